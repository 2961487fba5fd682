package call_test

// Black-box tests that drive a real weft server (call.ServeOn / call.Serve) with a raw protocol
// peer (testkit.RawPeer) and prove the server survives bad input: the "Bad input on the wire"
// scenarios of RELIABILITY.md, plus limits, drain, panics and log hygiene seen from the wire.
//
// Tests over real sockets only bound how long things may take, generously; timing assertions
// (handshake, idle and drain timeouts) run inside testing/synctest bubbles over net.Pipe.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
)

// ioBound bounds every wait on a real socket. It is generous: these waits only prove that
// nothing hangs.
const ioBound = 10 * time.Second

var (
	keyEcho    = call.MakeMethodKey("badinput", "Echo")
	keyBlock   = call.MakeMethodKey("badinput", "Block")
	keyPanic   = call.MakeMethodKey("badinput", "Panic")
	keyFail    = call.MakeMethodKey("badinput", "Fail")
	keyInspect = call.MakeMethodKey("badinput", "Inspect")
	keyUnknown = call.MakeMethodKey("badinput", "NoSuchMethod")
)

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// syncBuffer is a bytes.Buffer safe for the server's concurrent log writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// ---- handlers ----

func echoHandler(_ context.Context, args []byte) ([]byte, error) { return bytes.Clone(args), nil }

// counting wraps h to count its invocations in n.
func counting(n *atomic.Int64, h call.Handler) call.Handler {
	return func(ctx context.Context, args []byte) ([]byte, error) {
		n.Add(1)
		return h(ctx, args)
	}
}

// blocker is a handler that blocks until released (its reply is then its args) or until its
// context ends (it then returns the context's error). It tracks how many of it run at once.
type blocker struct {
	calls, running, maxRunning atomic.Int64
	started                    chan struct{} // one token per started handler
	release                    chan struct{} // closed to release every handler
	releaseOnce                sync.Once
}

func newBlocker() *blocker {
	return &blocker{started: make(chan struct{}, 4096), release: make(chan struct{})}
}

func (b *blocker) handle(ctx context.Context, args []byte) ([]byte, error) {
	b.calls.Add(1)
	n := b.running.Add(1)
	defer b.running.Add(-1)
	for {
		m := b.maxRunning.Load()
		if n <= m || b.maxRunning.CompareAndSwap(m, n) {
			break
		}
	}
	select {
	case b.started <- struct{}{}:
	default:
	}
	select {
	case <-b.release:
		return bytes.Clone(args), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (b *blocker) releaseAll() { b.releaseOnce.Do(func() { close(b.release) }) }

// waitStarted waits until n more handlers of b have started.
func (b *blocker) waitStarted(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(ioBound)
	for i := range n {
		select {
		case <-b.started:
		case <-timeout:
			t.Fatalf("only %d of %d blocking handlers started within %v", i, n, ioBound)
		}
	}
}

// ---- servers ----

// server is one call.ServeOn run, with the raw peer that is its client.
type server struct {
	peer   *testkit.RawPeer
	done   chan struct{} // closed when ServeOn returns
	cancel context.CancelFunc
}

// tcpConnPair returns both ends of a loopback TCP connection.
func tcpConnPair(t *testing.T) (client, srv net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := l.Accept()
		ch <- accepted{c, err}
	}()
	client, derr := net.DialTimeout("tcp", l.Addr().String(), ioBound)
	if derr != nil {
		l.Close() // unblocks Accept
	}
	a := <-ch
	l.Close()
	if derr != nil || a.err != nil {
		if client != nil {
			client.Close()
		}
		if a.c != nil {
			a.c.Close()
		}
		t.Fatalf("connecting over loopback: dial: %v, accept: %v", derr, a.err)
	}
	return client, a.c
}

// startServer serves hm with opts on a fresh loopback TCP connection. The connection, ServeOn
// and its context are cleaned up with t: the cleanup fails t if ServeOn does not return once the
// client side is closed.
func startServer(t *testing.T, hm *call.HandlerMap, opts call.ServerOptions) *server {
	t.Helper()
	cc, sc := tcpConnPair(t)
	return serveOn(t, cc, sc, hm, opts)
}

func serveOn(t *testing.T, cc, sc net.Conn, hm *call.HandlerMap, opts call.ServerOptions) *server {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	s := &server{peer: testkit.NewRawPeer(cc), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(s.done)
		call.ServeOn(ctx, sc, hm, opts)
	}()
	s.peer.SetDeadline(time.Now().Add(ioBound))
	t.Cleanup(func() {
		s.peer.Close()
		s.waitDone(t)
		cancel()
	})
	return s
}

// waitDone fails t unless ServeOn returns within ioBound. If it does not, it cancels ServeOn's
// context (a drain) and waits again, so that a failing test still joins its goroutine.
func (s *server) waitDone(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
		return
	case <-time.After(ioBound):
	}
	t.Errorf("ServeOn did not return within %v", ioBound)
	s.peer.Close()
	s.cancel()
	select {
	case <-s.done:
	case <-time.After(ioBound):
		t.Errorf("ServeOn still running %v after its connection was closed and its context cancelled", ioBound)
	}
}

// pipeServer is a call.ServeOn run over net.Pipe, for use inside a synctest bubble.
type pipeServer struct {
	peer   *testkit.RawPeer
	done   chan struct{}
	cancel context.CancelFunc
}

func startPipeServer(hm *call.HandlerMap, opts call.ServerOptions) *pipeServer {
	return startPipeServerWrapped(hm, opts, func(c net.Conn) net.Conn { return c })
}

// stop closes the client side and waits for ServeOn. Inside a bubble a ServeOn that never
// returns makes synctest report a deadlock.
func (ps *pipeServer) stop() {
	ps.peer.Close()
	<-ps.done
	ps.cancel()
}

// inBubble runs f in a testing/synctest bubble. Package call keeps objects that hold channels in
// process-wide sync.Pools (TestServerPoolsSafeAcrossSynctestBubbles): a channel made in a bubble
// and used outside it is a fatal error, and one made outside and waited on inside does not block
// durably, so the fake clock may stall. The pools are emptied (two GC cycles drop every pooled
// object) before and after the bubble, so that these tests neither crash nor hang other tests.
//
// A goroutine that never blocks (a busy loop) stops the bubble's clock, so the deadlines these
// tests set never fire: a real-time watchdog then ends the test binary with every goroutine's
// stack after bubbleWatchdog, instead of waiting for go test's own timeout.
func inBubble(t *testing.T, f func(*testing.T)) {
	t.Helper()
	runtime.GC()
	runtime.GC()
	name := t.Name()
	watchdog := time.AfterFunc(bubbleWatchdog, func() {
		debug.SetTraceback("all")
		panic(fmt.Sprintf("%s: synctest bubble still running after %v of real time: a goroutine in it never blocks, so fake time cannot advance", name, bubbleWatchdog))
	})
	defer func() { // also when f fails: synctest.Test then exits through runtime.Goexit
		watchdog.Stop()
		runtime.GC()
		runtime.GC()
	}()
	synctest.Test(t, f)
}

const bubbleWatchdog = 60 * time.Second

// runInChild re-executes this test binary to run only the test named name, with env added, and
// fails t with the child's output if it fails. It contains failures that kill the process (a
// fatal error, a panic in a timer goroutine) so that they are reported as t's failure.
func runInChild(t *testing.T, name string, env ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+name+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		const keep = 4000
		if len(out) > keep {
			out = append([]byte("...\n"), out[len(out)-keep:]...)
		}
		t.Errorf("child run of %s failed (%v):\n%s", name, err, out)
	}
}

// startPipeServerWrapped is startPipeServer with the server's end of the pipe wrapped.
func startPipeServerWrapped(hm *call.HandlerMap, opts call.ServerOptions, wrap func(net.Conn) net.Conn) *pipeServer {
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	cc, sc := net.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	ps := &pipeServer{peer: testkit.NewRawPeer(cc), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(ps.done)
		call.ServeOn(ctx, wrap(sc), hm, opts)
	}()
	return ps
}

// writeLatencyConn is a connection whose writes return d after delivering their bytes: a slow
// write system call or a writer preempted right after it. Inside a bubble d is fake time.
type writeLatencyConn struct {
	net.Conn
	d time.Duration
}

func (c writeLatencyConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	time.Sleep(c.d)
	return n, err
}

func withWriteLatency(d time.Duration) func(net.Conn) net.Conn {
	return func(c net.Conn) net.Conn { return writeLatencyConn{c, d} }
}

// ---- wire helpers ----

func handshake(t *testing.T, p *testkit.RawPeer) testkit.Hello {
	t.Helper()
	h, err := p.Handshake(testkit.ClientHello())
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if h.Version != testkit.Version {
		t.Fatalf("server hello version: got %d, want %d", h.Version, testkit.Version)
	}
	return h
}

// callFrame returns a CALL frame for id carrying h (whose Total the caller sets) and args.
func callFrame(id uint64, h testkit.CallHeader, args []byte, end bool) testkit.Frame {
	var flags byte
	if end {
		flags = testkit.FlagEnd
	}
	return testkit.Frame{Type: testkit.TypeCall, Flags: flags, ID: id, Payload: append(h.Encode(), args...)}
}

// simpleCall returns a complete one-frame call of key with args.
func simpleCall(id uint64, key call.MethodKey, args []byte) testkit.Frame {
	return callFrame(id, testkit.CallHeader{Key: key, Total: uint32(len(args))}, args, true)
}

func dataFrame(id uint64, b []byte, end bool) testkit.Frame {
	var flags byte
	if end {
		flags = testkit.FlagEnd
	}
	return testkit.Frame{Type: testkit.TypeData, Flags: flags, ID: id, Payload: b}
}

func writeFrames(t *testing.T, p *testkit.RawPeer, fs ...testkit.Frame) {
	t.Helper()
	if err := p.WriteFrames(fs...); err != nil {
		t.Fatalf("writing %d frames: %v", len(fs), err)
	}
}

// expectError reads until the terminal frame of id and checks that it is an ERROR with code and
// the never-ran flag as wanted.
func expectError(t *testing.T, p *testkit.RawPeer, id uint64, code byte, neverRan bool) testkit.ErrorBody {
	t.Helper()
	f, err := p.ReadTerminal(id)
	if err != nil {
		t.Fatalf("call %d: reading its terminal frame: %v (last GOAWAY %+v)", id, err, p.LastGoAway())
	}
	return checkError(t, f, code, neverRan)
}

func checkError(t *testing.T, f testkit.Frame, code byte, neverRan bool) testkit.ErrorBody {
	t.Helper()
	if f.Type != testkit.TypeError {
		t.Fatalf("call %d: got %v, want an ERROR frame with code %d", f.ID, f, code)
	}
	e, err := testkit.ParseErrorBody(f.Payload)
	if err != nil {
		t.Fatalf("call %d: malformed error body: %v", f.ID, err)
	}
	if e.Code != code || e.NeverRan() != neverRan {
		t.Fatalf("call %d: got error code %d never-ran=%v (%q), want code %d never-ran=%v",
			f.ID, e.Code, e.NeverRan(), e.Message, code, neverRan)
	}
	return e
}

// expectReply reads the response to id and returns the reply bytes, failing t unless it is a
// well-formed reply whose length is the one its header declares.
func expectReply(t *testing.T, p *testkit.RawPeer, id uint64) []byte {
	t.Helper()
	fs, err := p.ReadResponse(id)
	if err != nil {
		t.Fatalf("call %d: reading its response: %v (last GOAWAY %+v)", id, err, p.LastGoAway())
	}
	return replyBytes(t, id, fs)
}

