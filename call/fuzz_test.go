package call

// Fuzz targets for the wire format and the server connection.
//
// Every target checks its property against the independent encoder and decoder of
// internal/testkit (never against msg.go alone), and an allocation budget when the race
// detector is off (allocChecks, set by fuzz_alloc_test.go). The seed corpora live in
// testdata/fuzz/<FuzzName>; run one target with, for example,
//
//	go test -run=XXX -fuzz=FuzzServerProgram -fuzztime=60s -parallel=2 ./call/
//
// and the committed corpora with
//
//	go test -race -count=1 -run 'Fuzz' ./call/
//
// Besides inputs that widen coverage, the corpora keep the inputs that found bugs, named for
// them, as regression tests:
//
//   - FuzzErrorBody/utf8-message-cut-inside-a-rune: appendErrorBody cut a message over 1024
//     bytes inside a UTF-8 sequence.
//   - FuzzServerProgram/slot-freed-after-terminal: the server freed a call's concurrency slot
//     only after writing its terminal frame, so a client that sent its next call on receiving
//     it was refused.
//   - FuzzServerProgram/done-after-deadline-double-close: a handler's first ctx.Done() after its
//     deadline passed closed the Done channel twice.
//   - FuzzServerProgram/call-after-shutdown-never-cancelled: a call read from the buffer after a
//     failed write had shut the connection down was started with a context nothing cancelled,
//     so ServeOn never returned (timing-dependent).
//   - FuzzServerProgram/budget-wait-deadlock: the reader waited without bound for buffered-bytes
//     budget held by handlers that waited for a cancel it could then never read. Clients now
//     count a request until it is answered, and the server's wait is bounded.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/weftrpc/weft/internal/testkit"
)

// allocChecks enables the allocation budgets. fuzz_alloc_test.go sets it in builds without the
// race detector, which allocates on its own account.
var allocChecks bool

// allocsPerRun is testing.AllocsPerRun, skipped (0) when allocation budgets are off.
func allocsPerRun(runs int, f func()) float64 {
	if !allocChecks {
		return 0
	}
	return testing.AllocsPerRun(runs, f)
}

// bytesPerRun returns the average number of heap bytes one call of f allocates, measured over
// runs calls with GOMAXPROCS 1 (as testing.AllocsPerRun does), or 0 when allocation budgets are
// off.
func bytesPerRun(runs int, f func()) uint64 {
	if !allocChecks {
		return 0
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	f() // warm up
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / uint64(runs)
}

// ---------------------------------------------------------------------------------------------
// FuzzFrameHeader

func FuzzFrameHeader(f *testing.F) {
	for _, fr := range []testkit.Frame{
		{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 1, Length: testkit.Uint32(29)},
		{Type: testkit.TypeCall, ID: 7, Length: testkit.Uint32(64 << 10)},
		{Type: testkit.TypeData, Flags: testkit.FlagEnd, ID: 1<<63 + 5, Length: testkit.Uint32(0)},
		{Type: testkit.TypeCancel, ID: 3},
		{Type: testkit.TypeCancel, ID: 3, Length: testkit.Uint32(1)},
		{Type: testkit.TypeReply, Flags: testkit.FlagEnd, ID: 2, Length: testkit.Uint32(8)},
		{Type: testkit.TypeError, ID: 2, Length: testkit.Uint32(12)},
		{Type: testkit.TypePing, ID: math.MaxUint64},
		{Type: testkit.TypePong, ID: 9},
		{Type: testkit.TypeGoAway, ID: 4, Length: testkit.Uint32(1)},
		{Type: testkit.TypeGoAway, Flags: testkit.FlagEnd, ID: 4, Length: testkit.Uint32(1)},
		{Type: 0x10, ID: 1},
		{Type: 0x00, ID: 1},
		{Type: testkit.TypeData, Flags: 0x02, ID: 1},
		{Type: testkit.TypeData, Reserved: 0x0100, ID: 1},
		{Type: testkit.TypeData, Reserved: 0x0001, ID: 1},
		{Type: testkit.TypeData, ID: 1, Length: testkit.Uint32(math.MaxUint32)},
	} {
		f.Add(testkit.EncodeFrame(fr)[:testkit.HeaderSize], uint32(64<<10))
	}
	f.Add(testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeCall, Length: testkit.Uint32(16<<10 + 1)})[:16], uint32(16<<10))
	f.Add(testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeCall, Length: testkit.Uint32(16 << 10)})[:16], uint32(16<<10))
	f.Add(testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeData, Length: testkit.Uint32(1<<31 - 1)})[:16], uint32(1<<31-1))

	f.Fuzz(func(t *testing.T, b []byte, maxFrame uint32) {
		if len(b) < headerSize {
			return
		}
		mf := int(maxFrame)
		want, n := testkit.ParseFrameHeader(b)
		specOK := frameHeaderValid(want, n, mf)

		h, err := parseHeader(b, mf)
		if err != nil {
			if specOK {
				t.Fatalf("parseHeader(% x, %d) rejected a valid header: %v", b[:headerSize], mf, err)
			}
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("parseHeader(% x, %d) = %v, want an error wrapping ErrProtocol", b[:headerSize], mf, err)
			}
			return
		}
		if !specOK {
			t.Fatalf("parseHeader(% x, %d) accepted %v (length %d), which DESIGN.md rejects", b[:headerSize], mf, want, n)
		}
		if h.typ != want.Type || h.flags != want.Flags || h.length != n || h.id != want.ID {
			t.Fatalf("parseHeader(% x) = %+v, testkit decodes %v length %d", b[:headerSize], h, want, n)
		}
		if int64(h.length) > int64(mf) {
			t.Fatalf("accepted length %d above max frame %d", h.length, mf)
		}
		if enc := appendHeader(nil, h.typ, h.flags, int(h.length), h.id); !bytes.Equal(enc, b[:headerSize]) {
			t.Fatalf("appendHeader(parseHeader(% x)) = % x", b[:headerSize], enc)
		}
		hb := b[:headerSize]
		if a := allocsPerRun(10, func() { parseHeader(hb, mf) }); a != 0 {
			t.Fatalf("parseHeader allocates %v times per accepted header, want 0", a)
		}
	})
}

// frameHeaderValid is DESIGN.md's rule for a frame header a receiver accepts.
func frameHeaderValid(f testkit.Frame, n uint32, maxFrame int) bool {
	if f.Reserved != 0 || int64(n) > int64(maxFrame) {
		return false
	}
	switch f.Type {
	case testkit.TypeCall, testkit.TypeData, testkit.TypeReply:
		return f.Flags&^testkit.FlagEnd == 0
	case testkit.TypeCancel, testkit.TypePing, testkit.TypePong:
		return f.Flags == 0 && n == 0
	case testkit.TypeError, testkit.TypeGoAway:
		return f.Flags == 0
	}
	return false
}

// ---------------------------------------------------------------------------------------------
// FuzzCallHeader

// callHeaderSeeds are call headers covering every section, limit and malformation.
func callHeaderSeeds() [][]byte {
	key := MakeMethodKey("fuzz", "Echo")
	md := func(n, size int) [][2]string {
		var kv [][2]string
		for i := range n {
			kv = append(kv, [2]string{fmt.Sprintf("k%d", i), strings.Repeat("v", size)})
		}
		return kv
	}
	hs := []testkit.CallHeader{
		{Key: key},
		{Key: key, Total: 5},
		{Key: key, Signature: 0xDEADBEEF, Total: 1 << 20, Deadline: testkit.Uint64(1e9)},
		{Key: key, Deadline: testkit.Uint64(0)},
		{Key: key, Deadline: testkit.Uint64(math.MaxUint64)},
		{Key: key, TraceID: [16]byte{1}, SpanID: [8]byte{2}, TraceFlags: 1, Tracestate: "a=b,c=d"},
		{Key: key, HasTrace: true},
		{Key: key, HasTrace: true, Tracestate: strings.Repeat("t", 512)},
		{Key: key, HasTrace: true, Tracestate: strings.Repeat("t", 513)},
		{Key: key, Metadata: [][2]string{{"k", "v"}, {"", ""}, {"k", "w"}}},
		{Key: key, HasMetadata: true},
		{Key: key, Metadata: md(64, 0)},
		{Key: key, Metadata: md(65, 0)},
		{Key: key, Metadata: [][2]string{{"k", strings.Repeat("v", 8191)}}},
		{Key: key, Metadata: [][2]string{{"k", strings.Repeat("v", 8192)}}},
		{Key: key, MetadataCount: testkit.Uint16(3), Metadata: [][2]string{{"a", "b"}}},
		{Key: key, MetadataCount: testkit.Uint16(64)},
		{Key: key, MetadataCount: testkit.Uint16(0xFFFF)},
		{Key: key, Flags: 0x08},
		{Key: key, Flags: testkit.CallDeadline},
		{Key: key, Deadline: testkit.Uint64(5), HasTrace: true, Tracestate: "x", Metadata: md(3, 4), Total: 3},
	}
	var seeds [][]byte
	for _, h := range hs {
		b := h.Encode()
		seeds = append(seeds, b, append(slices.Clone(b), "args"...))
	}
	full := hs[len(hs)-1].Encode()
	for _, n := range []int{0, 16, 28, 29, 36, len(full) - 1} {
		seeds = append(seeds, full[:n])
	}
	return seeds
}

func FuzzCallHeader(f *testing.F) {
	for _, s := range callHeaderSeeds() {
		f.Add(s)
	}
	lim := Limits{}.withDefaults()
	f.Fuzz(func(t *testing.T, b []byte) {
		h, rest, err := parseCallHeader(b, &lim)
		checkCallHeader(t, b, &lim, h, rest, err)

		// Allocation: a small multiple of the input plus a constant (the metadata map, sized by
		// the entry count the header declares, which is at most MaxMetadataEntries).
		if a := allocsPerRun(8, func() { parseCallHeader(b, &lim) }); a > float64(16+2*lim.MaxMetadataEntries) || a > float64(16+len(b)) {
			t.Fatalf("parseCallHeader of %d bytes: %v allocations per run, budget min(%d, %d)", len(b), a, 16+2*lim.MaxMetadataEntries, 16+len(b))
		}
		if n, budget := bytesPerRun(8, func() { parseCallHeader(b, &lim) }), uint64(4*len(b)+callHeaderAllocConst); n > budget {
			t.Fatalf("parseCallHeader of %d bytes: %d bytes allocated per run, budget %d", len(b), n, budget)
		}
	})
}

