package call

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
)

// unhex decodes a hex dump written with spaces and comments ("# ..." to end of line).
func unhex(t *testing.T, dump string) []byte {
	t.Helper()
	var clean strings.Builder
	for _, line := range strings.Split(dump, "\n") {
		line, _, _ = strings.Cut(line, "#")
		clean.WriteString(strings.Join(strings.Fields(line), ""))
	}
	b, err := hex.DecodeString(clean.String())
	if err != nil {
		t.Fatalf("bad golden dump: %v", err)
	}
	return b
}

// TestGoldenBytes pins the byte layout DESIGN.md documents.
func TestGoldenBytes(t *testing.T) {
	lim := Limits{}.withDefaults()
	md := Metadata{"k": "vv"}
	call := callHeader{
		key:        MethodKey{0: 0xAA, 15: 0xBB},
		signature:  0x0102030405060708,
		flags:      callDeadline | callTrace | callMetadata,
		total:      3,
		deadline:   uint64(1500 * time.Millisecond),
		traceID:    [16]byte{0: 0x11, 15: 0x1F},
		spanID:     [8]byte{0: 0x22, 7: 0x2F},
		traceFlags: 0x01,
		tracestate: "a=b",
		md:         md,
	}
	head := appendCallHeader(nil, &call)
	callFrame := appendHeader(nil, frameCall, flagEnd, len(head)+3, 7)
	callFrame = append(append(callFrame, head...), "abc"...)

	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{
			name: "client hello with default limits",
			got:  helloFromLimits(lim, 0, 0).append(nil),
			want: `57454654 01 00 001c  # magic, version 1, features, rest length 28
				00010000          # max frame 64 KiB
				00400000          # max message 4 MiB
				00000000          # max concurrent (client: 0)
				01000000          # budget 16 MiB
				00002000          # metadata bytes 8 KiB
				0040 0200         # metadata entries 64, tracestate 512
				00000000          # idle timeout: none`,
		},
		{
			name: "server hello",
			got:  helloFromLimits(lim, 1024, 300000).append(nil),
			want: `57454654 01 00 001c 00010000 00400000
				00000400          # max concurrent 1024
				01000000 00002000 0040 0200
				000493e0          # idle timeout 300000 ms`,
		},
		{
			name: "CALL with deadline, trace context, metadata and a 3-byte request",
			got:  callFrame,
			want: `01 01 0000 0000004f 0000000000000007  # CALL, END, length 79, id 7
				aa0000000000000000000000000000bb      # method key
				0102030405060708                      # signature digest
				07                                    # flags: deadline, trace, metadata
				00000003                              # total request length
				0000000059682f00                      # deadline: 1.5 s in ns
				1100000000000000000000000000001f      # trace id
				220000000000002f                      # span id
				01 0003 613d62                        # trace flags, tracestate "a=b"
				0001 0001 6b 0002 7676                # 1 entry: "k" = "vv"
				616263                                # request "abc"`,
		},
		{
			name: "REPLY header",
			got:  append(appendHeader(nil, frameReply, flagEnd, replyHdrLen, 7), appendReplyHeader(nil, 0, 1.5)...),
			want: `04 01 0000 00000008 0000000000000007
				00000000 3fc00000   # total 0, load 1.5`,
		},
		{
			name: "ERROR body",
			got:  appendErrorBody(nil, &errorBody{code: codeRefused, neverRan: true, retryAfter: 250 * time.Millisecond, msg: "busy"}),
			want: `01 01 000000fa 0004 62757379  # refused, never ran, 250 ms, "busy"`,
		},
		{
			name: "continuation DATA and CANCEL headers",
			got:  append(appendHeader(nil, frameData, 0, 5, 9), appendHeader(nil, frameCancel, 0, 0, 9)...),
			want: `02 00 0000 00000005 0000000000000009
				03 00 0000 00000000 0000000000000009`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := unhex(t, tt.want)
			if !bytes.Equal(tt.got, want) {
				t.Errorf("got\n%s\nwant\n%s", hex.Dump(tt.got), hex.Dump(want))
			}
		})
	}

	// And the layout decodes back.
	h, err := parseHeader(callFrame, lim.MaxFrameSize)
	if err != nil || h.typ != frameCall || h.id != 7 || h.length != uint32(len(callFrame)-headerSize) {
		t.Fatalf("parseHeader = %+v, %v", h, err)
	}
	got, rest, err := parseCallHeader(callFrame[headerSize:], &lim)
	if err != nil {
		t.Fatal(err)
	}
	if got.key != call.key || got.signature != call.signature || got.deadline != call.deadline ||
		got.traceID != call.traceID || got.spanID != call.spanID || got.tracestate != "a=b" ||
		got.md["k"] != "vv" || len(got.md) != 1 || string(rest) != "abc" {
		t.Errorf("parseCallHeader = %+v, rest %q", got, rest)
	}
}

func TestParseHeaderRejects(t *testing.T) {
	good := appendHeader(nil, frameData, flagEnd, 10, 1)
	tests := []struct {
		name   string
		mutate func(b []byte)
	}{
		{"unknown type", func(b []byte) { b[0] = 0x09 }},
		{"stream family reserved", func(b []byte) { b[0] = 0x10 }},
		{"reserved flag", func(b []byte) { b[1] = 0x02 }},
		{"END on CANCEL", func(b []byte) { b[0] = frameCancel }},
		{"reserved bytes", func(b []byte) { b[3] = 1 }},
		{"length 0xFFFFFFFF", func(b []byte) { b[4], b[5], b[6], b[7] = 0xFF, 0xFF, 0xFF, 0xFF }},
		{"length max+1", func(b []byte) { b[4], b[5], b[6], b[7] = 0, 1, 0, 1 }},
		{"payload on PING", func(b []byte) { b[0], b[1] = framePing, 0 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tt.mutate(b)
			if _, err := parseHeader(b, 64<<10); !errors.Is(err, ErrProtocol) {
				t.Errorf("parseHeader(% x) = %v, want ErrProtocol", b, err)
			}
		})
	}
	if _, err := parseHeader(good, 64<<10); err != nil {
		t.Errorf("parseHeader(good) = %v", err)
	}
}