func replyBytes(t *testing.T, id uint64, fs []testkit.Frame) []byte {
	t.Helper()
	if fs[0].Type != testkit.TypeReply {
		msg := ""
		if fs[0].Type == testkit.TypeError {
			e, _ := testkit.ParseErrorBody(fs[0].Payload)
			msg = fmt.Sprintf(" (error code %d never-ran=%v %q)", e.Code, e.NeverRan(), e.Message)
		}
		t.Fatalf("call %d: got %v%s, want a REPLY", id, fs[0], msg)
	}
	rh, rest, err := testkit.ParseReplyHeader(fs[0].Payload)
	if err != nil {
		t.Fatalf("call %d: %v", id, err)
	}
	body := bytes.Clone(rest)
	for _, f := range fs[1:] {
		if f.Type != testkit.TypeData {
			t.Fatalf("call %d: got %v inside a reply, want DATA", id, f)
		}
		body = append(body, f.Payload...)
	}
	if len(body) != int(rh.Total) {
		t.Fatalf("call %d: reply carries %d bytes, its header declares %d", id, len(body), rh.Total)
	}
	return body
}

// expectEcho makes a complete call to keyEcho and checks its reply: proof that the connection
// still serves calls.
func expectEcho(t *testing.T, p *testkit.RawPeer, id uint64) {
	t.Helper()
	args := fmt.Appendf(nil, "still usable %d", id)
	writeFrames(t, p, simpleCall(id, keyEcho, args))
	if got := expectReply(t, p, id); !bytes.Equal(got, args) {
		t.Fatalf("echo call %d: got reply %q, want %q", id, got, args)
	}
}

// expectGoAway reads until the connection ends and checks that it ended after a GOAWAY with
// code.
func expectGoAway(t *testing.T, p *testkit.RawPeer, code byte) testkit.GoAway {
	t.Helper()
	g, err := p.ReadUntilClose()
	if err != nil {
		t.Fatalf("reading until the server closes: %v (GOAWAY %+v); want a GOAWAY with code %d, then the end of the connection", err, g, code)
	}
	if g == nil {
		t.Fatalf("connection closed without a GOAWAY, want a GOAWAY with code %d", code)
	}
	if g.Code != code {
		t.Fatalf("GOAWAY: got code %d (%q), want %d", g.Code, g.Message, code)
	}
	return *g
}

// isClosedErr reports whether err is how a read sees a connection the peer closed (as opposed
// to a timeout or a local failure).
func isClosedErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrClosedPipe)
}

// readNothingUntilClose reads from c and checks that the server closes it without sending one
// byte.
func readNothingUntilClose(t *testing.T, c net.Conn) {
	t.Helper()
	b := make([]byte, 64)
	n, err := c.Read(b)
	if n != 0 {
		t.Fatalf("got %d bytes %q from the server, want none", n, b[:n])
	}
	if !isClosedErr(err) {
		t.Fatalf("read: got %v, want the server to close the connection (EOF or reset)", err)
	}
}

// ---- 1. Truncated frames and chunked streams ----

// truncations are prefixes of valid client streams (after the handshake): the frame they end in
// is cut.
func truncations() []struct {
	name  string
	bytes []byte
} {
	args := bytes.Repeat([]byte("a"), 40)
	full := testkit.EncodeFrame(simpleCall(1, keyEcho, args))
	return []struct {
		name  string
		bytes []byte
	}{
		{"half a header", full[:8]},
		{"header without its payload", full[:testkit.HeaderSize]},
		{"call header cut", full[:testkit.HeaderSize+10]},
		{"arguments cut", full[:len(full)-1]},
		{"ping header cut", testkit.EncodeFrame(testkit.Frame{Type: testkit.TypePing, ID: 1})[:5]},
	}
}

// TestServerTruncatedFrameThenEOF: a stream that ends inside a frame closes the connection; the
// handler of the cut call never runs and ServeOn returns.
func TestServerTruncatedFrameThenEOF(t *testing.T) {
	cases := truncations()
	args := bytes.Repeat([]byte("b"), 100)
	partial := testkit.EncodeFrame(callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 200}, args, false))
	dataCut := testkit.EncodeFrame(dataFrame(1, args, true))[:testkit.HeaderSize+50]
	cases = append(cases, struct {
		name  string
		bytes []byte
	}{"data frame cut", append(partial, dataCut...)})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&runs, echoHandler))
			s := startServer(t, &hm, call.ServerOptions{})
			handshake(t, s.peer)
			if err := s.peer.WriteRaw(tc.bytes); err != nil {
				t.Fatal(err)
			}
			if err := s.peer.Conn().(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			for {
				f, err := s.peer.ReadFrame()
				if err != nil {
					if !isClosedErr(err) {
						t.Fatalf("read: got %v, want the server to close the connection", err)
					}
					break
				}
				if f.ID == 1 && testkit.IsTerminal(f) {
					t.Fatalf("got %v for the cut call, want no answer", f)
				}
			}
			s.waitDone(t)
			if n := runs.Load(); n != 0 {
				t.Errorf("handler ran %d times for a cut call, want 0", n)
			}
		})
	}
}

// TestServerTruncatedFrameThenSilence: a stream that stops inside a frame and stays silent is
// closed by the idle timeout with a GOAWAY carrying the idle code; the cut call never runs.
func TestServerTruncatedFrameThenSilence(t *testing.T) {
	const idle = 10 * time.Second
	for _, tc := range truncations() {
		t.Run(tc.name, func(t *testing.T) {
			inBubble(t, func(t *testing.T) {
				var runs atomic.Int64
				var hm call.HandlerMap
				hm.Set("badinput", "Echo", counting(&runs, echoHandler))
				ps := startPipeServer(&hm, call.ServerOptions{IdleTimeout: idle})
				defer ps.stop()
				p := ps.peer
				start := time.Now()
				p.SetDeadline(start.Add(10 * idle))
				handshake(t, p)
				if err := p.WriteRaw(tc.bytes); err != nil {
					t.Fatal(err)
				}
				expectGoAway(t, p, testkit.CloseIdle)
				if el := time.Since(start); el < idle || el > 2*idle {
					t.Errorf("closed %v after the last byte, want between %v and %v (the idle timeout)", el, idle, 2*idle)
				}
				if n := runs.Load(); n != 0 {
					t.Errorf("handler ran %d times for a cut call, want 0", n)
				}
			})
		})
	}
}

// TestServerIdleTimeoutClosesStalledPartialRequest: a peer that starts a request and then goes
// silent (slowloris with a half-sent request) must be closed by the idle timeout like any other
// silent peer; it must not hold the connection, a concurrency slot and buffered bytes forever.
func TestServerIdleTimeoutClosesStalledPartialRequest(t *testing.T) {
	const idle = 10 * time.Second
	args := bytes.Repeat([]byte("s"), 100)
	partial := testkit.EncodeFrame(callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 1000}, args, false))
	cases := []struct {
		name  string
		bytes []byte
	}{
		{"call without END, then silence", partial},
		{"call without END, then a cut DATA frame", append(bytes.Clone(partial), testkit.EncodeFrame(dataFrame(1, args, false))[:testkit.HeaderSize+10]...)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			inBubble(t, func(t *testing.T) {
				var runs atomic.Int64
				var hm call.HandlerMap
				hm.Set("badinput", "Echo", counting(&runs, echoHandler))
				ps := startPipeServer(&hm, call.ServerOptions{IdleTimeout: idle})
				defer ps.stop()
				p := ps.peer
				start := time.Now()
				p.SetDeadline(start.Add(10 * idle))
				handshake(t, p)
				if err := p.WriteRaw(tc.bytes); err != nil {
					t.Fatal(err)
				}
				g, err := p.ReadUntilClose()
				if err != nil || g == nil || g.Code != testkit.CloseIdle {
					t.Fatalf("after %v of silence with a partial request: got GOAWAY %+v, read error %v; "+
						"want a GOAWAY with the idle code %d within 2×IdleTimeout (%v), then the end of the connection",
						time.Since(start), g, err, testkit.CloseIdle, 2*idle)
				}
				if el := time.Since(start); el > 2*idle {
					t.Errorf("closed after %v, want at most 2×IdleTimeout (%v)", el, 2*idle)
				}
				if n := runs.Load(); n != 0 {
					t.Errorf("handler ran %d times for an incomplete request, want 0", n)
				}
			})
		})
	}
}

// TestServerChunkedStreamDecodesIdentically: a valid client stream (hello, single- and
// multi-frame calls with every optional call-header section, a ping) written in random 1–32 byte
// pieces decodes exactly as if written whole.
func TestServerChunkedStreamDecodesIdentically(t *testing.T) {
	type seen struct {
		args        []byte
		md          call.Metadata
		hasDeadline bool
	}
	reverse := func(b []byte) []byte {
		r := bytes.Clone(b)
		for i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {
			r[i], r[j] = r[j], r[i]
		}
		return r
	}
	for seed := range uint64(6) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 42))
			got := make(chan seen, 8)
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
				_, ok := ctx.Deadline()
				got <- seen{bytes.Clone(args), maps.Clone(call.IncomingMetadata(ctx)), ok}
				return reverse(args), nil
			})
			cc, sc := net.Pipe()
			// Handlers on their own goroutines: this test is about decoding, and inline
			// hand-offs trip a timer race of their own (TestServerInlineHandOffTimerDoesNotOutliveServeOn).
			s := serveOn(t, cc, sc, &hm, call.ServerOptions{InlineHandlerDuration: -1})
			p := s.peer

			randBytes := func(n int) []byte {
				b := make([]byte, n)
				for i := range b {
					b[i] = byte(rng.IntN(256))
				}
				return b
			}
			type want struct {
				id          uint64
				args        []byte
				md          call.Metadata
				hasDeadline bool
			}
			a1, a2, a3 := randBytes(37), randBytes(8100), []byte{}
			md := [][2]string{{"k1", "v1"}, {"tenant", "acme"}, {"empty", ""}}
			h2 := testkit.CallHeader{
				Key: keyEcho, Total: uint32(len(a2)), Deadline: testkit.Uint64(uint64(time.Hour)),
				TraceID: [16]byte{1, 2, 3}, SpanID: [8]byte{4, 5}, TraceFlags: 1, Tracestate: "vendor=value",
				Metadata: md,
			}
			wants := []want{
				{1, a1, nil, false},
				{2, a2, call.Metadata{"k1": "v1", "tenant": "acme", "empty": ""}, true},
				{3, a3, nil, false},
			}
			stream := testkit.ClientHello().Encode()
			stream = testkit.AppendFrame(stream, simpleCall(1, keyEcho, a1))
			stream = testkit.AppendFrame(stream, callFrame(2, h2, a2[:100], false))
			stream = testkit.AppendFrame(stream, dataFrame(2, a2[100:5100], false))
			stream = testkit.AppendFrame(stream, dataFrame(2, a2[5100:], true))
			stream = testkit.AppendFrame(stream, testkit.Frame{Type: testkit.TypePing, ID: 7})
			stream = testkit.AppendFrame(stream, simpleCall(3, keyEcho, a3))

			var (
				wg   sync.WaitGroup
				werr error
			)
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := stream
				for len(b) > 0 {
					n := min(len(b), 1+rng.IntN(32))
					if _, err := cc.Write(b[:n]); err != nil {
						werr = err
						return
					}
					b = b[n:]
				}
			}()
			defer wg.Wait()
			defer cc.Close() // on failure, unblocks the writer
			sh, err := p.ReadHello()
			if err != nil || sh.Version != testkit.Version {
				t.Fatalf("server hello: got %+v, %v; want version %d", sh, err, testkit.Version)
			}
			replies := map[uint64][]testkit.Frame{}
			done, pong := 0, false
			for done < len(wants) || !pong {
				f, err := p.ReadFrame()
				if err != nil {
					t.Fatalf("reading responses (%d of %d calls answered, pong %v): %v", done, len(wants), pong, err)
				}
				switch {
				case f.Type == testkit.TypePong:
					if f.ID != 7 {
						t.Fatalf("got PONG %d, want PONG 7", f.ID)
					}
					pong = true
				case f.Type == testkit.TypeReply || f.Type == testkit.TypeData || f.Type == testkit.TypeError:
					replies[f.ID] = append(replies[f.ID], f)
					if testkit.IsTerminal(f) {
						done++
					}
				default:
					t.Fatalf("unexpected frame %v", f)
				}
			}
			wg.Wait()
			if werr != nil {
				t.Fatalf("writing the chunked stream: %v", werr)
			}
			for _, w := range wants {
				fs := replies[w.id]
				if len(fs) == 0 {
					t.Fatalf("call %d: no response", w.id)
				}
				if r := replyBytes(t, w.id, fs); !bytes.Equal(r, reverse(w.args)) {
					t.Errorf("call %d: reply of %d bytes differs from the reversed arguments (%d bytes)", w.id, len(r), len(w.args))
				}
			}
			var seens []seen
			for range wants {
				seens = append(seens, <-got)
			}
			for _, w := range wants {
				found := false
				for _, s := range seens {
					if bytes.Equal(s.args, w.args) {
						found = true
						if !maps.Equal(s.md, w.md) {
							t.Errorf("call %d: handler saw metadata %v, want %v", w.id, s.md, w.md)
						}
						if s.hasDeadline != w.hasDeadline {
							t.Errorf("call %d: handler saw deadline=%v, want %v", w.id, s.hasDeadline, w.hasDeadline)
						}
					}
				}
				if !found {
					t.Errorf("call %d: no handler saw its %d argument bytes", w.id, len(w.args))
				}
			}
		})
	}
}

