// Package testkit is the test tooling shared by weft's packages.
//
// It holds an independent implementation of the wire format described in DESIGN.md (a "foreign
// peer" that does not share code with package call and can write both valid and deliberately
// invalid bytes), a raw protocol peer built on it, fault-injecting and recording connections, an
// in-memory listener and endpoint usable inside a testing/synctest bubble, certificates generated
// at test time, the matrix of transports tests run over, and the goroutine leak check.
//
// Package testkit must not import package call: call's tests import testkit.
package testkit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Wire constants, as specified in the "Wire format" section of DESIGN.md.
const (
	// Magic is the four bytes every hello starts with.
	Magic = "WEFT"
	// Version is the protocol version this package speaks.
	Version = 1
	// HelloPrefixSize is the size of the fixed part of a hello: magic, version, features and
	// the length of the rest.
	HelloPrefixSize = 8
	// HelloRestSize is the size of the fields of a hello after its prefix: the minimum value of
	// the hello's rest length.
	HelloRestSize = 28
	// MaxHelloRest is the largest rest length a hello may declare.
	MaxHelloRest = 1024
	// HeaderSize is the size of a frame header.
	HeaderSize = 16
	// CallHeaderSize is the size of a call header without its optional sections.
	CallHeaderSize = 29
	// ReplyHeaderSize is the size of a reply header.
	ReplyHeaderSize = 8
	// ErrorBodySize is the size of an error body without its message.
	ErrorBodySize = 8
)

// Frame types.
const (
	// TypeCall starts a request: call header, then the first bytes of the request.
	TypeCall = 0x01
	// TypeData carries more bytes of a request or a reply.
	TypeData = 0x02
	// TypeCancel cancels a request; its payload is empty.
	TypeCancel = 0x03
	// TypeReply starts a reply: reply header, then the first bytes of the reply.
	TypeReply = 0x04
	// TypeError ends a call with an error body.
	TypeError = 0x05
	// TypePing asks the peer for a PONG with the same id.
	TypePing = 0x06
	// TypePong answers a PING.
	TypePong = 0x07
	// TypeGoAway tells the client the server accepts no more calls; its id is the last accepted
	// request id and its payload a close code and a message.
	TypeGoAway = 0x08
)

// FlagEnd marks the last frame of a message (CALL, DATA, REPLY). It is the only defined frame
// flag.
const FlagEnd = 0x01

// Call header flags.
const (
	// CallDeadline marks a call header that carries a deadline.
	CallDeadline = 0x01
	// CallTrace marks a call header that carries a trace context.
	CallTrace = 0x02
	// CallMetadata marks a call header that carries metadata.
	CallMetadata = 0x04
)

// Error codes of an error body.
const (
	// CodeRefused is the code of a refused call: overloaded, draining or over the concurrency limit.
	CodeRefused = 1
	// CodeUnknownMethod is the code of a call to a method key with no handler.
	CodeUnknownMethod = 2
	// CodeSignatureMismatch is the code of a call whose signature digest is not the handler's.
	CodeSignatureMismatch = 3
	// CodeTooLarge is the code of a call whose message, metadata or tracestate is too large.
	CodeTooLarge = 4
	// CodeDeadline is the code of a call whose deadline was exceeded.
	CodeDeadline = 5
	// CodeCanceled is the code of a cancelled call.
	CodeCanceled = 6
	// CodeHandlerFailed is the code of a call whose handler returned an error.
	CodeHandlerFailed = 7
	// CodePanic is the code of a call whose handler panicked.
	CodePanic = 8
)

// ErrFlagNeverRan is the error body flag saying the handler was not started.
const ErrFlagNeverRan = 0x01

// Close codes of a GOAWAY payload.
const (
	// CloseDrain is the close code of a graceful drain.
	CloseDrain = 0
	// CloseProtocol is the close code of a protocol error.
	CloseProtocol = 1
	// CloseFlood is the close code of a peer that did not read its control frames or refusals.
	CloseFlood = 2
	// CloseIdle is the close code of an idle timeout.
	CloseIdle = 3
	// CloseStopping is the close code of a hard stop of the server.
	CloseStopping = 4
)

// Default limits from DESIGN.md, used by [ClientHello].
const (
	// DefaultMaxFrame is the default max frame size.
	DefaultMaxFrame = 64 << 10
	// DefaultMaxMessage is the default max message size.
	DefaultMaxMessage = 4 << 20
	// DefaultBudget is the default buffered-bytes budget.
	DefaultBudget = 16 << 20
	// DefaultMaxMetadataBytes is the default max metadata bytes per call.
	DefaultMaxMetadataBytes = 8 << 10
	// DefaultMaxMetadataEntries is the default max metadata entries per call.
	DefaultMaxMetadataEntries = 64
	// DefaultMaxTracestate is the default max tracestate length.
	DefaultMaxTracestate = 512
)

