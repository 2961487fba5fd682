package call_test

// Black-box behaviour tests of the client (call.Conn) against the real server and against fake
// servers built from testkit.RawPeer. Identifiers of this file start with "cb" to keep them apart
// from the other test files of the package.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"go.opentelemetry.io/otel/trace"
)

const (
	cbComponent = "behaviour"
	// cbHelloSize is the size of a hello with the minimum rest length, as both sides send it.
	cbHelloSize = testkit.HelloPrefixSize + testkit.HelloRestSize
	// cbCallHeaderWithDeadline is the size of a call header with only the deadline section.
	cbCallHeaderWithDeadline = testkit.CallHeaderSize + 8
)

var cbQuiet = slog.New(slog.DiscardHandler)

func cbKey(method string) call.MethodKey { return call.MakeMethodKey(cbComponent, method) }

// cbCtx returns a context that ends after d (on the bubble's clock inside a synctest bubble).
func cbCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// cbTransports returns the transports of the matrix with the given names, or all of them.
func cbTransports(names ...string) []testkit.Transport {
	all := testkit.Transports()
	if len(names) == 0 {
		return all
	}
	var out []testkit.Transport
	for _, tr := range all {
		if slices.Contains(names, tr.Name) {
			out = append(out, tr)
		}
	}
	return out
}

// cbServe runs call.Serve on l until the test ends; cleanup stops it hard and joins it.
func cbServe(t testing.TB, l net.Listener, hm *call.HandlerMap, opts call.ServerOptions) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = -1
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- call.Serve(ctx, call.NetListener(l, hm), opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("Serve did not return within 15s of a hard stop")
		}
	})
}

// cbDial dials ep; cleanup closes the connection.
func cbDial(t testing.TB, ep endpoint.Endpoint, opts call.ClientOptions) *call.Conn {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := call.Dial(ctx, ep, opts)
	if err != nil {
		t.Fatalf("Dial(%s): %v", ep.Address(), err)
	}
	t.Cleanup(c.Close)
	return c
}

// cbPipe connects a client to call.ServeOn over net.Pipe, recording what the client writes. It
// works inside a synctest bubble. Cleanup closes both ends and joins ServeOn.
func cbPipe(t testing.TB, hm *call.HandlerMap, sopts call.ServerOptions, copts call.ClientOptions) (*call.Conn, *testkit.Recorder) {
	t.Helper()
	cconn, sconn := net.Pipe()
	rec := testkit.NewRecorder(cconn)
	return cbServeOnPipe(t, rec, sconn, hm, sopts, copts), rec
}

func cbServeOnPipe(t testing.TB, cconn, sconn net.Conn, hm *call.HandlerMap, sopts call.ServerOptions, copts call.ClientOptions) *call.Conn {
	t.Helper()
	if sopts.Logger == nil {
		sopts.Logger = cbQuiet
	}
	if copts.Logger == nil {
		copts.Logger = cbQuiet
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	served := make(chan struct{})
	go func() {
		defer close(served)
		call.ServeOn(ctx, sconn, hm, sopts)
	}()
	join := func() {
		sconn.Close()
		select {
		case <-served:
		case <-time.After(15 * time.Second):
			t.Errorf("ServeOn did not return within 15s of its connection closing")
		}
		cancel()
	}
	c, err := call.NewConn(ctx, cconn, copts)
	if err != nil {
		join()
		t.Fatalf("NewConn: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		join()
	})
	return c
}

// cbBubble runs f in a synctest bubble. Package call pools objects holding channels (sync.Pool):
// a pooled channel made outside the bubble does not block durably inside it (synctest.Wait and
// the fake clock then stall), and one made inside must not be used outside it. Two garbage
// collections empty every sync.Pool, so the bubble starts and ends with empty pools.
func cbBubble(t *testing.T, f func(t *testing.T)) {
	t.Helper()
	runtime.GC()
	runtime.GC()
	defer func() {
		runtime.GC()
		runtime.GC()
	}()
	synctest.Test(t, f)
}

// cbResult is the outcome of a call run on its own goroutine.
type cbResult struct {
	out []byte
	err error
	at  time.Time
}

// cbGo runs a call on a new goroutine. The goroutine ends when the call returns; receive from
// the channel to join it.
func cbGo(ctx context.Context, c call.Connection, key call.MethodKey, args []byte, opts call.CallOptions) <-chan cbResult {
	ch := make(chan cbResult, 1)
	go func() {
		out, err := c.Call(ctx, key, args, opts)
		ch <- cbResult{out: out, err: err, at: time.Now()}
	}()
	return ch
}

// cbAwait receives a call's result or fails the test after d.
func cbAwait(t testing.TB, what string, ch <-chan cbResult, d time.Duration) cbResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(d):
		t.Fatalf("%s: still running after %v", what, d)
		return cbResult{}
	}
}

// cbWait receives from ch or fails the test after d.
func cbWait[T any](t testing.TB, what string, ch <-chan T, d time.Duration) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
		var zero T
		return zero
	}
}

// cbCategories are the error categories of a call; every call error matches exactly one.
var cbCategories = []error{
	call.ErrUnreachable, call.ErrRefused, call.ErrCommunication, call.ErrUnknownMethod,
	call.ErrSignatureMismatch, call.ErrMessageTooLarge, call.ErrRemote,
	context.DeadlineExceeded, context.Canceled,
}

// cbWantErr checks that err matches want, exactly one category, and NeverRan as given.
func cbWantErr(t testing.TB, what string, err, want error, neverRan bool) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: got no error, want one matching %q", what, want)
		return
	}
	if !errors.Is(err, want) {
		t.Errorf("%s: got error %q, want one matching %q", what, err, want)
	}
	if got := call.NeverRan(err); got != neverRan {
		t.Errorf("%s: NeverRan(%q) = %v, want %v", what, err, got, neverRan)
	}
	var matched []string
	for _, c := range cbCategories {
		if errors.Is(err, c) {
			matched = append(matched, c.Error())
		}
	}
	if len(matched) != 1 {
		t.Errorf("%s: error %q matches categories %q, want exactly one", what, err, matched)
	}
}

// cbGauge counts running handlers and remembers the maximum.
type cbGauge struct {
	mu           sync.Mutex
	running, max int
	entries      int
}

func (g *cbGauge) enter() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.running++
	g.entries++
	g.max = max(g.max, g.running)
}

func (g *cbGauge) exit() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.running--
}

func (g *cbGauge) stats() (maxRunning, entries int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.max, g.entries
}

func cbEcho(_ context.Context, args []byte) ([]byte, error) { return bytes.Clone(args), nil }

// cbLen replies with the length of its arguments as a big-endian uint32.
func cbLen(_ context.Context, args []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint32(nil, uint32(len(args))), nil
}

func cbU32(b []byte) int {
	if len(b) != 4 {
		return -1
	}
	return int(binary.BigEndian.Uint32(b))
}

// cbServerHello is the hello of a fake server: default limits, 16 concurrent calls, no idle
// timeout.
func cbServerHello() testkit.Hello {
	h := testkit.ClientHello()
	h.MaxConcurrent = 16
	return h
}

// cbFakeServer connects a client over net.Pipe to a RawPeer acting as the server, after the
// handshake. Cleanup closes both.
func cbFakeServer(t testing.TB, h testkit.Hello, copts call.ClientOptions) (*call.Conn, *testkit.RawPeer) {
	t.Helper()
	cconn, sconn := net.Pipe()
	p := testkit.NewRawPeer(sconn)
	p.SetDeadline(time.Now().Add(30 * time.Second))
	hs := make(chan error, 1)
	go func() {
		_, err := p.AcceptHandshake(h)
		hs <- err
	}()
	if copts.Logger == nil {
		copts.Logger = cbQuiet
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := call.NewConn(ctx, cconn, copts)
	herr := <-hs
	if err != nil || herr != nil {
		p.Close()
		t.Fatalf("handshake with the fake server: client %v, fake server %v", err, herr)
	}
	t.Cleanup(func() {
		c.Close()
		p.Close()
	})
	return c, p
}

// cbFrames returns the frames recorded after the hello; partial reports whether the bytes end
// inside a frame.
func cbFrames(t testing.TB, b []byte) (frames []testkit.Frame, partial bool) {
	t.Helper()
	_, rest, err := testkit.SplitHello(b)
	if err != nil {
		t.Fatalf("recorded bytes do not start with a hello: %v", err)
	}
	fs, err := testkit.SplitFrames(rest)
	return fs, err != nil
}

// --- Multiplexing --------------------------------------------------------------------------------

// RELIABILITY 22: 10k concurrent calls over one connection; every reply matches its caller.
func TestCBMultiplexTenThousandCalls(t *testing.T) {
	for _, tr := range cbTransports("pipe", "tcp") {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 60*time.Second)
			var hm call.HandlerMap
			// Every tenth handler outlasts InlineHandlerDuration (busy, not sleeping), so its
			// reader hands off and later calls overtake it: replies come back out of order.
			hm.Set(cbComponent, "Tag", func(_ context.Context, args []byte) ([]byte, error) {
				if args[0] == 's' {
					for start := time.Now(); time.Since(start) < 200*time.Microsecond; {
					}
				}
				out := make([]byte, 0, 4+len(args))
				return append(append(out, "ack:"...), args...), nil
			})
			// The race detector allows about 8k goroutines: run the calls in batches that are
			// each fully concurrent, and on the wire at once.
			const total, batch = 10000, 2500
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: batch}})
			c := cbDial(t, ep, call.ClientOptions{})

			var bad atomic.Int64
			for first := 0; first < total; first += batch {
				var wg sync.WaitGroup
				for i := first; i < first+batch; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						kind := "caller"
						if i%10 == 0 {
							kind = "slow caller"
						}
						args := fmt.Appendf(nil, "%s %d:", kind, i)
						args = append(args, bytes.Repeat([]byte{byte(i)}, i%200)...)
						out, err := c.Call(ctx, cbKey("Tag"), args, call.CallOptions{})
						want := append([]byte("ack:"), args...)
						if err != nil || !bytes.Equal(out, want) {
							if bad.Add(1) <= 5 {
								t.Errorf("caller %d: got %q, %v; want %q", i, out[:min(len(out), 40)], err, want[:min(len(want), 40)])
							}
						}
					}()
				}
				wg.Wait()
			}
			if n := bad.Load(); n > 0 {
				t.Errorf("%d of %d calls got a wrong reply or an error", n, total)
			}
		})
	}
}