// ---- 2. Length prefixes ----

// TestServerRejectsOversizedFrameLength: a header declaring more than the max frame size closes
// the connection with a protocol GOAWAY, on the header alone; exactly the max is accepted.
func TestServerRejectsOversizedFrameLength(t *testing.T) {
	const maxFrame = testkit.DefaultMaxFrame
	cases := []struct {
		name   string
		frame  testkit.Frame
		accept bool
	}{
		{"CALL declaring 0xFFFFFFFF bytes", testkit.Frame{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 1, Length: testkit.Uint32(math.MaxUint32)}, false},
		{"CALL declaring max+1 bytes", testkit.Frame{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 1, Payload: make([]byte, 100), Length: testkit.Uint32(maxFrame + 1)}, false},
		{"DATA declaring max+1 bytes", testkit.Frame{Type: testkit.TypeData, ID: 1, Length: testkit.Uint32(maxFrame + 1)}, false},
		{"PING declaring 0xFFFFFFFF bytes", testkit.Frame{Type: testkit.TypePing, ID: 1, Length: testkit.Uint32(math.MaxUint32)}, false},
		{"CALL of exactly max bytes", simpleCall(1, keyEcho, bytes.Repeat([]byte("m"), maxFrame-testkit.CallHeaderSize)), true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&runs, echoHandler))
			s := startServer(t, &hm, call.ServerOptions{})
			handshake(t, s.peer)
			writeFrames(t, s.peer, tc.frame)
			if tc.accept {
				if got := expectReply(t, s.peer, 1); len(got) != maxFrame-testkit.CallHeaderSize {
					t.Fatalf("reply: got %d bytes, want %d", len(got), maxFrame-testkit.CallHeaderSize)
				}
				expectEcho(t, s.peer, 2)
				return
			}
			expectGoAway(t, s.peer, testkit.CloseProtocol)
			s.waitDone(t)
			if n := runs.Load(); n != 0 {
				t.Errorf("handler ran %d times, want 0", n)
			}
		})
	}
}

// ---- 3. Malformed frames after the handshake ----

// TestServerProtocolErrorsCloseWithGoAway: every frame DESIGN.md calls a protocol error closes
// the connection with a GOAWAY carrying the protocol code, and no handler runs for it.
func TestServerProtocolErrorsCloseWithGoAway(t *testing.T) {
	ping := testkit.Frame{Type: testkit.TypePing, ID: 1}
	withReserved := func(f testkit.Frame, r uint16) testkit.Frame { f.Reserved = r; return f }
	withFlags := func(f testkit.Frame, fl byte) testkit.Frame { f.Flags = fl; return f }
	withType := func(f testkit.Frame, typ byte) testkit.Frame { f.Type = typ; return f }
	good := simpleCall(1, keyEcho, []byte("hello"))
	cases := []struct {
		name   string
		frames []testkit.Frame
		// blockRuns is how many blocking handlers the frames start legitimately.
		blockRuns int64
	}{
		{"frame type 0x00", []testkit.Frame{withType(ping, 0x00)}, 0},
		{"unknown frame type 0x09", []testkit.Frame{withType(ping, 0x09)}, 0},
		{"reserved stream type 0x10 not negotiated", []testkit.Frame{withType(good, 0x10)}, 0},
		{"frame type 0xFF", []testkit.Frame{withType(good, 0xFF)}, 0},
		{"REPLY from a client", []testkit.Frame{{Type: testkit.TypeReply, Flags: testkit.FlagEnd, ID: 1, Payload: testkit.ReplyHeader{}.Encode()}}, 0},
		{"ERROR from a client", []testkit.Frame{{Type: testkit.TypeError, ID: 1, Payload: testkit.ErrorBody{Code: 1}.Encode()}}, 0},
		{"GOAWAY from a client", []testkit.Frame{testkit.GoAway{Code: testkit.CloseDrain}.Frame()}, 0},
		{"reserved flag 0x02 on CALL", []testkit.Frame{withFlags(good, testkit.FlagEnd|0x02)}, 0},
		{"reserved flag 0x80 on DATA", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 2}, []byte("a"), false), withFlags(dataFrame(1, []byte("b"), true), testkit.FlagEnd|0x80)}, 0},
		{"END flag on PING", []testkit.Frame{withFlags(ping, testkit.FlagEnd)}, 0},
		{"flag on CANCEL", []testkit.Frame{simpleCall(1, keyBlock, nil), {Type: testkit.TypeCancel, Flags: 0x04, ID: 1}}, 1},
		{"reserved header bytes on PING", []testkit.Frame{withReserved(ping, 1)}, 0},
		{"reserved header bytes on CALL", []testkit.Frame{withReserved(good, 0x8000)}, 0},
		{"PING with a payload", []testkit.Frame{{Type: testkit.TypePing, ID: 1, Payload: []byte("x")}}, 0},
		{"CANCEL with a payload", []testkit.Frame{simpleCall(1, keyBlock, nil), {Type: testkit.TypeCancel, ID: 1, Payload: []byte("x")}}, 1},
		{"reserved call flag", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Flags: 0x80}, nil, true)}, 0},
		{"deadline flag without its section", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Flags: testkit.CallDeadline}, nil, true)}, 0},
		{"call header shorter than 29 bytes", []testkit.Frame{{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 1, Payload: make([]byte, 20)}}, 0},
		{"CALL with END carrying less than its total", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 10}, []byte("12345"), true)}, 0},
		{"CALL carrying more than its total", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 3}, []byte("12345"), false)}, 0},
		{"DATA beyond the declared total", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyEcho, Total: 10}, []byte("12345"), false), dataFrame(1, []byte("123456"), true)}, 0},
		{"DATA for a request never opened", []testkit.Frame{dataFrame(9, []byte("x"), true)}, 0},
		{"CANCEL for a request never opened", []testkit.Frame{{Type: testkit.TypeCancel, ID: 9}}, 0},
		{"DATA after the END of a running request", []testkit.Frame{simpleCall(1, keyBlock, []byte("x")), dataFrame(1, []byte("y"), true)}, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			b := newBlocker()
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&runs, echoHandler))
			hm.Set("badinput", "Block", b.handle)
			s := startServer(t, &hm, call.ServerOptions{})
			handshake(t, s.peer)
			writeFrames(t, s.peer, tc.frames...)
			expectGoAway(t, s.peer, testkit.CloseProtocol)
			s.waitDone(t)
			if n := runs.Load(); n != 0 {
				t.Errorf("echo handler ran %d times, want 0", n)
			}
			if n := b.calls.Load(); n != tc.blockRuns {
				t.Errorf("blocking handler ran %d times, want %d", n, tc.blockRuns)
			}
		})
	}
}

// TestServerRejectsBadHello: a peer that does not speak weft is closed during the handshake,
// without a handler ever being reachable; a wrong magic gets no byte at all.
func TestServerRejectsBadHello(t *testing.T) {
	good := testkit.ClientHello()
	withMagic, restShort, restLong, tinyFrame := good, good, good, good
	withMagic.Magic = "WEFX"
	restShort.RestLen = testkit.HelloRestSize - 1
	restLong.RestLen = testkit.MaxHelloRest + 1
	tinyFrame.MaxFrame = 1024
	cases := []struct {
		name        string
		bytes       []byte
		closeWrite  bool // half-close after writing: the server sees EOF
		wantNoBytes bool
	}{
		{"wrong magic", withMagic.Encode(), false, true},
		{"rest length below 28", restShort.Encode(), false, true},
		{"rest length above 1024", restLong.Encode(), false, true},
		{"hello cut, then EOF", good.Encode()[:20], true, true},
		{"prefix only, then EOF", good.Encode()[:testkit.HelloPrefixSize], true, true},
		{"max frame below 16 KiB", tinyFrame.Encode(), false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&runs, echoHandler))
			s := startServer(t, &hm, call.ServerOptions{})
			if err := s.peer.WriteRaw(tc.bytes); err != nil {
				t.Fatal(err)
			}
			// A call right behind the hello must not reach the handler either.
			if !tc.closeWrite {
				s.peer.WriteFrame(simpleCall(1, keyEcho, []byte("x"))) // may fail: the server may have closed
			} else if err := s.peer.Conn().(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if tc.wantNoBytes {
				readNothingUntilClose(t, s.peer.Conn())
			} else if _, err := io.Copy(io.Discard, s.peer.Conn()); err != nil && !isClosedErr(err) {
				t.Fatalf("read: got %v, want the server to close the connection", err)
			}
			s.waitDone(t)
			if n := runs.Load(); n != 0 {
				t.Errorf("handler ran %d times, want 0", n)
			}
		})
	}
}

