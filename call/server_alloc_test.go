//go:build !race

package call_test

// Allocation assertions on the server (RELIABILITY.md scenario 2): a declared size is never
// allocated up front; memory follows bytes received. They read runtime.MemStats.TotalAlloc, the
// cumulative bytes allocated by the whole process, so they are left out of race builds (the race
// runtime allocates on its own) and do not run in parallel with other tests.

import (
	"math"
	"runtime"
	"testing"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
)

const allocSlack = 1 << 20 // what the whole process may allocate around a measured step

func totalAlloc() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

// TestServerHugeLengthRejectedBeforeAllocating: a frame header declaring gigabytes closes the
// connection with a protocol GOAWAY without the server allocating anything near that size.
func TestServerHugeLengthRejectedBeforeAllocating(t *testing.T) {
	for _, tc := range []struct {
		name   string
		typ    byte
		length uint32
	}{
		{"CALL declaring 0xFFFFFFFF bytes", testkit.TypeCall, math.MaxUint32},
		{"CALL declaring 1 GiB", testkit.TypeCall, 1 << 30},
		{"DATA declaring 0xFFFFFFFF bytes", testkit.TypeData, math.MaxUint32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", echoHandler)
			s := startServer(t, &hm, call.ServerOptions{})
			handshake(t, s.peer)
			frame := testkit.EncodeFrame(testkit.Frame{Type: tc.typ, Flags: testkit.FlagEnd, ID: 1, Length: testkit.Uint32(tc.length)})
			before := totalAlloc()
			if err := s.peer.WriteRaw(frame); err != nil {
				t.Fatal(err)
			}
			expectGoAway(t, s.peer, testkit.CloseProtocol)
			s.waitDone(t)
			grew := totalAlloc() - before
			t.Logf("allocated %d bytes", grew)
			if grew > allocSlack {
				t.Errorf("rejecting a header declaring %d bytes allocated %d bytes, want at most %d", tc.length, grew, allocSlack)
			}
		})
	}
}

// TestServerTrickledRequestMemoryFollowsBytes: a CALL declaring a 4 MiB request (the default
// limit) followed by 1 KiB DATA frames makes the server allocate in proportion to the bytes
// received, not the declared total: after 256 KiB, well under 1 MiB.
func TestServerTrickledRequestMemoryFollowsBytes(t *testing.T) {
	const (
		declared = testkit.DefaultMaxMessage
		chunk    = 1 << 10
		received = 256 << 10
	)
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	// Everything the client writes is encoded before measuring.
	first := testkit.EncodeFrame(callFrame(1, testkit.CallHeader{Key: keyEcho, Total: declared}, make([]byte, chunk), false))
	data := testkit.EncodeFrame(dataFrame(1, make([]byte, chunk), false))
	ping := testkit.EncodeFrame(testkit.Frame{Type: testkit.TypePing, ID: 77})

	before := totalAlloc()
	if err := p.WriteRaw(first); err != nil {
		t.Fatal(err)
	}
	for sent := chunk; sent < received; sent += chunk {
		if err := p.WriteRaw(data); err != nil {
			t.Fatalf("after %d bytes: %v", sent, err)
		}
	}
	// The server reads frames in order: once the PONG arrives, it has taken in every DATA frame.
	if err := p.WriteRaw(ping); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := p.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for PONG 77: %v (GOAWAY %+v)", err, p.LastGoAway())
		}
		if f.Type == testkit.TypePong && f.ID == 77 {
			break
		}
		t.Fatalf("got %v while the request is incomplete, want only PONG 77", f)
	}
	grew := totalAlloc() - before
	t.Logf("allocated %d bytes for %d received", grew, received)
	if grew > allocSlack {
		t.Errorf("after receiving %d bytes of a request declaring %d, the process allocated %d bytes; want at most %d (memory must follow bytes received)",
			received, declared, grew, allocSlack)
	}
}

// TestServerUpfrontAllowanceIsPerConnection: DESIGN.md allocates a multi-frame request in full
// when its first frame arrives only while the declared sizes of such requests on the connection
// stay within 1 MiB; beyond it buffers grow with the bytes received. Eight partial requests each
// declaring 1 MiB, each with 1 KiB received, must not cost eight mebibytes.
func TestServerUpfrontAllowanceIsPerConnection(t *testing.T) {
	const (
		calls     = 8
		declared  = 1 << 20
		chunk     = 1 << 10
		allowance = 1 << 20
	)
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	var stream []byte
	for id := uint64(1); id <= calls; id++ {
		stream = testkit.AppendFrame(stream, callFrame(id, testkit.CallHeader{Key: keyEcho, Total: declared}, make([]byte, chunk), false))
	}
	stream = testkit.AppendFrame(stream, testkit.Frame{Type: testkit.TypePing, ID: 77})

	before := totalAlloc()
	if err := p.WriteRaw(stream); err != nil {
		t.Fatal(err)
	}
	f, err := p.ReadFrame()
	if err != nil || f.Type != testkit.TypePong || f.ID != 77 {
		t.Fatalf("after %d partial requests: got %v, %v; want PONG 77", calls, f, err)
	}
	grew := totalAlloc() - before
	t.Logf("allocated %d bytes for %d requests declaring %d bytes, %d received each", grew, calls, declared, chunk)
	if limit := uint64(allowance + allocSlack); grew > limit {
		t.Errorf("%d partial requests declaring %d bytes each, with %d bytes received each, allocated %d bytes; want at most %d (the 1 MiB per-connection allowance, plus growth with the bytes received)",
			calls, declared, chunk, grew, limit)
	}
}