// --- Interleaving --------------------------------------------------------------------------------

// cbGateConn passes reads through until after bytes were read, then closes paused and blocks
// reads until resume is closed.
type cbGateConn struct {
	net.Conn
	after  int64
	n      atomic.Int64
	once   sync.Once
	paused chan struct{}
	resume chan struct{}
}

func (g *cbGateConn) Read(b []byte) (int, error) {
	if g.n.Load() >= g.after {
		g.once.Do(func() { close(g.paused) })
		<-g.resume
	}
	n, err := g.Conn.Read(b)
	g.n.Add(int64(n))
	return n, err
}

// A 16-byte call issued while a 4 MiB call is being written goes out within a few frames, not
// after the large call's last chunk.
func TestCBSmallCallInterleavesWithLargeCall(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		var hm call.HandlerMap
		hm.Set(cbComponent, "Len", cbLen)
		cconn, sconn := net.Pipe()
		rec := testkit.NewRecorder(cconn)
		gate := &cbGateConn{Conn: sconn, after: cbHelloSize + 256<<10, paused: make(chan struct{}), resume: make(chan struct{})}
		c := cbServeOnPipe(t, rec, gate, &hm, call.ServerOptions{}, call.ClientOptions{})
		ctx := cbCtx(t, time.Minute)

		big := bytes.Repeat([]byte{0xB1}, 4<<20)
		bigRes := cbGo(ctx, c, cbKey("Len"), big, call.CallOptions{})
		cbWait(t, "the server to read the first 256 KiB of the large call", gate.paused, time.Minute)
		synctest.Wait() // the large call's writer is blocked in a pipe write
		issuedAfter, _ := cbFrames(t, rec.Bytes())
		small := bytes.Repeat([]byte{0x5A}, 16)
		smallRes := cbGo(ctx, c, cbKey("Len"), small, call.CallOptions{})
		synctest.Wait() // the small call is queued
		close(gate.resume)

		if r := cbAwait(t, "large call", bigRes, time.Minute); r.err != nil || cbU32(r.out) != len(big) {
			t.Errorf("large call: got %x, %v; want length %d", r.out, r.err, len(big))
		}
		if r := cbAwait(t, "small call", smallRes, time.Minute); r.err != nil || cbU32(r.out) != len(small) {
			t.Errorf("small call: got %x, %v; want length %d", r.out, r.err, len(small))
		}

		frames, partial := cbFrames(t, rec.Bytes())
		if partial {
			t.Fatalf("recorded client stream ends inside a frame")
		}
		var calls []testkit.Frame
		for _, f := range frames {
			if f.Type == testkit.TypeCall {
				calls = append(calls, f)
			}
		}
		if len(calls) != 2 {
			t.Fatalf("got %d CALL frames, want 2", len(calls))
		}
		bigID, smallID := calls[0].ID, calls[1].ID
		smallAt, bigEnd := -1, -1
		bigBefore, bigAfter := 0, 0
		for i, f := range frames {
			switch {
			case f.ID == smallID && f.Type == testkit.TypeCall:
				smallAt = i
				if !f.End() {
					t.Errorf("small call's CALL frame %v has no END flag; want the whole request in it", f)
				}
			case f.ID == bigID && smallAt < 0:
				bigBefore++
			case f.ID == bigID:
				bigAfter++
			}
			if f.ID == bigID && f.End() {
				bigEnd = i
			}
		}
		t.Logf("%d frames; %d complete when the small call was issued; small CALL at %d; large END at %d", len(frames), len(issuedAfter), smallAt, bigEnd)
		if d := smallAt - len(issuedAfter); d > 4 {
			t.Errorf("small call's CALL frame went out %d frames after the call was issued, want at most 4", d)
		}
		if smallAt > bigEnd {
			t.Errorf("small call's CALL frame (frame %d) came after the large call's final frame (frame %d)", smallAt, bigEnd)
		}
		if bigBefore == 0 || bigAfter == 0 {
			t.Errorf("large call had %d frames before and %d after the small call; want frames of both ids interleaved", bigBefore, bigAfter)
		}
	})
}

// --- Cancellation --------------------------------------------------------------------------------

// Cancelling a call cancels the handler's context, and the server's slot is freed only when the
// handler returns.
func TestCBCancelFreesSlotAfterHandlerReturns(t *testing.T) {
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			var gauge cbGauge
			entered := make(chan struct{}, 1)
			sawErr := make(chan error, 1)
			release := make(chan struct{})
			var hm call.HandlerMap
			hm.Set(cbComponent, "Block", func(hctx context.Context, _ []byte) ([]byte, error) {
				gauge.enter()
				defer gauge.exit()
				entered <- struct{}{}
				select {
				case <-hctx.Done():
					sawErr <- hctx.Err()
				case <-ctx.Done():
					sawErr <- errors.New("handler context never cancelled")
				}
				select {
				case <-release:
				case <-ctx.Done():
				}
				return nil, hctx.Err()
			})
			hm.Set(cbComponent, "Quick", func(context.Context, []byte) ([]byte, error) {
				gauge.enter()
				defer gauge.exit()
				return []byte("quick"), nil
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: 1}})
			c := cbDial(t, ep, call.ClientOptions{})

			ctxA, cancelA := context.WithCancel(ctx)
			defer cancelA()
			resA := cbGo(ctxA, c, cbKey("Block"), []byte("a"), call.CallOptions{})
			cbWait(t, "call A's handler to start", entered, 10*time.Second)
			cancelA()
			rA := cbAwait(t, "call A", resA, 10*time.Second)
			cbWantErr(t, "call A", rA.err, context.Canceled, false)
			if got := cbWait(t, "call A's handler to see its context end", sawErr, 10*time.Second); !errors.Is(got, context.Canceled) {
				t.Errorf("call A's handler saw ctx.Err() = %v, want context.Canceled", got)
			}
			if got := c.InFlight(); got != 1 {
				t.Errorf("InFlight() = %d while A's handler still runs, want 1 (the slot is freed by the terminal frame)", got)
			}

			resB := cbGo(ctx, c, cbKey("Quick"), []byte("b"), call.CallOptions{})
			// B must wait for A's handler: give a wrong implementation a moment to run it early.
			select {
			case r := <-resB:
				t.Errorf("call B ended (%q, %v) while call A's handler was still running with the only slot", r.out, r.err)
				resB = nil
			case <-time.After(50 * time.Millisecond):
			}
			close(release)
			if resB != nil {
				if rB := cbAwait(t, "call B", resB, 10*time.Second); rB.err != nil || string(rB.out) != "quick" {
					t.Errorf("call B: got %q, %v; want \"quick\", nil", rB.out, rB.err)
				}
			}
			if maxRunning, _ := gauge.stats(); maxRunning > 1 {
				t.Errorf("up to %d handlers ran at once, want at most MaxConcurrentCalls = 1", maxRunning)
			}
		})
	}
}

// --- Client-side queueing above the server's limit ----------------------------------------------

func TestCBClientQueuesAboveServerLimit(t *testing.T) {
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			const limit, callers = 2, 10
			var gauge cbGauge
			entered := make(chan struct{}, callers+1)
			release := make(chan struct{})
			var hm call.HandlerMap
			hm.Set(cbComponent, "Hold", func(hctx context.Context, args []byte) ([]byte, error) {
				gauge.enter()
				defer gauge.exit()
				entered <- struct{}{}
				select {
				case <-release:
				case <-hctx.Done():
					return nil, hctx.Err()
				}
				return bytes.Clone(args), nil
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: limit}})
			c := cbDial(t, ep, call.ClientOptions{})

			res := make([]<-chan cbResult, callers)
			for i := range res {
				res[i] = cbGo(ctx, c, cbKey("Hold"), fmt.Appendf(nil, "caller %d", i), call.CallOptions{})
			}
			for range limit {
				cbWait(t, "a handler to start", entered, 10*time.Second)
			}
			if got := c.InFlight(); got != limit {
				t.Errorf("InFlight() = %d with %d handlers blocked, want %d", got, limit, limit)
			}

			// A call queued behind the others whose context expires never ran.
			qctx, qcancel := context.WithTimeout(ctx, 100*time.Millisecond)
			_, err := c.Call(qctx, cbKey("Hold"), []byte("queued"), call.CallOptions{})
			qcancel()
			cbWantErr(t, "queued call whose deadline passed", err, context.DeadlineExceeded, true)

			close(release)
			for i, ch := range res {
				r := cbAwait(t, fmt.Sprintf("caller %d", i), ch, 10*time.Second)
				if want := fmt.Sprintf("caller %d", i); r.err != nil || string(r.out) != want {
					t.Errorf("caller %d: got %q, %v; want %q, nil", i, r.out, r.err, want)
				}
			}
			maxRunning, entries := gauge.stats()
			if maxRunning > limit {
				t.Errorf("up to %d handlers ran at once, want at most %d", maxRunning, limit)
			}
			if entries != callers {
				t.Errorf("handlers ran %d times, want %d (the expired queued call must not run)", entries, callers)
			}
		})
	}
}

// --- Load ----------------------------------------------------------------------------------------