// TestServerWrongVersionAnswersHelloThenCloses: a client speaking another version gets the
// server's hello (version 1), then the end of the connection. DESIGN.md: "Neither side writes
// before it has read what it answers, so the exchange works over an unbuffered net.Pipe": a client
// that writes its whole hello, then reads (as call.Dial does), must get the answer over a pipe too.
func TestServerWrongVersionAnswersHelloThenCloses(t *testing.T) {
	v2 := testkit.ClientHello()
	v2.Version = 2
	check := func(t *testing.T, p *testkit.RawPeer) {
		t.Helper()
		h, err := p.Handshake(v2)
		if err != nil {
			t.Fatalf("version-2 hello: got error %v, want the server's hello", err)
		}
		if h.Version != testkit.Version {
			t.Fatalf("server hello version: got %d, want %d", h.Version, testkit.Version)
		}
		f, err := p.ReadFrame()
		if err == nil {
			t.Fatalf("after the hello: got %v, want the end of the connection", f)
		}
		if !isClosedErr(err) {
			t.Fatalf("after the hello: got %v, want the end of the connection", err)
		}
	}
	t.Run("tcp", func(t *testing.T) {
		s := startServer(t, nil, call.ServerOptions{})
		check(t, s.peer)
		s.waitDone(t)
	})
	t.Run("pipe", func(t *testing.T) {
		inBubble(t, func(t *testing.T) {
			ps := startPipeServer(nil, call.ServerOptions{HandshakeTimeout: 5 * time.Second})
			defer ps.stop()
			ps.peer.SetDeadline(time.Now().Add(time.Minute))
			check(t, ps.peer)
		})
	})
}

// ---- 4. Request ids ----

// TestServerRequestIDNotIncreasing: a CALL whose id is not above every earlier id (reuse of an
// in-flight id, of a finished id, a lower id, id 0) is a protocol error; no handler runs twice.
func TestServerRequestIDNotIncreasing(t *testing.T) {
	cases := []struct {
		name      string
		first     []testkit.Frame // the legitimate calls
		firstKey  call.MethodKey
		bad       testkit.Frame
		wantBlock int64
		wantEcho  int64
	}{
		{"reuse of an in-flight id", []testkit.Frame{simpleCall(1, keyBlock, []byte("a"))}, keyBlock, simpleCall(1, keyBlock, []byte("b")), 1, 0},
		{"reuse of an in-flight id for another method", []testkit.Frame{simpleCall(1, keyBlock, []byte("a"))}, keyBlock, simpleCall(1, keyEcho, []byte("b")), 1, 0},
		{"id lower than an in-flight one", []testkit.Frame{simpleCall(5, keyBlock, []byte("a"))}, keyBlock, simpleCall(3, keyBlock, []byte("b")), 1, 0},
		{"reuse of a finished id", []testkit.Frame{simpleCall(1, keyEcho, []byte("a"))}, keyEcho, simpleCall(1, keyEcho, []byte("b")), 0, 1},
		{"id zero", nil, keyEcho, simpleCall(0, keyEcho, []byte("b")), 0, 0},
		{"reuse of a partial request's id", []testkit.Frame{callFrame(1, testkit.CallHeader{Key: keyBlock, Total: 10}, []byte("abc"), false)}, keyBlock, simpleCall(1, keyBlock, []byte("b")), 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var echoRuns atomic.Int64
			b := newBlocker()
			defer b.releaseAll()
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&echoRuns, echoHandler))
			hm.Set("badinput", "Block", b.handle)
			s := startServer(t, &hm, call.ServerOptions{})
			handshake(t, s.peer)
			if len(tc.first) > 0 {
				writeFrames(t, s.peer, tc.first...)
				switch {
				case tc.firstKey == keyBlock && tc.wantBlock > 0:
					b.waitStarted(t, 1)
				case tc.firstKey == keyEcho:
					expectReply(t, s.peer, tc.first[0].ID)
				}
			}
			writeFrames(t, s.peer, tc.bad)
			expectGoAway(t, s.peer, testkit.CloseProtocol)
			s.waitDone(t)
			if n := b.calls.Load(); n != tc.wantBlock {
				t.Errorf("blocking handler ran %d times, want %d", n, tc.wantBlock)
			}
			if n := echoRuns.Load(); n != tc.wantEcho {
				t.Errorf("echo handler ran %d times, want %d", n, tc.wantEcho)
			}
		})
	}
}

// ---- 6. Garbage after connect ----

var (
	httpGarbage = []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	// tlsGarbage looks like the start of a TLS 1.2 ClientHello record.
	tlsGarbage = append([]byte{
		0x16, 0x03, 0x01, 0x00, 0xa5, // record: handshake, TLS 1.0, length
		0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, // ClientHello, length, TLS 1.2
	}, bytes.Repeat([]byte{0x5a}, 160)...)
)

// TestServerGarbageAfterConnect: a plaintext weft server receiving HTTP or a TLS ClientHello
// closes at once, writes nothing, runs nothing, and ServeOn returns.
func TestServerGarbageAfterConnect(t *testing.T) {
	for _, tc := range []struct {
		name  string
		bytes []byte
	}{{"HTTP request", httpGarbage}, {"TLS ClientHello", tlsGarbage}} {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", counting(&runs, echoHandler))
			s := startServer(t, &hm, call.ServerOptions{})
			if err := s.peer.WriteRaw(tc.bytes); err != nil {
				t.Fatal(err)
			}
			readNothingUntilClose(t, s.peer.Conn())
			s.waitDone(t)
			if n := runs.Load(); n != 0 {
				t.Errorf("handler ran %d times, want 0", n)
			}
		})
	}
}

// TestServerGarbageLogsRateLimited: 50 garbage connections to one call.Serve produce only a few
// warnings: logs are not floodable.
func TestServerGarbageLogsRateLimited(t *testing.T) {
	testkit.CheckLeaks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var runs atomic.Int64
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", counting(&runs, echoHandler))
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- call.Serve(sctx, call.NetListener(l, &hm), call.ServerOptions{Logger: logger}) }()
	defer func() {
		stop()
		select {
		case <-served:
		case <-time.After(ioBound):
			t.Errorf("Serve did not return within %v of its context being cancelled", ioBound)
		}
	}()
	for i := range 50 {
		c, err := net.DialTimeout("tcp", l.Addr().String(), ioBound)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(ioBound))
		garbage := httpGarbage
		if i%2 == 1 {
			garbage = tlsGarbage
		}
		if _, err := c.Write(garbage); err != nil {
			c.Close()
			t.Fatal(err)
		}
		readNothingUntilClose(t, c)
		c.Close()
	}
	warnings := strings.Count(logs.String(), "level=WARN")
	if warnings < 1 || warnings >= 5 {
		t.Errorf("50 garbage connections logged %d warnings, want between 1 and 4:\n%s", warnings, logs.String())
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("handler ran %d times, want 0", n)
	}
}

// ---- 7. Slowloris ----

// TestServerHandshakeTimeout: a handshake that never completes is closed at
// ServerOptions.HandshakeTimeout, without the server writing anything.
func TestServerHandshakeTimeout(t *testing.T) {
	const timeout = 3 * time.Second
	hello := testkit.ClientHello().Encode()
	for _, tc := range []struct {
		name  string
		bytes []byte
	}{
		{"silent", nil},
		{"magic only", hello[:4]},
		{"prefix only", hello[:testkit.HelloPrefixSize]},
		{"all but the last byte", hello[:len(hello)-1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inBubble(t, func(t *testing.T) {
				ps := startPipeServer(nil, call.ServerOptions{HandshakeTimeout: timeout})
				defer ps.stop()
				start := time.Now()
				c := ps.peer.Conn()
				c.SetDeadline(start.Add(100 * timeout))
				if len(tc.bytes) > 0 {
					if _, err := c.Write(tc.bytes); err != nil {
						t.Fatal(err)
					}
				}
				readNothingUntilClose(t, c)
				if el := time.Since(start); el < timeout || el > timeout+time.Second {
					t.Errorf("closed after %v, want at the handshake timeout (%v)", el, timeout)
				}
			})
		})
	}
}

// TestServerIdleTimeout: a peer silent after the handshake is closed by IdleTimeout with a
// GOAWAY carrying the idle code, no sooner than IdleTimeout after the last frame it sent.
func TestServerIdleTimeout(t *testing.T) {
	const idle = 10 * time.Second
	for _, tc := range []struct {
		name   string
		pingAt time.Duration // 0: never
	}{
		{"silent", 0},
		{"one ping, then silent", idle / 2},
		{"one ping late, then silent", idle - time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inBubble(t, func(t *testing.T) {
				ps := startPipeServer(nil, call.ServerOptions{IdleTimeout: idle})
				defer ps.stop()
				p := ps.peer
				start := time.Now()
				p.SetDeadline(start.Add(20 * idle))
				sh := handshake(t, p)
				if want := uint32(idle / time.Millisecond); sh.IdleTimeoutMillis != want {
					t.Errorf("server hello idle timeout: got %d ms, want %d", sh.IdleTimeoutMillis, want)
				}
				last := start
				if tc.pingAt > 0 {
					time.Sleep(tc.pingAt) // fake clock
					writeFrames(t, p, testkit.Frame{Type: testkit.TypePing, ID: 42})
					f, err := p.ReadFrame()
					if err != nil || f.Type != testkit.TypePong || f.ID != 42 {
						t.Fatalf("answer to PING 42: got %v, %v; want PONG 42", f, err)
					}
					last = time.Now()
				}
				expectGoAway(t, p, testkit.CloseIdle)
				if el := time.Since(last); el < idle || el > 2*idle {
					t.Errorf("closed %v after the last frame received, want between %v and %v", el, idle, 2*idle)
				}
			})
		})
	}
}

// ---- 8. Concurrency limit and rapid reset ----

// TestServerConcurrencyLimit: calls beyond MaxConcurrentCalls are refused with never-ran, and
// running handlers never exceed the limit.
func TestServerConcurrencyLimit(t *testing.T) {
	const limit = 4
	b := newBlocker()
	defer b.releaseAll()
	var hm call.HandlerMap
	hm.Set("badinput", "Block", b.handle)
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: limit}})
	p := s.peer
	if sh := handshake(t, p); sh.MaxConcurrent != limit {
		t.Errorf("server hello max concurrent: got %d, want %d", sh.MaxConcurrent, limit)
	}
	for id := uint64(1); id <= limit; id++ {
		writeFrames(t, p, simpleCall(id, keyBlock, []byte{byte(id)}))
	}
	b.waitStarted(t, limit)
	// One over the limit, then a burst of them, to blocking and quick methods alike.
	writeFrames(t, p, simpleCall(limit+1, keyBlock, []byte("over")))
	expectError(t, p, limit+1, testkit.CodeRefused, true)
	var burst []testkit.Frame
	for id := uint64(limit + 2); id < limit+12; id++ {
		key := keyBlock
		if id%2 == 0 {
			key = keyEcho
		}
		burst = append(burst, simpleCall(id, key, []byte("over")))
	}
	writeFrames(t, p, burst...)
	for _, f := range burst {
		expectError(t, p, f.ID, testkit.CodeRefused, true)
	}
	if got := b.maxRunning.Load(); got != limit {
		t.Errorf("blocking handlers running at once: got %d, want %d", got, limit)
	}
	if got := b.calls.Load(); got != limit {
		t.Errorf("blocking handler started %d times, want %d", got, limit)
	}
	b.releaseAll()
	got := map[uint64]bool{}
	for len(got) < limit {
		f, err := p.ReadFrame()
		if err != nil {
			t.Fatalf("reading the released replies (%d of %d): %v", len(got), limit, err)
		}
		if !testkit.IsTerminal(f) {
			continue
		}
		if f.Type != testkit.TypeReply || f.ID < 1 || f.ID > limit || got[f.ID] {
			t.Fatalf("got %v, want one REPLY for each of calls 1..%d", f, limit)
		}
		got[f.ID] = true
	}
}

