package testkit_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/weftrpc/weft/internal/testkit"
)

// unhex decodes hex written with spaces, newlines and "|" separators for readability.
func unhex(t *testing.T, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "\n", "", "\t", "", "|", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad golden hex: %v", err)
	}
	return b
}

// The client hello with DESIGN.md's default limits, field by field.
const goldenClientHello = `
57 45 46 54 | 01 | 00 | 00 1c
00 01 00 00 | 00 40 00 00 | 00 00 00 00 | 01 00 00 00
00 00 20 00 | 00 40 | 02 00 | 00 00 00 00`

func TestHelloGolden(t *testing.T) {
	want := unhex(t, goldenClientHello)
	got := testkit.ClientHello().Encode()
	if !bytes.Equal(got, want) {
		t.Fatalf("ClientHello().Encode() =\n% x\nwant\n% x", got, want)
	}
	if len(got) != testkit.HelloPrefixSize+testkit.HelloRestSize {
		t.Fatalf("len = %d, want 36", len(got))
	}
	h, err := testkit.ParseHello(want)
	if err != nil {
		t.Fatal(err)
	}
	wantHello := testkit.ClientHello()
	wantHello.RestLen = 28
	wantHello.Magic = "WEFT"
	if h != wantHello {
		t.Fatalf("ParseHello = %+v, want %+v", h, wantHello)
	}
	if !bytes.Equal(h.Encode(), want) {
		t.Fatalf("re-encoding the parsed hello changed it")
	}
}

func TestHelloAllFields(t *testing.T) {
	h := testkit.Hello{
		Version: 2, Features: 0x81, MaxFrame: 0x01020304, MaxMessage: 0x05060708,
		MaxConcurrent: 0x090a0b0c, Budget: 0x0d0e0f10, MaxMetadataBytes: 0x11121314,
		MaxMetadataEntries: 0x1516, MaxTracestate: 0x1718, IdleTimeoutMillis: 0x191a1b1c,
	}
	want := unhex(t, `57454654 02 81 001c 01020304 05060708 090a0b0c 0d0e0f10 11121314 1516 1718 191a1b1c`)
	if got := h.Encode(); !bytes.Equal(got, want) {
		t.Fatalf("Encode =\n% x\nwant\n% x", got, want)
	}
	got, err := testkit.ParseHello(want)
	if err != nil {
		t.Fatalf("ParseHello: %v (another version is not an error)", err)
	}
	h.RestLen, h.Magic = 28, "WEFT"
	if got != h {
		t.Fatalf("ParseHello = %+v, want %+v", got, h)
	}
}

func TestHelloRestLen(t *testing.T) {
	base := testkit.ClientHello().Encode()

	long := testkit.ClientHello()
	long.RestLen = 32
	b := long.Encode()
	want := append(append([]byte(nil), base...), 0, 0, 0, 0)
	want[7] = 32
	if !bytes.Equal(b, want) {
		t.Fatalf("RestLen 32: got\n% x\nwant\n% x", b, want)
	}
	if h, err := testkit.ParseHello(b); err != nil || h.RestLen != 32 || h.MaxFrame != 64<<10 {
		t.Fatalf("ParseHello(RestLen 32) = %+v, %v", h, err)
	}

	short := testkit.ClientHello()
	short.RestLen = 10
	b = short.Encode()
	if len(b) != 18 || b[7] != 10 || !bytes.Equal(b[8:], base[8:18]) {
		t.Fatalf("RestLen 10: got % x", b)
	}

	bad := testkit.ClientHello()
	bad.Magic = "HTTP"
	if b := bad.Encode(); string(b[:4]) != "HTTP" || len(b) != 36 {
		t.Fatalf("Magic HTTP: got % x", b)
	}
}

func TestParseHelloErrors(t *testing.T) {
	valid := testkit.ClientHello().Encode()
	withRest := func(n uint16) []byte {
		h := testkit.ClientHello()
		h.RestLen = n
		return h.Encode()
	}
	bad := testkit.ClientHello()
	bad.Magic = "WEFX"
	for name, b := range map[string][]byte{
		"empty":     nil,
		"prefix":    valid[:8],
		"truncated": valid[:35],
		"magic":     bad.Encode(),
		"rest 27":   withRest(27),
		"rest 1025": withRest(1025),
	} {
		if _, err := testkit.ParseHello(b); !errors.Is(err, testkit.ErrMalformed) {
			t.Errorf("%s: ParseHello error = %v, want ErrMalformed", name, err)
		}
	}
	h, rest, err := testkit.SplitHello(append(withRest(1024), 1, 2, 3))
	if err != nil || h.RestLen != 1024 || !bytes.Equal(rest, []byte{1, 2, 3}) {
		t.Fatalf("SplitHello = %+v, % x, %v", h, rest, err)
	}
}