// The REPLY header carries the load the handler set, else the number of calls running.
func TestCBReplyCarriesLoad(t *testing.T) {
	entered := make(chan struct{}, 2)
	release := make(chan struct{})
	var hm call.HandlerMap
	hm.Set(cbComponent, "SetLoad", func(ctx context.Context, _ []byte) ([]byte, error) {
		call.SetLoad(ctx, 0.75)
		return []byte("ok"), nil
	})
	hm.Set(cbComponent, "Plain", func(context.Context, []byte) ([]byte, error) { return []byte("ok"), nil })
	hm.Set(cbComponent, "Hold", func(ctx context.Context, _ []byte) ([]byte, error) {
		entered <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return []byte("held"), nil
	})
	cconn, sconn := net.Pipe()
	served := make(chan struct{})
	sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go func() {
		defer close(served)
		call.ServeOn(sctx, sconn, &hm, call.ServerOptions{Logger: cbQuiet})
	}()
	defer func() {
		cconn.Close()
		cbWait(t, "ServeOn to return", served, 10*time.Second)
	}()
	p := testkit.NewRawPeer(cconn)
	p.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := p.Handshake(testkit.ClientHello()); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	load := func(id uint64, f testkit.Frame) float32 {
		t.Helper()
		if f.Type != testkit.TypeReply || f.ID != id {
			t.Fatalf("got frame %v, want a REPLY for %d", f, id)
		}
		h, _, err := testkit.ParseReplyHeader(f.Payload)
		if err != nil {
			t.Fatalf("reply %d: %v", id, err)
		}
		return h.Load
	}

	if err := p.Call(1, cbKey("SetLoad"), nil); err != nil {
		t.Fatal(err)
	}
	f, err := p.ReadTerminal(1)
	if err != nil {
		t.Fatal(err)
	}
	if got := load(1, f); got != 0.75 {
		t.Errorf("load of a handler that called SetLoad(0.75): got %v, want 0.75", got)
	}

	// Two handlers held, then a third call: the load counts all three.
	for id := uint64(2); id <= 3; id++ {
		if err := p.Call(id, cbKey("Hold"), nil); err != nil {
			t.Fatal(err)
		}
		cbWait(t, "a held handler to start", entered, 10*time.Second)
	}
	if err := p.Call(4, cbKey("Plain"), nil); err != nil {
		t.Fatal(err)
	}
	if f, err = p.ReadTerminal(4); err != nil {
		t.Fatal(err)
	}
	if got := load(4, f); got != 3 {
		t.Errorf("load without SetLoad while 3 calls run: got %v, want 3", got)
	}
	close(release)
	for range 2 {
		f, err := p.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if got := load(f.ID, f); got < 1 {
			t.Errorf("load of held call %d: got %v, want at least 1", f.ID, got)
		}
	}
}

// --- Metadata ------------------------------------------------------------------------------------

func TestCBMetadata(t *testing.T) {
	const mdBytes, mdEntries = 64, 4
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set(cbComponent, "Meta", func(hctx context.Context, _ []byte) ([]byte, error) {
				runs.Add(1)
				md := call.IncomingMetadata(hctx)
				var kv []string
				for k, v := range md {
					kv = append(kv, k+"="+v)
				}
				sort.Strings(kv)
				return []byte(strings.Join(kv, "&")), nil
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: call.Limits{MaxMetadataBytes: mdBytes, MaxMetadataEntries: mdEntries}})
			c := cbDial(t, ep, call.ClientOptions{})

			cases := []struct {
				name    string
				md      call.Metadata
				want    string
				tooBig  bool
				wantRun bool
			}{
				{name: "none", want: ""},
				{name: "two entries", md: call.Metadata{"user": "alice", "tenant": "blue"}, want: "tenant=blue&user=alice"},
				{name: "empty value", md: call.Metadata{"flag": ""}, want: "flag="},
				{name: "exactly at both limits", md: call.Metadata{"a": strings.Repeat("1", 15), "b": strings.Repeat("2", 15), "c": strings.Repeat("3", 15), "d": strings.Repeat("4", 15)},
					want: "a=" + strings.Repeat("1", 15) + "&b=" + strings.Repeat("2", 15) + "&c=" + strings.Repeat("3", 15) + "&d=" + strings.Repeat("4", 15)},
				{name: "one byte over", md: call.Metadata{"k": strings.Repeat("v", mdBytes)}, tooBig: true},
				{name: "one entry over", md: call.Metadata{"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}, tooBig: true},
			}
			for _, tc := range cases {
				before := runs.Load()
				cctx := ctx
				if tc.md != nil {
					cctx = call.WithMetadata(ctx, tc.md)
				}
				out, err := c.Call(cctx, cbKey("Meta"), nil, call.CallOptions{})
				ran := runs.Load() - before
				if tc.tooBig {
					cbWantErr(t, tc.name, err, call.ErrMessageTooLarge, true)
					if ran != 0 {
						t.Errorf("%s: the handler ran %d times, want 0", tc.name, ran)
					}
					continue
				}
				if err != nil || string(out) != tc.want {
					t.Errorf("%s: handler saw metadata %q (err %v), want %q", tc.name, out, err, tc.want)
				}
			}
			// The connection is still usable.
			if out, err := c.Call(call.WithMetadata(ctx, call.Metadata{"after": "x"}), cbKey("Meta"), nil, call.CallOptions{}); err != nil || string(out) != "after=x" {
				t.Errorf("call after the over-limit ones: got %q, %v; want \"after=x\"", out, err)
			}
		})
	}
}

// --- Trace context -------------------------------------------------------------------------------

func TestCBTraceContextPropagates(t *testing.T) {
	ts, err := trace.ParseTraceState("vendor=value,other=x")
	if err != nil {
		t.Fatal(err)
	}
	traceID := trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36}
	spanID := trace.SpanID{0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7}
	cases := []struct {
		name string
		sc   trace.SpanContext
	}{
		{"sampled with tracestate", trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled, TraceState: ts})},
		{"not sampled without tracestate", trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID})},
		{"no span context", trace.SpanContext{}},
	}
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			seen := make(chan trace.SpanContext, 1)
			var hm call.HandlerMap
			hm.Set(cbComponent, "Trace", func(hctx context.Context, _ []byte) ([]byte, error) {
				seen <- trace.SpanContextFromContext(hctx)
				return nil, nil
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{})
			c := cbDial(t, ep, call.ClientOptions{})
			for _, tc := range cases {
				cctx := ctx
				if tc.sc.IsValid() {
					cctx = trace.ContextWithSpanContext(ctx, tc.sc)
				}
				if _, err := c.Call(cctx, cbKey("Trace"), nil, call.CallOptions{}); err != nil {
					t.Errorf("%s: %v", tc.name, err)
					continue
				}
				got := cbWait(t, "the handler's span context", seen, 5*time.Second)
				if got.IsValid() != tc.sc.IsValid() {
					t.Errorf("%s: handler's span context valid = %v, want %v", tc.name, got.IsValid(), tc.sc.IsValid())
					continue
				}
				if got.TraceID() != tc.sc.TraceID() || got.SpanID() != tc.sc.SpanID() || got.TraceFlags() != tc.sc.TraceFlags() {
					t.Errorf("%s: handler saw trace %s span %s flags %s, want trace %s span %s flags %s", tc.name,
						got.TraceID(), got.SpanID(), got.TraceFlags(), tc.sc.TraceID(), tc.sc.SpanID(), tc.sc.TraceFlags())
				}
				if g, w := got.TraceState().String(), tc.sc.TraceState().String(); g != w {
					t.Errorf("%s: handler saw tracestate %q, want %q", tc.name, g, w)
				}
			}
		})
	}
}

// --- Peer identity -------------------------------------------------------------------------------

func TestCBPeerIdentity(t *testing.T) {
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			seen := make(chan *call.Peer, 1)
			var hm call.HandlerMap
			hm.Set(cbComponent, "Who", func(hctx context.Context, _ []byte) ([]byte, error) {
				p, ok := call.PeerFromContext(hctx)
				if !ok {
					p = nil
				}
				seen <- p
				return nil, nil
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{})
			c := cbDial(t, ep, call.ClientOptions{})
			if _, err := c.Call(ctx, cbKey("Who"), nil, call.CallOptions{}); err != nil {
				t.Fatal(err)
			}
			p := cbWait(t, "the handler's peer", seen, 5*time.Second)
			if p == nil {
				t.Fatalf("PeerFromContext found no peer in the handler's context")
			}
			if p.Addr == nil || p.Addr.String() == "" {
				t.Errorf("Peer.Addr = %v, want the client's address", p.Addr)
			}
			if tr.Name != "mtls" {
				if p.TLS != nil {
					t.Errorf("Peer.TLS is set on a plaintext %s connection, want nil", tr.Name)
				}
				return
			}
			if p.TLS == nil || len(p.TLS.VerifiedChains) == 0 || len(p.TLS.VerifiedChains[0]) == 0 {
				t.Fatalf("Peer.TLS = %v, want the state of the mTLS connection with verified chains", p.TLS)
			}
			if cn := p.TLS.VerifiedChains[0][0].Subject.CommonName; cn != testkit.MTLSClientName {
				t.Errorf("verified leaf common name = %q, want %q", cn, testkit.MTLSClientName)
			}
		})
	}
}

// --- Deadlines and local refusals ---------------------------------------------------------------

// cbStaleCtx reports a deadline in the past while its Err is still nil, as a context whose timer
// has not fired yet does.
type cbStaleCtx struct {
	context.Context
	deadline time.Time
}

func (c cbStaleCtx) Deadline() (time.Time, bool) { return c.deadline, true }