// TestServerSlotFreedWhenTerminalFrameSent: DESIGN.md says the client frees a call's slot when
// it receives the terminal frame, "so its count of calls running on the server is exact". A
// client at the server's limit that starts a new call as soon as a reply arrives must therefore
// never be refused. The server's writes take a millisecond to return after delivering their
// bytes (a slow system call, a preempted goroutine); the handler is long enough to be handed off
// the reader, as any handler over InlineHandlerDuration is.
func TestServerSlotFreedWhenTerminalFrameSent(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		var hm call.HandlerMap
		hm.Set("badinput", "Echo", func(_ context.Context, args []byte) ([]byte, error) {
			time.Sleep(time.Millisecond)
			return bytes.Clone(args), nil
		})
		ps := startPipeServerWrapped(&hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: 1}}, withWriteLatency(time.Millisecond))
		defer ps.stop()
		p := ps.peer
		p.SetDeadline(time.Now().Add(time.Hour))
		if sh := handshake(t, p); sh.MaxConcurrent != 1 {
			t.Fatalf("server hello max concurrent: got %d, want 1", sh.MaxConcurrent)
		}
		for id := uint64(1); id <= 5; id++ {
			// One call in flight at a time: the previous one's terminal frame was received.
			writeFrames(t, p, simpleCall(id, keyEcho, []byte("x")))
			f, err := p.ReadTerminal(id)
			if err != nil {
				t.Fatalf("call %d: %v", id, err)
			}
			if f.Type != testkit.TypeReply {
				e, _ := testkit.ParseErrorBody(f.Payload)
				t.Fatalf("call %d, sent after call %d's terminal frame arrived: got %v (code %d never-ran=%v %q), want a REPLY",
					id, id-1, f, e.Code, e.NeverRan(), e.Message)
			}
		}
	})
}

// TestServerRapidReset: open-cancel-open 1000 times (every third call left partial before its
// cancel): running handlers never exceed the limit, no call gets two terminal frames, and nothing
// is left running. "paced" keeps at most 64 calls unanswered, as a client within the control
// queue's bound does: every CALL then gets exactly one terminal frame. "unpaced" is an attacker
// writing as fast as it can: the server may disconnect it, but the invariants hold.
func TestServerRapidReset(t *testing.T) {
	for _, tc := range []struct {
		name   string
		window int // most calls without a terminal frame; 0: unbounded
	}{{"paced", 64}, {"unpaced", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			const (
				limit = 4
				n     = 1000
			)
			b := newBlocker()
			defer b.releaseAll()
			var hm call.HandlerMap
			hm.Set("badinput", "Block", b.handle)
			hm.Set("badinput", "Echo", echoHandler)
			s := startServer(t, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: limit}})
			p := s.peer
			handshake(t, p)
			p.SetDeadline(time.Now().Add(3 * ioBound))

			partial := func(id uint64) bool { return id%3 == 0 }
			window := make(chan struct{}, max(tc.window, 1))
			var (
				wg   sync.WaitGroup
				werr error
			)
			stopWriting := make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				for id := uint64(1); id <= n; id++ {
					if tc.window > 0 {
						select {
						case window <- struct{}{}:
						case <-stopWriting:
							return
						}
					}
					f := simpleCall(id, keyBlock, []byte("r"))
					if partial(id) {
						f = callFrame(id, testkit.CallHeader{Key: keyBlock, Total: 10}, []byte("r"), false)
					}
					if err := p.WriteFrames(f, testkit.Frame{Type: testkit.TypeCancel, ID: id}); err != nil {
						werr = fmt.Errorf("call %d: %w", id, err)
						return
					}
				}
			}()
			defer wg.Wait()
			defer close(stopWriting)
			defer p.Close() // on failure, unblocks the writer

			terminals := map[uint64]int{}
			codes := map[byte]int{}
			var readErr error
			read := func(until func() bool) {
				t.Helper()
				for readErr == nil && !until() {
					f, err := p.ReadFrame()
					if err != nil {
						readErr = err
						return
					}
					if !testkit.IsTerminal(f) {
						continue
					}
					terminals[f.ID]++
					if tc.window > 0 {
						select {
						case <-window:
						default:
						}
					}
					if f.Type == testkit.TypeError {
						e, err := testkit.ParseErrorBody(f.Payload)
						if err != nil {
							t.Fatalf("call %d: %v", f.ID, err)
						}
						codes[e.Code]++
						if partial(f.ID) && (e.Code != testkit.CodeCanceled && e.Code != testkit.CodeRefused || !e.NeverRan()) {
							t.Errorf("partial call %d cancelled: got error code %d never-ran=%v, want cancelled or refused, never-ran", f.ID, e.Code, e.NeverRan())
						}
					}
				}
			}
			read(func() bool { return len(terminals) >= n })
			if readErr == nil {
				wg.Wait()
				if werr != nil {
					t.Fatalf("writing: %v", werr)
				}
				// A last call: once it is answered, any duplicate terminal frame for the earlier
				// ones would have had every chance to arrive.
				writeFrames(t, p, simpleCall(n+1, keyEcho, []byte("last")))
				read(func() bool { return terminals[n+1] > 0 })
			}
			t.Logf("terminal frames for %d ids; error codes %v; handlers started %d; read ended with %v (GOAWAY %+v)",
				len(terminals), codes, b.calls.Load(), readErr, p.LastGoAway())
			if tc.window > 0 {
				if readErr != nil {
					t.Fatalf("a paced client was disconnected after %d answers: %v (GOAWAY %+v)", len(terminals), readErr, p.LastGoAway())
				}
				if len(terminals) != n+1 {
					t.Errorf("got terminal frames for %d distinct ids, want %d", len(terminals), n+1)
				}
			}
			for id, c := range terminals {
				if c != 1 {
					t.Errorf("call %d: got %d terminal frames, want exactly 1", id, c)
				}
			}
			if got := b.maxRunning.Load(); got > limit {
				t.Errorf("blocking handlers running at once: got %d, want at most %d", got, limit)
			}
			p.Close()
			s.waitDone(t)
			if got := b.running.Load(); got != 0 {
				t.Errorf("%d handlers still running after ServeOn returned", got)
			}
		})
	}
}

// ---- 9. Floods ----

// TestServerControlFlood: a peer that floods PINGs (or calls the server refuses) without reading
// the answers. DESIGN.md bounds the control queue at 256 frames and disconnects such a peer with
// a GOAWAY carrying the flood code. Over net.Pipe nothing is buffered outside the server, so:
//   - while no answer is read, the server takes in at most about 256 flooded frames (every write
//     that completed was read by the server): its memory is bounded;
//   - when the peer then reads, the server either resumes (backpressure) or, if it closes the
//     connection while its writer still delivers frames, the last frame is that GOAWAY: a typed
//     reason, not a bare EOF;
//   - a peer that reads nothing for a minute is disconnected.
//
// The peer starts reading after various delays, since where the server gives up is its choice.
func TestServerControlFlood(t *testing.T) {
	const (
		sent     = 10_000
		maxQueue = 256 + 2 // the control queue, plus a frame in a write and one being read
	)
	kinds := []struct {
		name  string
		frame func(i uint64) testkit.Frame
	}{
		{"pings", func(i uint64) testkit.Frame { return testkit.Frame{Type: testkit.TypePing, ID: i} }},
		{"calls to an unknown method", func(i uint64) testkit.Frame { return simpleCall(i, keyUnknown, nil) }},
	}
	for _, kind := range kinds {
		for _, delay := range []time.Duration{0, 500 * time.Millisecond, 1500 * time.Millisecond, 3 * time.Second, time.Minute} {
			t.Run(fmt.Sprintf("%s, read after %v", kind.name, delay), func(t *testing.T) {
				inBubble(t, func(t *testing.T) {
					ps := startPipeServer(nil, call.ServerOptions{})
					defer ps.stop()
					p := ps.peer
					p.SetDeadline(time.Now().Add(time.Hour))
					handshake(t, p)
					var written atomic.Int64
					writerDone := make(chan struct{})
					go func() {
						defer close(writerDone)
						for i := uint64(1); i <= sent; i++ {
							if err := p.WriteFrame(kind.frame(i)); err != nil {
								return
							}
							written.Add(1)
						}
					}()
					defer func() { <-writerDone }()
					defer p.Close() // on failure, unblocks the writer

					synctest.Wait() // the server and the flooding writer are blocked
					if took := written.Load(); took > maxQueue {
						t.Errorf("with none of its answers read, the server took in %d flooded frames, want at most %d (a bounded control queue)", took, maxQueue)
					}
					time.Sleep(delay) // the peer still does not read
					answers := 0
					var frames []testkit.Frame // the last few, for the failure message
					var goAway *testkit.GoAway
					var readErr error
					for answers < sent {
						f, err := p.ReadFrame()
						if err != nil {
							readErr = err
							break
						}
						frames = append(frames[max(0, len(frames)-3):], f)
						if f.Type == testkit.TypeGoAway {
							g, err := testkit.ParseGoAway(f)
							if err != nil {
								t.Fatal(err)
							}
							goAway = &g
							continue
						}
						answers++
					}
					t.Logf("took in %d frames before the peer read; the peer read %d answers, GOAWAY %+v, then %v", written.Load(), answers, goAway, readErr)
					switch {
					case readErr == nil:
						// Every flooded frame was answered once the peer read: backpressure.
						if delay >= time.Minute {
							t.Errorf("a peer that read nothing for %v was not disconnected (all %d frames answered once it read)", delay, sent)
						}
						if goAway != nil {
							t.Errorf("got GOAWAY %+v on a connection that stayed open", goAway)
						}
					case !isClosedErr(readErr):
						t.Fatalf("reading: %v", readErr)
					case goAway != nil && goAway.Code != testkit.CloseFlood:
						t.Errorf("flooded connection closed with GOAWAY code %d (%q), want the flood code %d", goAway.Code, goAway.Message, testkit.CloseFlood)
					case len(frames) > 0 && goAway == nil:
						t.Errorf("the server delivered %d answers after the peer started reading, then closed without a GOAWAY (last frames %v); want a GOAWAY with the flood code %d before the close",
							answers, frames, testkit.CloseFlood)
					}
				})
			})
		}
	}
}

// TestServerRefusalBurstFromReadingClient: DESIGN.md disconnects "a peer that fills [the control
// queue] (floods pings or calls while never reading)". A client that reads every answer and never
// has more calls open than the server's advertised MaxConcurrentCalls (1024) is not such a peer:
// a burst of 1000 calls to a method the server does not know (say, after a deploy removed it) must
// all be answered with CodeUnknownMethod, and the connection must stay open. The server's writes
// take a millisecond to return, as on any real network.
func TestServerRefusalBurstFromReadingClient(t *testing.T) {
	const n = 1000
	inBubble(t, func(t *testing.T) {
		var hm call.HandlerMap
		hm.Set("badinput", "Echo", echoHandler)
		ps := startPipeServerWrapped(&hm, call.ServerOptions{}, withWriteLatency(time.Millisecond))
		defer ps.stop()
		p := ps.peer
		p.SetDeadline(time.Now().Add(time.Hour))
		if sh := handshake(t, p); sh.MaxConcurrent < n {
			t.Fatalf("server hello max concurrent: got %d, want at least %d", sh.MaxConcurrent, n)
		}
		fs := make([]testkit.Frame, n)
		for i := range fs {
			fs[i] = simpleCall(uint64(i+1), keyUnknown, nil)
		}
		var (
			wg   sync.WaitGroup
			werr error
		)
		wg.Add(1)
		go func() {
			defer wg.Done()
			werr = p.WriteFrames(fs...)
		}()
		defer wg.Wait()
		defer p.Close() // on failure, unblocks the writer
		answered := map[uint64]bool{}
		for len(answered) < n {
			f, err := p.ReadFrame()
			if err != nil {
				t.Fatalf("a client reading every answer was disconnected after %d of %d answers: %v", len(answered), n, err)
			}
			if f.Type == testkit.TypeGoAway {
				g, _ := testkit.ParseGoAway(f)
				t.Fatalf("a client reading every answer got GOAWAY code %d (%q) after %d of %d answers, want all answered",
					g.Code, g.Message, len(answered), n)
			}
			checkError(t, f, testkit.CodeUnknownMethod, true)
			answered[f.ID] = true
		}
		wg.Wait()
		if werr != nil {
			t.Fatalf("writing the burst: %v", werr)
		}
		expectEcho(t, p, n+1)
	})
}

