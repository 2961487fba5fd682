package codec_test

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/weftrpc/weft/codec"
)

// The values that FuzzDecoder reads, FuzzRoundTrip writes, and the truncation test cuts: one of
// every kind the Encoder and Decoder handle.

// tree is a recursive value, decoded with Enter and Leave.
type tree struct {
	Label string
	Kids  []*tree
}

// blob travels by Encoder.Binary; it implements only MarshalBinary.
type blob []byte

func (b blob) MarshalBinary() ([]byte, error) { return b, nil }

func (b *blob) UnmarshalBinary(p []byte) error {
	*b = append(blob(nil), p...)
	return nil
}

type myInt16 int16

type record struct {
	B    bool
	U8   uint8
	U16  uint16
	U32  uint32
	U64  uint64
	U    uint
	Up   uintptr
	I8   int8
	I16  int16
	I32  int32
	I64  int64
	I    int
	F32  float32
	F64  float64
	S    string
	Bs   []byte
	SS   [][]string // nested Len loops
	T    time.Time
	D    time.Duration
	Bin  blob
	I8s  []int8
	I16s []int16
	I32s []int32
	I64s []int64
	U8s  []uint8
	U16s []uint16
	U32s []uint32
	U64s []uint64
	F32s []float32
	F64s []float64
	My   []myInt16
	Ints []int
	Uns  []uint
	Ups  []uintptr
	Tree *tree
	Err  error // last: its encoding is not canonical (see checkErrorReencode)
}

// encodeHead encodes the fields before T.
func encodeHead(e *codec.Encoder, r *record) {
	e.Bool(r.B)
	e.Uint8(r.U8)
	e.Uint16(r.U16)
	e.Uint32(r.U32)
	e.Uint64(r.U64)
	e.Uint(r.U)
	e.Uintptr(r.Up)
	e.Int8(r.I8)
	e.Int16(r.I16)
	e.Int32(r.I32)
	e.Int64(r.I64)
	e.Int(r.I)
	e.Float32(r.F32)
	e.Float64(r.F64)
	e.String(r.S)
	e.Bytes(r.Bs)
	if r.SS == nil {
		e.Len(-1)
	} else {
		e.Len(len(r.SS))
		for _, ss := range r.SS {
			if ss == nil {
				e.Len(-1)
				continue
			}
			e.Len(len(ss))
			for _, s := range ss {
				e.String(s)
			}
		}
	}
}

// encodeTail encodes the fields between T and Err.
func encodeTail(e *codec.Encoder, r *record) {
	e.Duration(r.D)
	if err := e.Binary(r.Bin); err != nil {
		panic(err) // blob's MarshalBinary cannot fail
	}
	codec.AppendFixed(e, r.I8s)
	codec.AppendFixed(e, r.I16s)
	codec.AppendFixed(e, r.I32s)
	codec.AppendFixed(e, r.I64s)
	codec.AppendFixed(e, r.U8s)
	codec.AppendFixed(e, r.U16s)
	codec.AppendFixed(e, r.U32s)
	codec.AppendFixed(e, r.U64s)
	codec.AppendFixed(e, r.F32s)
	codec.AppendFixed(e, r.F64s)
	codec.AppendFixed(e, r.My)
	codec.AppendWords(e, r.Ints)
	codec.AppendWords(e, r.Uns)
	codec.AppendWords(e, r.Ups)
	encodeTree(e, r.Tree)
}

func encodeRecord(e *codec.Encoder, r *record) {
	encodeHead(e, r)
	e.Time(r.T)
	encodeTail(e, r)
	e.Error(r.Err)
}

func encodeTree(e *codec.Encoder, t *tree) {
	e.Bool(t != nil)
	if t == nil {
		return
	}
	e.String(t.Label)
	if t.Kids == nil {
		e.Len(-1)
		return
	}
	e.Len(len(t.Kids))
	for _, k := range t.Kids {
		encodeTree(e, k)
	}
}