// A CALL frame with END, id 7 and every optional section of the call header.
const goldenCall = `
01 | 01 | 00 00 | 00 00 00 54 | 00 00 00 00 00 00 00 07
00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f
11 22 33 44 55 66 77 88
07
00 00 00 03
00 00 00 00 3b 9a ca 00
a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af | b0 b1 b2 b3 b4 b5 b6 b7 | 01 | 00 03 6b 3d 76
00 02 | 00 01 61 00 01 31 | 00 02 62 63 00 00
78 79 7a`

func fullCallHeader() testkit.CallHeader {
	h := testkit.CallHeader{
		Signature:  0x1122334455667788,
		Total:      3,
		Deadline:   testkit.Uint64(1_000_000_000),
		HasTrace:   true,
		TraceFlags: 1,
		Tracestate: "k=v",
		Metadata:   [][2]string{{"a", "1"}, {"bc", ""}},
	}
	for i := range h.Key {
		h.Key[i] = byte(i)
	}
	for i := range h.TraceID {
		h.TraceID[i] = 0xa0 + byte(i)
	}
	for i := range h.SpanID {
		h.SpanID[i] = 0xb0 + byte(i)
	}
	return h
}

func TestCallFrameGolden(t *testing.T) {
	want := unhex(t, goldenCall)
	h := fullCallHeader()
	f := testkit.Frame{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 7, Payload: append(h.Encode(), "xyz"...)}
	got := testkit.EncodeFrame(f)
	if !bytes.Equal(got, want) {
		t.Fatalf("CALL frame =\n% x\nwant\n% x", got, want)
	}
	if got := testkit.AppendFrame([]byte{0xff}, f); !bytes.Equal(got[1:], want) || got[0] != 0xff {
		t.Fatalf("AppendFrame did not append")
	}

	pf, rest, err := testkit.ParseFrame(want)
	if err != nil || len(rest) != 0 {
		t.Fatalf("ParseFrame: %v, %d bytes left", err, len(rest))
	}
	if pf.Type != testkit.TypeCall || pf.Flags != testkit.FlagEnd || pf.ID != 7 || !pf.End() || pf.Length != nil {
		t.Fatalf("ParseFrame = %v", pf)
	}
	ph, req, err := testkit.ParseCallHeader(pf.Payload)
	if err != nil {
		t.Fatal(err)
	}
	h.HasMetadata = true
	if !reflect.DeepEqual(ph, h) {
		t.Fatalf("ParseCallHeader =\n%+v\nwant\n%+v", ph, h)
	}
	if string(req) != "xyz" {
		t.Fatalf("request = %q", req)
	}
}

func TestCallHeaderVariants(t *testing.T) {
	var key [16]byte
	key[15] = 9
	minimal := testkit.CallHeader{Key: key, Total: 5}.Encode()
	want := unhex(t, `00000000000000000000000000000009 0000000000000000 00 00000005`)
	if !bytes.Equal(minimal, want) {
		t.Fatalf("minimal header =\n% x\nwant\n% x", minimal, want)
	}

	// Extra flag bits are OR-ed in, without sections: deliberately invalid headers.
	b := testkit.CallHeader{Flags: 0x80 | testkit.CallTrace}.Encode()
	if len(b) != testkit.CallHeaderSize || b[24] != 0x82 {
		t.Fatalf("flags header = % x", b)
	}
	if _, _, err := testkit.ParseCallHeader(b); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("trace flag without section: err = %v, want ErrMalformed", err)
	}

	// An empty metadata section and a lying entry count.
	b = testkit.CallHeader{HasMetadata: true}.Encode()
	if len(b) != testkit.CallHeaderSize+2 || b[24] != testkit.CallMetadata {
		t.Fatalf("empty metadata header = % x", b)
	}
	b = testkit.CallHeader{MetadataCount: testkit.Uint16(3), Metadata: [][2]string{{"k", "v"}}}.Encode()
	if got := b[testkit.CallHeaderSize:]; !bytes.Equal(got, unhex(t, "0003 0001 6b 0001 76")) {
		t.Fatalf("metadata section = % x", got)
	}
	if _, _, err := testkit.ParseCallHeader(b); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("lying count: err = %v, want ErrMalformed", err)
	}

	// Trace section present because a field is set, even without HasTrace.
	b = testkit.CallHeader{Tracestate: "x"}.Encode()
	if b[24] != testkit.CallTrace || len(b) != testkit.CallHeaderSize+16+8+1+2+1 {
		t.Fatalf("tracestate-only header = % x", b)
	}
	if _, _, err := testkit.ParseCallHeader(b[:20]); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("short header: err = %v", err)
	}
}

