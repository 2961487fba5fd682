package codec_test

import (
	"fmt"
	"testing"
	"unsafe"

	"github.com/weftrpc/weft/codec"
)

var benchSizes = []struct {
	name  string
	bytes int
}{
	{"16B", 16},
	{"1KiB", 1 << 10},
	{"64KiB", 64 << 10},
	{"1MiB", 1 << 20},
}

func BenchmarkBytes(b *testing.B) {
	for _, size := range benchSizes {
		payload := make([]byte, size.bytes)
		for i := range payload {
			payload[i] = byte(i)
		}
		b.Run("encode/"+size.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size.bytes))
			e := codec.NewEncoder(make([]byte, 0, size.bytes+16))
			for b.Loop() {
				e.Reset(e.Data())
				e.Bytes(payload)
			}
		})
		b.Run("decode/"+size.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size.bytes))
			e := codec.NewEncoder(nil)
			e.Bytes(payload)
			var d codec.Decoder
			for b.Loop() {
				d.Reset(e.Data())
				if got := d.Bytes(); len(got) != size.bytes {
					b.Fatalf("decoded %d bytes, want %d", len(got), size.bytes)
				}
			}
			if err := d.Finish(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// benchNumbers compares AppendFixed and DecodeFixed with encoding and decoding element by
// element, as code without bulk copies would.
func benchNumbers[T int32 | float64](b *testing.B, encOne func(*codec.Encoder, T), decOne func(*codec.Decoder) T) {
	size := int(unsafe.Sizeof(T(0)))
	for _, sz := range benchSizes {
		s := make([]T, max(sz.bytes/size, 1))
		for i := range s {
			s[i] = T(i) / 3
		}
		bytes := int64(len(s) * size)
		eBulk := codec.NewEncoder(nil)
		codec.AppendFixed(eBulk, s)
		encoded := eBulk.Data()

		b.Run("encode/bulk/"+sz.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(bytes)
			e := codec.NewEncoder(make([]byte, 0, len(encoded)))
			for b.Loop() {
				e.Reset(e.Data())
				codec.AppendFixed(e, s)
			}
		})
		b.Run("encode/loop/"+sz.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(bytes)
			e := codec.NewEncoder(make([]byte, 0, len(encoded)))
			for b.Loop() {
				e.Reset(e.Data())
				e.Len(len(s))
				for _, v := range s {
					encOne(e, v)
				}
			}
		})
		b.Run("decode/bulk/"+sz.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(bytes)
			var d codec.Decoder
			for b.Loop() {
				d.Reset(encoded)
				if got := codec.DecodeFixed[T](&d); len(got) != len(s) {
					b.Fatalf("decoded %d elements, want %d", len(got), len(s))
				}
			}
		})
		b.Run("decode/loop/"+sz.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(bytes)
			var d codec.Decoder
			for b.Loop() {
				d.Reset(encoded)
				n := d.Len(size, size)
				got := make([]T, max(n, 0))
				for i := range got {
					got[i] = decOne(&d)
				}
				if len(got) != len(s) {
					b.Fatalf("decoded %d elements, want %d", len(got), len(s))
				}
			}
		})
	}
}

func BenchmarkFloat64s(b *testing.B) {
	benchNumbers(b, (*codec.Encoder).Float64, (*codec.Decoder).Float64)
}

func BenchmarkInt32s(b *testing.B) {
	benchNumbers(b, (*codec.Encoder).Int32, (*codec.Decoder).Int32)
}

// A struct-heavy argument, with the marshalling code rpcgen would generate written by hand.
type benchItem struct {
	Name  string
	Tags  []string
	Count int64
	Score float64
}

type benchDoc struct {
	ID      string
	Owner   string
	Version int32
	Created int64
	Payload []byte
	Items   []benchItem
}

func (doc *benchDoc) encode(e *codec.Encoder) {
	e.String(doc.ID)
	e.String(doc.Owner)
	e.Int32(doc.Version)
	e.Int64(doc.Created)
	e.Bytes(doc.Payload)
	if doc.Items == nil {
		e.Len(-1)
		return
	}
	e.Len(len(doc.Items))
	for i := range doc.Items {
		it := &doc.Items[i]
		e.String(it.Name)
		if it.Tags == nil {
			e.Len(-1)
		} else {
			e.Len(len(it.Tags))
			for _, tag := range it.Tags {
				e.String(tag)
			}
		}
		e.Int64(it.Count)
		e.Float64(it.Score)
	}
}

func (doc *benchDoc) decode(d *codec.Decoder) {
	doc.ID = d.String()
	doc.Owner = d.String()
	doc.Version = d.Int32()
	doc.Created = d.Int64()
	doc.Payload = d.Bytes()
	doc.Items = nil
	// An item encodes to at least 1+1+8+8 bytes.
	if n := d.Len(18, int(unsafe.Sizeof(benchItem{}))); n >= 0 {
		doc.Items = make([]benchItem, n)
		for i := range doc.Items {
			it := &doc.Items[i]
			it.Name = d.String()
			if m := d.Len(1, int(unsafe.Sizeof(""))); m >= 0 {
				it.Tags = make([]string, m)
				for j := range it.Tags {
					it.Tags[j] = d.String()
				}
			}
			it.Count = d.Int64()
			it.Score = d.Float64()
		}
	}
}

func makeBenchDoc(items int) *benchDoc {
	doc := &benchDoc{ID: "doc-0123456789", Owner: "someone@example.com", Version: 3, Created: 1700000000, Payload: make([]byte, 16*items)}
	for i := range items {
		doc.Items = append(doc.Items, benchItem{
			Name:  fmt.Sprintf("item-%d", i),
			Tags:  []string{"alpha", "beta", fmt.Sprint(i % 7)},
			Count: int64(i),
			Score: float64(i) / 7,
		})
	}
	return doc
}

func BenchmarkStruct(b *testing.B) {
	for _, items := range []int{0, 16, 1024, 16384} {
		doc := makeBenchDoc(items)
		e := codec.NewEncoder(nil)
		doc.encode(e)
		encoded := e.Data()
		name := fmt.Sprintf("items=%d,%dB", items, len(encoded))
		b.Run("encode/"+name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(encoded)))
			e := codec.NewEncoder(make([]byte, 0, len(encoded)))
			for b.Loop() {
				e.Reset(e.Data())
				doc.encode(e)
			}
		})
		b.Run("decode/"+name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(encoded)))
			var d codec.Decoder
			var got benchDoc
			for b.Loop() {
				d.Reset(encoded)
				got.decode(&d)
				if err := d.Finish(); err != nil {
					b.Fatal(err)
				}
			}
			if len(got.Items) != items {
				b.Fatalf("decoded %d items, want %d", len(got.Items), items)
			}
		})
	}
}

// TestBenchDoc checks the benchmarks' hand-written marshalling.
func TestBenchDoc(t *testing.T) {
	for _, items := range []int{0, 3} {
		want := makeBenchDoc(items)
		e := codec.NewEncoder(nil)
		want.encode(e)
		d := codec.NewDecoder(e.Data())
		var got benchDoc
		got.decode(d)
		if err := d.Finish(); err != nil {
			t.Fatalf("%d items: %v", items, err)
		}
		if fmt.Sprint(got) != fmt.Sprint(*want) || (got.Items == nil) != (want.Items == nil) {
			t.Errorf("%d items: got %+v, want %+v", items, got, *want)
		}
	}
}