// decodeRecord reads a record the way generated code would: lengths bounded by Len with the
// elements' minimum encoded size and memory size, pointers charged with Alloc, recursion
// bounded with Enter.
func decodeRecord(d *codec.Decoder) record {
	var r record
	r.B = d.Bool()
	r.U8 = d.Uint8()
	r.U16 = d.Uint16()
	r.U32 = d.Uint32()
	r.U64 = d.Uint64()
	r.U = d.Uint()
	r.Up = d.Uintptr()
	r.I8 = d.Int8()
	r.I16 = d.Int16()
	r.I32 = d.Int32()
	r.I64 = d.Int64()
	r.I = d.Int()
	r.F32 = d.Float32()
	r.F64 = d.Float64()
	r.S = d.String()
	r.Bs = d.Bytes()
	if n := d.Len(1, int(unsafe.Sizeof([]string{}))); n >= 0 {
		r.SS = make([][]string, n)
		for i := range r.SS {
			if m := d.Len(1, int(unsafe.Sizeof(""))); m >= 0 {
				r.SS[i] = make([]string, m)
				for j := range r.SS[i] {
					r.SS[i][j] = d.String()
				}
			}
		}
	}
	r.T = d.Time()
	r.D = d.Duration()
	d.Binary(&r.Bin)
	r.I8s = codec.DecodeFixed[int8](d)
	r.I16s = codec.DecodeFixed[int16](d)
	r.I32s = codec.DecodeFixed[int32](d)
	r.I64s = codec.DecodeFixed[int64](d)
	r.U8s = codec.DecodeFixed[uint8](d)
	r.U16s = codec.DecodeFixed[uint16](d)
	r.U32s = codec.DecodeFixed[uint32](d)
	r.U64s = codec.DecodeFixed[uint64](d)
	r.F32s = codec.DecodeFixed[float32](d)
	r.F64s = codec.DecodeFixed[float64](d)
	r.My = codec.DecodeFixed[myInt16](d)
	r.Ints = codec.DecodeWords[int](d)
	r.Uns = codec.DecodeWords[uint](d)
	r.Ups = codec.DecodeWords[uintptr](d)
	r.Tree = decodeTree(d)
	r.Err = d.Error()
	return r
}

func decodeTree(d *codec.Decoder) *tree {
	if !d.Bool() {
		return nil
	}
	if !d.Enter() {
		return nil
	}
	defer d.Leave()
	if !d.Alloc(int(unsafe.Sizeof(tree{}))) {
		return nil
	}
	t := &tree{Label: d.String()}
	// A present kid encodes to at least 3 bytes, an absent one to 1.
	if n := d.Len(1, int(unsafe.Sizeof(&tree{}))); n >= 0 {
		t.Kids = make([]*tree, n)
		for i := range t.Kids {
			t.Kids[i] = decodeTree(d)
		}
	}
	return t
}

// recordDiff describes how got differs from want: floats compare by bits (NaN payloads
// included), times by instant and zone offset, errors by describeError, and slices by
// reflect.DeepEqual so that nil and empty differ (except the Binary blob, whose encoding does
// not keep them apart).
func recordDiff(want, got *record, wantOffset int) []string {
	var diffs []string
	add := func(field string, w, g any) {
		diffs = append(diffs, fmt.Sprintf("%s: got %#v, want %#v", field, g, w))
	}
	if math.Float32bits(got.F32) != math.Float32bits(want.F32) {
		add("F32 bits", math.Float32bits(want.F32), math.Float32bits(got.F32))
	}
	if math.Float64bits(got.F64) != math.Float64bits(want.F64) {
		add("F64 bits", math.Float64bits(want.F64), math.Float64bits(got.F64))
	}
	if !reflect.DeepEqual(float32Bits(got.F32s), float32Bits(want.F32s)) {
		add("F32s bits", float32Bits(want.F32s), float32Bits(got.F32s))
	}
	if !reflect.DeepEqual(float64Bits(got.F64s), float64Bits(want.F64s)) {
		add("F64s bits", float64Bits(want.F64s), float64Bits(got.F64s))
	}
	if !got.T.Equal(want.T) {
		add("T", want.T.String(), got.T.String())
	}
	if _, off := got.T.Zone(); off != wantOffset {
		add("T zone offset", wantOffset, off)
	}
	if !bytes.Equal(got.Bin, want.Bin) {
		add("Bin", want.Bin, got.Bin)
	}
	if g, w := describeError(got.Err), describeError(want.Err); g != w {
		add("Err", w, g)
	}
	w, g := *want, *got
	for _, r := range []*record{&w, &g} {
		r.F32, r.F64, r.F32s, r.F64s, r.T, r.Bin, r.Err = 0, 0, nil, nil, time.Time{}, nil, nil
	}
	if !reflect.DeepEqual(g, w) {
		v, gv := reflect.ValueOf(w), reflect.ValueOf(g)
		for i := range v.NumField() {
			if !reflect.DeepEqual(gv.Field(i).Interface(), v.Field(i).Interface()) {
				add(v.Type().Field(i).Name, v.Field(i).Interface(), gv.Field(i).Interface())
			}
		}
	}
	return diffs
}