// TestServerPingFloodOverTCP: 100k PINGs over a real socket from a peer that never reads the
// PONGs: the server may buffer them in the kernel, push back or disconnect, but nothing hangs,
// and ServeOn returns once the peer closes.
func TestServerPingFloodOverTCP(t *testing.T) {
	s := startServer(t, nil, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	const perWrite, writes = 1000, 100
	chunk := make([]byte, 0, perWrite*testkit.HeaderSize)
	for i := range perWrite {
		chunk = testkit.AppendFrame(chunk, testkit.Frame{Type: testkit.TypePing, ID: uint64(i + 1)})
	}
	p.SetWriteDeadline(time.Now().Add(3 * time.Second))
	wrote := make(chan error, 1)
	go func() {
		for range writes {
			if err := p.WriteRaw(chunk); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	select {
	case err := <-wrote:
		t.Logf("flood writer ended with %v", err)
	case <-time.After(ioBound):
		p.Close()
		<-wrote
		t.Fatalf("writing %d PINGs with a 3s write deadline did not end within %v", perWrite*writes, ioBound)
	}
	p.Close()
	s.waitDone(t)
}

// TestServerLateCancelFlood: cancels for finished calls are dropped, but a flood of them is
// disconnected with the flood code rather than tolerated forever.
func TestServerLateCancelFlood(t *testing.T) {
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	expectEcho(t, p, 1)
	// A few late cancels are normal (a cancel crossing the reply): dropped, connection fine.
	cancel1 := testkit.Frame{Type: testkit.TypeCancel, ID: 1}
	writeFrames(t, p, cancel1, cancel1, cancel1)
	expectEcho(t, p, 2)
	flood := make([]testkit.Frame, 200)
	for i := range flood {
		flood[i] = testkit.Frame{Type: testkit.TypeCancel, ID: uint64(1 + i%2)}
	}
	writeFrames(t, p, flood...)
	expectGoAway(t, p, testkit.CloseFlood)
	s.waitDone(t)
}

// ---- 10. Metadata and trace-context limits ----

// TestServerMetadataLimits: metadata and tracestate over the limits fail that call with
// CodeTooLarge, never-ran, and the connection keeps serving; exactly the limits are accepted and
// delivered intact.
func TestServerMetadataLimits(t *testing.T) {
	entries := func(n int) [][2]string {
		md := make([][2]string, n)
		for i := range md {
			md[i] = [2]string{fmt.Sprintf("k%02d", i), "v"}
		}
		return md
	}
	bigValue := func(total int) [][2]string { return [][2]string{{"k", strings.Repeat("v", total-1)}} }
	tracestate := func(n int) string { return "a=" + strings.Repeat("b", n-2) }
	const (
		refused = iota
		accepted
		protocol
	)
	cases := []struct {
		name string
		h    testkit.CallHeader
		more []testkit.Frame // DATA frames after a CALL without END
		want int
		// wantEntries is the number of metadata entries the handler sees when accepted.
		wantEntries int
	}{
		{"entry count 65535 (lying)", testkit.CallHeader{Metadata: entries(1), MetadataCount: testkit.Uint16(65535)}, nil, refused, 0},
		{"65 entries", testkit.CallHeader{Metadata: entries(65)}, nil, refused, 0},
		{"64 entries", testkit.CallHeader{Metadata: entries(64)}, nil, accepted, 64},
		{"8193 metadata bytes", testkit.CallHeader{Metadata: bigValue(8193)}, nil, refused, 0},
		{"8192 metadata bytes", testkit.CallHeader{Metadata: bigValue(8192)}, nil, accepted, 1},
		{"8193 bytes over many entries", testkit.CallHeader{Metadata: append(entries(60), [2]string{"x", strings.Repeat("y", 8193-60*4-1)})}, nil, refused, 0},
		{"tracestate of 513 bytes", testkit.CallHeader{TraceID: [16]byte{1}, SpanID: [8]byte{1}, Tracestate: tracestate(513)}, nil, refused, 0},
		{"tracestate of 60000 bytes", testkit.CallHeader{TraceID: [16]byte{1}, SpanID: [8]byte{1}, Tracestate: tracestate(60000)}, nil, refused, 0},
		{"tracestate of 512 bytes", testkit.CallHeader{TraceID: [16]byte{1}, SpanID: [8]byte{1}, Tracestate: tracestate(512)}, nil, accepted, 0},
		{"65 entries on a multi-frame request", testkit.CallHeader{Metadata: entries(65)}, []testkit.Frame{dataFrame(1, []byte("more"), false), dataFrame(1, []byte("end"), true)}, refused, 0},
		{"entry count above the entries present", testkit.CallHeader{Metadata: entries(1), MetadataCount: testkit.Uint16(2)}, nil, protocol, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var runs atomic.Int64
			entriesSeen := make(chan int, 1)
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", echoHandler)
			hm.Set("badinput", "Inspect", func(ctx context.Context, args []byte) ([]byte, error) {
				runs.Add(1)
				entriesSeen <- len(call.IncomingMetadata(ctx))
				return nil, nil
			})
			s := startServer(t, &hm, call.ServerOptions{})
			p := s.peer
			handshake(t, p)
			h := tc.h
			h.Key = keyInspect
			var args []byte
			end := tc.more == nil
			if !end {
				args = []byte("start")
				h.Total = uint32(len(args) + len("more") + len("end"))
			}
			writeFrames(t, p, append([]testkit.Frame{callFrame(1, h, args, end)}, tc.more...)...)
			switch tc.want {
			case refused:
				expectError(t, p, 1, testkit.CodeTooLarge, true)
				expectEcho(t, p, 2)
				if n := runs.Load(); n != 0 {
					t.Errorf("handler ran %d times, want 0", n)
				}
			case accepted:
				expectReply(t, p, 1)
				if got := <-entriesSeen; got != tc.wantEntries {
					t.Errorf("handler saw %d metadata entries, want %d", got, tc.wantEntries)
				}
				expectEcho(t, p, 2)
			case protocol:
				expectGoAway(t, p, testkit.CloseProtocol)
				if n := runs.Load(); n != 0 {
					t.Errorf("handler ran %d times, want 0", n)
				}
			}
		})
	}
}

// ---- 11. Deadline edge values ----

// TestServerDeadlineEdges: remaining time 0 or 1ns is refused with CodeDeadline, never-ran,
// and no handler runs; huge values do not overflow; no deadline means none.
func TestServerDeadlineEdges(t *testing.T) {
	type observed struct {
		deadline time.Time
		ok       bool
		err      error
		done     bool
	}
	const farFuture = 100 * 365 * 24 * time.Hour
	cases := []struct {
		name      string
		remaining *uint64
		refused   bool
		check     func(t *testing.T, sent time.Time, o observed)
	}{
		{"zero", testkit.Uint64(0), true, nil},
		// One nanosecond has passed by the time the handler would start: like zero, it is
		// refused without running (RELIABILITY 11: no handler runs for an expired call).
		{"one nanosecond", testkit.Uint64(1), true, nil},
		{"ten seconds", testkit.Uint64(uint64(10 * time.Second)), false, func(t *testing.T, sent time.Time, o observed) {
			if !o.ok || o.deadline.Before(sent.Add(9*time.Second)) || o.deadline.After(time.Now().Add(10*time.Second)) {
				t.Errorf("handler saw deadline %v (ok=%v), want about 10s after %v", o.deadline, o.ok, sent)
			}
			if o.err != nil || o.done {
				t.Errorf("handler saw Err %v, Done closed %v; want a live context", o.err, o.done)
			}
		}},
		{"2^63 (negative as int64)", testkit.Uint64(1 << 63), false, nil},
		{"max uint64", testkit.Uint64(math.MaxUint64), false, nil},
		{"no deadline", nil, false, func(t *testing.T, sent time.Time, o observed) {
			if o.ok || !o.deadline.IsZero() {
				t.Errorf("handler saw deadline %v (ok=%v), want none", o.deadline, o.ok)
			}
			if o.err != nil || o.done {
				t.Errorf("handler saw Err %v, Done closed %v; want a live context", o.err, o.done)
			}
		}},
	}
	huge := func(t *testing.T, sent time.Time, o observed) {
		if !o.ok || o.deadline.Before(sent.Add(farFuture)) {
			t.Errorf("handler saw deadline %v (ok=%v), want one more than 100 years away", o.deadline, o.ok)
		}
		if o.err != nil || o.done {
			t.Errorf("handler saw Err %v, Done closed %v; want a live context", o.err, o.done)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			check := tc.check
			if check == nil && !tc.refused {
				check = huge
			}
			var runs atomic.Int64
			obs := make(chan observed, 1)
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", echoHandler)
			hm.Set("badinput", "Inspect", func(ctx context.Context, args []byte) ([]byte, error) {
				runs.Add(1)
				var o observed
				o.deadline, o.ok = ctx.Deadline()
				o.err = ctx.Err()
				select {
				case <-ctx.Done():
					o.done = true
				default:
				}
				obs <- o
				return []byte("ran"), nil
			})
			s := startServer(t, &hm, call.ServerOptions{})
			p := s.peer
			handshake(t, p)
			sent := time.Now()
			writeFrames(t, p, callFrame(1, testkit.CallHeader{Key: keyInspect, Deadline: tc.remaining}, nil, true))
			if tc.refused {
				expectError(t, p, 1, testkit.CodeDeadline, true)
				if n := runs.Load(); n != 0 {
					t.Errorf("handler ran %d times for an expired call, want 0", n)
				}
			} else {
				f, err := p.ReadTerminal(1)
				if err != nil {
					t.Fatalf("reading the terminal frame: %v", err)
				}
				if f.Type != testkit.TypeReply && f.Type != testkit.TypeError {
					t.Fatalf("got %v, want a REPLY or ERROR", f)
				}
				select {
				case o := <-obs:
					check(t, sent, o)
				default:
					t.Fatalf("the call was answered with %v without its handler running", f)
				}
			}
			expectEcho(t, p, 2)
		})
	}
}

// ---- 23. Message size limits ----

// TestServerMaxMessageSize: a request of exactly MaxMessageSize succeeds, one byte more fails
// with CodeTooLarge never-ran, its remaining chunks are skipped, and the same connection serves
// the next call. A reply over the client's advertised limit fails too.
func TestServerMaxMessageSize(t *testing.T) {
	const limit = 100 << 10
	var runs atomic.Int64
	sum := func(b []byte) []byte { s := sha256.Sum256(b); return s[:] }
	var hm call.HandlerMap
	hm.Set("badinput", "Inspect", counting(&runs, func(_ context.Context, args []byte) ([]byte, error) {
		return sum(args), nil
	}))
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{Limits: call.Limits{MaxMessageSize: limit}})
	p := s.peer
	if sh := handshake(t, p); sh.MaxMessage != limit {
		t.Errorf("server hello max message: got %d, want %d", sh.MaxMessage, limit)
	}
	// multiFrame sends args as a CALL declaring total, then DATA frames.
	multiFrame := func(id uint64, args []byte, total uint32) {
		t.Helper()
		const first = 60 << 10
		fs := []testkit.Frame{callFrame(id, testkit.CallHeader{Key: keyInspect, Total: total}, args[:first], false)}
		for off := first; off < len(args); off += 32 << 10 {
			end := min(off+32<<10, len(args))
			fs = append(fs, dataFrame(id, args[off:end], end == len(args)))
		}
		writeFrames(t, p, fs...)
	}
	exact := bytes.Repeat([]byte("e"), limit)
	multiFrame(1, exact, limit)
	if got := expectReply(t, p, 1); !bytes.Equal(got, sum(exact)) {
		t.Fatalf("request of exactly the limit: handler saw different bytes")
	}
	over := bytes.Repeat([]byte("o"), limit+1)
	multiFrame(2, over, limit+1)
	expectError(t, p, 2, testkit.CodeTooLarge, true)
	if n := runs.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1 (only the request within the limit)", n)
	}
	// The skipped chunks must not be mistaken for anything: the next call is served.
	exact2 := bytes.Repeat([]byte("f"), limit)
	multiFrame(3, exact2, limit)
	if got := expectReply(t, p, 3); !bytes.Equal(got, sum(exact2)) {
		t.Fatalf("request after a refused one: handler saw different bytes")
	}
	expectEcho(t, p, 4)
}