// Calls that fail before sending (expired deadline, limits the server advertised) write nothing.
func TestCBLocalFailuresSendNothing(t *testing.T) {
	const maxMsg = 64 << 10
	var runs atomic.Int64
	var hm call.HandlerMap
	hm.Set(cbComponent, "Count", func(_ context.Context, args []byte) ([]byte, error) {
		runs.Add(1)
		return []byte("ran"), nil
	})
	c, rec := cbPipe(t, &hm, call.ServerOptions{Limits: call.Limits{MaxMessageSize: maxMsg, MaxMetadataBytes: 32, MaxMetadataEntries: 2}}, call.ClientOptions{})
	ctx := cbCtx(t, 20*time.Second)

	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	longTS, err := trace.ParseTraceState(strings.Join([]string{"a=" + strings.Repeat("1", 200), "b=" + strings.Repeat("2", 200), "c=" + strings.Repeat("3", 200)}, ","))
	if err != nil {
		t.Fatal(err)
	}
	withTS := trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{1}, SpanID: trace.SpanID{1}, TraceState: longTS,
	}))
	cases := []struct {
		name string
		ctx  context.Context
		args []byte
		want error
	}{
		{"already expired context", expired, []byte("x"), context.DeadlineExceeded},
		{"deadline passed, context not yet done", cbStaleCtx{ctx, time.Now().Add(-time.Millisecond)}, []byte("x"), context.DeadlineExceeded},
		{"request one byte over the server's max message", ctx, make([]byte, maxMsg+1), call.ErrMessageTooLarge},
		{"metadata bytes over the server's limit", call.WithMetadata(ctx, call.Metadata{"k": strings.Repeat("v", 32)}), []byte("x"), call.ErrMessageTooLarge},
		{"metadata entries over the server's limit", call.WithMetadata(ctx, call.Metadata{"a": "", "b": "", "c": ""}), []byte("x"), call.ErrMessageTooLarge},
		{"tracestate over the server's limit", withTS, []byte("x"), call.ErrMessageTooLarge},
	}
	for _, tc := range cases {
		_, err := c.Call(tc.ctx, cbKey("Count"), tc.args, call.CallOptions{})
		cbWantErr(t, tc.name, err, tc.want, true)
	}
	if frames, partial := cbFrames(t, rec.Bytes()); len(frames) > 0 || partial {
		t.Errorf("the client wrote %d frames (partial: %v) for calls that must fail before sending: %v", len(frames), partial, frames)
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("the handler ran %d times, want 0", n)
	}

	// Control: a good call is recorded as one CALL frame.
	if out, err := c.Call(ctx, cbKey("Count"), make([]byte, maxMsg), call.CallOptions{}); err != nil || string(out) != "ran" {
		t.Fatalf("call at exactly the max message size: got %q, %v; want \"ran\"", out, err)
	}
	frames, _ := cbFrames(t, rec.Bytes())
	ncall := 0
	for _, f := range frames {
		if f.Type == testkit.TypeCall {
			ncall++
		}
	}
	if ncall != 1 {
		t.Errorf("recorded %d CALL frames after one good call, want 1", ncall)
	}
}

// A deadline that passes while the handler runs ends the call at the deadline and cancels the
// handler's context.
func TestCBDeadlinePassesWhileHandlerRuns(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		type seen struct {
			err      error
			at       time.Time
			deadline time.Time
			ok       bool
		}
		saw := make(chan seen, 1)
		var hm call.HandlerMap
		hm.Set(cbComponent, "Wait", func(hctx context.Context, _ []byte) ([]byte, error) {
			d, ok := hctx.Deadline()
			select {
			case <-hctx.Done():
				saw <- seen{err: hctx.Err(), at: time.Now(), deadline: d, ok: ok}
			case <-time.After(time.Hour):
				saw <- seen{at: time.Now(), deadline: d, ok: ok}
			}
			// Answer a moment after the deadline, so the caller's own deadline decides its
			// outcome (TestCBHandlerContextErrorIsReportedAsSuch covers an answer at the deadline).
			time.Sleep(time.Millisecond)
			return []byte("late"), nil
		})
		c, _ := cbPipe(t, &hm, call.ServerOptions{}, call.ClientOptions{})
		const timeout = 2 * time.Second
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_, err := c.Call(ctx, cbKey("Wait"), nil, call.CallOptions{})
		took := time.Since(start)
		cbWantErr(t, "call past its deadline", err, context.DeadlineExceeded, false)
		if took < timeout || took > timeout+time.Millisecond {
			t.Errorf("call returned after %v, want at its deadline %v", took, timeout)
		}
		h := cbWait(t, "the handler to end", saw, time.Hour)
		if !h.ok || h.deadline.Sub(start) != timeout {
			t.Errorf("handler's deadline: %v (set %v), want %v after the call started", h.deadline.Sub(start), h.ok, timeout)
		}
		if h.err == nil {
			t.Errorf("handler's context was not cancelled (it waited %v)", h.at.Sub(start))
		} else if !errors.Is(h.err, context.DeadlineExceeded) && !errors.Is(h.err, context.Canceled) {
			t.Errorf("handler's ctx.Err() = %v, want DeadlineExceeded or Canceled", h.err)
		}
		if at := h.at.Sub(start); at > timeout+time.Millisecond {
			t.Errorf("handler's context ended %v after the call started, want at the deadline %v", at, timeout)
		}
	})
}

// --- Handler errors ------------------------------------------------------------------------------

func TestCBHandlerErrors(t *testing.T) {
	const sig, otherSig = 0x1111, 0x2222
	cases := []struct {
		name       string
		method     string
		sig        uint64
		want       error // nil: success
		neverRan   bool
		msg        string // the error's text contains it
		notMsg     string // the error's text does not contain it
		retryAfter time.Duration
		runs       int64
	}{
		{name: "handler returns an error", method: "Fail", want: call.ErrRemote, msg: "disk on fire 42", runs: 1},
		{name: "handler asks for a retry later", method: "Retry", want: call.ErrRemote, msg: "busy, come back", retryAfter: 2 * time.Second, runs: 1},
		{name: "handler panics", method: "Panic", want: call.ErrRemote, notMsg: "kaboom", runs: 1},
		{name: "unknown method", method: "Missing", want: call.ErrUnknownMethod, neverRan: true},
		{name: "signature mismatch", method: "Signed", sig: otherSig, want: call.ErrSignatureMismatch, neverRan: true},
		{name: "same signature", method: "Signed", sig: sig, runs: 1},
		{name: "caller sends no signature", method: "Signed", sig: 0, runs: 1},
		{name: "handler registered without signature", method: "Unsigned", sig: otherSig, runs: 1},
	}
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			runs := map[string]*atomic.Int64{}
			var hm call.HandlerMap
			handle := func(method string, sig uint64, h call.Handler) {
				n := new(atomic.Int64)
				runs[method] = n
				hm.SetSigned(cbComponent, method, sig, func(ctx context.Context, args []byte) ([]byte, error) {
					n.Add(1)
					return h(ctx, args)
				})
			}
			handle("Fail", 0, func(context.Context, []byte) ([]byte, error) { return nil, errors.New("disk on fire 42") })
			handle("Retry", 0, func(context.Context, []byte) ([]byte, error) {
				return nil, &call.HandlerError{Err: errors.New("busy, come back"), RetryAfter: 2 * time.Second}
			})
			handle("Panic", 0, func(context.Context, []byte) ([]byte, error) { panic("kaboom") })
			handle("Signed", sig, func(context.Context, []byte) ([]byte, error) { return []byte("signed ok"), nil })
			handle("Unsigned", 0, func(context.Context, []byte) ([]byte, error) { return []byte("unsigned ok"), nil })
			handle("Echo", 0, cbEcho)
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{})
			c := cbDial(t, ep, call.ClientOptions{})

			for _, tc := range cases {
				var before int64
				if n := runs[tc.method]; n != nil {
					before = n.Load()
				}
				out, err := c.Call(ctx, cbKey(tc.method), []byte("args"), call.CallOptions{Signature: tc.sig})
				var ran int64
				if n := runs[tc.method]; n != nil {
					ran = n.Load() - before
				}
				if ran != tc.runs {
					t.Errorf("%s: handler ran %d times, want %d", tc.name, ran, tc.runs)
				}
				if tc.want == nil {
					if err != nil || len(out) == 0 {
						t.Errorf("%s: got %q, %v; want success", tc.name, out, err)
					}
					continue
				}
				cbWantErr(t, tc.name, err, tc.want, tc.neverRan)
				if err == nil {
					continue
				}
				if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
					t.Errorf("%s: error %q does not contain the handler's message %q", tc.name, err, tc.msg)
				}
				if tc.notMsg != "" && strings.Contains(err.Error(), tc.notMsg) {
					t.Errorf("%s: error %q reveals %q, which must stay on the server", tc.name, err, tc.notMsg)
				}
				d, ok := call.RetryAfter(err)
				if tc.retryAfter > 0 && (!ok || d < tc.retryAfter) {
					t.Errorf("%s: RetryAfter = %v, %v; want at least %v, true", tc.name, d, ok, tc.retryAfter)
				}
				if tc.retryAfter == 0 && ok {
					t.Errorf("%s: RetryAfter = %v, true; want none", tc.name, d)
				}
			}

			// Panics affect only their own callers.
			var wg sync.WaitGroup
			var bad atomic.Int64
			for i := range 60 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if i%6 == 0 {
						_, err := c.Call(ctx, cbKey("Panic"), nil, call.CallOptions{})
						if !errors.Is(err, call.ErrRemote) {
							bad.Add(1)
							t.Errorf("panicking call %d: got %v, want ErrRemote", i, err)
						}
						return
					}
					args := fmt.Appendf(nil, "echo %d", i)
					if out, err := c.Call(ctx, cbKey("Echo"), args, call.CallOptions{}); err != nil || !bytes.Equal(out, args) {
						bad.Add(1)
						t.Errorf("echo %d next to panics: got %q, %v; want %q", i, out, err, args)
					}
				}()
			}
			wg.Wait()
			if out, err := c.Call(ctx, cbKey("Echo"), []byte("after"), call.CallOptions{}); err != nil || string(out) != "after" {
				t.Errorf("echo after the panics: got %q, %v", out, err)
			}
		})
	}
}

