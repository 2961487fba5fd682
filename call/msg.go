package call

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"
	"unicode/utf8"
)

// truncateUTF8 returns s cut to at most n bytes without splitting a UTF-8 sequence.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// durationToMillis converts d to whole milliseconds, rounding up and saturating.
func durationToMillis(d time.Duration) uint32 {
	if d <= 0 {
		return 0
	}
	ms := (d + time.Millisecond - 1) / time.Millisecond
	if ms > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(ms)
}

// The byte layout of everything on the wire. DESIGN.md describes it in prose, field by field;
// TestGoldenBytes pins it.
//
//	hello:        "WEFT" | version u8 | features u8 | restLen u16 | maxFrame u32 | maxMessage u32 |
//	              maxConcurrent u32 | budget u32 | mdBytes u32 | mdEntries u16 | tracestate u16 |
//	              idleMillis u32 | (restLen-28 ignored bytes)
//	frame header: type u8 | flags u8 | reserved u16 | length u32 | id u64
//	call header:  key [16] | signature u64 | callFlags u8 | total u32 | [deadline u64] |
//	              [traceID [16] | spanID [8] | traceFlags u8 | tsLen u16 | ts] |
//	              [count u16 | (kLen u16 | k | vLen u16 | v)*]
//	reply header: total u32 | load f32
//	error body:   code u8 | flags u8 | retryAfterMillis u32 | msgLen u16 | msg
//	goaway body:  code u8 | msg

const (
	magic          = "WEFT"
	protocolV1     = 1
	helloPrefixLen = 8
	helloRestLen   = 28
	helloMaxRest   = 1024
	headerSize     = 16

	// Frame types.
	frameCall   = 0x01
	frameData   = 0x02
	frameCancel = 0x03
	frameReply  = 0x04
	frameError  = 0x05
	framePing   = 0x06
	framePong   = 0x07
	frameGoAway = 0x08
	// 0x10-0x1F: reserved for streams and server push.

	flagEnd = 0x01

	// Call header flags.
	callDeadline = 0x01
	callTrace    = 0x02
	callMetadata = 0x04
	callFlagMask = callDeadline | callTrace | callMetadata

	callFixedLen  = 16 + 8 + 1 + 4
	traceFixedLen = 16 + 8 + 1 + 2
	replyHdrLen   = 8
	errorFixedLen = 8
	maxErrorMsg   = 1024

	errFlagNeverRan = 0x01

	// Close codes carried by GOAWAY.
	closeDrain    = 0
	closeProtocol = 1
	closeFlood    = 2
	closeIdle     = 3
	closeStopping = 4

	// maxRequestID is where a client stops using a connection; ids never wrap.
	maxRequestID = 1 << 63
)

// hello is the handshake message each side sends.
type hello struct {
	version       byte
	features      byte
	maxFrame      uint32
	maxMessage    uint32
	maxConcurrent uint32
	budget        uint32
	mdBytes       uint32
	mdEntries     uint16
	tracestate    uint16
	idleMillis    uint32
}

func helloFromLimits(l Limits, concurrent int, idleMillis uint32) hello {
	return hello{
		version:       protocolV1,
		maxFrame:      uint32(l.MaxFrameSize),
		maxMessage:    uint32(l.MaxMessageSize),
		maxConcurrent: uint32(concurrent),
		budget:        uint32(l.MaxBufferedBytes),
		mdBytes:       uint32(l.MaxMetadataBytes),
		mdEntries:     uint16(l.MaxMetadataEntries),
		tracestate:    uint16(l.MaxTracestate),
		idleMillis:    idleMillis,
	}
}

func (h hello) append(b []byte) []byte {
	b = append(b, magic...)
	b = append(b, h.version, h.features)
	b = binary.BigEndian.AppendUint16(b, helloRestLen)
	b = binary.BigEndian.AppendUint32(b, h.maxFrame)
	b = binary.BigEndian.AppendUint32(b, h.maxMessage)
	b = binary.BigEndian.AppendUint32(b, h.maxConcurrent)
	b = binary.BigEndian.AppendUint32(b, h.budget)
	b = binary.BigEndian.AppendUint32(b, h.mdBytes)
	b = binary.BigEndian.AppendUint16(b, h.mdEntries)
	b = binary.BigEndian.AppendUint16(b, h.tracestate)
	b = binary.BigEndian.AppendUint32(b, h.idleMillis)
	return b
}

// parseHelloPrefix checks the first 8 bytes of a hello and returns the version and the length
// of the rest.
func parseHelloPrefix(b []byte) (version, features byte, rest int, err error) {
	if string(b[:4]) != magic {
		return 0, 0, 0, fmt.Errorf("%w: bad magic %q (not a weft peer)", ErrProtocol, b[:4])
	}
	rest = int(binary.BigEndian.Uint16(b[6:8]))
	if rest < helloRestLen || rest > helloMaxRest {
		return 0, 0, 0, fmt.Errorf("%w: hello length %d out of range [%d, %d]", ErrProtocol, rest, helloRestLen, helloMaxRest)
	}
	return b[4], b[5], rest, nil
}