// callHeaderAllocConst is the constant part of parseCallHeader's allocation budget: a metadata
// map for MaxMetadataEntries (64) entries, and an error.
const callHeaderAllocConst = 8 << 10

// checkCallHeader checks parseCallHeader's result for b against testkit's decoder and the
// limits, and that a decoded header re-encodes to bytes that decode to the same header.
func checkCallHeader(t *testing.T, b []byte, lim *Limits, h callHeader, rest []byte, err error) {
	t.Helper()
	th, trest, terr := testkit.ParseCallHeader(b)
	reserved := len(b) >= callFixedLen && b[24]&^callFlagMask != 0
	overLimit := false
	if terr == nil {
		size := 0
		for _, kv := range th.Metadata {
			size += len(kv[0]) + len(kv[1])
		}
		overLimit = len(th.Tracestate) > lim.MaxTracestate || len(th.Metadata) > lim.MaxMetadataEntries || size > lim.MaxMetadataBytes
	}
	switch {
	case reserved:
		if !errors.Is(err, ErrProtocol) {
			t.Fatalf("call header with reserved flags %#x: err = %v, want ErrProtocol", b[24], err)
		}
		return
	case terr != nil:
		// Malformed. A limit check may fire before the truncation is seen.
		if err == nil {
			t.Fatalf("parseCallHeader accepted a header testkit finds malformed (%v): % x", terr, b)
		}
		if !errors.Is(err, ErrProtocol) && !errors.Is(err, errCallLimit) {
			t.Fatalf("parseCallHeader(% x) = %v, want ErrProtocol or errCallLimit", b, err)
		}
		return
	case overLimit:
		if !errors.Is(err, errCallLimit) || errors.Is(err, ErrProtocol) {
			t.Fatalf("well-formed call header over the limits (tracestate %d, %d metadata entries): err = %v, want errCallLimit alone", len(th.Tracestate), len(th.Metadata), err)
		}
		return
	case err != nil:
		t.Fatalf("parseCallHeader rejected a well-formed header within limits: %v\n% x", err, b)
	}

	// Accepted: the fields are testkit's.
	if want := testkitToCallHeader(th); !callHeadersEqual(h, want) {
		t.Fatalf("parseCallHeader(% x) =\n%+v\ntestkit decodes\n%+v", b, h, want)
	}
	if !bytes.Equal(rest, trest) {
		t.Fatalf("rest = % x, testkit's = % x", rest, trest)
	}
	if len(rest) > 0 && &rest[0] != &b[len(b)-len(rest)] {
		t.Fatalf("rest is not a suffix of the input")
	}
	if len(h.md) > lim.MaxMetadataEntries {
		t.Fatalf("%d metadata entries accepted, limit %d", len(h.md), lim.MaxMetadataEntries)
	}
	size := 0
	for k, v := range h.md {
		size += len(k) + len(v)
	}
	if size > lim.MaxMetadataBytes {
		t.Fatalf("%d metadata bytes accepted, limit %d", size, lim.MaxMetadataBytes)
	}
	if len(h.tracestate) > lim.MaxTracestate {
		t.Fatalf("tracestate of %d bytes accepted, limit %d", len(h.tracestate), lim.MaxTracestate)
	}

	// Round trip: the encoding decodes to the same header and has the predicted length.
	enc := appendCallHeader(nil, &h)
	if len(enc) != callHeaderLen(&h) {
		t.Fatalf("appendCallHeader wrote %d bytes, callHeaderLen says %d", len(enc), callHeaderLen(&h))
	}
	h2, rest2, err := parseCallHeader(enc, lim)
	if err != nil || len(rest2) != 0 {
		t.Fatalf("re-encoded header % x does not parse: %v (rest %d bytes)", enc, err, len(rest2))
	}
	if !callHeadersEqual(h, h2) {
		t.Fatalf("round trip:\n%+v\nbecame\n%+v", h, h2)
	}
	if len(th.Metadata) == len(h.md) { // no duplicate keys: same size
		if consumed := len(b) - len(rest); len(enc) != consumed {
			t.Fatalf("re-encoded header has %d bytes, the input's had %d", len(enc), consumed)
		}
		if len(h.md) <= 1 && !bytes.Equal(enc, b[:len(b)-len(rest)]) {
			t.Fatalf("re-encoded header\n% x\nis not the input's\n% x", enc, b[:len(b)-len(rest)])
		}
	}
}

func testkitToCallHeader(th testkit.CallHeader) callHeader {
	h := callHeader{
		key: th.Key, signature: th.Signature, total: th.Total,
		traceID: th.TraceID, spanID: th.SpanID, traceFlags: th.TraceFlags, tracestate: th.Tracestate,
	}
	if th.Deadline != nil {
		h.flags |= callDeadline
		h.deadline = *th.Deadline
	}
	if th.HasTrace {
		h.flags |= callTrace
	}
	if th.HasMetadata {
		h.flags |= callMetadata
		for _, kv := range th.Metadata {
			if h.md == nil {
				h.md = Metadata{}
			}
			h.md[kv[0]] = kv[1]
		}
	}
	return h
}

func callHeadersEqual(a, b callHeader) bool {
	return a.key == b.key && a.signature == b.signature && a.flags == b.flags && a.total == b.total &&
		a.deadline == b.deadline && a.traceID == b.traceID && a.spanID == b.spanID &&
		a.traceFlags == b.traceFlags && a.tracestate == b.tracestate &&
		(a.md == nil) == (b.md == nil) && maps.Equal(a.md, b.md)
}

// ---------------------------------------------------------------------------------------------
// FuzzHelloParse

func helloSeeds() [][]byte {
	v1 := testkit.ClientHello()
	long := v1
	long.RestLen = 200
	short := v1
	short.RestLen = 20
	v2 := v1
	v2.Version = 2
	feat := v1
	feat.Features = 0xFF
	small := v1
	small.MaxFrame = 16<<10 - 1
	big := v1
	big.MaxMessage = 1 << 31
	max := v1
	max.MaxFrame, max.MaxMessage, max.Budget = 1<<31-1, 1<<31-1, 1<<31-1
	bad := v1
	bad.Magic = "HTTP"
	huge := v1
	huge.RestLen = 1025
	exact := v1
	exact.RestLen = 1024
	var seeds [][]byte
	for _, h := range []testkit.Hello{v1, long, short, v2, feat, small, big, max, bad, huge, exact, {}} {
		seeds = append(seeds, h.Encode())
	}
	return seeds
}

func FuzzHelloParse(f *testing.F) {
	for _, s := range helloSeeds() {
		f.Add(s)
	}
	f.Add([]byte("WEFT"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < helloPrefixLen {
			return
		}
		th, terr := testkit.ParseHello(b)
		restLen := int(binary.BigEndian.Uint16(b[6:8]))
		prefixOK := string(b[:4]) == testkit.Magic && restLen >= testkit.HelloRestSize && restLen <= testkit.MaxHelloRest

		version, features, rest, err := parseHelloPrefix(b[:helloPrefixLen])
		if (err == nil) != prefixOK {
			t.Fatalf("parseHelloPrefix(% x) = %v, DESIGN.md says valid=%v", b[:8], err, prefixOK)
		}
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("parseHelloPrefix error %v does not wrap ErrProtocol", err)
			}
			return
		}
		if version != b[4] || features != b[5] || rest != restLen {
			t.Fatalf("parseHelloPrefix(% x) = %d, %d, %d", b[:8], version, features, rest)
		}
		if len(b) < helloPrefixLen+rest {
			if terr == nil {
				t.Fatalf("testkit accepts a truncated hello")
			}
			return
		}
		if terr != nil {
			t.Fatalf("testkit rejects a hello parseHelloPrefix accepts: %v", terr)
		}
		restOK := th.MaxFrame >= minFrameSize && th.MaxFrame <= maxWireLimit && th.MaxMessage <= maxWireLimit && th.Budget <= maxWireLimit
		body := b[helloPrefixLen : helloPrefixLen+rest]
		h, err := parseHelloRest(version, features, body)
		if (err == nil) != restOK {
			t.Fatalf("parseHelloRest(% x) = %v, want valid=%v", body, err, restOK)
		}
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("parseHelloRest error %v does not wrap ErrProtocol", err)
			}
			return
		}
		want := hello{
			version: th.Version, features: th.Features, maxFrame: th.MaxFrame, maxMessage: th.MaxMessage,
			maxConcurrent: th.MaxConcurrent, budget: th.Budget, mdBytes: th.MaxMetadataBytes,
			mdEntries: th.MaxMetadataEntries, tracestate: th.MaxTracestate, idleMillis: th.IdleTimeoutMillis,
		}
		if h != want {
			t.Fatalf("parseHelloRest = %+v, testkit decodes %+v", h, want)
		}
		// Round trip: the encoding is the input with the rest length 28 and the ignored tail
		// dropped.
		enc := h.append(nil)
		wantEnc := slices.Concat(b[:6], []byte{0, helloRestLen}, b[8:8+helloRestLen])
		if !bytes.Equal(enc, wantEnc) {
			t.Fatalf("hello.append = % x, want % x", enc, wantEnc)
		}
		v2, f2, r2, err := parseHelloPrefix(enc)
		if err != nil {
			t.Fatalf("re-encoded prefix: %v", err)
		}
		h2, err := parseHelloRest(v2, f2, enc[helloPrefixLen:helloPrefixLen+r2])
		if err != nil || h2 != h {
			t.Fatalf("re-encoded hello decodes to %+v, %v; want %+v", h2, err, h)
		}
		if a := allocsPerRun(10, func() {
			v, f, r, _ := parseHelloPrefix(b[:helloPrefixLen])
			parseHelloRest(v, f, b[helloPrefixLen:helloPrefixLen+r])
		}); a != 0 {
			t.Fatalf("parsing a valid hello allocates %v times, want 0", a)
		}
	})
}