// ErrMalformed is wrapped by every error the Parse functions of this package return for bytes
// that do not follow the wire format. Test for it with errors.Is.
var ErrMalformed = errors.New("testkit: malformed")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// Hello is a handshake message. Its zero value encodes a hello with every field zero and the
// correct magic; start from [ClientHello] for a valid one.
type Hello struct {
	Version  byte
	Features byte
	// RestLen is the declared length of the rest of the hello. 0 means [HelloRestSize] (28).
	// Encode pads a larger value with zero bytes and truncates the fields to a smaller one.
	RestLen uint16

	MaxFrame           uint32
	MaxMessage         uint32
	MaxConcurrent      uint32
	Budget             uint32
	MaxMetadataBytes   uint32
	MaxMetadataEntries uint16
	MaxTracestate      uint16
	IdleTimeoutMillis  uint32

	// Magic is written verbatim in place of the magic; "" means [Magic]. A string that is not
	// four bytes long shifts every following field, producing a malformed hello.
	Magic string
}

// ClientHello returns the hello of a client with DESIGN.md's default limits: max frame 64 KiB,
// max message 4 MiB, concurrency 0, budget 16 MiB, metadata 8192 bytes and 64 entries, tracestate
// 512 bytes, no idle timeout.
func ClientHello() Hello {
	return Hello{
		Version:            Version,
		MaxFrame:           DefaultMaxFrame,
		MaxMessage:         DefaultMaxMessage,
		Budget:             DefaultBudget,
		MaxMetadataBytes:   DefaultMaxMetadataBytes,
		MaxMetadataEntries: DefaultMaxMetadataEntries,
		MaxTracestate:      DefaultMaxTracestate,
	}
}

// Encode returns the wire form of h: the magic, version, features and rest length, then
// h.RestLen bytes (28 if RestLen is 0) holding the fields, padded with zeros or truncated.
func (h Hello) Encode() []byte {
	magic := h.Magic
	if magic == "" {
		magic = Magic
	}
	rest := int(h.RestLen)
	if rest == 0 {
		rest = HelloRestSize
	}
	b := make([]byte, 0, len(magic)+4+max(rest, HelloRestSize))
	b = append(b, magic...)
	b = append(b, h.Version, h.Features)
	b = binary.BigEndian.AppendUint16(b, uint16(rest))
	start := len(b)
	b = binary.BigEndian.AppendUint32(b, h.MaxFrame)
	b = binary.BigEndian.AppendUint32(b, h.MaxMessage)
	b = binary.BigEndian.AppendUint32(b, h.MaxConcurrent)
	b = binary.BigEndian.AppendUint32(b, h.Budget)
	b = binary.BigEndian.AppendUint32(b, h.MaxMetadataBytes)
	b = binary.BigEndian.AppendUint16(b, h.MaxMetadataEntries)
	b = binary.BigEndian.AppendUint16(b, h.MaxTracestate)
	b = binary.BigEndian.AppendUint32(b, h.IdleTimeoutMillis)
	if rest < HelloRestSize {
		return b[:start+rest]
	}
	return append(b, make([]byte, rest-HelloRestSize)...)
}

// HelloRestLen returns the rest length declared by the 8-byte hello prefix b, the number of bytes
// to read after it. It does not validate the prefix.
//
// REQUIRES: len(b) >= HelloPrefixSize.
func HelloRestLen(b []byte) int { return int(binary.BigEndian.Uint16(b[6:8])) }

// ParseHello parses a hello: its 8-byte prefix then the rest length it declares. Bytes after the
// hello are ignored. The returned RestLen is the declared length and Magic is the magic read.
//
// An error (wrapping [ErrMalformed]) is returned if b is too short, the magic is not [Magic], or
// the rest length is outside [28, 1024]; the Hello then holds the fields that could be read. A
// version other than [Version] is not an error: check h.Version.
func ParseHello(b []byte) (Hello, error) {
	h, _, err := SplitHello(b)
	return h, err
}

