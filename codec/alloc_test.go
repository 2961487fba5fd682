//go:build !race

package codec_test

import (
	"math"
	"runtime"
	"testing"
	"time"

	"github.com/weftrpc/weft/codec"
)

// The allocation budget of a Decoder, as the package documents it: decoding n input bytes
// allocates at most budgetFactor*n + budgetSlack bytes (codec.go's constants).
const (
	budgetFactor = 64
	budgetSlack  = 64 << 10
)

// allocatedBy returns the bytes of heap memory allocated while f runs. It counts every
// goroutine's allocations: tests that use it do not run in parallel.
func allocatedBy(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// checkDecodeBudget runs decode, which decodes inputLen bytes, and fails t if it allocated more
// than the decoder's budget for them. Under the race detector (alloc_race_test.go) it only runs
// decode.
func checkDecodeBudget(t testing.TB, inputLen int, decode func()) {
	t.Helper()
	got := allocatedBy(decode)
	if limit := uint64(budgetFactor*inputLen + budgetSlack); got > limit {
		t.Errorf("decoding %d bytes allocated %d bytes, want at most %d", inputLen, got, limit)
	}
}

// TestAllocsPerRun pins the number of allocations of the hot paths: encoding into a reused
// buffer allocates nothing, and decoding allocates only the values it returns, one allocation
// each.
func TestAllocsPerRun(t *testing.T) {
	payload := make([]byte, 4096)
	floats := make([]float64, 512)
	ints := make([]int, 64)
	stamp := time.Date(2024, 2, 29, 12, 0, 0, 5, time.UTC)
	e := codec.NewEncoder(make([]byte, 0, 1<<16))
	var atString, atBytes, atTime, atFixed, atWords int
	encodeAll := func() {
		e.Reset(e.Data())
		e.Bool(true)
		e.Uint8(1)
		e.Uint16(2)
		e.Uint32(3)
		e.Uint64(4)
		e.Uint(5)
		e.Uintptr(6)
		e.Int8(-1)
		e.Int16(-2)
		e.Int32(-3)
		e.Int64(-4)
		e.Int(-5)
		e.Float32(1.5)
		e.Float64(math.Pi)
		atString = len(e.Data())
		e.String("a string of some length")
		atBytes = len(e.Data())
		e.Bytes(payload)
		e.Len(3)
		atTime = len(e.Data())
		e.Time(stamp)
		e.Duration(time.Second)
		atFixed = len(e.Data())
		codec.AppendFixed(e, floats)
		atWords = len(e.Data())
		codec.AppendWords(e, ints)
		e.Error(nil)
	}
	encodeAll()
	data := append([]byte(nil), e.Data()...)
	var d codec.Decoder

	tests := []struct {
		name string
		f    func()
		want float64
	}{
		{"encode everything into a reused buffer", encodeAll, 0},
		{"decode numbers", func() {
			d.Reset(data)
			d.Bool()
			d.Uint8()
			d.Uint16()
			d.Uint32()
			d.Uint64()
			d.Uint()
			d.Uintptr()
			d.Int8()
			d.Int16()
			d.Int32()
			d.Int64()
			d.Int()
			d.Float32()
			d.Float64()
		}, 0},
		{"decode a string", func() { d.Reset(data[atString:]); _ = d.String() }, 1},
		{"decode bytes", func() { d.Reset(data[atBytes:]); _ = d.Bytes() }, 1},
		{"decode a UTC time", func() { d.Reset(data[atTime:]); _ = d.Time() }, 0},
		{"decode fixed", func() { d.Reset(data[atFixed:]); _ = codec.DecodeFixed[float64](&d) }, 1},
		{"decode words", func() { d.Reset(data[atWords:]); _ = codec.DecodeWords[int](&d) }, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := testing.AllocsPerRun(100, tt.f); got != tt.want {
				t.Errorf("got %v allocations, want %v", got, tt.want)
			}
			if err := d.Err(); err != nil {
				t.Errorf("decoding failed: %v", err)
			}
		})
	}
}

// TestOwnedDecoderDoesNotCopy checks that decoding []byte from an owned decoder allocates no copy.
func TestOwnedDecoderDoesNotCopy(t *testing.T) {
	e := codec.NewEncoder(nil)
	e.Bytes(make([]byte, 64<<10))
	data := e.Data()
	var n int
	got := allocatedBy(func() {
		d := codec.NewOwnedDecoder(data)
		n = len(d.Bytes())
	})
	if n != 64<<10 || got >= 1<<10 {
		t.Errorf("decoding 64 KiB from an owned decoder: got %d bytes, allocated %d bytes, want under 1 KiB", n, got)
	}
}

// TestBudgetMeasured checks that the budget helper itself notices an allocation beyond the
// budget, so that passing budget checks mean something.
func TestBudgetMeasured(t *testing.T) {
	var sink []byte
	got := allocatedBy(func() { sink = make([]byte, 1<<20) })
	if got < 1<<20 {
		t.Errorf("allocatedBy(make 1 MiB) = %d, want at least %d", got, 1<<20)
	}
	_ = sink
}