// ---------------------------------------------------------------------------------------------
// FuzzReplyHeader and FuzzErrorBody

func FuzzReplyHeader(f *testing.F) {
	for _, h := range []testkit.ReplyHeader{
		{}, {Total: 5, Load: 1.5}, {Total: math.MaxUint32, Load: float32(math.Inf(1))},
		{Load: float32(math.NaN())}, {Load: -1}, {Load: float32(math.Copysign(0, -1))}, {Load: math.MaxFloat32},
	} {
		f.Add(append(h.Encode(), "reply"...))
	}
	f.Add([]byte{0, 0, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, rest, err := parseReplyHeader(b)
		th, trest, terr := testkit.ParseReplyHeader(b)
		if (err == nil) != (terr == nil) {
			t.Fatalf("parseReplyHeader(% x): %v; testkit: %v", b, err, terr)
		}
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
			return
		}
		if !bytes.Equal(rest, trest) || len(rest) > 0 && &rest[0] != &b[len(b)-len(rest)] {
			t.Fatalf("rest % x is not the input's tail % x", rest, trest)
		}
		if h.total != th.Total {
			t.Fatalf("total = %d, testkit %d", h.total, th.Total)
		}
		raw := float64(th.Load)
		if math.IsNaN(raw) || math.IsInf(raw, 0) || raw < 0 {
			if h.load != 0 {
				t.Fatalf("load %v decoded as %v, want 0", th.Load, h.load)
			}
		} else if math.Float32bits(h.load) != math.Float32bits(th.Load) {
			t.Fatalf("load %v decoded as %v", th.Load, h.load)
		} else if enc := appendReplyHeader(nil, int(h.total), h.load); !bytes.Equal(enc, b[:replyHdrLen]) {
			t.Fatalf("appendReplyHeader(parseReplyHeader(% x)) = % x", b[:replyHdrLen], enc)
		}
		if l := float64(h.load); math.IsNaN(l) || math.IsInf(l, 0) || l < 0 {
			t.Fatalf("decoded load %v is not a finite non-negative number", h.load)
		}
		if a := allocsPerRun(10, func() { parseReplyHeader(b) }); a != 0 {
			t.Fatalf("parseReplyHeader allocates %v times, want 0", a)
		}
	})
}

func FuzzErrorBody(f *testing.F) {
	for _, e := range []testkit.ErrorBody{
		{Code: testkit.CodeRefused, Flags: testkit.ErrFlagNeverRan, RetryAfterMillis: 250, Message: "busy"},
		{Code: testkit.CodePanic, Message: "handler panicked"},
		{Code: 0xFF, Flags: 0x02, Message: "x"},
		{Code: testkit.CodeHandlerFailed, RetryAfterMillis: math.MaxUint32, Message: strings.Repeat("é", 600)},
		{},
	} {
		f.Add(e.Encode(), false)
		f.Add(append(e.Encode(), "trailing"...), true)
	}
	f.Add([]byte{7, 0, 0, 0, 0, 0, 0, 9, 'a'}, false)
	f.Add(append([]byte{7, 0, 0, 0, 0, 0}, strings.Repeat("é", 700)...), true)
	f.Fuzz(func(t *testing.T, b []byte, encode bool) {
		if encode {
			// The encoder's side: b is a message (and a code and retry delay from its first
			// bytes). Whatever the encoder writes parses back to what it was given, with the
			// message cut to maxErrorMsg bytes; a UTF-8 message stays UTF-8 (DESIGN.md: "message
			// (UTF-8)").
			var code, flags byte
			var retry uint32
			if len(b) >= 6 {
				code, flags, retry = b[0], b[1], binary.BigEndian.Uint32(b[2:6])
				b = b[6:]
			}
			in := errorBody{
				code: code, neverRan: flags&1 != 0, msg: string(b),
				retryAfter: time.Duration(int32(retry)) * time.Microsecond * 997,
			}
			enc := appendErrorBody(nil, &in)
			out, err := parseErrorBody(enc)
			if err != nil {
				t.Fatalf("appendErrorBody(%+v) = % x does not parse: %v", in, enc, err)
			}
			if te, err := testkit.ParseErrorBody(enc); err != nil || te.Message != out.msg {
				t.Fatalf("testkit parses % x as %+v, %v", enc, te, err)
			}
			if out.code != in.code || out.neverRan != in.neverRan {
				t.Fatalf("code/neverRan %d/%v became %d/%v", in.code, in.neverRan, out.code, out.neverRan)
			}
			if len(out.msg) > maxErrorMsg || !strings.HasPrefix(in.msg, out.msg) || len(in.msg) <= maxErrorMsg && out.msg != in.msg {
				t.Fatalf("message of %d bytes encoded as %d bytes %q", len(in.msg), len(out.msg), out.msg)
			}
			if utf8.ValidString(in.msg) && !utf8.ValidString(out.msg) {
				t.Fatalf("valid UTF-8 message of %d bytes encoded as invalid UTF-8 (cut inside a rune at %d bytes): ...%q", len(in.msg), len(out.msg), out.msg[max(0, len(out.msg)-8):])
			}
			switch {
			case in.retryAfter <= 0:
				if out.retryAfter != 0 {
					t.Fatalf("retry-after %v encoded as %v", in.retryAfter, out.retryAfter)
				}
			case out.retryAfter < in.retryAfter || out.retryAfter-in.retryAfter >= time.Millisecond:
				t.Fatalf("retry-after %v encoded as %v, want it rounded up to whole milliseconds", in.retryAfter, out.retryAfter)
			}
			return
		}

		e, err := parseErrorBody(b)
		var msgLen int
		if len(b) >= errorFixedLen {
			msgLen = int(binary.BigEndian.Uint16(b[6:8]))
		}
		whole := len(b) >= errorFixedLen && len(b) >= errorFixedLen+msgLen
		if !whole {
			if err == nil {
				t.Fatalf("parseErrorBody accepted a truncated body % x", b)
			}
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
			return
		}
		body := b[:errorFixedLen+msgLen]
		te, terr := testkit.ParseErrorBody(body)
		if terr != nil {
			t.Fatalf("testkit rejects % x: %v", body, terr)
		}
		if te.Flags&^testkit.ErrFlagNeverRan != 0 {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error body with reserved flags %#x: err = %v, want ErrProtocol", te.Flags, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("parseErrorBody rejected a valid body % x: %v", body, err)
		}
		if e.code != te.Code || e.neverRan != te.NeverRan() || e.msg != te.Message ||
			e.retryAfter != time.Duration(te.RetryAfterMillis)*time.Millisecond {
			t.Fatalf("parseErrorBody(% x) = %+v, testkit decodes %+v", body, e, te)
		}
		if len(e.msg) <= maxErrorMsg {
			if enc := appendErrorBody(nil, &e); !bytes.Equal(enc, body) {
				t.Fatalf("appendErrorBody(parseErrorBody(% x)) = % x", body, enc)
			}
		}
		if n, budget := bytesPerRun(8, func() { parseErrorBody(b) }), uint64(2*len(b)+64); n > budget {
			t.Fatalf("parseErrorBody of %d bytes allocates %d bytes, budget %d", len(b), n, budget)
		}
	})
}

// ---------------------------------------------------------------------------------------------
// Server fixtures shared by FuzzHello and FuzzServerProgram

var (
	fzEcho    = MakeMethodKey("fuzz", "Echo")    // replies with its args (the same bytes)
	fzSigned  = MakeMethodKey("fuzz", "Signed")  // signed with fzSignature; replies with a copy of its args
	fzBlock   = MakeMethodKey("fuzz", "Block")   // returns its context's error once it is done
	fzSlow    = MakeMethodKey("fuzz", "Slow")    // works 2 ms, then returns its context's error once it is done
	fzPanic   = MakeMethodKey("fuzz", "Panic")   // panics
	fzFail    = MakeMethodKey("fuzz", "Fail")    // fails with a retry-after of 1.5 ms
	fzMissing = MakeMethodKey("fuzz", "Missing") // not registered
	fzKeys    = [...]MethodKey{fzEcho, fzSigned, fzBlock, fzPanic, fzFail, fzMissing, fzSlow}
)

const fzSignature = 0x5157

func fzHandlerEcho(ctx context.Context, args []byte) ([]byte, error) { return args, nil }

func fzHandlerClone(ctx context.Context, args []byte) ([]byte, error) { return bytes.Clone(args), nil }

func fzHandlerBlock(ctx context.Context, args []byte) ([]byte, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func fzHandlerSlow(ctx context.Context, args []byte) ([]byte, error) {
	time.Sleep(2 * time.Millisecond)
	<-ctx.Done()
	return nil, ctx.Err()
}

func fzHandlerPanic(ctx context.Context, args []byte) ([]byte, error) { panic("fuzz: handler panics") }

func fzHandlerFail(ctx context.Context, args []byte) ([]byte, error) {
	return nil, &HandlerError{Err: errors.New("fuzz: handler fails"), RetryAfter: 1500 * time.Microsecond}
}

func fzHandlers() *HandlerMap {
	var hm HandlerMap
	hm.Set("fuzz", "Echo", fzHandlerEcho)
	hm.SetSigned("fuzz", "Signed", fzSignature, fzHandlerClone)
	hm.Set("fuzz", "Block", fzHandlerBlock)
	hm.Set("fuzz", "Slow", fzHandlerSlow)
	hm.Set("fuzz", "Panic", fzHandlerPanic)
	hm.Set("fuzz", "Fail", fzHandlerFail)
	return &hm
}

var fzLogger = slog.New(slog.DiscardHandler)

// fzAllocConst is the constant part of a server connection's allocation budget: its buffers,
// and up-front buffers for the partial requests it may hold (2 x 4 of 64 KiB at most).
const fzAllocConst = 2 << 20

const (
	fzTimeout      = 3 * time.Second // for anything that should take microseconds
	fzWriteTimeout = 2 * time.Second // a server that reads nothing this long is deaf
)

// fzBytes returns n bytes of request id at offset off: a pattern, so that every chunk of a
// request can be generated on its own and an echo checked.
func fzBytes(id uint64, off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(uint64(off+i)*7 + id*131)
	}
	return b
}

