// Package sub has an exported struct whose exported field has an unexported type.
package sub

type Outer struct {
	In inner
}

type inner struct {
	X int
}