// SplitHello is [ParseHello] that also returns the bytes after the hello, for example the frames
// of a recorded client stream.
func SplitHello(b []byte) (Hello, []byte, error) {
	var h Hello
	if len(b) < HelloPrefixSize {
		return h, nil, malformed("hello: %d bytes, want at least %d", len(b), HelloPrefixSize)
	}
	h.Magic = string(b[:4])
	h.Version = b[4]
	h.Features = b[5]
	h.RestLen = binary.BigEndian.Uint16(b[6:8])
	rest := b[HelloPrefixSize:]
	if len(rest) >= HelloRestSize {
		h.MaxFrame = binary.BigEndian.Uint32(rest[0:])
		h.MaxMessage = binary.BigEndian.Uint32(rest[4:])
		h.MaxConcurrent = binary.BigEndian.Uint32(rest[8:])
		h.Budget = binary.BigEndian.Uint32(rest[12:])
		h.MaxMetadataBytes = binary.BigEndian.Uint32(rest[16:])
		h.MaxMetadataEntries = binary.BigEndian.Uint16(rest[20:])
		h.MaxTracestate = binary.BigEndian.Uint16(rest[22:])
		h.IdleTimeoutMillis = binary.BigEndian.Uint32(rest[24:])
	}
	switch {
	case h.Magic != Magic:
		return h, nil, malformed("hello: magic %q, want %q", h.Magic, Magic)
	case h.RestLen < HelloRestSize || h.RestLen > MaxHelloRest:
		return h, nil, malformed("hello: rest length %d outside [%d, %d]", h.RestLen, HelloRestSize, MaxHelloRest)
	case len(rest) < int(h.RestLen):
		return h, nil, malformed("hello: %d bytes after the prefix, want %d", len(rest), h.RestLen)
	}
	return h, rest[h.RestLen:], nil
}

// Frame is one frame: a 16-byte header and a payload.
type Frame struct {
	Type     byte
	Flags    byte
	Reserved uint16
	ID       uint64
	Payload  []byte
	// Length, if not nil, is written as the payload length instead of len(Payload), to encode
	// a lying length prefix. Decoders of this package leave it nil.
	Length *uint32
}

// End reports whether f has the END flag.
func (f Frame) End() bool { return f.Flags&FlagEnd != 0 }

// String describes f for test failure messages.
func (f Frame) String() string {
	return fmt.Sprintf("{%s flags=%#02x id=%d len=%d}", TypeName(f.Type), f.Flags, f.ID, len(f.Payload))
}

// TypeName returns the DESIGN.md name of frame type t ("CALL", "DATA", ...), or its hex value.
func TypeName(t byte) string {
	switch t {
	case TypeCall:
		return "CALL"
	case TypeData:
		return "DATA"
	case TypeCancel:
		return "CANCEL"
	case TypeReply:
		return "REPLY"
	case TypeError:
		return "ERROR"
	case TypePing:
		return "PING"
	case TypePong:
		return "PONG"
	case TypeGoAway:
		return "GOAWAY"
	}
	return fmt.Sprintf("type(%#02x)", t)
}

// Uint32 returns a pointer to v, for [Frame.Length].
func Uint32(v uint32) *uint32 { return &v }

// Uint64 returns a pointer to v, for [CallHeader.Deadline].
func Uint64(v uint64) *uint64 { return &v }

// Uint16 returns a pointer to v, for [CallHeader.MetadataCount].
func Uint16(v uint16) *uint16 { return &v }

// AppendFrame appends the wire form of f (header, then payload) to dst and returns the extended
// slice.
func AppendFrame(dst []byte, f Frame) []byte {
	n := uint32(len(f.Payload))
	if f.Length != nil {
		n = *f.Length
	}
	dst = append(dst, f.Type, f.Flags)
	dst = binary.BigEndian.AppendUint16(dst, f.Reserved)
	dst = binary.BigEndian.AppendUint32(dst, n)
	dst = binary.BigEndian.AppendUint64(dst, f.ID)
	return append(dst, f.Payload...)
}

// EncodeFrame returns the wire form of f.
func EncodeFrame(f Frame) []byte {
	return AppendFrame(make([]byte, 0, HeaderSize+len(f.Payload)), f)
}

// ParseFrameHeader parses a 16-byte frame header, returning the frame without its payload and the
// payload length the header declares. It does not validate the header's fields.
//
// REQUIRES: len(b) >= HeaderSize.
func ParseFrameHeader(b []byte) (Frame, uint32) {
	f := Frame{
		Type:     b[0],
		Flags:    b[1],
		Reserved: binary.BigEndian.Uint16(b[2:4]),
		ID:       binary.BigEndian.Uint64(b[8:16]),
	}
	return f, binary.BigEndian.Uint32(b[4:8])
}