// --- Max message size in both directions (RELIABILITY 23) ----------------------------------------

func TestCBMessageSizeLimitBothDirections(t *testing.T) {
	const maxMsg = 256 << 10
	reply := make([]byte, maxMsg+1)
	for i := range reply {
		reply[i] = byte(i * 7)
	}
	cases := []struct {
		name     string
		method   string
		size     int
		want     error
		neverRan bool
		runs     int64
	}{
		{name: "request of exactly max", method: "Len", size: maxMsg, runs: 1},
		{name: "request of max+1", method: "Len", size: maxMsg + 1, want: call.ErrMessageTooLarge, neverRan: true},
		{name: "reply of exactly max", method: "Make", size: maxMsg, runs: 1},
		{name: "reply of max+1", method: "Make", size: maxMsg + 1, want: call.ErrMessageTooLarge, runs: 1},
	}
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			var runs atomic.Int64
			var hm call.HandlerMap
			hm.Set(cbComponent, "Len", func(ctx context.Context, args []byte) ([]byte, error) {
				runs.Add(1)
				return cbLen(ctx, args)
			})
			hm.Set(cbComponent, "Make", func(_ context.Context, args []byte) ([]byte, error) {
				runs.Add(1)
				return reply[:cbU32(args)], nil
			})
			hm.Set(cbComponent, "Echo", cbEcho)
			lim := call.Limits{MaxMessageSize: maxMsg}
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: lim})
			c := cbDial(t, ep, call.ClientOptions{Limits: lim})
			for _, tc := range cases {
				args := binary.BigEndian.AppendUint32(nil, uint32(tc.size))
				if tc.method == "Len" {
					args = bytes.Repeat([]byte{0xA5}, tc.size)
				}
				before := runs.Load()
				out, err := c.Call(ctx, cbKey(tc.method), args, call.CallOptions{})
				if ran := runs.Load() - before; ran != tc.runs {
					t.Errorf("%s: handler ran %d times, want %d", tc.name, ran, tc.runs)
				}
				switch {
				case tc.want != nil:
					cbWantErr(t, tc.name, err, tc.want, tc.neverRan)
				case err != nil:
					t.Errorf("%s: %v", tc.name, err)
				case tc.method == "Len" && cbU32(out) != tc.size:
					t.Errorf("%s: server got %d bytes, want %d", tc.name, cbU32(out), tc.size)
				case tc.method == "Make" && !bytes.Equal(out, reply[:tc.size]):
					t.Errorf("%s: got a reply of %d bytes, want the %d bytes the handler returned", tc.name, len(out), tc.size)
				}
				// The connection stays usable.
				if out, err := c.Call(ctx, cbKey("Echo"), []byte("still there"), call.CallOptions{}); err != nil || string(out) != "still there" {
					t.Errorf("after %s: echo got %q, %v", tc.name, out, err)
				}
			}
		})
	}
}

// A (fake) server that sends a reply over the client's limit anyway: the call fails with
// ErrMessageTooLarge, the chunks are skipped, the connection stays usable.
func TestCBClientSkipsOversizedReply(t *testing.T) {
	const maxMsg = 256 << 10
	c, p := cbFakeServer(t, cbServerHello(), call.ClientOptions{Limits: call.Limits{MaxMessageSize: maxMsg}})
	ctx := cbCtx(t, 20*time.Second)

	sendReply := func(id uint64, total int) error {
		rest := total
		first := min(rest, 60000)
		payload := append(testkit.ReplyHeader{Total: uint32(total)}.Encode(), make([]byte, first)...)
		rest -= first
		fs := []testkit.Frame{{Type: testkit.TypeReply, ID: id, Payload: payload}}
		for rest > 0 {
			n := min(rest, 60000)
			rest -= n
			fs = append(fs, testkit.Frame{Type: testkit.TypeData, ID: id, Payload: make([]byte, n)})
		}
		fs[len(fs)-1].Flags = testkit.FlagEnd
		return p.WriteFrames(fs...)
	}
	for _, tc := range []struct {
		name string
		size int
		want error
	}{
		{"reply of max+1", maxMsg + 1, call.ErrMessageTooLarge},
		{"reply of exactly max", maxMsg, nil},
		{"reply of max+1 again", maxMsg + 1, call.ErrMessageTooLarge},
	} {
		res := cbGo(ctx, c, cbKey("Any"), []byte(tc.name), call.CallOptions{})
		f, err := p.ReadFrame()
		if err != nil || f.Type != testkit.TypeCall {
			t.Fatalf("%s: fake server read %v, %v; want a CALL", tc.name, f, err)
		}
		if err := sendReply(f.ID, tc.size); err != nil {
			t.Fatalf("%s: writing the reply: %v", tc.name, err)
		}
		r := cbAwait(t, tc.name, res, 10*time.Second)
		if tc.want != nil {
			cbWantErr(t, tc.name, r.err, tc.want, false)
			continue
		}
		if r.err != nil || len(r.out) != tc.size {
			t.Errorf("%s: got %d bytes, %v; want %d bytes", tc.name, len(r.out), r.err, tc.size)
		}
	}
}

// --- Fault injection (RELIABILITY 12) ------------------------------------------------------------

// cbCaptureListener hands every accepted connection to conns.
type cbCaptureListener struct {
	net.Listener
	conns chan net.Conn
}

func (l *cbCaptureListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		select {
		case l.conns <- c:
		default:
		}
	}
	return c, err
}

func TestCBFaults(t *testing.T) {
	const reqLen, replyLen = 1000, 1000
	// Offsets of the request and reply in each direction's byte stream.
	const (
		reqStart   = cbHelloSize + testkit.HeaderSize + cbCallHeaderWithDeadline // client → server
		replyStart = cbHelloSize + testkit.HeaderSize + testkit.ReplyHeaderSize  // server → client
	)
	never := testkit.NoFault()
	cases := []struct {
		name           string
		client, server testkit.Fault
		want           error
		neverRan       bool
		// over net.Pipe nothing is buffered: a request the server stops reading is never sent in
		// full, so the call provably never ran.
		wantPipe     error
		neverRanPipe bool
		runs         int64
	}{
		{name: "client write fails mid-request", client: testkit.Fault{ReadAfter: -1, WriteAfter: reqStart + reqLen/2}, server: never,
			want: call.ErrUnreachable, neverRan: true},
		{name: "server read fails mid-request", client: never, server: testkit.Fault{ReadAfter: cbHelloSize + testkit.HeaderSize + 20, WriteAfter: -1},
			want: call.ErrCommunication, wantPipe: call.ErrUnreachable, neverRanPipe: true},
		{name: "server write fails mid-reply", client: never, server: testkit.Fault{ReadAfter: -1, WriteAfter: replyStart + replyLen/2},
			want: call.ErrCommunication, runs: 1},
		{name: "client read fails mid-reply", client: testkit.Fault{ReadAfter: replyStart + replyLen/2, WriteAfter: -1}, server: never,
			want: call.ErrCommunication, runs: 1},
	}
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			for _, tc := range cases {
				t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
					ctx := cbCtx(t, 20*time.Second)
					var runs atomic.Int64
					var hm call.HandlerMap
					hm.Set(cbComponent, "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
						runs.Add(1)
						return cbEcho(ctx, args)
					})
					l, ep := tr.Listen(t)
					cbServe(t, testkit.FaultListener(l, func(int) testkit.Fault { return tc.server }), &hm, call.ServerOptions{})
					c := cbDial(t, testkit.FaultEndpoint(ep, tc.client), call.ClientOptions{})
					_, err := c.Call(ctx, cbKey("Echo"), bytes.Repeat([]byte{'q'}, reqLen), call.CallOptions{})
					want, neverRan := tc.want, tc.neverRan
					if tr.Name == "pipe" && tc.wantPipe != nil {
						want, neverRan = tc.wantPipe, tc.neverRanPipe
					}
					cbWantErr(t, tc.name, err, want, neverRan)
					if n := runs.Load(); n != tc.runs {
						t.Errorf("handler ran %d times, want %d", n, tc.runs)
					}
					cbWait(t, "the broken connection to close", c.Done(), 10*time.Second)
					_, err = c.Call(ctx, cbKey("Echo"), []byte("x"), call.CallOptions{})
					cbWantErr(t, "call on the broken connection", err, call.ErrUnreachable, true)
				})
			}
			t.Run("server_crash_mid-call", func(t *testing.T) {
				ctx := cbCtx(t, 20*time.Second)
				entered := make(chan struct{}, 1)
				cancelled := make(chan error, 1)
				var hm call.HandlerMap
				hm.Set(cbComponent, "Hang", func(hctx context.Context, _ []byte) ([]byte, error) {
					entered <- struct{}{}
					select {
					case <-hctx.Done():
						cancelled <- hctx.Err()
					case <-ctx.Done():
						cancelled <- nil
					}
					return nil, hctx.Err()
				})
				l, ep := tr.Listen(t)
				cl := &cbCaptureListener{Listener: l, conns: make(chan net.Conn, 1)}
				cbServe(t, cl, &hm, call.ServerOptions{})
				c := cbDial(t, ep, call.ClientOptions{})
				res := cbGo(ctx, c, cbKey("Hang"), []byte("x"), call.CallOptions{})
				cbWait(t, "the handler to start", entered, 10*time.Second)
				cbWait(t, "the accepted connection", cl.conns, time.Second).Close()
				r := cbAwait(t, "call whose server connection died", res, 10*time.Second)
				cbWantErr(t, "call whose server connection died", r.err, call.ErrCommunication, false)
				if err := cbWait(t, "the handler to end", cancelled, 10*time.Second); err == nil {
					t.Errorf("the handler's context was not cancelled when its connection closed")
				}
			})
		})
	}
}