// serverStacks returns the stacks of the goroutines running server code or fuzz handlers.
func serverStacks() string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		for _, fn := range []string{
			"weft/call.serveConn", "weft/call.ServeOn", "weft/call.(*serverConn)", "weft/call.(*readerState)",
			"weft/call.(*writer)", "weft/call.(*serverCall)", "weft/call.fzHandler",
		} {
			if strings.Contains(g, fn) {
				out = append(out, g)
				break
			}
		}
	}
	return strings.Join(out, "\n\n")
}

// checkGoroutines waits, boundedly, for the goroutine count to fall back to baseline, and fails
// t if goroutines of the server are still running then.
func checkGoroutines(t *testing.T, baseline int) {
	t.Helper()
	deadline := time.Now().Add(fzTimeout)
	for i := 0; runtime.NumGoroutine() > baseline; i++ {
		if time.Now().After(deadline) {
			if s := serverStacks(); s != "" {
				t.Fatalf("server goroutines still running %v after ServeOn returned:\n%s", fzTimeout, s)
			}
			return
		}
		if i < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(time.Millisecond)
		}
	}
}

// waitClosed waits at most d for ch to be closed.
func waitClosed(ch <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// fzNotifier lets goroutines wait, boundedly, for a condition on state guarded by mu.
type fzNotifier struct {
	mu      sync.Mutex
	changed chan struct{}
}

// notifyLocked wakes the waiters. REQUIRES: n.mu is held.
func (n *fzNotifier) notifyLocked() {
	if n.changed != nil {
		close(n.changed)
		n.changed = nil
	}
}

// waitFor waits at most d for cond, called with n.mu held, to hold.
func (n *fzNotifier) waitFor(d time.Duration, cond func() bool) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		n.mu.Lock()
		if cond() {
			n.mu.Unlock()
			return true
		}
		if n.changed == nil {
			n.changed = make(chan struct{})
		}
		ch := n.changed
		n.mu.Unlock()
		select {
		case <-ch:
		case <-t.C:
			return false
		}
	}
}

// fzCall is what the client sent for one request id, and what it received.
type fzCall struct {
	key        MethodKey
	want       []byte // the whole request, set before its last frame is written
	complete   bool
	terminals  int
	term       testkit.Frame
	replying   bool
	reply      []byte
	replyTotal int
}

// fzMonitor checks every frame the server writes.
type fzMonitor struct {
	fzNotifier
	// guarded by mu
	maxFrame   int // the client's limits, from its hello
	maxMessage uint32
	calls      map[uint64]*fzCall
	pings      map[uint64]int // pings sent and not answered, by id
	goAways    []testkit.GoAway
	refusals   []string // ERROR frames with code 1 (refused)
	frames     int
	traffic    int   // bytes of the frames read
	desync     bool  // the server may frame the client's bytes differently than the client
	ended      error // why reading stopped
	errs       []string
}

func newMonitor(maxFrame int, maxMessage uint32) *fzMonitor {
	return &fzMonitor{maxFrame: maxFrame, maxMessage: maxMessage, calls: map[uint64]*fzCall{}, pings: map[uint64]int{}}
}

// addCall records a CALL for id about to be written; the first CALL of an id counts.
func (m *fzMonitor) addCall(id uint64, key MethodKey) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.calls[id] == nil {
		m.calls[id] = &fzCall{key: key}
	}
}

// setWant records the whole request of id, before its last frame is written.
func (m *fzMonitor) setWant(id uint64, want []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.calls[id]; c != nil && !c.complete {
		c.want, c.complete = want, true
	}
}

func (m *fzMonitor) addPing(id uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pings[id]++
}

func (m *fzMonitor) terminated(id uint64) bool {
	c := m.calls[id]
	return c != nil && c.terminals > 0
}

// read reads frames from p until it fails, checking each.
func (m *fzMonitor) read(p *testkit.RawPeer) {
	for {
		f, err := p.ReadFrame()
		m.mu.Lock()
		if err != nil {
			m.ended = err
			m.notifyLocked()
			m.mu.Unlock()
			return
		}
		m.frameLocked(f)
		m.notifyLocked()
		m.mu.Unlock()
	}
}

func (m *fzMonitor) violations() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.errs)
}

// frameLocked checks one frame from the server. REQUIRES: m.mu is held.
func (m *fzMonitor) frameLocked(f testkit.Frame) {
	m.frames++
	m.traffic += testkit.HeaderSize + len(f.Payload)
	bad := func(format string, args ...any) {
		if len(m.errs) < 20 {
			m.errs = append(m.errs, fmt.Sprintf("server frame %v (#%d): ", f, m.frames)+fmt.Sprintf(format, args...))
		}
	}
	if f.Reserved != 0 {
		bad("reserved header bytes %#x", f.Reserved)
	}
	if len(f.Payload) > m.maxFrame {
		bad("payload of %d bytes exceeds the client's max frame size %d", len(f.Payload), m.maxFrame)
	}
	switch f.Type {
	case testkit.TypeReply, testkit.TypeData:
		if f.Flags&^testkit.FlagEnd != 0 {
			bad("reserved flags")
		}
		c := m.calls[f.ID]
		switch {
		case c == nil && m.desync:
			return
		case c == nil:
			bad("for a request id the client never sent")
			return
		case c.terminals > 0:
			bad("after the call's terminal frame %v", c.term)
			return
		}
		payload := f.Payload
		if f.Type == testkit.TypeReply {
			if c.replying {
				bad("a second REPLY before the first ended")
				return
			}
			rh, rest, err := testkit.ParseReplyHeader(f.Payload)
			if err != nil {
				bad("%v", err)
				return
			}
			if l := float64(rh.Load); math.IsNaN(l) || math.IsInf(l, 0) || l < 0 {
				bad("load %v", rh.Load)
			}
			if rh.Total > m.maxMessage {
				bad("reply of %d bytes exceeds the client's max message size %d", rh.Total, m.maxMessage)
			}
			c.replying, c.replyTotal, c.reply = true, int(rh.Total), nil
			payload = rest
		} else if !c.replying {
			bad("DATA for a call with no reply in progress")
			return
		}
		c.reply = append(c.reply, payload...)
		switch {
		case len(c.reply) > c.replyTotal:
			bad("reply carries %d bytes, its header declares %d", len(c.reply), c.replyTotal)
		case f.End() && len(c.reply) != c.replyTotal:
			bad("END after %d of %d reply bytes", len(c.reply), c.replyTotal)
		case !f.End() && len(c.reply) == c.replyTotal:
			bad("reply complete (%d bytes) without END", c.replyTotal)
		}
		if !f.End() {
			return
		}
		m.terminalLocked(f, c, bad)
		switch {
		case c.key != fzEcho && c.key != fzSigned:
			bad("REPLY to a call of %x, whose handler never replies", c.key[:4])
		case !c.complete:
			bad("REPLY to a request the client never completed")
		case !bytes.Equal(c.reply, c.want):
			bad("echo of a %d-byte request is %d bytes and differs at byte %d", len(c.want), len(c.reply), firstDiff(c.reply, c.want))
		}
	case testkit.TypeError:
		if f.Flags != 0 {
			bad("flags on an ERROR frame")
		}
		c := m.calls[f.ID]
		if c == nil {
			if !m.desync {
				bad("for a request id the client never sent")
			}
			return
		}
		if c.terminals > 0 {
			bad("after the call's terminal frame %v", c.term)
			return
		}
		m.terminalLocked(f, c, bad)
		e, err := testkit.ParseErrorBody(f.Payload)
		if err != nil {
			bad("%v", err)
			return
		}
		if len(e.Message) > maxErrorMsg {
			bad("message of %d bytes", len(e.Message))
		}
		if e.Flags&^testkit.ErrFlagNeverRan != 0 {
			bad("reserved error flags %#x", e.Flags)
		}
		registered := c.key == fzEcho || c.key == fzSigned || c.key == fzBlock || c.key == fzSlow || c.key == fzPanic || c.key == fzFail
		switch e.Code {
		case testkit.CodeRefused:
			m.refusals = append(m.refusals, fmt.Sprintf("request %d: %q", f.ID, e.Message))
		case testkit.CodeUnknownMethod:
			if registered {
				bad("unknown-method error for a registered method: %q", e.Message)
			}
		case testkit.CodeSignatureMismatch:
			if c.key != fzSigned {
				bad("signature mismatch for an unsigned method: %q", e.Message)
			}
		case testkit.CodeTooLarge:
		case testkit.CodeDeadline, testkit.CodeCanceled:
			// Never-ran, or the handler returned its context's error.
			if !e.NeverRan() && c.key != fzBlock && c.key != fzSlow {
				bad("code %d from a handler that never returns its context's error: %q", e.Code, e.Message)
			}
		case testkit.CodeHandlerFailed:
			if c.key != fzFail && c.key != fzBlock && c.key != fzSlow {
				bad("handler-failed error from a handler that never fails: %q", e.Message)
			}
			if c.key == fzFail && e.RetryAfterMillis != 2 {
				bad("retry-after %d ms, want 1.5 ms rounded up to 2", e.RetryAfterMillis)
			}
		case testkit.CodePanic:
			if c.key != fzPanic {
				bad("panic error from a handler that never panics")
			}
		default:
			bad("unknown error code %d", e.Code)
		}
		if e.NeverRan() && e.Code > testkit.CodeCanceled || !e.NeverRan() && e.Code < testkit.CodeTooLarge {
			bad("error code %d with never-ran=%v", e.Code, e.NeverRan())
		}
		if !registered && !e.NeverRan() {
			bad("a call to an unregistered method ran")
		}
	case testkit.TypePong:
		if f.Flags != 0 || len(f.Payload) != 0 {
			bad("malformed PONG")
		}
		if m.pings[f.ID] == 0 {
			if !m.desync {
				bad("PONG for no outstanding PING")
			}
		} else {
			m.pings[f.ID]--
		}
	case testkit.TypeGoAway:
		if f.Flags != 0 {
			bad("flags on a GOAWAY")
		}
		g, err := testkit.ParseGoAway(f)
		if err != nil {
			bad("%v", err)
			return
		}
		if g.Code > testkit.CloseStopping {
			bad("unknown close code %d", g.Code)
		}
		if len(g.Message) > maxErrorMsg {
			bad("go-away message of %d bytes", len(g.Message))
		}
		m.goAways = append(m.goAways, g)
	default:
		bad("a frame type servers never send")
	}
}