// ParseFrame parses the frame at the start of b and returns it and the bytes after it. Its
// payload aliases b (nil if empty). An error wrapping [ErrMalformed] is returned if b holds less
// than a whole frame.
func ParseFrame(b []byte) (Frame, []byte, error) {
	if len(b) < HeaderSize {
		return Frame{}, b, malformed("frame: %d bytes, want a %d-byte header", len(b), HeaderSize)
	}
	f, n := ParseFrameHeader(b)
	b = b[HeaderSize:]
	if uint64(len(b)) < uint64(n) {
		return f, b, malformed("frame %v: header declares %d payload bytes, %d present", f, n, len(b))
	}
	if n > 0 {
		f.Payload = b[:n:n]
	}
	return f, b[n:], nil
}

// CallHeader is the start of a CALL payload. Encode derives the deadline, trace and metadata flags
// from the optional sections present; Flags adds raw bits to them.
type CallHeader struct {
	Key       [16]byte
	Signature uint64
	// Flags holds extra call flag bits OR-ed into the derived ones: set a reserved bit, or a
	// section's bit without the section, to encode an invalid header. ParseCallHeader stores
	// here only the bits other than CallDeadline, CallTrace and CallMetadata.
	Flags byte
	Total uint32

	// Deadline is the remaining time in nanoseconds; nil means no deadline section.
	Deadline *uint64

	// The trace section is present if HasTrace is set or any of its fields is not zero.
	HasTrace   bool
	TraceID    [16]byte
	SpanID     [8]byte
	TraceFlags byte
	Tracestate string

	// The metadata section is present if HasMetadata is set, Metadata is not empty, or
	// MetadataCount is not nil.
	HasMetadata bool
	Metadata    [][2]string
	// MetadataCount, if not nil, is written as the entry count instead of len(Metadata).
	MetadataCount *uint16
}

func (h CallHeader) hasTrace() bool {
	return h.HasTrace || h.TraceID != [16]byte{} || h.SpanID != [8]byte{} || h.TraceFlags != 0 || h.Tracestate != ""
}

func (h CallHeader) hasMetadata() bool {
	return h.HasMetadata || len(h.Metadata) > 0 || h.MetadataCount != nil
}

// Encode returns the wire form of h. Lengths are written as uint16 of the real lengths: a
// tracestate, key or value longer than 65535 bytes produces a lying length.
func (h CallHeader) Encode() []byte {
	return h.Append(make([]byte, 0, CallHeaderSize+64))
}

// Append appends the wire form of h to dst and returns the extended slice.
func (h CallHeader) Append(dst []byte) []byte {
	flags := h.Flags
	if h.Deadline != nil {
		flags |= CallDeadline
	}
	if h.hasTrace() {
		flags |= CallTrace
	}
	if h.hasMetadata() {
		flags |= CallMetadata
	}
	dst = append(dst, h.Key[:]...)
	dst = binary.BigEndian.AppendUint64(dst, h.Signature)
	dst = append(dst, flags)
	dst = binary.BigEndian.AppendUint32(dst, h.Total)
	if h.Deadline != nil {
		dst = binary.BigEndian.AppendUint64(dst, *h.Deadline)
	}
	if h.hasTrace() {
		dst = append(dst, h.TraceID[:]...)
		dst = append(dst, h.SpanID[:]...)
		dst = append(dst, h.TraceFlags)
		dst = appendString16(dst, h.Tracestate)
	}
	if h.hasMetadata() {
		count := uint16(len(h.Metadata))
		if h.MetadataCount != nil {
			count = *h.MetadataCount
		}
		dst = binary.BigEndian.AppendUint16(dst, count)
		for _, kv := range h.Metadata {
			dst = appendString16(dst, kv[0])
			dst = appendString16(dst, kv[1])
		}
	}
	return dst
}

func appendString16(dst []byte, s string) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(s)))
	return append(dst, s...)
}

// ParseCallHeader parses the call header at the start of a CALL payload and returns it and the
// request bytes after it. Sections are decoded as the flags say; HasTrace and HasMetadata are set
// for the sections present. An error wrapping [ErrMalformed] is returned if b is too short for
// the sections its flags announce.
func ParseCallHeader(b []byte) (CallHeader, []byte, error) {
	var h CallHeader
	if len(b) < CallHeaderSize {
		return h, nil, malformed("call header: %d bytes, want at least %d", len(b), CallHeaderSize)
	}
	copy(h.Key[:], b)
	h.Signature = binary.BigEndian.Uint64(b[16:])
	flags := b[24]
	h.Flags = flags &^ (CallDeadline | CallTrace | CallMetadata)
	h.Total = binary.BigEndian.Uint32(b[25:])
	r := reader{b: b[CallHeaderSize:]}
	if flags&CallDeadline != 0 {
		d := r.uint64()
		h.Deadline = &d
	}
	if flags&CallTrace != 0 {
		h.HasTrace = true
		copy(h.TraceID[:], r.bytes(16))
		copy(h.SpanID[:], r.bytes(8))
		h.TraceFlags = r.byte()
		h.Tracestate = string(r.bytes(int(r.uint16())))
	}
	if flags&CallMetadata != 0 {
		h.HasMetadata = true
		n := int(r.uint16())
		for i := 0; i < n && !r.short; i++ {
			k := string(r.bytes(int(r.uint16())))
			v := string(r.bytes(int(r.uint16())))
			h.Metadata = append(h.Metadata, [2]string{k, v})
		}
	}
	if r.short {
		return h, nil, malformed("call header: truncated (flags %#02x)", flags)
	}
	return h, r.b, nil
}