// parseHelloRest decodes the fields after the prefix; b has at least helloRestLen bytes.
func parseHelloRest(version, features byte, b []byte) (hello, error) {
	h := hello{
		version:       version,
		features:      features,
		maxFrame:      binary.BigEndian.Uint32(b[0:]),
		maxMessage:    binary.BigEndian.Uint32(b[4:]),
		maxConcurrent: binary.BigEndian.Uint32(b[8:]),
		budget:        binary.BigEndian.Uint32(b[12:]),
		mdBytes:       binary.BigEndian.Uint32(b[16:]),
		mdEntries:     binary.BigEndian.Uint16(b[20:]),
		tracestate:    binary.BigEndian.Uint16(b[22:]),
		idleMillis:    binary.BigEndian.Uint32(b[24:]),
	}
	if h.maxFrame < minFrameSize {
		return h, fmt.Errorf("%w: peer max frame size %d below minimum %d", ErrProtocol, h.maxFrame, minFrameSize)
	}
	if h.maxFrame > maxWireLimit || h.maxMessage > maxWireLimit || h.budget > maxWireLimit {
		return h, fmt.Errorf("%w: peer limit above 2^31-1", ErrProtocol)
	}
	return h, nil
}

// frameHeader is a decoded frame header.
type frameHeader struct {
	typ    byte
	flags  byte
	length uint32
	id     uint64
}

func appendHeader(b []byte, typ, flags byte, length int, id uint64) []byte {
	b = append(b, typ, flags, 0, 0)
	b = binary.BigEndian.AppendUint32(b, uint32(length))
	return binary.BigEndian.AppendUint64(b, id)
}

// parseHeader decodes and validates a frame header. Anything it rejects is a protocol error
// that closes the connection.
func parseHeader(b []byte, maxFrame int) (frameHeader, error) {
	h := frameHeader{typ: b[0], flags: b[1], length: binary.BigEndian.Uint32(b[4:]), id: binary.BigEndian.Uint64(b[8:])}
	if b[2] != 0 || b[3] != 0 {
		return h, fmt.Errorf("%w: reserved header bytes set in frame type %#x", ErrProtocol, h.typ)
	}
	var allowed byte
	switch h.typ {
	case frameCall, frameData, frameReply:
		allowed = flagEnd
	case frameCancel, frameError, framePing, framePong, frameGoAway:
	default:
		return h, fmt.Errorf("%w: unknown frame type %#x", ErrProtocol, h.typ)
	}
	if h.flags&^allowed != 0 {
		return h, fmt.Errorf("%w: reserved flags %#x in frame type %#x", ErrProtocol, h.flags&^allowed, h.typ)
	}
	if int64(h.length) > int64(maxFrame) {
		return h, fmt.Errorf("%w: frame of %d bytes exceeds max frame size %d", ErrProtocol, h.length, maxFrame)
	}
	switch h.typ {
	case frameCancel, framePing, framePong:
		if h.length != 0 {
			return h, fmt.Errorf("%w: frame type %#x with %d-byte payload", ErrProtocol, h.typ, h.length)
		}
	}
	return h, nil
}

// callHeader is the decoded start of a CALL payload.
type callHeader struct {
	key        MethodKey
	signature  uint64
	flags      byte
	total      uint32
	deadline   uint64 // remaining nanoseconds, if flags&callDeadline
	traceID    [16]byte
	spanID     [8]byte
	traceFlags byte
	tracestate string
	md         Metadata
}

// errCallLimit marks a call header that is well formed but over a metadata or tracestate
// limit: that call fails, the connection stays.
var errCallLimit = errors.New("call header over limit")

// decoder reads fields from a byte slice; a short read sets short and returns zeros.
type decoder struct {
	b     []byte
	short bool
}

