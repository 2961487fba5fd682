// Package codec has the name of weft's codec package.
package codec

// Frame crosses the wire.
type Frame struct {
	Seq  uint32
	Data []byte
}