func float32Bits(s []float32) []uint32 {
	if s == nil {
		return nil
	}
	b := make([]uint32, len(s))
	for i, f := range s {
		b[i] = math.Float32bits(f)
	}
	return b
}

func float64Bits(s []float64) []uint64 {
	if s == nil {
		return nil
	}
	b := make([]uint64, len(s))
	for i, f := range s {
		b[i] = math.Float64bits(f)
	}
	return b
}

// Errors that FuzzErrors and FuzzRoundTrip send: a sentinel and a typed error with a cause.
var errFuzzSentinel = errors.New("fuzz sentinel")

type fuzzError struct {
	Code  int32
	Msg   string
	Cause error
}

func (e *fuzzError) Error() string { return e.Msg }
func (e *fuzzError) Unwrap() error { return e.Cause }

func init() {
	codec.RegisterSentinel("codec_test.errFuzzSentinel", errFuzzSentinel)
	codec.RegisterErrorType("codec_test.fuzzError",
		func(e *codec.Encoder, err *fuzzError) {
			e.Int32(err.Code)
			e.String(err.Msg)
			e.Error(err.Cause)
		},
		func(d *codec.Decoder) *fuzzError {
			err := &fuzzError{Code: d.Int32()}
			err.Msg = d.String()
			err.Cause = d.Error()
			return err
		})
}

// describeError renders an error's tree as the codec sends it: a registered sentinel or typed
// error as itself, any other error as its message and the errors it wraps.
func describeError(err error) string {
	if err == nil {
		return "nil"
	}
	if err == errFuzzSentinel {
		return "S"
	}
	if e, ok := err.(*fuzzError); ok {
		return fmt.Sprintf("T(%d,%q)[%s]", e.Code, e.Msg, describeError(e.Cause))
	}
	wrapped := unwrapAll(err)
	parts := make([]string, len(wrapped))
	for i, w := range wrapped {
		parts[i] = describeError(w)
	}
	return fmt.Sprintf("R(%q)[%s]", err.Error(), strings.Join(parts, ","))
}

// unwrapAll returns the errors that err wraps, as the Encoder finds them.
func unwrapAll(err error) []error {
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		if w := u.Unwrap(); w != nil {
			return []error{w}
		}
	case interface{ Unwrap() []error }:
		return u.Unwrap()
	}
	return nil
}

// wrapCount counts the wrapped errors in a tree: the Encoder sends at most 64 in all, so a
// decoded tree with more is cut when it is sent again.
func wrapCount(err error) int {
	if err == nil || err == errFuzzSentinel {
		return 0
	}
	wrapped := unwrapAll(err)
	n := len(wrapped)
	for _, w := range wrapped {
		n += wrapCount(w)
	}
	return n
}

// checkErrorReencode checks that a decoded error, sent again, arrives with the same message,
// and with the same tree when sending it cuts nothing.
func checkErrorReencode(t *testing.T, got error) {
	t.Helper()
	e := codec.NewEncoder(nil)
	e.Error(got)
	d := codec.NewDecoder(e.Data())
	again := d.Error()
	if err := d.Finish(); err != nil {
		t.Fatalf("decoding a re-encoded error %s: %v", describeError(got), err)
	}
	if (got == nil) != (again == nil) {
		t.Fatalf("re-encoded error: got %v, want %v", again, got)
	}
	if got == nil {
		return
	}
	if got.Error() != again.Error() {
		t.Fatalf("re-encoded error message: got %q, want %q", again.Error(), got.Error())
	}
	if wrapCount(got) <= 64 {
		if g, w := describeError(again), describeError(got); g != w {
			t.Fatalf("re-encoded error: got %s, want %s", g, w)
		}
	}
}