func (m *fzMonitor) terminalLocked(f testkit.Frame, c *fzCall, bad func(string, ...any)) {
	c.terminals++
	if c.terminals > 1 {
		bad("second terminal frame of the call (the first was %v)", c.term)
	}
	c.term = f
	c.replying = false
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// fzServer runs ServeOn on one end of a pipe.
type fzServer struct {
	conn   net.Conn // the client's end
	served chan struct{}
	cancel context.CancelFunc
}

func startServer(opts ServerOptions) *fzServer {
	c, s := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	srv := &fzServer{conn: c, served: make(chan struct{}), cancel: cancel}
	hm := fzHandlers()
	go func() {
		defer close(srv.served)
		ServeOn(ctx, s, hm, opts)
	}()
	return srv
}

// stop closes the client's end and checks that ServeOn returns within fzTimeout; if it does
// not, it stops the server through its context (a hard stop) so that the test can go on.
func (srv *fzServer) stop(t *testing.T) {
	t.Helper()
	srv.conn.Close()
	if !waitClosed(srv.served, fzTimeout) {
		t.Errorf("ServeOn did not return within %v of the client closing the connection; server goroutines:\n%s", fzTimeout, serverStacks())
		srv.cancel()
		if !waitClosed(srv.served, 2*time.Second) {
			t.Fatalf("ServeOn did not return after a hard stop either")
		}
	}
	srv.cancel()
}

// ---------------------------------------------------------------------------------------------
// FuzzHello

// The fates of a client hello.
const (
	helloIncomplete    = iota // the server waits for more bytes
	helloSilent               // the server closes without writing: bad magic or rest length
	helloMismatch             // the server writes its hello and closes: another version
	helloMismatchShort        // another version, and fewer bytes than the hello declares: the server may answer at once or wait for the rest
	helloRejected             // the server closes without writing: limits out of range
	helloAccepted             // the server answers and serves frames
)

func helloFate(in []byte) int {
	if len(in) < testkit.HelloPrefixSize {
		return helloIncomplete
	}
	rest := testkit.HelloRestLen(in)
	switch {
	case string(in[:4]) != testkit.Magic || rest < testkit.HelloRestSize || rest > testkit.MaxHelloRest:
		return helloSilent
	case in[4] != testkit.Version && len(in) < testkit.HelloPrefixSize+rest:
		return helloMismatchShort
	case in[4] != testkit.Version:
		return helloMismatch
	case len(in) < testkit.HelloPrefixSize+rest:
		return helloIncomplete
	}
	h, err := testkit.ParseHello(in)
	if err != nil {
		panic(err)
	}
	if h.MaxFrame < minFrameSize || h.MaxFrame > maxWireLimit || h.MaxMessage > maxWireLimit || h.Budget > maxWireLimit {
		return helloRejected
	}
	return helloAccepted
}

// fzSink collects what the server writes.
type fzSink struct {
	fzNotifier
	buf []byte
	err error
}

func (s *fzSink) drain(c net.Conn) {
	b := make([]byte, 4096)
	for {
		n, err := c.Read(b)
		s.mu.Lock()
		s.buf = append(s.buf, b[:n]...)
		s.err = err
		s.notifyLocked()
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func helloSeedsWithFrames() [][]byte {
	h := testkit.ClientHello().Encode()
	call := func(id uint64, key MethodKey, end bool, total int, args []byte) []byte {
		p := testkit.CallHeader{Key: key, Total: uint32(total)}.Encode()
		var flags byte
		if end {
			flags = testkit.FlagEnd
		}
		return testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeCall, Flags: flags, ID: id, Payload: append(p, args...)})
	}
	data := func(id uint64, end bool, b []byte) []byte {
		var flags byte
		if end {
			flags = testkit.FlagEnd
		}
		return testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeData, Flags: flags, ID: id, Payload: b})
	}
	ping := testkit.EncodeFrame(testkit.Frame{Type: testkit.TypePing, ID: 77})
	return [][]byte{
		slices.Concat(h, ping),
		slices.Concat(h, call(1, fzEcho, true, 3, []byte("abc")), ping),
		slices.Concat(h, call(1, fzEcho, false, 6, []byte("abc")), data(1, true, []byte("def"))),
		slices.Concat(h, call(1, fzPanic, true, 0, nil), call(2, fzMissing, true, 0, nil), call(3, fzFail, true, 0, nil)),
		slices.Concat(h, call(5, fzBlock, true, 0, nil), testkit.EncodeFrame(testkit.Frame{Type: testkit.TypeCancel, ID: 5})),
		slices.Concat(h, call(2, fzEcho, true, 1, []byte("x")), call(2, fzEcho, true, 1, []byte("y"))),
		slices.Concat(h, testkit.EncodeFrame(testkit.Frame{Type: 0x10, ID: 1})),
		slices.Concat(h, data(9, true, []byte("orphan"))),
		slices.Concat(h[:20]),
		slices.Concat(h, call(1, fzEcho, true, 3, []byte("ab"))),
	}
}

func FuzzHello(f *testing.F) {
	for _, s := range helloSeeds() {
		f.Add(s)
	}
	for _, s := range helloSeedsWithFrames() {
		f.Add(s)
	}
	f.Add([]byte{})
	f.Add([]byte("WEF"))
	opts := ServerOptions{Logger: fzLogger, HandshakeTimeout: time.Second, IdleTimeout: -1, DrainTimeout: -1}
	full := opts.withDefaults()
	wantHello := helloFromLimits(full.Limits, full.Limits.MaxConcurrentCalls, 0).append(nil)

	f.Fuzz(func(t *testing.T, in []byte) {
		checkHandshake(t, in, &full)

		baseline := runtime.NumGoroutine()
		srv := startServer(opts)
		sink := &fzSink{}
		sunk := make(chan struct{})
		go func() {
			defer close(sunk)
			sink.drain(srv.conn)
		}()
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			srv.conn.SetWriteDeadline(time.Now().Add(fzTimeout))
			srv.conn.Write(in)
		}()

		fate := helloFate(in)
		switch fate {
		case helloSilent, helloMismatch, helloRejected:
			// The server closes the connection on its own.
			if !waitClosed(srv.served, fzTimeout) {
				t.Errorf("fate %d: ServeOn still running %v after a hello it must refuse", fate, fzTimeout)
			}
		case helloIncomplete, helloMismatchShort:
			// The server has read everything and waits for the rest of the hello, or it
			// answered a version it does not speak at once and closed.
			if !waitClosed(wrote, fzTimeout) {
				t.Errorf("the server did not read an incomplete hello within %v", fzTimeout)
			}
		case helloAccepted:
			if !sink.waitFor(fzTimeout, func() bool { return len(sink.buf) >= len(wantHello) || sink.err != nil }) {
				t.Errorf("no answer to a valid hello within %v", fzTimeout)
			}
			if !waitClosed(wrote, fzTimeout) {
				t.Errorf("the server did not read the client's %d bytes within %v", len(in), fzTimeout)
			}
			// If the client's frames are whole, a PING after them is answered (unless they
			// made the server close): the server has then handled every frame before it.
			_, sent, _ := testkit.SplitHello(in)
			if _, err := testkit.SplitFrames(sent); err == nil {
				srv.conn.SetWriteDeadline(time.Now().Add(fzTimeout))
				if _, err := srv.conn.Write(testkit.EncodeFrame(testkit.Frame{Type: testkit.TypePing, ID: fzHelloPing})); err == nil {
					if !sink.waitFor(fzTimeout, func() bool {
						return sink.err != nil || len(sink.buf) >= len(wantHello) && hasPong(sink.buf[len(wantHello):])
					}) {
						t.Errorf("no PONG within %v", fzTimeout)
					}
				}
			}
		}
		srv.stop(t)
		<-sunk
		<-wrote
		got := sink.buf

		switch fate {
		case helloSilent, helloRejected, helloIncomplete:
			if len(got) != 0 {
				t.Fatalf("fate %d: the server wrote % x", fate, got)
			}
		case helloMismatchShort:
			if len(got) != 0 && !bytes.Equal(got, wantHello) {
				t.Fatalf("answer to a short version-%d hello:\n% x\nwant nothing or the server's hello and nothing else:\n% x", in[4], got, wantHello)
			}
		case helloMismatch:
			if !bytes.Equal(got, wantHello) {
				t.Fatalf("answer to a version-%d hello:\n% x\nwant the server's hello and nothing else:\n% x", in[4], got, wantHello)
			}
		case helloAccepted:
			sh, frames, err := testkit.SplitHello(got)
			if err != nil || sh.Version != testkit.Version || !bytes.Equal(got[:len(wantHello)], wantHello) {
				t.Fatalf("answer to a valid hello: %v\n% x\nwant it to start with\n% x", err, got, wantHello)
			}
			checkServerStream(t, in, frames)
		}
		checkGoroutines(t, baseline)
	})
}

// memConn is a connection that reads in and discards what is written, for measuring the
// server's handshake alone.
type memConn struct {
	in      []byte
	off     int
	written int
}

func (c *memConn) Read(b []byte) (int, error) {
	if c.off >= len(c.in) {
		return 0, io.EOF
	}
	n := copy(b, c.in[c.off:])
	c.off += n
	return n, nil
}
func (c *memConn) Write(b []byte) (int, error)      { c.written += len(b); return len(b), nil }
func (c *memConn) Close() error                     { return nil }
func (c *memConn) LocalAddr() net.Addr              { return nil }
func (c *memConn) RemoteAddr() net.Addr             { return nil }
func (c *memConn) SetDeadline(time.Time) error      { return nil }
func (c *memConn) SetReadDeadline(time.Time) error  { return nil }
func (c *memConn) SetWriteDeadline(time.Time) error { return nil }