func TestFrameLyingLength(t *testing.T) {
	f := testkit.Frame{Type: testkit.TypeData, Flags: 0x80, Reserved: 0xbeef, ID: 1 << 63, Payload: []byte("ab"), Length: testkit.Uint32(1 << 30)}
	got := testkit.EncodeFrame(f)
	want := unhex(t, `02 80 beef 40000000 8000000000000000 6162`)
	if !bytes.Equal(got, want) {
		t.Fatalf("got\n% x\nwant\n% x", got, want)
	}
	if _, _, err := testkit.ParseFrame(got); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("ParseFrame of lying frame: err = %v", err)
	}
	hdr, n := testkit.ParseFrameHeader(got)
	if n != 1<<30 || hdr.Reserved != 0xbeef || hdr.Flags != 0x80 || hdr.ID != 1<<63 {
		t.Fatalf("ParseFrameHeader = %v, %d", hdr, n)
	}
	if _, _, err := testkit.ParseFrame(got[:15]); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("ParseFrame of short header: err = %v", err)
	}
}

func TestReplyHeader(t *testing.T) {
	b := append(testkit.ReplyHeader{Total: 258, Load: 1.5}.Encode(), 'r')
	if want := unhex(t, `00000102 3fc00000 72`); !bytes.Equal(b, want) {
		t.Fatalf("got % x, want % x", b, want)
	}
	h, rest, err := testkit.ParseReplyHeader(b)
	if err != nil || h.Total != 258 || h.Load != 1.5 || string(rest) != "r" {
		t.Fatalf("ParseReplyHeader = %+v, %q, %v", h, rest, err)
	}
	if _, _, err := testkit.ParseReplyHeader(b[:7]); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("short: err = %v", err)
	}
}

func TestErrorBody(t *testing.T) {
	e := testkit.ErrorBody{Code: testkit.CodeRefused, Flags: testkit.ErrFlagNeverRan, RetryAfterMillis: 1000, Message: "busy"}
	b := e.Encode()
	if want := unhex(t, `01 01 000003e8 0004 62757379`); !bytes.Equal(b, want) {
		t.Fatalf("got % x, want % x", b, want)
	}
	got, err := testkit.ParseErrorBody(b)
	if err != nil || got != e || !got.NeverRan() {
		t.Fatalf("ParseErrorBody = %+v, %v", got, err)
	}
	for _, bad := range [][]byte{b[:7], b[:len(b)-1], append(b, 0)} {
		if _, err := testkit.ParseErrorBody(bad); !errors.Is(err, testkit.ErrMalformed) {
			t.Errorf("ParseErrorBody(% x): err = %v, want ErrMalformed", bad, err)
		}
	}
}

func TestGoAway(t *testing.T) {
	g := testkit.GoAway{LastID: 41, Code: testkit.CloseIdle, Message: "idle"}
	got := testkit.EncodeFrame(g.Frame())
	if want := unhex(t, `08 00 0000 00000005 0000000000000029 03 69646c65`); !bytes.Equal(got, want) {
		t.Fatalf("got % x, want % x", got, want)
	}
	f, _, _ := testkit.ParseFrame(got)
	if pg, err := testkit.ParseGoAway(f); err != nil || pg != g {
		t.Fatalf("ParseGoAway = %+v, %v", pg, err)
	}
	if _, err := testkit.ParseGoAway(testkit.Frame{Type: testkit.TypeGoAway}); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("empty GOAWAY: err = %v", err)
	}
	if _, err := testkit.ParseGoAway(testkit.Frame{Type: testkit.TypePing, Payload: []byte{0}}); !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("PING as GOAWAY: err = %v", err)
	}
}

func TestConstants(t *testing.T) {
	// Spot checks against DESIGN.md's tables.
	if testkit.TypeCall != 1 || testkit.TypeGoAway != 8 || testkit.CodePanic != 8 || testkit.CloseStopping != 4 ||
		testkit.CallMetadata != 4 || testkit.HeaderSize != 16 || testkit.Magic != "WEFT" || testkit.Version != 1 {
		t.Fatal("constants disagree with DESIGN.md")
	}
	if s := (testkit.Frame{Type: testkit.TypePong, ID: 3}).String(); s != "{PONG flags=0x00 id=3 len=0}" {
		t.Fatalf("String = %q", s)
	}
}