// --- Go-away and unknown ids from a fake server (RELIABILITY 5) ---------------------------------

func TestCBGoAwayFromFakeServer(t *testing.T) {
	c, p := cbFakeServer(t, cbServerHello(), call.ClientOptions{})
	ctx := cbCtx(t, 20*time.Second)

	// Three calls reach the fake server in order; remember which caller got which id.
	res := map[string]<-chan cbResult{}
	ids := map[uint64]string{}
	for _, name := range []string{"first", "second", "third"} {
		res[name] = cbGo(ctx, c, cbKey("Any"), []byte(name), call.CallOptions{})
		f, err := p.ReadFrame()
		if err != nil || f.Type != testkit.TypeCall || !f.End() {
			t.Fatalf("fake server read %v, %v; want a whole CALL", f, err)
		}
		_, args, err := testkit.ParseCallHeader(f.Payload)
		if err != nil || string(args) != name {
			t.Fatalf("CALL %d carries %q, %v; want %q", f.ID, args, err, name)
		}
		ids[f.ID] = name
	}
	var sorted []uint64
	for id := range ids {
		sorted = append(sorted, id)
	}
	slices.Sort(sorted)
	if ids[sorted[0]] != "first" || ids[sorted[1]] != "second" || ids[sorted[2]] != "third" {
		t.Fatalf("request ids do not increase in call order: %v", ids)
	}
	lastAccepted := sorted[0]

	if err := p.WriteFrame(testkit.GoAway{LastID: lastAccepted, Code: testkit.CloseDrain, Message: "draining"}.Frame()); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"second", "third"} {
		r := cbAwait(t, name, res[name], 10*time.Second)
		cbWantErr(t, name+" call, above the go-away's last id", r.err, call.ErrRefused, true)
	}
	if !c.Draining() {
		t.Errorf("Draining() = false after a go-away, want true")
	}
	nctx, ncancel := context.WithTimeout(ctx, 2*time.Second)
	_, err := c.Call(nctx, cbKey("Any"), []byte("new"), call.CallOptions{})
	ncancel()
	cbWantErr(t, "new call after the go-away", err, call.ErrUnreachable, true)

	// Replies for an unknown id and for a refused call are dropped; the accepted call still gets
	// its own reply.
	for _, f := range []struct {
		id      uint64
		payload string
	}{{99, "intruder"}, {sorted[1], "late reply for a refused call"}, {lastAccepted, "reply to first"}} {
		if err := p.Reply(f.id, []byte(f.payload)); err != nil {
			t.Fatalf("writing reply %d: %v", f.id, err)
		}
	}
	r := cbAwait(t, "first", res["first"], 10*time.Second)
	if r.err != nil || string(r.out) != "reply to first" {
		t.Errorf("accepted call: got %q, %v; want \"reply to first\"", r.out, r.err)
	}
	// With its last accepted call answered, the connection closes itself: cleanly, not as a
	// protocol error caused by the stray replies.
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("connection still open after its go-away's last call ended")
	}
	if err := c.Err(); errors.Is(err, call.ErrProtocol) || !errors.Is(err, call.ErrClosed) {
		t.Errorf("connection closed with %v, want a clean close after draining", err)
	}
}

// Calls refused by a go-away never occupied a server slot: once the accepted call ends, InFlight
// is 0.
func TestCBInFlightAfterGoAway(t *testing.T) {
	c, p := cbFakeServer(t, cbServerHello(), call.ClientOptions{})
	ctx := cbCtx(t, 20*time.Second)
	accepted := cbGo(ctx, c, cbKey("Any"), []byte("accepted"), call.CallOptions{})
	first, err := p.ReadFrame()
	if err != nil || first.Type != testkit.TypeCall {
		t.Fatalf("fake server read %v, %v; want a CALL", first, err)
	}
	refused := cbGo(ctx, c, cbKey("Any"), []byte("refused"), call.CallOptions{})
	if f, err := p.ReadFrame(); err != nil || f.Type != testkit.TypeCall {
		t.Fatalf("fake server read %v, %v; want a CALL", f, err)
	}
	if got := c.InFlight(); got != 2 {
		t.Errorf("InFlight() = %d with two calls sent, want 2", got)
	}
	if err := p.WriteFrame(testkit.GoAway{LastID: first.ID, Code: testkit.CloseDrain}.Frame()); err != nil {
		t.Fatal(err)
	}
	r := cbAwait(t, "refused call", refused, 10*time.Second)
	cbWantErr(t, "refused call", r.err, call.ErrRefused, true)
	if err := p.Reply(first.ID, []byte("done")); err != nil {
		t.Fatal(err)
	}
	if r := cbAwait(t, "accepted call", accepted, 10*time.Second); r.err != nil || string(r.out) != "done" {
		t.Errorf("accepted call: got %q, %v", r.out, r.err)
	}
	if got := c.InFlight(); got != 0 {
		t.Errorf("InFlight() = %d after the accepted call ended and the other was refused by the go-away, want 0", got)
	}
}

// A reply for an id that was never used, or that already finished, never reaches another caller.
func TestCBReplyForUnknownIDIsDropped(t *testing.T) {
	c, p := cbFakeServer(t, cbServerHello(), call.ClientOptions{})
	ctx := cbCtx(t, 20*time.Second)

	res := cbGo(ctx, c, cbKey("Any"), []byte("mine"), call.CallOptions{})
	f, err := p.ReadFrame()
	if err != nil || f.Type != testkit.TypeCall {
		t.Fatalf("fake server read %v, %v; want a CALL", f, err)
	}
	id := f.ID
	if err := p.WriteFrames(
		testkit.Frame{Type: testkit.TypeReply, Flags: testkit.FlagEnd, ID: id + 1, Payload: append(testkit.ReplyHeader{Total: 5}.Encode(), "wrong"...)},
		testkit.Frame{Type: testkit.TypeReply, Flags: testkit.FlagEnd, ID: 1 << 40, Payload: append(testkit.ReplyHeader{Total: 5}.Encode(), "wrong"...)},
		testkit.Frame{Type: testkit.TypeError, ID: id + 7, Payload: testkit.ErrorBody{Code: testkit.CodeHandlerFailed, Message: "wrong"}.Encode()},
	); err != nil {
		t.Fatal(err)
	}
	if err := p.Reply(id, []byte("right")); err != nil {
		t.Fatal(err)
	}
	r := cbAwait(t, "call", res, 10*time.Second)
	if r.err != nil || string(r.out) != "right" {
		t.Errorf("got %q, %v; want \"right\"", r.out, r.err)
	}
	// A second reply for the finished id is dropped too; the next call gets its own.
	res = cbGo(ctx, c, cbKey("Any"), []byte("next"), call.CallOptions{})
	f, err = p.ReadFrame()
	if err != nil || f.Type != testkit.TypeCall {
		t.Fatalf("fake server read %v, %v; want a CALL", f, err)
	}
	if err := p.Reply(id, []byte("stale")); err != nil {
		t.Fatal(err)
	}
	if err := p.Reply(f.ID, []byte("next reply")); err != nil {
		t.Fatal(err)
	}
	if r := cbAwait(t, "next call", res, 10*time.Second); r.err != nil || string(r.out) != "next reply" {
		t.Errorf("next call: got %q, %v; want \"next reply\"", r.out, r.err)
	}
}

// --- Keepalive (RELIABILITY 7, 14) ---------------------------------------------------------------

func TestCBKeepaliveDeclaresHalfOpenServerDead(t *testing.T) {
	const interval, timeout = 2 * time.Second, time.Second
	const bound = interval + 2*timeout
	cases := []struct {
		name         string
		peerReads    bool          // the peer reads and discards what it is sent; it never writes
		callDeadline time.Duration // 0: no call in flight
		want         error
		neverRan     bool
		wantBy       time.Duration // the call ends by then, after the handshake
	}{
		{name: "idle, peer neither reads nor writes"},
		{name: "call in flight, peer reads but never answers", peerReads: true, callDeadline: time.Minute,
			want: call.ErrCommunication, wantBy: bound},
		{name: "call in flight, peer neither reads nor writes", callDeadline: time.Minute,
			want: call.ErrUnreachable, neverRan: true, wantBy: bound},
		{name: "call deadline first, peer reads but never answers", peerReads: true, callDeadline: 500 * time.Millisecond,
			want: context.DeadlineExceeded, wantBy: 500 * time.Millisecond},
		{name: "call deadline first, peer neither reads nor writes", callDeadline: 500 * time.Millisecond,
			want: context.DeadlineExceeded, neverRan: true, wantBy: 500 * time.Millisecond},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				cconn, sconn := net.Pipe()
				peer := testkit.NewRawPeer(sconn)
				stop := make(chan struct{})
				peerDone := make(chan struct{})
				go func() {
					defer close(peerDone)
					if _, err := peer.AcceptHandshake(cbServerHello()); err != nil {
						t.Errorf("fake server handshake: %v", err)
						return
					}
					if tc.peerReads {
						io.Copy(io.Discard, sconn)
						return
					}
					<-stop
				}()
				defer func() {
					close(stop)
					sconn.Close()
					<-peerDone
				}()
				ctx := cbCtx(t, time.Hour)
				c, err := call.NewConn(ctx, cconn, call.ClientOptions{Logger: cbQuiet, KeepaliveInterval: interval, KeepaliveTimeout: timeout})
				if err != nil {
					t.Fatalf("NewConn: %v", err)
				}
				defer c.Close()
				start := time.Now()
				var res <-chan cbResult
				if tc.callDeadline > 0 {
					cctx, cancel := context.WithTimeout(ctx, tc.callDeadline)
					defer cancel()
					res = cbGo(cctx, c, cbKey("Any"), []byte("anyone there?"), call.CallOptions{})
				}
				select {
				case <-c.Done():
				case <-time.After(bound + time.Second):
					t.Fatalf("connection still open %v after the handshake, want it declared dead within %v", time.Since(start), bound)
				}
				if dead := time.Since(start); dead < interval || dead > bound {
					t.Errorf("declared dead %v after the handshake, want between %v and %v", dead, interval, bound)
				}
				if err := c.Err(); err == nil || !strings.Contains(err.Error(), "keepalive") {
					t.Errorf("Err() = %v, want a reason mentioning keepalive", err)
				}
				if res == nil {
					return
				}
				r := cbAwait(t, "call in flight", res, time.Minute)
				cbWantErr(t, "call in flight", r.err, tc.want, tc.neverRan)
				if at := r.at.Sub(start); at > tc.wantBy {
					t.Errorf("call ended %v after it started, want by %v", at, tc.wantBy)
				}
			})
		})
	}
}