// checkHandshake runs serverHandshake on in alone: its verdict must be DESIGN.md's, and what it
// allocates must not depend on what the client sends or declares. A peer that is not shown to
// speak weft (bad magic or rest length) costs at most a few small allocations: no hello buffer.
func checkHandshake(t *testing.T, in []byte, opts *ServerOptions) {
	t.Helper()
	ctx := context.Background()
	c := &memConn{in: in}
	peer, _, err := serverHandshake(ctx, c, opts)
	fate := helloFate(in)
	switch {
	case fate == helloAccepted && err != nil:
		t.Fatalf("serverHandshake rejected a valid hello: %v", err)
	case fate != helloAccepted && err == nil:
		t.Fatalf("serverHandshake accepted a hello of fate %d: %+v", fate, peer)
	case fate == helloAccepted:
		th, _ := testkit.ParseHello(in)
		if peer.maxFrame != th.MaxFrame || peer.maxMessage != th.MaxMessage || peer.budget != th.Budget ||
			peer.mdBytes != th.MaxMetadataBytes || peer.mdEntries != th.MaxMetadataEntries || peer.tracestate != th.MaxTracestate ||
			peer.maxConcurrent != th.MaxConcurrent || peer.idleMillis != th.IdleTimeoutMillis || peer.features != th.Features {
			t.Fatalf("serverHandshake decoded %+v, testkit %+v", peer, th)
		}
	}
	want := 0 // bytes the server writes: its hello, or nothing
	if fate == helloAccepted || fate == helloMismatch {
		want = helloPrefixLen + helloRestLen
	}
	switch {
	case fate == helloMismatchShort:
		if c.written != 0 && c.written != helloPrefixLen+helloRestLen {
			t.Fatalf("serverHandshake wrote %d bytes for a short hello of another version, want 0 or a hello", c.written)
		}
	case c.written != want:
		t.Fatalf("serverHandshake wrote %d bytes for a hello of fate %d, want %d", c.written, fate, want)
	}
	if !allocChecks {
		return
	}
	run := func() {
		c.off = 0
		serverHandshake(ctx, c, opts)
	}
	maxAllocs, maxBytes := 12.0, uint64(2<<10)
	if fate == helloSilent || len(in) < helloPrefixLen {
		maxAllocs, maxBytes = 10, 512
	}
	if a := allocsPerRun(10, run); a > maxAllocs {
		t.Fatalf("serverHandshake of a hello of fate %d: %v allocations, budget %v", fate, a, maxAllocs)
	}
	if n := bytesPerRun(10, run); n > maxBytes {
		t.Fatalf("serverHandshake of a hello of fate %d: %d bytes allocated, budget %d", fate, n, maxBytes)
	}
}

// fzHelloPing is the id of the PING FuzzHello sends after the client's frames.
const fzHelloPing = 0xF00D_F00D_F00D

// hasPong reports whether the whole frames at the start of b include fzHelloPing's PONG.
func hasPong(b []byte) bool {
	fs, _ := testkit.SplitFrames(b)
	for _, f := range fs {
		if f.Type == testkit.TypePong && f.ID == fzHelloPing {
			return true
		}
	}
	return false
}

// checkServerStream checks the frames a server wrote in answer to in, a client's hello and
// frames. The last frame may be cut short: the client closed the connection.
func checkServerStream(t *testing.T, in, out []byte) {
	t.Helper()
	ch, sent, err := testkit.SplitHello(in)
	if err != nil {
		t.Fatal(err)
	}
	m := newMonitor(int(ch.MaxFrame), ch.MaxMessage)
	// The requests the server may answer, and the echoes the ones it completes must get.
	type partial struct {
		total int
		buf   []byte
	}
	open := map[uint64]*partial{}
	fs, _ := testkit.SplitFrames(sent)
	for _, f := range fs {
		switch f.Type {
		case testkit.TypeCall:
			var key MethodKey
			copy(key[:], f.Payload)
			if m.calls[f.ID] != nil {
				continue
			}
			m.calls[f.ID] = &fzCall{key: key}
			h, args, err := testkit.ParseCallHeader(f.Payload)
			switch {
			case err != nil || len(args) > int(h.Total):
			case f.End() && len(args) == int(h.Total):
				m.calls[f.ID].want, m.calls[f.ID].complete = args, true
			case !f.End():
				open[f.ID] = &partial{total: int(h.Total), buf: slices.Clone(args)}
			}
		case testkit.TypeData:
			p := open[f.ID]
			if p == nil {
				continue
			}
			p.buf = append(p.buf, f.Payload...)
			switch {
			case len(p.buf) > p.total:
				delete(open, f.ID)
			case f.End() && len(p.buf) == p.total:
				m.calls[f.ID].want, m.calls[f.ID].complete = p.buf, true
				delete(open, f.ID)
			case f.End():
				delete(open, f.ID)
			}
		case testkit.TypePing:
			m.pings[f.ID]++
		}
	}
	m.pings[fzHelloPing]++
	frames, _ := testkit.SplitFrames(out)
	for _, f := range frames {
		m.frameLocked(f)
	}
	if errs := m.errs; len(errs) > 0 {
		t.Fatalf("the server's answer to\n% x\nis wrong:\n%s", in, strings.Join(errs, "\n"))
	}
}

// ---------------------------------------------------------------------------------------------
// FuzzServerProgram

// The server's limits in FuzzServerProgram: small, so that programs reach them.
var fzLimits = Limits{
	MaxFrameSize:       16 << 10,
	MaxMessageSize:     64 << 10,
	MaxConcurrentCalls: 4,
	MaxBufferedBytes:   64 << 10,
	MaxMetadataBytes:   256,
	MaxMetadataEntries: 4,
	MaxTracestate:      32,
}

// Operations of a program. Each is one byte (mod fzOps) followed by its operand bytes; a
// program's first byte selects options (see FuzzServerProgram).
const (
	opCall    = iota // a complete request in one CALL frame: method, id, options, size (2)
	opPartial        // the first frame of a longer request: method, id, options, size (2), first
	opData           // a DATA frame: target, mode
	opCancel         // a CANCEL: target
	opPing           // a PING: id (2)
	opPong           // a PONG: id
	opRaw            // any frame: type, flags, reserved, length mode, id, then payload bytes
	opGoAway         // a GOAWAY from the client, which only servers send
	opClose          // the end of the program
	opSettle         // cancel the calls in flight and wait for all their terminal frames
	opBig            // a complete multi-frame request: method, id, options, size (2)
	opSleep          // sleep: duration
	fzOps
)

// fzClient runs a program against a server connection. It tracks whether the program has
// obeyed the protocol so far ("legal"); a legal program must get exactly one terminal frame per
// request and no protocol error from the server. Whatever the program does, every frame the
// server writes must be well formed (fzMonitor) and ServeOn must return once the client closes.
type fzClient struct {
	t        *testing.T
	conn     net.Conn
	mon      *fzMonitor
	prog     []byte
	pos      int
	frameMax int // the server's max frame size

	maxID   uint64            // highest CALL id sent
	legal   bool              // the program has obeyed the protocol so far
	why     string            // the first thing it did that the protocol forbids
	dead    bool              // a write failed
	batch   []uint64          // requests sent since the last settle
	sent    []uint64          // every request id sent, in order
	open    map[uint64]*fzReq // requests the client is still sending
	openIDs []uint64
	dropped []uint64 // partial requests the client cancelled: DATA for them is discarded
	partial int      // declared bytes of open requests within the message limit
	cancels int      // CANCELs the program sent (settles excluded)
	pings   int
	pingSeq uint64
	traffic int // bytes the client wrote
}

// fzReq is a request the client has started and not finished sending.
type fzReq struct {
	total, sent int
	counted     int // bytes counted in fzClient.partial
}

func (c *fzClient) next() byte {
	if c.pos >= len(c.prog) {
		c.pos++
		return 0
	}
	b := c.prog[c.pos]
	c.pos++
	return b
}

func (c *fzClient) take(n int) []byte {
	start := min(c.pos, len(c.prog))
	end := min(c.pos+n, len(c.prog))
	c.pos += n
	return slices.Clone(c.prog[start:end])
}

func (c *fzClient) illegal(format string, args ...any) {
	if c.legal {
		c.legal = false
		c.why = fmt.Sprintf(format, args...)
	}
}

// write writes one frame; a server that reads nothing for fzWriteTimeout fails the test.
func (c *fzClient) write(f testkit.Frame) bool {
	if c.dead {
		return false
	}
	c.conn.SetWriteDeadline(time.Now().Add(fzWriteTimeout))
	b := testkit.EncodeFrame(f)
	c.traffic += len(b)
	if _, err := c.conn.Write(b); err != nil {
		c.dead = true
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.t.Errorf("the server read nothing for %v while the client was writing %v (legal program: %v %s); server goroutines:\n%s",
				fzWriteTimeout, f, c.legal, c.why, serverStacks())
		}
		return false
	}
	return true
}

// nextID returns the id of a new request from an operand: mostly increasing, sometimes
// repeated, decreasing or jumping.
func (c *fzClient) nextID(b byte) uint64 {
	var id uint64
	switch {
	case b < 0xF0:
		id = c.maxID + 1 + uint64(b%3)
	case b < 0xF8:
		id = c.maxID
	case b < 0xFE:
		if k := uint64(b - 0xF7); c.maxID >= k {
			id = c.maxID - k
		}
	case b == 0xFE:
		id = c.maxID + 1<<32
	default:
		id = c.maxID + 1<<62
	}
	return id
}

