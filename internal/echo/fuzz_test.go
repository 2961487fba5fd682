package echo

import (
	"reflect"
	"testing"

	"github.com/weftrpc/weft/codec"
)

// FuzzRecordDecoder feeds arbitrary bytes to the generated decoder of Record. Decoding never
// panics, allocates within the codec's budget, and what decodes re-encodes to bytes that decode
// to the same value.
func FuzzRecordDecoder(f *testing.F) {
	for _, n := range []int{0, 1, 3} {
		enc := codec.NewEncoder(nil)
		weft_enc_Record(enc, record(n))
		f.Add(enc.Data())
	}
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, data []byte) {
		var got Record
		var err error
		allocated := measureAlloc(func() {
			dec := codec.NewDecoder(data)
			got = weft_dec_Record(dec)
			err = dec.Finish()
		})
		if limit := uint64(64*len(data) + 64<<10); allocated > limit {
			t.Fatalf("decoding %d bytes allocated %d bytes, budget %d", len(data), allocated, limit)
		}
		if err != nil {
			return
		}
		enc := codec.NewEncoder(nil)
		weft_enc_Record(enc, got)
		dec := codec.NewDecoder(enc.Data())
		again := weft_dec_Record(dec)
		if err := dec.Finish(); err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if !reflect.DeepEqual(got, again) {
			t.Fatalf("round trip changed the record:\n%+v\n%+v", got, again)
		}
	})
}