// FuzzDecoder decodes arbitrary bytes as a record. Decoding never panics and stays within the
// allocation budget; when it succeeds, encoding the values again gives back the input bytes,
// except for the time (equal instant and offset) and the error (checkErrorReencode), whose
// encodings are not canonical.
func FuzzDecoder(f *testing.F) {
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		var r record
		var err error
		checkDecodeBudget(t, len(data), func() {
			d := codec.NewDecoder(data)
			r = decodeRecord(d)
			err = d.Finish()
		})
		// An owned decoder, whose one-byte slices alias the input, decodes the same.
		od := codec.NewOwnedDecoder(data)
		ro := decodeRecord(od)
		if oerr := od.Finish(); (oerr == nil) != (err == nil) {
			t.Fatalf("Finish: %v, but with an owned decoder: %v", err, oerr)
		}
		if err != nil {
			if !errors.Is(err, codec.ErrDecode) {
				t.Fatalf("Finish: got %v, want an error wrapping ErrDecode", err)
			}
			return
		}
		_, off := r.T.Zone()
		if diffs := recordDiff(&r, &ro, off); len(diffs) > 0 {
			t.Fatalf("an owned decoder decodes differently:\n%s", strings.Join(diffs, "\n"))
		}

		// Stable: the re-encoding decodes to the same values and encodes to itself.
		e := codec.NewEncoder(nil)
		encodeRecord(e, &r)
		d := codec.NewDecoder(e.Data())
		r2 := decodeRecord(d)
		if err := d.Finish(); err != nil {
			t.Fatalf("decoding the re-encoding: %v", err)
		}
		if diffs := recordDiff(&r, &r2, off); len(diffs) > 0 {
			t.Fatalf("re-encoded record differs:\n%s", strings.Join(diffs, "\n"))
		}
		e2 := codec.NewEncoder(nil)
		encodeRecord(e2, &r2)
		if !bytes.Equal(e2.Data(), e.Data()) {
			t.Fatalf("encoding is not stable:\n got %x\nwant %x", e2.Data(), e.Data())
		}
		checkErrorReencode(t, r.Err)

		// Exact: the bytes before the time, and those between the time and the error, are the
		// input's.
		head := codec.NewEncoder(nil)
		encodeHead(head, &r)
		h := head.Data()
		if !bytes.HasPrefix(data, h) {
			t.Fatalf("re-encoding differs from the input before the time:\n got %x\nwant %x", h, data[:min(len(h), len(data))])
		}
		tEnd := len(h) + 1 + int(data[len(h)])
		tail := codec.NewEncoder(nil)
		encodeTail(tail, &r)
		if !bytes.HasPrefix(data[tEnd:], tail.Data()) {
			rest := data[tEnd:]
			t.Fatalf("re-encoding differs from the input between the time and the error:\n got %x\nwant %x", tail.Data(), rest[:min(len(tail.Data()), len(rest))])
		}
	})
}

// FuzzRoundTrip builds a record from the fuzzer's values, encodes it, and checks that it
// decodes to an equal record within the allocation budget.
func FuzzRoundTrip(f *testing.F) {
	f.Add(false, int64(0), uint64(0), float32(0), float64(0), "", []byte(nil), int64(0), uint32(0), int32(0), uint8(0))
	f.Fuzz(func(t *testing.T, b bool, i int64, u uint64, f32 float32, f64 float64, s string, bs []byte, sec int64, nsec uint32, off int32, shape uint8) {
		r, wantOffset := makeRecord(b, i, u, f32, f64, s, bs, sec, nsec, off, shape)
		e := codec.NewEncoder(nil)
		encodeRecord(e, &r)
		data := e.Data()
		var got record
		var err error
		checkDecodeBudget(t, len(data), func() {
			d := codec.NewDecoder(data)
			got = decodeRecord(d)
			err = d.Finish()
		})
		if err != nil {
			t.Fatalf("decoding an encoded record: %v", err)
		}
		if diffs := recordDiff(&r, &got, wantOffset); len(diffs) > 0 {
			t.Fatalf("decoded record differs:\n%s", strings.Join(diffs, "\n"))
		}
		if r.Err != nil && got.Err.Error() != r.Err.Error() {
			t.Errorf("error message: got %q, want %q", got.Err.Error(), r.Err.Error())
		}
	})
}