// TestServerReplyOverClientLimit: the server never sends a reply larger than the client's
// advertised max message size: it fails that call with CodeTooLarge (the handler ran).
func TestServerReplyOverClientLimit(t *testing.T) {
	const clientLimit = 1000
	var hm call.HandlerMap
	hm.Set("badinput", "Inspect", func(_ context.Context, args []byte) ([]byte, error) {
		return make([]byte, binary.BigEndian.Uint32(args)), nil
	})
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	ch := testkit.ClientHello()
	ch.MaxMessage = clientLimit
	if _, err := p.Handshake(ch); err != nil {
		t.Fatal(err)
	}
	size := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
	writeFrames(t, p, simpleCall(1, keyInspect, size(clientLimit)))
	if got := expectReply(t, p, 1); len(got) != clientLimit {
		t.Fatalf("reply of exactly the client's limit: got %d bytes, want %d", len(got), clientLimit)
	}
	writeFrames(t, p, simpleCall(2, keyInspect, size(clientLimit+1)))
	expectError(t, p, 2, testkit.CodeTooLarge, false)
	writeFrames(t, p, simpleCall(3, keyInspect, size(10)))
	if got := expectReply(t, p, 3); len(got) != 10 {
		t.Fatalf("reply after a too-large one: got %d bytes, want 10", len(got))
	}
}

// ---- 27. Unknown methods ----

// TestServerUnknownMethod: a key with no handler fails with CodeUnknownMethod never-ran; 10k
// distinct unknown keys are all answered, the connection keeps working, and no goroutines pile
// up.
func TestServerUnknownMethod(t *testing.T) {
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	p.SetDeadline(time.Now().Add(3 * ioBound))
	writeFrames(t, p, simpleCall(1, keyUnknown, []byte("x")))
	expectError(t, p, 1, testkit.CodeUnknownMethod, true)
	expectEcho(t, p, 2)

	before := runtime.NumGoroutine()
	const n, batch = 10_000, 100
	id := uint64(10)
	for sent := 0; sent < n; sent += batch {
		fs := make([]testkit.Frame, batch)
		want := map[uint64]bool{}
		for i := range fs {
			var key call.MethodKey
			binary.BigEndian.PutUint64(key[:], uint64(sent+i))
			copy(key[8:], "unknown!")
			id++
			fs[i] = simpleCall(id, key, []byte("x"))
			want[id] = true
		}
		writeFrames(t, p, fs...)
		for len(want) > 0 {
			f, err := p.ReadFrame()
			if err != nil {
				t.Fatalf("after %d unknown keys: %v (GOAWAY %+v)", sent, err, p.LastGoAway())
			}
			if !want[f.ID] {
				t.Fatalf("got %v, want an answer to one of calls %d..%d", f, fs[0].ID, id)
			}
			checkError(t, f, testkit.CodeUnknownMethod, true)
			delete(want, f.ID)
		}
	}
	expectEcho(t, p, id+1)
	if after := runtime.NumGoroutine(); after > before+2 {
		t.Errorf("goroutines: %d before 10k unknown keys, %d after; want no growth", before, after)
	}
}

// ---- 29. Secrets in logs ----

// TestServerSecretsNeverLogged: metadata values (credentials) never appear in the server's logs,
// even at debug level, nor in what it sends back, whatever way the call fails.
func TestServerSecretsNeverLogged(t *testing.T) {
	const secret = "secret-token-XYZ"
	auth := [2]string{"authorization", secret}
	filler := func(n int) [][2]string {
		md := [][2]string{auth}
		for i := range n {
			md = append(md, [2]string{fmt.Sprintf("f%d", i), "v"})
		}
		return md
	}
	cases := []struct {
		name      string
		frame     testkit.Frame
		wantClose bool
		wantLog   string // a log line the failure must produce, proving the logger is used
	}{
		{"unknown method", callFrame(1, testkit.CallHeader{Key: keyUnknown, Metadata: [][2]string{auth}}, nil, true), false, ""},
		{"handler error", callFrame(1, testkit.CallHeader{Key: keyFail, Metadata: [][2]string{auth}}, nil, true), false, ""},
		{"handler panic", callFrame(1, testkit.CallHeader{Key: keyPanic, Metadata: [][2]string{auth}}, nil, true), false, "panicked"},
		{"too many metadata entries", callFrame(1, testkit.CallHeader{Key: keyEcho, Metadata: filler(64)}, nil, true), false, ""},
		{"too many metadata bytes", callFrame(1, testkit.CallHeader{Key: keyEcho, Metadata: [][2]string{auth, {"big", strings.Repeat("b", 9000)}}}, nil, true), false, ""},
		{"reserved call flag", callFrame(1, testkit.CallHeader{Key: keyEcho, Flags: 0x80, Metadata: [][2]string{auth}}, nil, true), true, "protocol error"},
		{"truncated metadata", callFrame(1, testkit.CallHeader{Key: keyEcho, Metadata: [][2]string{auth}, MetadataCount: testkit.Uint16(2)}, nil, true), true, "protocol error"},
		{"metadata cut by the total", callFrame(1, testkit.CallHeader{Key: keyEcho, Metadata: [][2]string{auth}, Total: 5}, []byte("abc"), true), true, "protocol error"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var logs syncBuffer
			logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", echoHandler)
			hm.Set("badinput", "Fail", func(context.Context, []byte) ([]byte, error) {
				return nil, errors.New("handler failed on purpose")
			})
			hm.Set("badinput", "Panic", func(context.Context, []byte) ([]byte, error) {
				panic("handler panicked on purpose")
			})
			s := startServer(t, &hm, call.ServerOptions{Logger: logger})
			p := s.peer
			handshake(t, p)
			writeFrames(t, p, tc.frame)
			var wire []byte
			for {
				f, err := p.ReadFrame()
				if err != nil {
					if !tc.wantClose || !isClosedErr(err) {
						t.Fatalf("reading: %v", err)
					}
					break
				}
				wire = append(wire, f.Payload...)
				if !tc.wantClose && f.ID == 1 && testkit.IsTerminal(f) {
					break
				}
			}
			p.Close()
			s.waitDone(t)
			if strings.Contains(logs.String(), secret) {
				t.Errorf("server logs contain the metadata secret:\n%s", logs.String())
			}
			if bytes.Contains(wire, []byte(secret)) {
				t.Errorf("server sent the metadata secret back: %q", wire)
			}
			if tc.wantLog != "" && !strings.Contains(logs.String(), tc.wantLog) {
				t.Errorf("server logs lack %q:\n%s", tc.wantLog, logs.String())
			}
		})
	}
}

// ---- 16. Handler panics ----

// TestServerHandlerPanicIsolated: a panicking handler fails its own call with CodePanic (it ran),
// while a concurrent call on the same connection completes and the connection keeps serving.
func TestServerHandlerPanicIsolated(t *testing.T) {
	b := newBlocker()
	defer b.releaseAll()
	var hm call.HandlerMap
	hm.Set("badinput", "Block", b.handle)
	hm.Set("badinput", "Echo", echoHandler)
	hm.Set("badinput", "Panic", func(context.Context, []byte) ([]byte, error) { panic("boom") })
	s := startServer(t, &hm, call.ServerOptions{})
	p := s.peer
	handshake(t, p)
	writeFrames(t, p, simpleCall(1, keyBlock, []byte("concurrent")))
	b.waitStarted(t, 1)
	writeFrames(t, p, simpleCall(2, keyPanic, nil))
	e := expectError(t, p, 2, testkit.CodePanic, false)
	if strings.Contains(e.Message, "boom") {
		t.Errorf("error message %q carries the panic value, which is only logged", e.Message)
	}
	b.releaseAll()
	if got := expectReply(t, p, 1); string(got) != "concurrent" {
		t.Errorf("concurrent call: got %q, want %q", got, "concurrent")
	}
	expectEcho(t, p, 3)
}

// ---- Drain ----

// TestServerDrain: cancelling ServeOn's context sends a GOAWAY with the drain code and the last
// accepted id; accepted calls (running, or still being received) finish; a later CALL is refused
// never-ran; then the connection closes and ServeOn returns.
func TestServerDrain(t *testing.T) {
	b := newBlocker()
	defer b.releaseAll()
	var hm call.HandlerMap
	hm.Set("badinput", "Block", b.handle)
	hm.Set("badinput", "Echo", echoHandler)
	// Handlers on their own goroutines: a reader hand-off disables the drain
	// (TestServerDrainAfterHandOff); this test is about drain semantics.
	s := startServer(t, &hm, call.ServerOptions{InlineHandlerDuration: -1})
	p := s.peer
	handshake(t, p)
	expectEcho(t, p, 1)
	writeFrames(t, p, simpleCall(3, keyBlock, []byte("in flight")))
	b.waitStarted(t, 1)
	writeFrames(t, p, callFrame(4, testkit.CallHeader{Key: keyEcho, Total: 10}, []byte("part"), false))
	writeFrames(t, p, testkit.Frame{Type: testkit.TypePing, ID: 99}) // once answered, call 4 was read
	for {
		f, err := p.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if f.Type == testkit.TypePong && f.ID == 99 {
			break
		}
	}
	s.cancel()
	f, err := p.ReadFrame()
	if err != nil {
		t.Fatalf("after cancelling ServeOn's context: %v, want a GOAWAY", err)
	}
	g, err := testkit.ParseGoAway(f)
	if err != nil {
		t.Fatalf("after cancelling ServeOn's context: got %v, want a GOAWAY", f)
	}
	if g.Code != testkit.CloseDrain || g.LastID != 4 {
		t.Fatalf("GOAWAY: got code %d last id %d, want code %d last id 4", g.Code, g.LastID, testkit.CloseDrain)
	}
	writeFrames(t, p, simpleCall(5, keyEcho, []byte("late")))
	expectError(t, p, 5, testkit.CodeRefused, true)
	writeFrames(t, p, dataFrame(4, []byte("ial!!!"), true))
	if got := expectReply(t, p, 4); string(got) != "partial!!!" {
		t.Errorf("partial call accepted before the GOAWAY: got %q, want %q", got, "partial!!!")
	}
	b.releaseAll()
	if got := expectReply(t, p, 3); string(got) != "in flight" {
		t.Errorf("in-flight call: got %q, want %q", got, "in flight")
	}
	if g, err := p.ReadUntilClose(); err != nil || g != nil {
		t.Errorf("after the drained calls: got GOAWAY %+v, %v; want the connection closed", g, err)
	}
	s.waitDone(t)
}