func (d *decoder) bytes(n int) []byte {
	if n > len(d.b) {
		d.short = true
		d.b = nil
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u8() byte {
	if v := d.bytes(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if v := d.bytes(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.bytes(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.bytes(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// parseCallHeader decodes a call header from the start of a CALL payload and returns the
// request bytes that follow it. An error wrapping ErrProtocol is malformed input; an error
// wrapping errCallLimit is a limit that fails only this call.
func parseCallHeader(b []byte, lim *Limits) (callHeader, []byte, error) {
	var h callHeader
	d := decoder{b: b}
	copy(h.key[:], d.bytes(16))
	h.signature = d.u64()
	h.flags = d.u8()
	h.total = d.u32()
	if d.short {
		return h, nil, fmt.Errorf("%w: truncated call header", ErrProtocol)
	}
	if h.flags&^callFlagMask != 0 {
		return h, nil, fmt.Errorf("%w: reserved call flags %#x", ErrProtocol, h.flags&^callFlagMask)
	}
	if h.flags&callDeadline != 0 {
		h.deadline = d.u64()
	}
	var overLimit error
	if h.flags&callTrace != 0 {
		copy(h.traceID[:], d.bytes(16))
		copy(h.spanID[:], d.bytes(8))
		h.traceFlags = d.u8()
		n := int(d.u16())
		ts := d.bytes(n)
		if n > lim.MaxTracestate {
			overLimit = fmt.Errorf("%w: tracestate of %d bytes exceeds %d", errCallLimit, n, lim.MaxTracestate)
		} else if n > 0 {
			h.tracestate = string(ts)
		}
	}
	if h.flags&callMetadata != 0 && !d.short {
		n := int(d.u16())
		if n > lim.MaxMetadataEntries {
			// Skipping the entries would need parsing them; the call fails, and the rest of
			// the frame is discarded with it.
			return h, nil, fmt.Errorf("%w: %d metadata entries exceed %d", errCallLimit, n, lim.MaxMetadataEntries)
		}
		total := 0
		var md Metadata
		if overLimit == nil && n > 0 {
			md = make(Metadata, n)
		}
		for range n {
			k := d.bytes(int(d.u16()))
			v := d.bytes(int(d.u16()))
			if d.short {
				break
			}
			total += len(k) + len(v)
			if total > lim.MaxMetadataBytes {
				return h, nil, fmt.Errorf("%w: metadata exceeds %d bytes", errCallLimit, lim.MaxMetadataBytes)
			}
			if md != nil {
				md[string(k)] = string(v)
			}
		}
		h.md = md
	}
	if d.short {
		return h, nil, fmt.Errorf("%w: truncated call header", ErrProtocol)
	}
	if overLimit != nil {
		return h, nil, overLimit
	}
	return h, d.b, nil
}

// callHeaderLen returns the encoded size of h.
func callHeaderLen(h *callHeader) int {
	n := callFixedLen
	if h.flags&callDeadline != 0 {
		n += 8
	}
	if h.flags&callTrace != 0 {
		n += traceFixedLen + len(h.tracestate)
	}
	if h.flags&callMetadata != 0 {
		n += 2
		for k, v := range h.md {
			n += 4 + len(k) + len(v)
		}
	}
	return n
}

func appendCallHeader(b []byte, h *callHeader) []byte {
	b = append(b, h.key[:]...)
	b = binary.BigEndian.AppendUint64(b, h.signature)
	b = append(b, h.flags)
	b = binary.BigEndian.AppendUint32(b, h.total)
	if h.flags&callDeadline != 0 {
		b = binary.BigEndian.AppendUint64(b, h.deadline)
	}
	if h.flags&callTrace != 0 {
		b = append(b, h.traceID[:]...)
		b = append(b, h.spanID[:]...)
		b = append(b, h.traceFlags)
		b = binary.BigEndian.AppendUint16(b, uint16(len(h.tracestate)))
		b = append(b, h.tracestate...)
	}
	if h.flags&callMetadata != 0 {
		b = binary.BigEndian.AppendUint16(b, uint16(len(h.md)))
		for k, v := range h.md {
			b = binary.BigEndian.AppendUint16(b, uint16(len(k)))
			b = append(b, k...)
			b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
			b = append(b, v...)
		}
	}
	return b
}

// replyHeader is the decoded start of a REPLY payload.
type replyHeader struct {
	total uint32
	load  float32
}

func appendReplyHeader(b []byte, total int, load float32) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(total))
	return binary.BigEndian.AppendUint32(b, math.Float32bits(load))
}

func parseReplyHeader(b []byte) (replyHeader, []byte, error) {
	if len(b) < replyHdrLen {
		return replyHeader{}, nil, fmt.Errorf("%w: truncated reply header", ErrProtocol)
	}
	h := replyHeader{total: binary.BigEndian.Uint32(b), load: math.Float32frombits(binary.BigEndian.Uint32(b[4:]))}
	if math.IsNaN(float64(h.load)) || math.IsInf(float64(h.load), 0) || h.load < 0 {
		h.load = 0
	}
	return h, b[replyHdrLen:], nil
}

// errorBody is the decoded payload of an ERROR frame.
type errorBody struct {
	code       byte
	neverRan   bool
	retryAfter time.Duration
	msg        string
}

func appendErrorBody(b []byte, e *errorBody) []byte {
	var flags byte
	if e.neverRan {
		flags |= errFlagNeverRan
	}
	msg := truncateUTF8(e.msg, maxErrorMsg)
	b = append(b, e.code, flags)
	b = binary.BigEndian.AppendUint32(b, durationToMillis(e.retryAfter))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

func parseErrorBody(b []byte) (errorBody, error) {
	d := decoder{b: b}
	e := errorBody{code: d.u8()}
	flags := d.u8()
	e.retryAfter = time.Duration(d.u32()) * time.Millisecond
	e.msg = string(d.bytes(int(d.u16())))
	if d.short {
		return e, fmt.Errorf("%w: truncated error frame", ErrProtocol)
	}
	if flags&^errFlagNeverRan != 0 {
		return e, fmt.Errorf("%w: reserved error flags %#x", ErrProtocol, flags)
	}
	e.neverRan = flags&errFlagNeverRan != 0
	return e, nil
}