// --- Slow server (RELIABILITY 15) ----------------------------------------------------------------

func TestCBSlowHandlerDoesNotStallConnection(t *testing.T) {
	t.Run("sleeping handler, fake clock", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			const slowFor = 10 * time.Second
			var hm call.HandlerMap
			hm.Set(cbComponent, "Slow", func(context.Context, []byte) ([]byte, error) {
				time.Sleep(slowFor)
				return []byte("slow"), nil
			})
			hm.Set(cbComponent, "Echo", cbEcho)
			c, _ := cbPipe(t, &hm, call.ServerOptions{}, call.ClientOptions{})
			ctx := cbCtx(t, time.Minute)
			start := time.Now()
			slow := cbGo(ctx, c, cbKey("Slow"), nil, call.CallOptions{})
			for i := range 20 {
				args := fmt.Appendf(nil, "quick %d", i)
				if out, err := c.Call(ctx, cbKey("Echo"), args, call.CallOptions{}); err != nil || !bytes.Equal(out, args) {
					t.Errorf("quick call %d: got %q, %v", i, out, err)
				}
			}
			if took := time.Since(start); took >= slowFor {
				t.Errorf("20 quick calls took %v of fake time, want them done while the slow handler sleeps %v", took, slowFor)
			}
			select {
			case r := <-slow:
				t.Fatalf("slow call ended early: %q, %v", r.out, r.err)
			default:
			}
			r := cbAwait(t, "slow call", slow, time.Minute)
			if r.err != nil || string(r.out) != "slow" {
				t.Errorf("slow call: got %q, %v", r.out, r.err)
			}
			if took := r.at.Sub(start); took != slowFor {
				t.Errorf("slow call took %v of fake time, want %v", took, slowFor)
			}
		})
	})
	for _, tr := range cbTransports() {
		t.Run("blocked handler/"+tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			entered := make(chan struct{}, 1)
			release := make(chan struct{})
			var hm call.HandlerMap
			hm.Set(cbComponent, "Block", func(hctx context.Context, _ []byte) ([]byte, error) {
				entered <- struct{}{}
				select {
				case <-release:
				case <-hctx.Done():
				}
				return []byte("unblocked"), nil
			})
			hm.Set(cbComponent, "Echo", cbEcho)
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{})
			c := cbDial(t, ep, call.ClientOptions{})
			blocked := cbGo(ctx, c, cbKey("Block"), nil, call.CallOptions{})
			cbWait(t, "the blocking handler to start", entered, 10*time.Second)
			for i := range 50 {
				args := bytes.Repeat([]byte{byte(i)}, i*1000)
				if out, err := c.Call(ctx, cbKey("Echo"), args, call.CallOptions{}); err != nil || !bytes.Equal(out, args) {
					t.Errorf("call %d next to a blocked handler: got %d bytes, %v; want %d bytes", i, len(out), err, len(args))
				}
			}
			close(release)
			if r := cbAwait(t, "blocked call", blocked, 10*time.Second); r.err != nil || string(r.out) != "unblocked" {
				t.Errorf("blocked call: got %q, %v", r.out, r.err)
			}
		})
	}
}

// --- Handshake failures --------------------------------------------------------------------------

func TestCBDialHandshakeFailures(t *testing.T) {
	readHello := func(c net.Conn) {
		buf := make([]byte, cbHelloSize)
		io.ReadFull(c, buf)
	}
	cases := []struct {
		name     string
		serve    func(c net.Conn)
		want     error
		contains []string
	}{
		{name: "HTTP server answering garbage", want: call.ErrProtocol, serve: func(c net.Conn) {
			readHello(c)
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
			io.Copy(io.Discard, c)
		}},
		{name: "server closing at once", want: call.ErrUnreachable, serve: func(c net.Conn) {}},
		{name: "server speaking version 2", want: call.ErrProtocol, contains: []string{"version 2", "1"}, serve: func(c net.Conn) {
			readHello(c)
			h := cbServerHello()
			h.Version = 2
			c.Write(h.Encode())
			io.Copy(io.Discard, c)
		}},
		{name: "hello with a bad length", want: call.ErrProtocol, serve: func(c net.Conn) {
			readHello(c)
			h := cbServerHello()
			h.RestLen = 10
			c.Write(h.Encode())
			io.Copy(io.Discard, c)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			served := make(chan struct{})
			go func() {
				defer close(served)
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				tc.serve(c)
				c.Close()
			}()
			ctx := cbCtx(t, 10*time.Second)
			c, err := call.Dial(ctx, endpoint.TCP(l.Addr().String()), call.ClientOptions{Logger: cbQuiet})
			if err == nil {
				c.Close()
				t.Fatalf("Dial succeeded, want an error matching %q", tc.want)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("Dial: got %q, want an error matching %q", err, tc.want)
			}
			for _, s := range tc.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Dial: error %q does not mention %q", err, s)
				}
			}
			cbWait(t, "the fake server to finish", served, 10*time.Second)
		})
	}
}

// A server that accepts the connection and never answers: Dial fails at the handshake timeout.
func TestCBDialHandshakeTimeout(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		const hsTimeout = 3 * time.Second
		l := testkit.NewPipeListener("silent")
		defer l.Close()
		stop := make(chan struct{})
		accepted := make(chan struct{})
		go func() {
			defer close(accepted)
			c, err := l.Accept()
			if err != nil {
				return
			}
			<-stop
			c.Close()
		}()
		start := time.Now()
		c, err := call.Dial(cbCtx(t, time.Minute), l, call.ClientOptions{Logger: cbQuiet, HandshakeTimeout: hsTimeout})
		took := time.Since(start)
		close(stop)
		<-accepted
		if err == nil {
			c.Close()
			t.Fatalf("Dial to a silent server succeeded")
		}
		if !errors.Is(err, call.ErrUnreachable) {
			t.Errorf("Dial: got %q, want an error matching ErrUnreachable", err)
		}
		if took != hsTimeout {
			t.Errorf("Dial returned after %v, want at the handshake timeout %v", took, hsTimeout)
		}
	})
}

// mTLS with a certificate the other side does not trust fails with ErrAuthentication, under
// TLS 1.2 and TLS 1.3 (where the server's rejection of the client certificate surfaces only on
// the client's first read, during weft's hello).
func TestCBDialMTLSUntrustedCertificate(t *testing.T) {
	ca, other := testkit.NewCA(t), testkit.NewCA(t)
	serverOpts := testkit.CertOptions{CommonName: testkit.MTLSServerName, DNSNames: []string{testkit.MTLSServerName}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}
	goodServer := ca.Issue(t, serverOpts)
	strangeServer := other.Issue(t, serverOpts)
	goodClient := ca.Issue(t, testkit.CertOptions{CommonName: testkit.MTLSClientName, Client: true})
	strangeClient := other.Issue(t, testkit.CertOptions{CommonName: testkit.MTLSClientName, Client: true})

	var hm call.HandlerMap
	hm.Set(cbComponent, "Echo", cbEcho)
	listen := func(t *testing.T, cert tls.Certificate) string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		cbServe(t, tls.NewListener(l, testkit.ServerTLS(t, ca, cert)), &hm, call.ServerOptions{})
		return l.Addr().String()
	}
	cases := []struct {
		name     string
		server   tls.Certificate
		client   tls.Certificate
		clientCA *testkit.CA
		want     error // nil: the call succeeds
	}{
		{"trusted both ways", goodServer, goodClient, ca, nil},
		{"client certificate from another CA", goodServer, strangeClient, ca, call.ErrAuthentication},
		{"server certificate from another CA", strangeServer, goodClient, ca, call.ErrAuthentication},
	}
	for _, version := range []struct {
		name string
		v    uint16
	}{{"TLS1.2", tls.VersionTLS12}, {"TLS1.3", tls.VersionTLS13}} {
		for _, tc := range cases {
			t.Run(version.name+"/"+tc.name, func(t *testing.T) {
				addr := listen(t, tc.server)
				cfg := testkit.ClientTLS(t, tc.clientCA, tc.client, testkit.MTLSServerName)
				cfg.MaxVersion = version.v
				ctx := cbCtx(t, 10*time.Second)
				c, err := call.Dial(ctx, endpoint.MTLS(cfg, endpoint.TCP(addr)), call.ClientOptions{Logger: cbQuiet})
				if tc.want == nil {
					if err != nil {
						t.Fatalf("Dial: %v", err)
					}
					defer c.Close()
					if out, err := c.Call(ctx, cbKey("Echo"), []byte("hi"), call.CallOptions{}); err != nil || string(out) != "hi" {
						t.Errorf("call: got %q, %v", out, err)
					}
					return
				}
				if err == nil {
					c.Close()
					t.Fatalf("Dial succeeded, want an error matching %q", tc.want)
				}
				if !errors.Is(err, tc.want) {
					t.Errorf("Dial: got %q, want an error matching %q", err, tc.want)
				}
			})
		}
	}
}

