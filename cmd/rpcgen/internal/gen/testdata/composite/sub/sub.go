// Package sub declares types that a component of another package takes and returns.
package sub

// Vec is a struct of another package that crosses the wire.
type Vec struct {
	X, Y, Z float32
	Label   string
	Meta    map[string][]int
}

// Grid is a named slice of another package's structs.
type Grid []Vec