// reader reads big-endian fields, recording whether b ran out.
type reader struct {
	b     []byte
	short bool
}

func (r *reader) bytes(n int) []byte {
	if r.short || len(r.b) < n {
		r.short = true
		r.b = nil
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) byte() byte {
	if v := r.bytes(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) uint16() uint16 {
	if v := r.bytes(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) uint32() uint32 {
	if v := r.bytes(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *reader) uint64() uint64 {
	if v := r.bytes(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// ReplyHeader is the start of a REPLY payload.
type ReplyHeader struct {
	Total uint32
	Load  float32
}

// Encode returns the wire form of h.
func (h ReplyHeader) Encode() []byte {
	b := make([]byte, 0, ReplyHeaderSize)
	b = binary.BigEndian.AppendUint32(b, h.Total)
	return binary.BigEndian.AppendUint32(b, math.Float32bits(h.Load))
}

// ParseReplyHeader parses the reply header at the start of a REPLY payload and returns it and the
// reply bytes after it. An error wrapping [ErrMalformed] is returned if b is shorter than
// [ReplyHeaderSize].
func ParseReplyHeader(b []byte) (ReplyHeader, []byte, error) {
	if len(b) < ReplyHeaderSize {
		return ReplyHeader{}, nil, malformed("reply header: %d bytes, want %d", len(b), ReplyHeaderSize)
	}
	h := ReplyHeader{
		Total: binary.BigEndian.Uint32(b),
		Load:  math.Float32frombits(binary.BigEndian.Uint32(b[4:])),
	}
	return h, b[ReplyHeaderSize:], nil
}

// ErrorBody is the payload of an ERROR frame.
type ErrorBody struct {
	Code             byte
	Flags            byte
	RetryAfterMillis uint32
	Message          string
}

// NeverRan reports whether e has the [ErrFlagNeverRan] flag.
func (e ErrorBody) NeverRan() bool { return e.Flags&ErrFlagNeverRan != 0 }

// Encode returns the wire form of e. A message longer than 65535 bytes produces a lying length.
func (e ErrorBody) Encode() []byte {
	b := make([]byte, 0, ErrorBodySize+len(e.Message))
	b = append(b, e.Code, e.Flags)
	b = binary.BigEndian.AppendUint32(b, e.RetryAfterMillis)
	return appendString16(b, e.Message)
}

// ParseErrorBody parses the payload of an ERROR frame. An error wrapping [ErrMalformed] is
// returned if b is shorter than its message length says or has bytes after the message.
func ParseErrorBody(b []byte) (ErrorBody, error) {
	r := reader{b: b}
	e := ErrorBody{Code: r.byte(), Flags: r.byte(), RetryAfterMillis: r.uint32()}
	e.Message = string(r.bytes(int(r.uint16())))
	switch {
	case r.short:
		return e, malformed("error body: truncated (%d bytes)", len(b))
	case len(r.b) > 0:
		return e, malformed("error body: %d bytes after the message", len(r.b))
	}
	return e, nil
}

// GoAway is the content of a GOAWAY frame.
type GoAway struct {
	LastID  uint64
	Code    byte
	Message string
}

// Frame returns the GOAWAY frame carrying g.
func (g GoAway) Frame() Frame {
	p := append([]byte{g.Code}, g.Message...)
	return Frame{Type: TypeGoAway, ID: g.LastID, Payload: p}
}

// ParseGoAway decodes a GOAWAY frame. An error wrapping [ErrMalformed] is returned if f is not a
// GOAWAY or its payload is empty.
func ParseGoAway(f Frame) (GoAway, error) {
	if f.Type != TypeGoAway {
		return GoAway{}, malformed("goaway: frame %v is not a GOAWAY", f)
	}
	if len(f.Payload) == 0 {
		return GoAway{LastID: f.ID}, malformed("goaway: empty payload, want a close code")
	}
	return GoAway{LastID: f.ID, Code: f.Payload[0], Message: string(f.Payload[1:])}, nil
}