// call sends the first frame of a request: all of it (op opCall), or the first chunk (opPartial,
// and opBig, which then sends the rest).
func (c *fzClient) call(op byte) {
	m, idb, opt := c.next(), c.next(), c.next()
	size := int(c.next())<<6 | int(c.next()&63)
	key := fzKeys[int(m)%len(fzKeys)]
	id := c.nextID(idb)
	fresh := id > c.maxID
	if !fresh {
		c.illegal("CALL %d after CALL %d", id, c.maxID)
	}

	h := testkit.CallHeader{Key: key, Total: 0}
	switch (m >> 3) & 3 {
	case 1:
		h.Signature = fzSignature
	case 2:
		h.Signature = fzSignature + 1
	}
	if opt&1 != 0 {
		d := [...]uint64{0, uint64(time.Millisecond), uint64(time.Hour), math.MaxUint64}[(opt>>3)&3]
		h.Deadline = &d
	}
	if opt&2 != 0 {
		h.HasTrace, h.TraceID, h.SpanID, h.TraceFlags = true, [16]byte{1, byte(id)}, [8]byte{2}, 1
		h.Tracestate = "k=v"
		if opt&0x40 != 0 {
			h.Tracestate = strings.Repeat("t", fzLimits.MaxTracestate+1)
		}
	}
	if opt&4 != 0 {
		h.HasMetadata = true
		n := 2
		if opt&0x20 != 0 {
			n = fzLimits.MaxMetadataEntries + 1
		}
		for i := range n {
			h.Metadata = append(h.Metadata, [2]string{fmt.Sprint("k", i), "v"})
		}
	}
	if opt&0x80 != 0 {
		h.Flags = 0x08
		c.illegal("reserved call flag")
	}
	room := c.frameMax - len(h.Encode())
	var total, first int
	switch op {
	case opCall:
		total = min(size, room)
		first = total
	case opPartial:
		total = size * 5 // up to 80 KiB: some over the message limit
		first = min(total, room, int(c.next())*64)
	case opBig:
		total = min(room+1+size*4, fzLimits.MaxMessageSize)
		first = room
	}
	h.Total = uint32(total)
	if len(c.batch) >= fzLimits.MaxConcurrentCalls {
		c.illegal("more than %d requests in flight", fzLimits.MaxConcurrentCalls)
	}
	var req *fzReq
	if op != opCall {
		req = &fzReq{total: total, sent: first}
		if total <= fzLimits.MaxMessageSize {
			req.counted = total
			if c.partial+total > fzLimits.MaxBufferedBytes {
				c.illegal("partial requests declare %d bytes, over the budget of %d", c.partial+total, fzLimits.MaxBufferedBytes)
			}
		}
	}
	if fresh {
		c.maxID = id
		c.mon.addCall(id, MethodKey(key))
		if op == opCall {
			c.mon.setWant(id, fzBytes(id, 0, total))
		}
		c.batch = append(c.batch, id)
		c.sent = append(c.sent, id)
		if req != nil {
			c.partial += req.counted
			c.open[id] = req
			c.openIDs = append(c.openIDs, id)
		}
	}
	f := testkit.Frame{Type: testkit.TypeCall, ID: id, Payload: append(h.Encode(), fzBytes(id, 0, first)...)}
	if op == opCall {
		f.Flags = testkit.FlagEnd
	}
	if !c.write(f) || op != opBig || !fresh {
		return
	}
	for !c.dead && c.open[id] != nil {
		n := min(req.total-req.sent, c.frameMax)
		c.data(id, req, n, n == req.total-req.sent)
	}
}

// data sends n more bytes of the open request id, with END if end.
func (c *fzClient) data(id uint64, req *fzReq, n int, end bool) {
	off := req.sent
	switch {
	case off+n > req.total:
		c.illegal("request %d: DATA past its %d bytes", id, req.total)
	case end && off+n < req.total:
		c.illegal("request %d: END after %d of %d bytes", id, off+n, req.total)
	case n > c.frameMax:
		c.illegal("DATA frame of %d bytes", n)
	}
	req.sent += n
	if end {
		if req.sent == req.total && n <= c.frameMax {
			c.mon.setWant(id, fzBytes(id, 0, req.total))
		}
		c.closeReq(id)
	}
	f := testkit.Frame{Type: testkit.TypeData, ID: id, Payload: fzBytes(id, off, n)}
	if end {
		f.Flags = testkit.FlagEnd
	}
	c.write(f)
}

// closeReq forgets the open request id. Its bytes stay counted against the budget until the
// request is answered: DESIGN.md has a client count a multi-frame request until its terminal
// frame arrives, and every request of the batch is answered by the time settle ends.
func (c *fzClient) closeReq(id uint64) {
	if req := c.open[id]; req != nil {
		delete(c.open, id)
		c.openIDs = slices.DeleteFunc(c.openIDs, func(x uint64) bool { return x == id })
	}
}

func (c *fzClient) opData() {
	sel, mode := c.next(), c.next()
	switch {
	case sel < 0xC0 && len(c.openIDs) > 0:
		id := c.openIDs[int(sel)%len(c.openIDs)]
		req := c.open[id]
		rem := req.total - req.sent
		switch {
		case mode&0x80 == 0: // a valid chunk
			n := min(rem, c.frameMax)
			if mode&0x40 == 0 {
				n = min(n, int(mode&0x3F)*256)
			}
			c.data(id, req, n, n == rem)
		case mode&1 != 0: // too many bytes
			c.data(id, req, rem+1, true)
		default: // END too early
			c.data(id, req, rem/2, true)
		}
	case sel < 0xE0 && len(c.dropped) > 0:
		// The rest of a request the client cancelled: the server drops it.
		id := c.dropped[int(sel)%len(c.dropped)]
		c.write(testkit.Frame{Type: testkit.TypeData, Flags: mode & 1, ID: id, Payload: fzBytes(id, 0, int(mode)*16)})
	default:
		// DATA for a request that is complete or was never sent.
		var id uint64
		if len(c.sent) > 0 && sel < 0xF0 {
			id = c.sent[int(sel)%len(c.sent)]
			if c.open[id] != nil {
				id = c.maxID + 1
			}
		} else {
			id = c.maxID + 1 + uint64(sel&7)
		}
		if !slices.Contains(c.dropped, id) {
			c.illegal("DATA for request %d, which is complete or was never sent", id)
		}
		c.write(testkit.Frame{Type: testkit.TypeData, Flags: mode & 1, ID: id, Payload: fzBytes(id, 0, int(mode)*16)})
	}
}

func (c *fzClient) opCancel() {
	sel := c.next()
	var id uint64
	switch {
	case sel >= 0xF8:
		id = c.maxID + uint64(sel-0xF7)
		if id > c.maxID {
			c.illegal("CANCEL for request %d, which was never sent", id)
		}
	case sel >= 0xF0 || len(c.sent) == 0:
		id = 0
	case sel&1 == 0 && len(c.openIDs) > 0:
		id = c.openIDs[int(sel>>1)%len(c.openIDs)]
		c.closeReq(id)
		c.dropped = append(c.dropped, id)
	default:
		id = c.sent[int(sel>>1)%len(c.sent)]
	}
	c.cancels++
	if c.cancels > 64 {
		c.illegal("more than 64 cancels")
	}
	c.write(testkit.Frame{Type: testkit.TypeCancel, ID: id})
}

func (c *fzClient) opRaw() {
	typ, flags, res, lm, idb := c.next(), c.next(), c.next(), c.next(), c.next()
	f := testkit.Frame{Type: typ, Flags: flags, ID: uint64(idb), Payload: c.take(int(lm & 0x3F))}
	if res&0x80 != 0 {
		f.Reserved = uint16(res)
	}
	switch lm >> 6 {
	case 1: // a lying length: the frame swallows what follows
		f.Length = testkit.Uint32(uint32(len(f.Payload)) + uint32(res))
		if res != 0 {
			// The server now frames the client's bytes differently than the client: it
			// may find calls and pings in them.
			c.mon.mu.Lock()
			c.mon.desync = true
			c.mon.mu.Unlock()
		}
	case 2:
		f.Length = testkit.Uint32(uint32(c.frameMax) + 1)
	}
	switch typ {
	case testkit.TypeCall:
		var key MethodKey
		copy(key[:], f.Payload)
		c.mon.addCall(f.ID, key)
	case testkit.TypePing:
		c.mon.addPing(f.ID)
	}
	c.illegal("raw frame %v", f)
	c.write(f)
}

// settle cancels every request of the batch that has no terminal frame or is still being
// sent, then checks that the server answers a PING and ends every request of the batch with
// exactly one terminal frame.
func (c *fzClient) settle() {
	if !c.legal || c.dead {
		return
	}
	for _, id := range c.batch {
		c.mon.mu.Lock()
		done := c.mon.terminated(id)
		c.mon.mu.Unlock()
		_, open := c.open[id]
		if open {
			c.closeReq(id)
			c.dropped = append(c.dropped, id)
		}
		if open || !done {
			c.write(testkit.Frame{Type: testkit.TypeCancel, ID: id})
		}
	}
	c.pingSeq++
	if c.pings++; c.pings > fzMaxPings {
		c.illegal("more than %d pings", fzMaxPings)
		return
	}
	pid := 1<<40 + c.pingSeq
	c.mon.addPing(pid)
	if !c.write(testkit.Frame{Type: testkit.TypePing, ID: pid}) {
		return
	}
	if !c.mon.waitFor(fzTimeout, func() bool { return c.mon.pings[pid] == 0 || c.mon.ended != nil }) {
		c.t.Errorf("the server did not answer a PING within %v; server goroutines:\n%s", fzTimeout, serverStacks())
		c.dead = true
		return
	}
	batch := c.batch
	if !c.mon.waitFor(fzTimeout, func() bool {
		for _, id := range batch {
			if !c.mon.terminated(id) {
				return c.mon.ended != nil
			}
		}
		return true
	}) {
		c.mon.mu.Lock()
		var missing []uint64
		for _, id := range batch {
			if !c.mon.terminated(id) {
				missing = append(missing, id)
			}
		}
		c.mon.mu.Unlock()
		c.t.Errorf("requests %v got no terminal frame within %v of being cancelled; server goroutines:\n%s", missing, fzTimeout, serverStacks())
		c.dead = true
		return
	}
	c.batch = nil
	c.partial = 0 // every request of the batch is answered
}