// --- Close ---------------------------------------------------------------------------------------

func TestCBCloseWithCallsInFlight(t *testing.T) {
	const running = 4
	for _, tr := range cbTransports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			entered := make(chan struct{}, running)
			var hm call.HandlerMap
			hm.Set(cbComponent, "Hold", func(hctx context.Context, _ []byte) ([]byte, error) {
				entered <- struct{}{}
				select {
				case <-hctx.Done():
				case <-ctx.Done():
				}
				return nil, hctx.Err()
			})
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: running}})
			c := cbDial(t, ep, call.ClientOptions{})
			var held []<-chan cbResult
			for i := range running {
				held = append(held, cbGo(ctx, c, cbKey("Hold"), fmt.Appendf(nil, "%d", i), call.CallOptions{}))
			}
			for range running {
				cbWait(t, "a handler to start", entered, 10*time.Second)
			}
			// One more waits on the client for a server slot: it is never sent.
			queued := cbGo(ctx, c, cbKey("Hold"), []byte("queued"), call.CallOptions{})

			c.Close()
			for i, ch := range held {
				r := cbAwait(t, fmt.Sprintf("running call %d", i), ch, 10*time.Second)
				// Its handler ran: the error must not claim it never did.
				cbWantErr(t, fmt.Sprintf("running call %d", i), r.err, call.ErrCommunication, false)
			}
			r := cbAwait(t, "queued call", queued, 10*time.Second)
			cbWantErr(t, "queued call", r.err, call.ErrUnreachable, true)

			c.Close() // a second Close returns
			select {
			case <-c.Done():
			default:
				t.Errorf("Done() not closed after Close")
			}
			if err := c.Err(); !errors.Is(err, call.ErrClosed) {
				t.Errorf("Err() after Close = %v, want one matching ErrClosed", err)
			}
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err := c.Call(actx, cbKey("Hold"), []byte("after"), call.CallOptions{})
			cancel()
			cbWantErr(t, "call after Close", err, call.ErrUnreachable, true)
		})
	}
}

// --- Stopping a server after a reader hand-off -------------------------------------------------

// Cancelling Serve's context drains (or hard-stops) every connection, including one whose first
// reader handed off to a new one because a handler ran longer than InlineHandlerDuration.
func TestCBServeStopReachesConnectionAfterHandOff(t *testing.T) {
	for _, stop := range []struct {
		name  string
		drain time.Duration
	}{{"graceful drain", 0}, {"hard stop", -1}} {
		for _, tr := range cbTransports("pipe", "tcp") {
			t.Run(stop.name+"/"+tr.Name, func(t *testing.T) {
				ctx := cbCtx(t, 30*time.Second)
				signal := make(chan struct{})
				entered := make(chan struct{}, 1)
				var hm call.HandlerMap
				// Wait blocks until Signal runs. Wait runs inline on the connection's first
				// reader, so Signal can only be read by a reader that took over from it.
				hm.Set(cbComponent, "Wait", func(hctx context.Context, _ []byte) ([]byte, error) {
					entered <- struct{}{}
					select {
					case <-signal:
						return []byte("signalled"), nil
					case <-hctx.Done():
						return nil, hctx.Err()
					}
				})
				hm.Set(cbComponent, "Signal", func(context.Context, []byte) ([]byte, error) {
					close(signal)
					return []byte("sent"), nil
				})
				hm.Set(cbComponent, "Echo", cbEcho)
				l, ep := tr.Listen(t)
				sctx, cancel := context.WithCancel(ctx)
				defer cancel()
				served := make(chan error, 1)
				go func() {
					served <- call.Serve(sctx, call.NetListener(l, &hm), call.ServerOptions{Logger: cbQuiet, DrainTimeout: stop.drain})
				}()
				c, err := call.Dial(ctx, ep, call.ClientOptions{Logger: cbQuiet})
				if err != nil {
					cancel()
					<-served
					t.Fatalf("Dial: %v", err)
				}
				wait := cbGo(ctx, c, cbKey("Wait"), nil, call.CallOptions{})
				cbWait(t, "the Wait handler to start", entered, 10*time.Second)
				if out, err := c.Call(ctx, cbKey("Signal"), nil, call.CallOptions{}); err != nil || string(out) != "sent" {
					t.Errorf("Signal: got %q, %v", out, err)
				}
				if r := cbAwait(t, "Wait", wait, 10*time.Second); r.err != nil || string(r.out) != "signalled" {
					t.Errorf("Wait: got %q, %v", r.out, r.err)
				}
				// One more round trip, so the first reader is done with its hand-off.
				if out, err := c.Call(ctx, cbKey("Echo"), []byte("x"), call.CallOptions{}); err != nil || string(out) != "x" {
					t.Errorf("Echo: got %q, %v", out, err)
				}

				// An idle connection is closed at once by either kind of stop.
				cancel()
				select {
				case <-c.Done():
				case <-time.After(2 * time.Second):
					t.Errorf("the server did not close the idle connection within 2s of its context being cancelled (%s)", stop.name)
				}
				c.Close() // unblocks Serve when the connection was not closed
				select {
				case <-served:
				case <-time.After(10 * time.Second):
					t.Errorf("Serve did not return within 10s of its context being cancelled and the client closing")
					<-served
				}
			})
		}
	}
}

// --- Server slot accounting ----------------------------------------------------------------------

// A client that counts a server slot as busy until the call's terminal frame arrives (as
// DESIGN.md says it must) is never refused: the server frees a slot no later than it sends the
// terminal frame. Handlers run on their own goroutines here, as they do once a reader hands off.
func TestCBServerFreesSlotBeforeTerminalFrame(t *testing.T) {
	var hm call.HandlerMap
	hm.Set(cbComponent, "Quick", func(context.Context, []byte) ([]byte, error) { return []byte("ok"), nil })
	cconn, sconn := net.Pipe()
	served := make(chan struct{})
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		defer close(served)
		call.ServeOn(sctx, sconn, &hm, call.ServerOptions{Logger: cbQuiet, InlineHandlerDuration: -1, Limits: call.Limits{MaxConcurrentCalls: 1}})
	}()
	defer func() {
		cconn.Close()
		cbWait(t, "ServeOn to return", served, 10*time.Second)
	}()
	p := testkit.NewRawPeer(cconn)
	p.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := p.Handshake(testkit.ClientHello()); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	const calls = 300
	refused := 0
	for id := uint64(1); id <= calls; id++ {
		if err := p.Call(id, cbKey("Quick"), nil); err != nil {
			t.Fatalf("call %d: %v", id, err)
		}
		f, err := p.ReadTerminal(id)
		if err != nil {
			t.Fatalf("call %d: %v", id, err)
		}
		if f.Type == testkit.TypeError {
			body, _ := testkit.ParseErrorBody(f.Payload)
			if refused++; refused <= 3 {
				t.Errorf("call %d, sent after the previous call's terminal frame, was refused: code %d %q", id, body.Code, body.Message)
			}
		}
	}
	if refused > 0 {
		t.Errorf("%d of %d sequential calls were refused by a server with MaxConcurrentCalls = 1", refused, calls)
	}
}

// A handler that gives up because its context ended and returns the context's error is reported
// with the matching wire code (5 deadline exceeded, 6 cancelled), not as a handler failure (7):
// a caller whose deadline passes must see context.DeadlineExceeded whichever side noticed first.
func TestCBHandlerContextErrorIsReportedAsSuch(t *testing.T) {
	cases := []struct {
		name     string
		deadline time.Duration // 0: none
		cancel   bool          // the client cancels the call once its handler runs
		wantCode byte
	}{
		{name: "deadline passes", deadline: time.Second, wantCode: testkit.CodeDeadline},
		{name: "caller cancels", cancel: true, wantCode: testkit.CodeCanceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				entered := make(chan struct{}, 1)
				var hm call.HandlerMap
				hm.Set(cbComponent, "Wait", func(hctx context.Context, _ []byte) ([]byte, error) {
					entered <- struct{}{}
					<-hctx.Done()
					return nil, hctx.Err()
				})
				cconn, sconn := net.Pipe()
				served := make(chan struct{})
				sctx, cancel := context.WithTimeout(context.Background(), time.Hour)
				defer cancel()
				go func() {
					defer close(served)
					call.ServeOn(sctx, sconn, &hm, call.ServerOptions{Logger: cbQuiet})
				}()
				defer func() {
					cconn.Close()
					<-served
				}()
				p := testkit.NewRawPeer(cconn)
				if _, err := p.Handshake(testkit.ClientHello()); err != nil {
					t.Fatalf("handshake: %v", err)
				}
				h := testkit.CallHeader{Key: cbKey("Wait")}
				if tc.deadline > 0 {
					h.Deadline = testkit.Uint64(uint64(tc.deadline))
				}
				if err := p.WriteFrame(testkit.Frame{Type: testkit.TypeCall, Flags: testkit.FlagEnd, ID: 1, Payload: h.Encode()}); err != nil {
					t.Fatal(err)
				}
				<-entered
				if tc.cancel {
					if err := p.WriteFrame(testkit.Frame{Type: testkit.TypeCancel, ID: 1}); err != nil {
						t.Fatal(err)
					}
				}
				f, err := p.ReadTerminal(1)
				if err != nil {
					t.Fatal(err)
				}
				if f.Type != testkit.TypeError {
					t.Fatalf("terminal frame %v, want an ERROR", f)
				}
				body, err := testkit.ParseErrorBody(f.Payload)
				if err != nil {
					t.Fatal(err)
				}
				if body.Code != tc.wantCode || body.NeverRan() {
					t.Errorf("ERROR code %d (never ran %v, %q), want code %d, never ran false", body.Code, body.NeverRan(), body.Message, tc.wantCode)
				}
			})
		})
	}
}