// makeRecord spreads the fuzzer's values over every field of a record; shape's bits choose nil
// or empty slices, the tree's depth and the error's kind. It returns the zone offset the
// decoded time must have: the time's own, or 0 when the codec must fall back to UTC.
func makeRecord(b bool, i int64, u uint64, f32 float32, f64 float64, s string, bs []byte, sec int64, nsec uint32, off int32, shape uint8) (record, int) {
	r := record{
		B: b, U8: uint8(u), U16: uint16(u >> 8), U32: uint32(u >> 16), U64: u, U: uint(u >> 1), Up: uintptr(u >> 3),
		I8: int8(i), I16: int16(i >> 8), I32: int32(i >> 16), I64: i, I: int(i >> 1),
		F32: f32, F64: f64, S: s, Bs: bs, D: time.Duration(i ^ int64(u)),
		Bin: blob(bs),
	}
	if shape&1 == 0 || len(bs) > 0 {
		r.Bs = append([]byte{}, bs...) // else nil
	}
	if shape&2 != 0 {
		r.SS = [][]string{}
		for _, group := range strings.Split(s, ";") {
			if group == "nil" {
				r.SS = append(r.SS, nil)
				continue
			}
			r.SS = append(r.SS, strings.Split(group, ","))
		}
	}
	// Numbers from bs: every Fixed and Word kind, NaN payloads and all.
	le := func(p []byte) uint64 {
		var v uint64
		for k := len(p) - 1; k >= 0; k-- {
			v = v<<8 | uint64(p[k])
		}
		return v
	}
	chunks := func(size int) [][]byte {
		if shape&4 != 0 && len(bs) < size {
			return nil
		}
		out := [][]byte{}
		for k := 0; k+size <= len(bs); k += size {
			out = append(out, bs[k:k+size])
		}
		return out
	}
	for _, c := range chunks(1) {
		r.I8s = append(r.I8s, int8(c[0]))
		r.U8s = append(r.U8s, c[0])
	}
	for _, c := range chunks(2) {
		r.I16s = append(r.I16s, int16(le(c)))
		r.U16s = append(r.U16s, uint16(le(c)))
		r.My = append(r.My, myInt16(le(c)))
	}
	for _, c := range chunks(4) {
		r.I32s = append(r.I32s, int32(le(c)))
		r.U32s = append(r.U32s, uint32(le(c)))
		r.F32s = append(r.F32s, math.Float32frombits(uint32(le(c))))
	}
	for _, c := range chunks(8) {
		r.I64s = append(r.I64s, int64(le(c)))
		r.U64s = append(r.U64s, le(c))
		r.F64s = append(r.F64s, math.Float64frombits(le(c)))
		r.Ints = append(r.Ints, int(le(c)))
		r.Uns = append(r.Uns, uint(le(c)))
		r.Ups = append(r.Ups, uintptr(le(c)))
	}
	if shape&4 == 0 { // empty, not nil, when bs is too short
		for _, p := range []any{&r.I8s, &r.U8s, &r.I16s, &r.U16s, &r.My, &r.I32s, &r.U32s, &r.F32s, &r.I64s, &r.U64s, &r.F64s, &r.Ints, &r.Uns, &r.Ups} {
			v := reflect.ValueOf(p).Elem()
			if v.IsNil() {
				v.Set(reflect.MakeSlice(v.Type(), 0, 0))
			}
		}
	}

	// A chain of trees, the last with nil or empty kids.
	if depth := int(shape>>3) & 7; depth > 0 {
		r.Tree = &tree{Label: s}
		cur := r.Tree
		for k := 1; k < depth; k++ {
			next := &tree{Label: fmt.Sprint(k)}
			cur.Kids = []*tree{nil, next}
			cur = next
		}
		if shape&1 != 0 {
			cur.Kids = []*tree{}
		}
	}

	switch shape >> 6 {
	case 1:
		r.Err = errFuzzSentinel
	case 2:
		r.Err = fmt.Errorf("%s: %w", s, errFuzzSentinel)
	case 3:
		r.Err = &fuzzError{Code: int32(i), Msg: s, Cause: errors.Join(errors.New(s), errFuzzSentinel)}
	}

	// The time: any instant, in a zone with any offset. Encoder.Time falls back to UTC where
	// time.Time.AppendBinary fails: for offsets whose whole minutes are -1 (the format's mark
	// for UTC) or do not fit an int16. Offsets with seconds use the format's version 2.
	r.T = time.Unix(sec, int64(nsec%1e9)).In(time.FixedZone("", int(off)))
	wantOffset := int(off)
	if m := int(off) / 60; m == -1 || m < math.MinInt16 || m > math.MaxInt16 {
		wantOffset = 0
	}
	return r, wantOffset
}

// FuzzErrors decodes arbitrary bytes as an error: it never panics, stays within the allocation
// budget, and an error it decodes arrives again with the same message when sent.
func FuzzErrors(f *testing.F) {
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, data []byte) {
		var got, err error
		checkDecodeBudget(t, len(data), func() {
			d := codec.NewDecoder(data)
			got = d.Error()
			err = d.Finish()
		})
		if err != nil {
			if !errors.Is(err, codec.ErrDecode) {
				t.Fatalf("Finish: got %v, want an error wrapping ErrDecode", err)
			}
			return
		}
		checkErrorReencode(t, got)
	})
}