// TestServerDrainTimeoutHardStop: calls still running after DrainTimeout are cancelled and the
// connection is closed with a GOAWAY carrying the stopping code.
func TestServerDrainTimeoutHardStop(t *testing.T) {
	const drain = 5 * time.Second
	inBubble(t, func(t *testing.T) {
		b := newBlocker()
		var hm call.HandlerMap
		hm.Set("badinput", "Block", b.handle)
		ps := startPipeServer(&hm, call.ServerOptions{DrainTimeout: drain})
		defer ps.stop()
		p := ps.peer
		p.SetDeadline(time.Now().Add(time.Hour))
		handshake(t, p)
		writeFrames(t, p, simpleCall(1, keyBlock, []byte("stuck")))
		synctest.Wait()
		if n := b.running.Load(); n != 1 {
			t.Fatalf("%d handlers running, want 1", n)
		}
		start := time.Now()
		ps.cancel()
		var goAways []testkit.GoAway
		for {
			f, err := p.ReadFrame()
			if err != nil {
				if !isClosedErr(err) {
					t.Fatalf("reading: %v", err)
				}
				break
			}
			if f.Type == testkit.TypeGoAway {
				g, err := testkit.ParseGoAway(f)
				if err != nil {
					t.Fatal(err)
				}
				goAways = append(goAways, g)
			}
		}
		if el := time.Since(start); el < drain || el > drain+time.Second {
			t.Errorf("closed %v after the drain started, want at the drain timeout (%v)", el, drain)
		}
		synctest.Wait()
		if n := b.running.Load(); n != 0 {
			t.Errorf("%d handlers still running after the hard stop, want 0", n)
		}
		want := []testkit.GoAway{{LastID: 1, Code: testkit.CloseDrain}, {LastID: 1, Code: testkit.CloseStopping}}
		if len(goAways) != len(want) {
			t.Fatalf("GOAWAYs: got %+v, want codes drain then stopping, last id 1", goAways)
		}
		for i := range want {
			if goAways[i].Code != want[i].Code || goAways[i].LastID != want[i].LastID {
				t.Errorf("GOAWAY %d: got code %d last id %d, want code %d last id %d", i, goAways[i].Code, goAways[i].LastID, want[i].Code, want[i].LastID)
			}
		}
	})
}

// TestServerDrainAfterHandOff: cancelling the context of ServeOn (or Serve) drains the
// connection even after a handler outlasted InlineHandlerDuration and the connection's first
// reader handed off to a new one: a GOAWAY with the drain code arrives and, with no call in
// flight, the connection closes and ServeOn / Serve return.
func TestServerDrainAfterHandOff(t *testing.T) {
	const drain = 5 * time.Second
	slow := func(_ context.Context, args []byte) ([]byte, error) {
		time.Sleep(time.Millisecond) // > InlineHandlerDuration (50µs): handed off the reader
		return bytes.Clone(args), nil
	}
	// exercise makes one slow call, starts the drain and checks what the client sees.
	exercise := func(t *testing.T, p *testkit.RawPeer, startDrain func()) {
		t.Helper()
		p.SetDeadline(time.Now().Add(time.Minute))
		handshake(t, p)
		writeFrames(t, p, simpleCall(1, keyEcho, []byte("slow")))
		if got := expectReply(t, p, 1); string(got) != "slow" {
			t.Fatalf("slow call: got %q, want %q", got, "slow")
		}
		synctest.Wait() // the handed-off reader has finished its handler
		startDrain()
		g, err := p.ReadUntilClose()
		if err != nil || g == nil || g.Code != testkit.CloseDrain || g.LastID != 1 {
			t.Fatalf("after the drain started: got GOAWAY %+v, read error %v; want a GOAWAY with the drain code and last id 1, then the end of the connection", g, err)
		}
	}
	t.Run("ServeOn", func(t *testing.T) {
		inBubble(t, func(t *testing.T) {
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", slow)
			ps := startPipeServer(&hm, call.ServerOptions{DrainTimeout: drain})
			defer ps.stop()
			exercise(t, ps.peer, ps.cancel)
			select {
			case <-ps.done:
			case <-time.After(2 * drain):
				t.Errorf("ServeOn did not return within 2×DrainTimeout of its context being cancelled")
			}
		})
	})
	t.Run("Serve", func(t *testing.T) {
		inBubble(t, func(t *testing.T) {
			var hm call.HandlerMap
			hm.Set("badinput", "Echo", slow)
			l := testkit.NewPipeListener("drain")
			ctx, stop := context.WithCancel(context.Background())
			defer stop()
			served := make(chan error, 1)
			go func() {
				served <- call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{DrainTimeout: drain, Logger: quietLogger()})
			}()
			c, err := l.Dial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			p := testkit.NewRawPeer(c)
			defer func() {
				p.Close()
				<-served
			}()
			exercise(t, p, stop)
			select {
			case <-served:
				served <- nil // for the deferred receive
			case <-time.After(2 * drain):
				t.Errorf("Serve did not return within 2×DrainTimeout of its context being cancelled")
			}
		})
	})
}

// TestServerInlineHandOffTimerDoesNotOutliveServeOn: the inline hand-off timer of a reader must
// not act on a connection that is done. When a handler's run (including writing its reply) takes
// about InlineHandlerDuration, the timer fires while the reader takes the handler back; the late
// callback runs readerState.handOff, whose s.wg.Add(1) races with serveConn's s.wg.Wait(): the
// process dies with "sync: WaitGroup is reused before previous Wait has returned" (or "Add called
// concurrently with Wait"), and the race detector reports it. This is a stress test over real
// time, since synctest's scheduling does not produce the interleaving: it fails reliably under
// -race (the race detector) and now and then without it (the panic). The stress runs in a child
// process (this test binary, re-executed) so that the panic is reported as this test's failure
// instead of ending the whole run.
func TestServerInlineHandOffTimerDoesNotOutliveServeOn(t *testing.T) {
	if os.Getenv(childEnv) == "handoff" {
		handOffStress(t)
		return
	}
	runInChild(t, "TestServerInlineHandOffTimerDoesNotOutliveServeOn", childEnv+"=handoff")
}

// childEnv, set in a child process started by runInChild, selects what the child runs.
const childEnv = "WEFT_TEST_BADINPUT_CHILD"

func handOffStress(t *testing.T) {
	const conns = 1000
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	rng := rand.New(rand.NewPCG(1, 2))
	for it := range conns {
		cc, sc := net.Pipe()
		s := serveOn(t, cc, sc, &hm, call.ServerOptions{})
		p := s.peer
		// Four calls written in small pieces while their replies are read: each reply write
		// blocks on the pipe until it is read, so inline runs last about as long as the budget.
		stream := testkit.ClientHello().Encode()
		for id := uint64(1); id <= 4; id++ {
			stream = testkit.AppendFrame(stream, simpleCall(id, keyEcho, bytes.Repeat([]byte{byte(id)}, 50)))
		}
		var pieces []int
		for left := len(stream); left > 0; {
			n := min(left, 1+rng.IntN(32))
			pieces = append(pieces, n)
			left -= n
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := stream
			for _, n := range pieces {
				if _, err := cc.Write(b[:n]); err != nil {
					return
				}
				b = b[n:]
			}
		}()
		if _, err := p.ReadHello(); err != nil {
			cc.Close()
			wg.Wait()
			t.Fatalf("connection %d: reading the hello: %v", it, err)
		}
		answered := map[uint64]bool{}
		for len(answered) < 4 {
			f, err := p.ReadFrame()
			if err != nil {
				cc.Close()
				wg.Wait()
				t.Fatalf("connection %d: after answers %v: %v", it, answered, err)
			}
			if testkit.IsTerminal(f) {
				answered[f.ID] = true
			}
		}
		wg.Wait()
		p.Close()
		s.waitDone(t)
	}
}

// TestServerPoolsSafeAcrossSynctestBubbles: DESIGN.md and RELIABILITY.md have weft tested inside
// testing/synctest bubbles (testkit's in-memory listener exists for that). A server that ran
// calls inside a bubble must not leave bubble-owned state behind for servers outside it: package
// call pools outMsg values, each holding a channel made where it was first allocated, in a
// process-wide sync.Pool, so a later server outside the bubble that reuses one dies with "fatal
// error: receive on synctest channel from outside bubble". The child runs with one P so that the
// pooled values are found deterministically.
func TestServerPoolsSafeAcrossSynctestBubbles(t *testing.T) {
	if os.Getenv(childEnv) == "pools" {
		poolsAcrossBubbles(t)
		return
	}
	runInChild(t, "TestServerPoolsSafeAcrossSynctestBubbles", childEnv+"=pools", "GOMAXPROCS=1")
}

func poolsAcrossBubbles(t *testing.T) {
	const calls = 64
	// Two GC cycles empty a sync.Pool: keep the collector off between the two phases.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	var hm call.HandlerMap
	hm.Set("badinput", "Echo", echoHandler)
	hm.Set("badinput", "Inspect", func(_ context.Context, args []byte) ([]byte, error) {
		time.Sleep(time.Millisecond) // the calls overlap
		return bytes.Clone(args), nil
	})
	// Handlers on their own goroutines: no inline hand-off timers, whose own race
	// (TestServerInlineHandOffTimerDoesNotOutliveServeOn) would blur this test.
	opts := call.ServerOptions{InlineHandlerDuration: -1}
	// Inside a bubble: 64 overlapping calls, so that many reply messages are pooled.
	synctest.Test(t, func(t *testing.T) {
		ps := startPipeServer(&hm, opts)
		defer ps.stop()
		p := ps.peer
		p.SetDeadline(time.Now().Add(time.Minute))
		handshake(t, p)
		fs := make([]testkit.Frame, calls)
		for i := range fs {
			fs[i] = simpleCall(uint64(i+1), keyInspect, []byte("in"))
		}
		wrote := make(chan error, 1)
		go func() { wrote <- p.WriteFrames(fs...) }()
		for answered := 0; answered < calls; {
			f, err := p.ReadFrame()
			if err != nil {
				t.Fatalf("inside the bubble, after %d answers: %v", answered, err)
			}
			if testkit.IsTerminal(f) {
				answered++
			}
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
	})
	// Outside: a new server reuses what the first one pooled.
	cc, sc := net.Pipe()
	s := serveOn(t, cc, sc, &hm, opts)
	handshake(t, s.peer)
	for id := uint64(1); id <= calls; id++ {
		expectEcho(t, s.peer, id)
	}
}
