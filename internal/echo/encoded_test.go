package echo

import "github.com/weftrpc/weft/codec"

// newEncoded returns the arguments of Echo(b) as the client stub encodes them.
func newEncoded(b []byte) []byte {
	enc := codec.NewEncoder(nil)
	codec.AppendFixed(enc, b)
	return enc.Data()
}
