package codec

import (
	"encoding/binary"
	"unsafe"
)

// Fixed is the set of number types whose size is the same on every platform. Slices of them
// are encoded and decoded by [AppendFixed] and [DecodeFixed] with one copy.
type Fixed interface {
	~int8 | ~int16 | ~int32 | ~int64 | ~uint8 | ~uint16 | ~uint32 | ~uint64 | ~float32 | ~float64
}

// Word is the set of integer types whose size depends on the platform; they are encoded as 8
// bytes each by [AppendWords] and [DecodeWords].
type Word interface {
	~int | ~uint | ~uintptr
}

// littleEndian reports whether this machine stores numbers little-endian, as the encoding does.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// raw returns the memory of s as bytes.
func raw[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(s))), len(s)*int(unsafe.Sizeof(s[0])))
}

// swap reverses the bytes of every size-byte element of b, converting between this machine's
// byte order and the encoding's on big-endian machines.
func swap(b []byte, size int) {
	for i := 0; i+size <= len(b); i += size {
		e := b[i : i+size]
		for j, k := 0, size-1; j < k; j, k = j+1, k-1 {
			e[j], e[k] = e[k], e[j]
		}
	}
}

// AppendFixed encodes a slice of fixed-size numbers (nil distinct from empty) with one copy.
func AppendFixed[T Fixed](e *Encoder, s []T) {
	if s == nil {
		e.Len(-1)
		return
	}
	e.Len(len(s))
	start := len(e.buf)
	e.buf = append(e.buf, raw(s)...)
	if !littleEndian {
		var zero T
		swap(e.buf[start:], int(unsafe.Sizeof(zero)))
	}
}

// DecodeFixed decodes a slice encoded by [AppendFixed] with one copy, or, for one-byte types
// and a Decoder from [NewOwnedDecoder], none: the result then aliases the input.
func DecodeFixed[T Fixed](d *Decoder) []T {
	var zero T
	size := int(unsafe.Sizeof(zero))
	if size == 1 && d.alias {
		n := d.Len(1, 0)
		if n < 0 {
			return nil
		}
		b := d.next(n)
		if len(b) == 0 {
			return []T{}
		}
		return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(b))), n)
	}
	n := d.Len(size, size)
	if n < 0 {
		return nil
	}
	s := make([]T, n)
	dst := raw(s)
	copy(dst, d.next(len(dst)))
	if !littleEndian {
		swap(dst, size)
	}
	return s
}

// AppendWords encodes a slice of ints, uints or uintptrs (nil distinct from empty), 8 bytes
// each; on 64-bit little-endian machines with one copy.
func AppendWords[T Word](e *Encoder, s []T) {
	if s == nil {
		e.Len(-1)
		return
	}
	e.Len(len(s))
	var zero T
	if littleEndian && unsafe.Sizeof(zero) == 8 {
		e.buf = append(e.buf, raw(s)...)
		return
	}
	e.Grow(8 * len(s))
	for _, v := range s {
		e.Uint64(uint64(v))
	}
}

// DecodeWords decodes a slice encoded by [AppendWords]. On a 32-bit platform a value that does
// not fit is an error.
func DecodeWords[T Word](d *Decoder) []T {
	var zero T
	n := d.Len(8, int(unsafe.Sizeof(zero)))
	if n < 0 {
		return nil
	}
	s := make([]T, n)
	if littleEndian && unsafe.Sizeof(zero) == 8 {
		copy(raw(s), d.next(8*n))
		return s
	}
	for i := range s {
		v := d.Uint64()
		s[i] = T(v)
		if uint64(s[i]) != v && d.err == nil {
			d.fail("value %d overflows this platform's word", v)
		}
	}
	return s
}