// run interprets the program.
func (c *fzClient) run() {
	for c.pos < len(c.prog) && !c.dead {
		switch op := c.next() % fzOps; op {
		case opCall, opPartial, opBig:
			c.call(op)
		case opData:
			c.opData()
		case opCancel:
			c.opCancel()
		case opPing:
			id := uint64(c.next())<<8 | uint64(c.next())
			c.pings++
			if c.pings > fzMaxPings {
				c.illegal("more than %d pings", fzMaxPings)
			}
			c.mon.addPing(id)
			c.write(testkit.Frame{Type: testkit.TypePing, ID: id})
		case opPong:
			c.write(testkit.Frame{Type: testkit.TypePong, ID: uint64(c.next())})
		case opRaw:
			c.opRaw()
		case opGoAway:
			c.illegal("GOAWAY from the client")
			c.write(testkit.GoAway{LastID: c.maxID, Code: testkit.CloseDrain}.Frame())
		case opClose:
			return
		case opSettle:
			c.settle()
		case opSleep:
			time.Sleep(time.Duration(c.next()%8) * time.Millisecond)
		}
	}
}

// fzMaxPings is the most pings a program sends and stays legal: the server may take a burst of
// more than 64 for a flood.
const fzMaxPings = 60

// Program builders for seeds.
func pCall(method, idStep, opt byte, size int) []byte {
	return []byte{opCall, method, idStep, opt, byte(size >> 6), byte(size & 63)}
}
func pPartial(method, idStep, opt byte, size int, first byte) []byte {
	return []byte{opPartial, method, idStep, opt, byte(size >> 6), byte(size & 63), first}
}
func pBig(method, idStep, opt byte, size int) []byte {
	return []byte{opBig, method, idStep, opt, byte(size >> 6), byte(size & 63)}
}
func pData(sel, mode byte) []byte { return []byte{opData, sel, mode} }
func pCancel(sel byte) []byte     { return []byte{opCancel, sel} }
func pPing(id uint16) []byte      { return []byte{opPing, byte(id >> 8), byte(id)} }

// Method operands (index into fzKeys; bits 3-4 choose the signature).
const (
	mEcho, mSigned, mBlock, mPanic, mFail, mMissing, mSlow = 0, 1, 2, 3, 4, 5, 6
	mSignedOK, mSignedBad                                  = mSigned | 1<<3, mSigned | 2<<3
)

// Option operands.
const (
	oDeadline0, oDeadline1ms, oDeadlineHour = 0x01, 0x09, 0x11
	oTrace, oMetadata                       = 0x02, 0x04
	oTooManyMD, oLongTracestate, oReserved  = 0x24, 0x42, 0x80
)

func programSeeds() [][]byte {
	p := func(mode byte, ops ...[]byte) []byte { return append([]byte{mode}, slices.Concat(ops...)...) }
	settle, sleep, closeOp := []byte{opSettle}, []byte{opSleep, 3}, []byte{opClose}
	return [][]byte{
		p(0, pCall(mEcho, 0, 0, 100), pPing(1), settle),
		p(1, pCall(mEcho, 0, oTrace|oMetadata, 3000), pCall(mSignedOK, 1, oDeadlineHour, 10), pCall(mSignedBad, 0, 0, 1), settle),
		p(2, pCall(mBlock, 0, 0, 0), pCall(mBlock, 0, oDeadline1ms, 0), sleep, pCancel(0), settle),
		p(4, pCall(mPanic, 0, 0, 5), pCall(mFail, 0, 0, 5), pCall(mMissing, 0, 0, 5), pCall(mEcho, 0, oDeadline0, 5), settle),
		p(0, pPartial(mEcho, 0, 0, 200, 10), pData(0, 0x05), pData(0, 0x40), settle),
		p(1, pPartial(mEcho, 0, 0, 16000, 100), pData(0, 0x40), pData(0, 0x40), pData(0, 0x40), pData(0, 0x40), pData(0, 0x40), pData(0, 0x40), settle),
		p(4, pBig(mEcho, 0, 0, 8000), pBig(mSigned, 0, 0, 100), settle),
		p(0, pPartial(mMissing, 0, 0, 300, 1), pData(0, 0x40), pPartial(mEcho, 0, oTooManyMD, 300, 1), pData(0, 0x40), settle),
		p(0, pPartial(mEcho, 0, 0, 16000, 1), pCancel(0), pData(0xC0, 0x21), settle),
		p(0, pPartial(mEcho, 0, oLongTracestate, 100, 1), pCall(mEcho, 0, oTooManyMD, 10), settle),
		// Over the concurrency limit, and the buffered-bytes budget with a blocked handler.
		p(0, pCall(mBlock, 0, 0, 0), pCall(mBlock, 0, 0, 0), pCall(mBlock, 0, 0, 0), pCall(mBlock, 0, 0, 0), pCall(mEcho, 0, 0, 1), settle),
		// Protocol errors.
		p(0, pCall(mEcho, 0, 0, 1), pCall(mEcho, 0xF0, 0, 1), settle),
		p(0, pCall(mEcho, 0, 0, 1), pCall(mEcho, 0xF9, 0, 1)),
		p(0, pCall(mEcho, 0, oReserved, 1)),
		p(0, pPartial(mEcho, 0, 0, 100, 1), pData(0, 0x81)),
		p(0, pPartial(mEcho, 0, 0, 100, 1), pData(0, 0x80)),
		p(0, pCall(mEcho, 0, 0, 1), pData(0xF0, 1)),
		p(0, pCancel(0xFA)),
		p(0, []byte{opGoAway}),
		p(0, []byte{opRaw, 0x10, 0, 0, 0, 1}),
		p(0, []byte{opRaw, testkit.TypeCall, 1, 0, 0x45, 1}, []byte("0123456789")),
		p(0, []byte{opRaw, testkit.TypePing, 0, 0, 0x80, 1}),
		p(0, []byte{opRaw, testkit.TypeData, 0, 9, 0x40, 1}, pPing(3)),
		p(0, pCall(mEcho, 0xFF, 0, 1), pCall(mEcho, 0xFE, 0, 1), settle),
		p(0, pCall(mBlock, 0, 0, 1), []byte{opPong, 5}, closeOp, pCall(mEcho, 0, 0, 1)),
	}
}

// FuzzServerProgram drives a real server connection (ServeOn over net.Pipe, small limits) with
// a program of client operations decoded from the input: calls to an echo handler, a handler
// that waits for its context, a panicking one and others, partial requests and their DATA,
// cancels, pings, raw and illegal frames, settles and sleeps. The input's first byte chooses
// inline or goroutine handlers, flattened or vectored writes, and the client's max frame size.
//
// For every program, each frame the server writes is well formed and answers something the
// client sent (at most one terminal frame per request, echoes equal to their requests), the
// server never stops reading for fzWriteTimeout, ServeOn returns once the client closes, no
// goroutine is left, and allocation stays within a constant plus a multiple of the traffic.
//
// A program that obeys DESIGN.md ("legal": increasing ids, exact request sizes, at most
// MaxConcurrentCalls requests between settles, partial requests within the buffered-bytes
// budget, at most 64 cancels of finished calls, no frames only servers send) must also never
// see a go-away, a closed connection or a refusal, and each settle must see exactly one
// terminal frame for every request since the previous one.
func FuzzServerProgram(f *testing.F) {
	for _, s := range programSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) == 0 {
			return
		}
		var before runtime.MemStats
		if allocChecks {
			runtime.ReadMemStats(&before)
		}
		baseline := runtime.NumGoroutine()
		mode := prog[0]
		opts := ServerOptions{Logger: fzLogger, Limits: fzLimits, HandshakeTimeout: fzTimeout, IdleTimeout: -1, DrainTimeout: -1}
		if mode&1 != 0 {
			opts.InlineHandlerDuration = -1
		}
		if mode&2 != 0 {
			opts.WriteFlattenLimit = -1
		}
		ch := testkit.ClientHello()
		ch.MaxFrame = 16 << 10
		if mode&4 != 0 {
			ch.MaxFrame = 64 << 10
		}
		srv := startServer(opts)
		peer := testkit.NewRawPeer(srv.conn)
		peer.SetDeadline(time.Now().Add(fzTimeout))
		if sh, err := peer.Handshake(ch); err != nil || sh.Version != testkit.Version {
			srv.stop(t)
			t.Fatalf("handshake: %+v, %v", sh, err)
		}
		peer.SetDeadline(time.Time{})

		mon := newMonitor(int(ch.MaxFrame), ch.MaxMessage)
		read := make(chan struct{})
		go func() {
			defer close(read)
			mon.read(peer)
		}()
		c := &fzClient{t: t, conn: srv.conn, mon: mon, prog: prog, pos: 1, frameMax: fzLimits.MaxFrameSize, legal: true, open: map[uint64]*fzReq{}}
		c.run()
		if c.legal && !c.dead {
			c.settle()
		}
		mon.mu.Lock()
		goAways, ended, refusals := slices.Clone(mon.goAways), mon.ended, slices.Clone(mon.refusals)
		mon.mu.Unlock()

		srv.stop(t)
		<-read
		if errs := mon.violations(); len(errs) > 0 {
			t.Errorf("program % x: the server wrote bad frames:\n%s", prog, strings.Join(errs, "\n"))
		}
		if c.legal {
			if len(goAways) > 0 || ended != nil {
				t.Errorf("program % x obeys the protocol, yet the server sent %+v and ended the connection (%v)", prog, goAways, ended)
			}
			if len(refusals) > 0 {
				t.Errorf("program % x never has more than %d calls in flight, yet the server refused %v", prog, fzLimits.MaxConcurrentCalls, refusals)
			}
		}
		checkGoroutines(t, baseline)

		// Memory follows bytes received: what the connection allocated (with the test's own
		// share, at most a few copies of the traffic) is a constant plus a multiple of the
		// traffic, never the sizes requests declare.
		if allocChecks && !t.Failed() {
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			traffic := c.traffic + mon.traffic
			if n, budget := after.TotalAlloc-before.TotalAlloc, uint64(fzAllocConst+16*traffic); n > budget {
				t.Errorf("program % x: %d bytes allocated for %d bytes of traffic, budget %d", prog, n, traffic, budget)
			}
		}
	})
}
