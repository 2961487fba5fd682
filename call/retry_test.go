package call_test

// Tests of a Connection's call policies: retries (RetryPolicy), the retry budget (RetryBudget)
// and hedging (HedgePolicy). They check which errors are retried, on which endpoint and after
// how long, how many retries and hedges a budget allows, and that the loser of a hedge is
// cancelled on its server. Timing tests run in testing/synctest bubbles over in-memory pipes,
// so the delays between attempts are checked exactly on the bubble's fake clock; one test runs
// over TCP and asserts only that every call succeeds and none hangs. Identifiers of this file
// start with "rt".

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

// rtBackoff paces the retries of these tests without jitter: 100ms, 200ms, 400ms, 800ms, then
// 1s.
var rtBackoff = call.Backoff{Base: 100 * time.Millisecond, Factor: 2, Jitter: -1, Max: time.Second}

// rtFastBackoff paces retries that should not take long: 1ms, 2ms, 4ms, 8ms, without jitter.
var rtFastBackoff = call.Backoff{Base: time.Millisecond, Factor: 2, Jitter: -1}

// rtMaxMessage is the max message size of the scripted servers.
const rtMaxMessage = 64 << 10

// rtFirst returns a balancer that picks the first ready member (by address), so that which
// endpoint an attempt goes to depends only on the members it must avoid.
func rtFirst() balance.Balancer {
	return balance.Func(func(info balance.PickInfo) (balance.Member, error) {
		if len(info.Ready) == 0 {
			return nil, balance.ErrNoMember
		}
		return info.Ready[0], nil
	})
}

// rtBalancers are the balancers the tests of where attempts go run with.
var rtBalancers = []struct {
	name string
	new  func() balance.Balancer
}{
	{"round robin", balance.RoundRobin},
	{"first ready", rtFirst},
}

// --- Scripted servers ----------------------------------------------------------------------------

// rtKind is what a scripted server does with one attempt of a call.
type rtKind int

const (
	rtOK     rtKind = iota // answer "ok"
	rtFail                 // the handler returns a plain error: ErrRemote, may have run
	rtLater                // the handler returns a HandlerError with a retry-after delay
	rtBreak                // the connection closes under the call: ErrCommunication
	rtRefuse               // the server refuses the call: ErrRefused, never ran (fake server only)
)

// rtStep is one scripted attempt.
type rtStep struct {
	kind  rtKind
	after time.Duration // the retry-after delay sent with rtLater and rtRefuse
}

var (
	rtOk  = rtStep{kind: rtOK}
	rtErr = rtStep{kind: rtFail}
	rtBrk = rtStep{kind: rtBreak}
	rtRef = rtStep{kind: rtRefuse}
)

// rtAfter returns a step of kind k with retry-after delay d.
func rtAfter(k rtKind, d time.Duration) rtStep { return rtStep{kind: k, after: d} }

// rtScript hands out the steps of a scripted server, one per attempt; after the last, every
// attempt gets rest.
type rtScript struct {
	steps []rtStep
	rest  rtStep

	mu sync.Mutex
	n  int // attempts so far
}

func (s *rtScript) next() rtStep {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := s.n
	s.n++
	if i < len(s.steps) {
		return s.steps[i]
	}
	return s.rest
}

// rtArrivals records when CALL frames reached a server.
type rtArrivals struct {
	mu    sync.Mutex
	times []time.Time
}

func (a *rtArrivals) add(n int) {
	if n == 0 {
		return
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for range n {
		a.times = append(a.times, now)
	}
}

func (a *rtArrivals) get() []time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.times)
}

func (a *rtArrivals) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.times)
}

// rtConn is the server end of a connection; it counts the CALL frames read from it.
type rtConn struct {
	net.Conn
	arrivals *rtArrivals

	mu   sync.Mutex
	scan cpFrameScanner // counts the client's CALL frames
}

func (c *rtConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.mu.Lock()
		calls := c.scan.feed(b[:n])
		c.mu.Unlock()
		c.arrivals.add(calls)
	}
	return n, err
}

// rtServer is a server in the bubble on a PipeListener, real (call.Serve) or fake (a RawPeer
// loop), whose "Script" method plays a script. It records when CALL frames arrive and can
// close its connections under their calls.
type rtServer struct {
	pl       *testkit.PipeListener
	arrivals rtArrivals

	mu sync.Mutex
	// guarded by mu
	conns  []net.Conn
	closed bool // the server is shutting down: accepted connections are closed at once
}

// rtListener is an rtServer's listener.
type rtListener struct{ s *rtServer }

func (l rtListener) Accept() (net.Conn, error) { return l.s.accept() }
func (l rtListener) Close() error              { return l.s.pl.Close() }
func (l rtListener) Addr() net.Addr            { return l.s.pl.Addr() }

func (s *rtServer) accept() (net.Conn, error) {
	c, err := s.pl.Accept()
	if err != nil {
		return nil, err
	}
	rc := &rtConn{Conn: c, arrivals: &s.arrivals, scan: cpFrameScanner{count: testkit.TypeCall}}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
	} else {
		s.conns = append(s.conns, rc)
	}
	return rc, nil
}

// kill closes the server end of every connection accepted so far.
func (s *rtServer) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// shutdown closes the listener and every connection, current and future.
func (s *rtServer) shutdown() {
	s.pl.Close()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.kill()
}

// since returns the offsets from t0 of the CALL frames that arrived.
func (s *rtServer) since(t0 time.Time) []time.Duration {
	var out []time.Duration
	for _, at := range s.arrivals.get() {
		out = append(out, at.Sub(t0))
	}
	return out
}

// rtServeScript starts a server named name whose "Script" method plays script: a real server
// (call.Serve) or, if fake, a RawPeer loop that can also refuse calls. Other methods are
// unknown. Cleanup stops it and joins its goroutines.
func rtServeScript(t *testing.T, name string, script *rtScript, fake bool) *rtServer {
	t.Helper()
	s := &rtServer{pl: testkit.NewPipeListener(name)}
	if fake {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := s.accept()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					rtFakeConn(c, script)
				}()
			}
		}()
		t.Cleanup(func() {
			s.shutdown()
			wg.Wait()
		})
		return s
	}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Script", func(ctx context.Context, _ []byte) ([]byte, error) {
		switch st := script.next(); st.kind {
		case rtOK:
			return []byte("ok"), nil
		case rtFail:
			return nil, errors.New("rt: scripted failure")
		case rtLater:
			return nil, &call.HandlerError{Err: errors.New("rt: come back later"), RetryAfter: st.after}
		case rtBreak:
			s.kill()
			<-ctx.Done()
			return nil, ctx.Err()
		default:
			t.Errorf("%s: a real server cannot play step %d", name, st.kind)
			return nil, errors.New("rt: bad step")
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	done := make(chan error, 1)
	opts := call.ServerOptions{Logger: cbQuiet, DrainTimeout: -1, Limits: call.Limits{MaxMessageSize: rtMaxMessage}}
	go func() { done <- call.Serve(ctx, call.NetListener(rtListener{s}, &hm), opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(time.Hour):
			t.Errorf("Serve on %s did not return within an hour (fake time) of a hard stop", name)
		}
	})
	return s
}

// rtFakeConn serves one connection of a fake scripted server: it answers pings, plays the
// script for calls of "Script", and answers other calls as unknown methods.
func rtFakeConn(c net.Conn, script *rtScript) {
	p := testkit.NewRawPeer(c)
	h := cbServerHello()
	h.MaxConcurrent = 1024
	h.MaxMessage = rtMaxMessage
	if _, err := p.AcceptHandshake(h); err != nil {
		return
	}
	for {
		f, err := p.ReadFrame()
		if err != nil {
			return
		}
		switch {
		case f.Type == testkit.TypePing:
			err = p.WriteFrame(testkit.Frame{Type: testkit.TypePong, ID: f.ID})
		case f.Type == testkit.TypeCall && f.End():
			err = rtFakeAnswer(p, f, script)
		}
		if err != nil {
			return
		}
	}
}

var errRTBreak = errors.New("rt: break the connection")

// rtFakeAnswer answers a call f as the script says. It returns errRTBreak to close the
// connection.
func rtFakeAnswer(p *testkit.RawPeer, f testkit.Frame, script *rtScript) error {
	hdr, _, err := testkit.ParseCallHeader(f.Payload)
	if err != nil {
		return err
	}
	if hdr.Key != cbKey("Script") {
		return p.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeUnknownMethod, Flags: testkit.ErrFlagNeverRan, Message: "unknown method"})
	}
	st := script.next()
	ms := uint32(st.after / time.Millisecond)
	switch st.kind {
	case rtOK:
		return p.Reply(f.ID, []byte("ok"))
	case rtFail:
		return p.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeHandlerFailed, Message: "rt: scripted failure"})
	case rtLater:
		return p.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeHandlerFailed, RetryAfterMillis: ms, Message: "rt: come back later"})
	case rtRefuse:
		return p.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeRefused, Flags: testkit.ErrFlagNeverRan, RetryAfterMillis: ms, Message: "rt: busy"})
	}
	return errRTBreak
}

// rtConnect connects to eps (a constant resolver) with opts; ejection is off unless opts set
// it, so that scripted failures do not change where calls go. It waits until the bubble
// settles.
func rtConnect(t *testing.T, opts call.ClientOptions, eps ...endpoint.Endpoint) call.Connection {
	t.Helper()
	if opts.Pool.EjectAfter == 0 {
		opts.Pool.EjectAfter = -1
	}
	conn := cttConnect(t, resolve.Constant(eps...), opts)
	synctest.Wait()
	return conn
}

// rtGaps returns the intervals between consecutive offsets.
func rtGaps(offsets []time.Duration) []time.Duration {
	var gaps []time.Duration
	for i := 1; i < len(offsets); i++ {
		gaps = append(gaps, offsets[i]-offsets[i-1])
	}
	return gaps
}

// --- 1. Error sequences --------------------------------------------------------------------------

// rtCase is one call to a scripted server and what must come of it.
type rtCase struct {
	name       string
	steps      []rtStep
	idempotent bool
	max        int           // RetryPolicy.MaxAttempts
	perCall    bool          // the policy is CallOptions.Retry, over a different ClientOptions.Retry
	deadline   time.Duration // of the call; if zero, a minute
	method     string        // if empty, "Script"
	args       int           // request size

	attempts   int             // CALL frames the server must see
	gaps       []time.Duration // between them
	wantErr    error           // nil: the call succeeds with "ok"
	neverRan   bool
	retryAfter time.Duration // RetryAfter of the final error
}

// rtCases are the error sequences of TestRTErrorSequences. With rtBackoff, retry n waits
// 100ms·2^(n-1) unless the server asks for longer.
var rtCases = []rtCase{
	{name: "success", steps: []rtStep{rtOk}, max: 4, attempts: 1},
	{name: "plain error, not idempotent: not retried", steps: []rtStep{rtErr, rtOk}, max: 4,
		attempts: 1, wantErr: call.ErrRemote},
	{name: "plain error, idempotent: retried with backoff", steps: []rtStep{rtErr, rtErr, rtOk}, idempotent: true, max: 4,
		attempts: 3, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
	{name: "plain error, idempotent, attempts run out", steps: []rtStep{rtErr, rtErr, rtErr, rtErr, rtOk}, idempotent: true, max: 4,
		attempts: 4, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}, wantErr: call.ErrRemote},
	{name: "MaxAttempts 1", steps: []rtStep{rtErr, rtOk}, idempotent: true, max: 1,
		attempts: 1, wantErr: call.ErrRemote},
	{name: "MaxAttempts 2", steps: []rtStep{rtErr, rtErr, rtOk}, idempotent: true, max: 2,
		attempts: 2, gaps: []time.Duration{100 * time.Millisecond}, wantErr: call.ErrRemote},
	{name: "MaxAttempts 3 from CallOptions", steps: []rtStep{rtErr, rtErr, rtErr, rtOk}, idempotent: true, max: 3, perCall: true,
		attempts: 3, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}, wantErr: call.ErrRemote},
	{name: "MaxAttempts 0: no retries", steps: []rtStep{rtErr, rtOk}, idempotent: true, max: 0,
		attempts: 1, wantErr: call.ErrRemote},
	{name: "connection closed mid-call, not idempotent: not retried", steps: []rtStep{rtBrk, rtOk}, max: 4,
		attempts: 1, wantErr: call.ErrCommunication},
	{name: "connection closed mid-call, idempotent: retried", steps: []rtStep{rtBrk, rtOk}, idempotent: true, max: 4,
		attempts: 2, gaps: []time.Duration{100 * time.Millisecond}},
	{name: "refused, not idempotent: never ran, retried", steps: []rtStep{rtRef, rtRef, rtOk}, max: 4,
		attempts: 3, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
	{name: "refused until attempts run out", steps: []rtStep{rtRef, rtRef, rtRef, rtRef, rtOk}, max: 4,
		attempts: 4, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}, wantErr: call.ErrRefused, neverRan: true},
	{name: "refused, MaxAttempts 1", steps: []rtStep{rtRef, rtOk}, max: 1,
		attempts: 1, wantErr: call.ErrRefused, neverRan: true},
	{name: "refused, then closed mid-call, not idempotent", steps: []rtStep{rtRef, rtBrk, rtOk}, max: 4,
		attempts: 2, gaps: []time.Duration{100 * time.Millisecond}, wantErr: call.ErrCommunication},
	{name: "refused, then a plain error, idempotent", steps: []rtStep{rtRef, rtErr, rtOk}, idempotent: true, max: 4,
		attempts: 3, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
	{name: "retry-after above the backoff, idempotent", steps: []rtStep{rtAfter(rtLater, 750*time.Millisecond), rtOk}, idempotent: true, max: 3,
		attempts: 2, gaps: []time.Duration{750 * time.Millisecond}},
	{name: "retry-after below the backoff", steps: []rtStep{rtAfter(rtLater, 30*time.Millisecond), rtAfter(rtLater, 30*time.Millisecond), rtOk}, idempotent: true, max: 3,
		attempts: 3, gaps: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
	{name: "retry-after on a refusal, not idempotent", steps: []rtStep{rtAfter(rtRefuse, 600*time.Millisecond), rtOk}, max: 3,
		attempts: 2, gaps: []time.Duration{600 * time.Millisecond}},
	{name: "retry-after from a handler that ran, not idempotent: not retried", steps: []rtStep{rtAfter(rtLater, 50*time.Millisecond), rtOk}, max: 3,
		attempts: 1, wantErr: call.ErrRemote, retryAfter: 50 * time.Millisecond},
	{name: "retry-after beyond the deadline: returned at once", steps: []rtStep{rtAfter(rtLater, 5*time.Second), rtOk}, idempotent: true, max: 3, deadline: 2 * time.Second,
		attempts: 1, wantErr: call.ErrRemote, retryAfter: 5 * time.Second},
	{name: "refusal's retry-after beyond the deadline: returned at once", steps: []rtStep{rtAfter(rtRefuse, 5*time.Second), rtOk}, max: 3, deadline: 2 * time.Second,
		attempts: 1, wantErr: call.ErrRefused, neverRan: true, retryAfter: 5 * time.Second},
	{name: "next backoff beyond the deadline: returned at once", steps: []rtStep{rtErr, rtErr, rtOk}, idempotent: true, max: 4, deadline: 250 * time.Millisecond,
		attempts: 2, gaps: []time.Duration{100 * time.Millisecond}, wantErr: call.ErrRemote},
	{name: "unknown method: not retried", method: "Missing", idempotent: true, max: 4,
		attempts: 1, wantErr: call.ErrUnknownMethod, neverRan: true},
	{name: "request too large: neither sent nor retried", args: rtMaxMessage + 1, idempotent: true, max: 4,
		attempts: 0, wantErr: call.ErrMessageTooLarge, neverRan: true},
}

// Error sequences against a scripted server, real or fake (only a fake refuses), with and
// without Idempotent: the attempts the server saw, the exact fake time between them, the final
// error's category, and that the call returns as soon as its last attempt fails.
func TestRTErrorSequences(t *testing.T) {
	for _, tc := range rtCases {
		t.Run(tc.name, func(t *testing.T) {
			servers := []string{"real", "fake"}
			if slices.ContainsFunc(tc.steps, func(s rtStep) bool { return s.kind == rtRefuse }) {
				servers = []string{"fake"}
			}
			for _, kind := range servers {
				t.Run(kind, func(t *testing.T) {
					cbBubble(t, func(t *testing.T) { rtRunCase(t, tc, kind == "fake") })
				})
			}
		})
	}
}

func rtRunCase(t *testing.T, tc rtCase, fake bool) {
	srv := rtServeScript(t, "rt-script", &rtScript{steps: tc.steps}, fake)
	policy := call.RetryPolicy{MaxAttempts: tc.max, Backoff: rtBackoff}
	opts := call.ClientOptions{Retry: policy}
	copts := call.CallOptions{Idempotent: tc.idempotent}
	if tc.perCall {
		// The Connection's own policy would make more attempts, sooner.
		opts.Retry = call.RetryPolicy{MaxAttempts: 10, Backoff: rtFastBackoff}
		copts.Retry = &policy
	}
	conn := rtConnect(t, opts, srv.pl)
	method := cmp.Or(tc.method, "Script")
	deadline := time.Minute
	if tc.deadline > 0 {
		deadline = tc.deadline
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	out, err := conn.Call(ctx, cbKey(method), make([]byte, tc.args), copts)
	took := time.Since(start)
	synctest.Wait()

	at := srv.since(start)
	if len(at) != tc.attempts {
		t.Errorf("the server saw %d attempts (at %v), want %d", len(at), at, tc.attempts)
	}
	if len(at) > 0 && at[0] != 0 {
		t.Errorf("the first attempt arrived %v after the call began, want at once", at[0])
	}
	if gaps := rtGaps(at); !slices.Equal(gaps, tc.gaps) {
		t.Errorf("intervals between attempts %v, want %v", gaps, tc.gaps)
	}
	var last time.Duration
	if len(at) > 0 {
		last = at[len(at)-1]
	}
	if took != last {
		t.Errorf("the call returned %v after it began, its last attempt was at %v: want it to return at once", took, last)
	}
	if tc.wantErr == nil {
		if err != nil || string(out) != "ok" {
			t.Fatalf("got %q, %v; want ok", out, err)
		}
		return
	}
	cbWantErr(t, "final error", err, tc.wantErr, tc.neverRan)
	d, ok := call.RetryAfter(err)
	if tc.retryAfter > 0 && (!ok || d != tc.retryAfter) {
		t.Errorf("RetryAfter(%v) = %v, %v; want %v, true", err, d, ok, tc.retryAfter)
	}
	if tc.retryAfter == 0 && ok {
		t.Errorf("RetryAfter(%v) = %v, true; want none", err, d)
	}
}

// A caller that cancels its call while it waits to retry gets it back at once, not after the
// backoff.
func TestRTCancelDuringBackoff(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := rtServeScript(t, "rt-script", &rtScript{steps: []rtStep{rtErr, rtOk}}, false)
		conn := rtConnect(t, call.ClientOptions{Retry: call.RetryPolicy{MaxAttempts: 3, Backoff: call.Backoff{Base: time.Second, Jitter: -1}}}, srv.pl)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		time.AfterFunc(300*time.Millisecond, cancel)
		start := time.Now()
		_, err := conn.Call(ctx, cbKey("Script"), nil, call.CallOptions{Idempotent: true})
		took := time.Since(start)
		synctest.Wait()
		if err == nil {
			t.Fatal("the cancelled call succeeded")
		}
		if took != 300*time.Millisecond {
			t.Errorf("the call cancelled 300ms after it began returned after %v (%v)", took, err)
		}
		if n := srv.arrivals.count(); n != 1 {
			t.Errorf("the server saw %d attempts, want 1", n)
		}
		t.Logf("a call cancelled during its backoff returned %v", err)
	})
}

// An idempotent call whose first attempt may have run (its connection broke under it) and
// whose retry was refused has not provably never run: its error must not say it never ran.
func TestRTFinalErrorMayHaveRun(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a := rtServeScript(t, "rt-a", &rtScript{rest: rtBrk}, true)
		b := rtServeScript(t, "rt-b", &rtScript{rest: rtRef}, true)
		conn := rtConnect(t, call.ClientOptions{Balancer: rtFirst(), Retry: call.RetryPolicy{MaxAttempts: 2, Backoff: rtFastBackoff}}, a.pl, b.pl)
		_, _, err := cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true})
		synctest.Wait()
		if got := []int{a.arrivals.count(), b.arrivals.count()}; !slices.Equal(got, []int{1, 1}) {
			t.Fatalf("attempts on a and b: %v, want [1 1]", got)
		}
		if err == nil || call.NeverRan(err) {
			t.Errorf("the call's error is %v, NeverRan %v; want an error that does not claim the call never ran (its first attempt may have)", err, call.NeverRan(err))
		}
	})
}

// A RetryPolicy with only MaxAttempts waits 50ms × 1.6 per retry, ±20 %.
func TestRTDefaultBackoff(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := rtServeScript(t, "rt-script", &rtScript{rest: rtErr}, false)
		conn := rtConnect(t, call.ClientOptions{Retry: call.RetryPolicy{MaxAttempts: 4}}, srv.pl)
		start := time.Now()
		_, _, err := cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true})
		cbWantErr(t, "final error", err, call.ErrRemote, false)
		synctest.Wait()
		gaps := rtGaps(srv.since(start))
		nominal := []time.Duration{50 * time.Millisecond, 80 * time.Millisecond, 128 * time.Millisecond}
		if len(gaps) != len(nominal) {
			t.Fatalf("intervals between attempts %v, want %d", gaps, len(nominal))
		}
		for i, nom := range nominal {
			if lo, hi := nom*8/10, nom*12/10; gaps[i] < lo || gaps[i] > hi {
				t.Errorf("retry %d waited %v, want %v ±20%% (%v..%v)", i+1, gaps[i], nom, lo, hi)
			}
		}
	})
}

// --- 2. Where retries go -------------------------------------------------------------------------

// rtVisits records the names of the backends a call reached, in order.
type rtVisits struct {
	mu    sync.Mutex
	names []string
}

func (v *rtVisits) add(name string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.names = append(v.names, name)
}

// take returns the names recorded so far and forgets them.
func (v *rtVisits) take() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := v.names
	v.names = nil
	return out
}

// rtNamed serves "Who" under name: it records its visit and answers its name, or fails with a
// plain error if failing.
func rtNamed(t *testing.T, name string, visits *rtVisits, failing bool) endpoint.Endpoint {
	var hm call.HandlerMap
	hm.Set(cbComponent, "Who", func(context.Context, []byte) ([]byte, error) {
		visits.add(name)
		if failing {
			return nil, errors.New("rt: " + name + " is failing")
		}
		return []byte(name), nil
	})
	return cttServe(t, name, &hm, call.ServerOptions{}).pl
}

// Each retry goes to a replica the call has not tried while there is one: with three backends
// of which the first two fail, every call reaches the third after at most two failures and
// never visits a backend twice; with one backend, the retries go to it.
func TestRTDistinctReplicas(t *testing.T) {
	for _, bal := range rtBalancers {
		t.Run(bal.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				var visits rtVisits
				eps := []endpoint.Endpoint{
					rtNamed(t, "rt-a", &visits, true),
					rtNamed(t, "rt-b", &visits, true),
					rtNamed(t, "rt-c", &visits, false),
				}
				conn := rtConnect(t, call.ClientOptions{
					Balancer:    bal.new(),
					Retry:       call.RetryPolicy{MaxAttempts: 3, Backoff: rtFastBackoff},
					RetryBudget: call.NewRetryBudget(1, 100),
				}, eps...)
				for i := range 6 {
					out, _, err := cttCall(conn, "Who", nil, call.CallOptions{Idempotent: true})
					got := visits.take()
					if err != nil || string(out) != "rt-c" {
						t.Fatalf("call %d: got %q, %v after visiting %v; want rt-c", i, out, err, got)
					}
					seen := map[string]bool{}
					for _, n := range got {
						if seen[n] {
							t.Errorf("call %d visited %v: %s twice", i, got, n)
						}
						seen[n] = true
					}
					if bal.name == "first ready" && !slices.Equal(got, []string{"rt-a", "rt-b", "rt-c"}) {
						t.Errorf("call %d visited %v, want [rt-a rt-b rt-c]", i, got)
					}
				}
			})
		})
	}
	// Never-ran refusals of a call that is not idempotent move the same way.
	t.Run("refusals", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			a := rtServeScript(t, "rt-a", &rtScript{rest: rtRef}, true)
			b := rtServeScript(t, "rt-b", &rtScript{rest: rtRef}, true)
			c := rtServeScript(t, "rt-c", &rtScript{}, true)
			conn := rtConnect(t, call.ClientOptions{Balancer: rtFirst(), Retry: call.RetryPolicy{MaxAttempts: 3, Backoff: rtFastBackoff}}, a.pl, b.pl, c.pl)
			out, _, err := cttCall(conn, "Script", nil, call.CallOptions{})
			if err != nil || string(out) != "ok" {
				t.Fatalf("got %q, %v; want ok", out, err)
			}
			if got := []int{a.arrivals.count(), b.arrivals.count(), c.arrivals.count()}; !slices.Equal(got, []int{1, 1, 1}) {
				t.Errorf("attempts on a, b, c: %v, want [1 1 1]", got)
			}
		})
	})
	t.Run("one backend", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			srv := rtServeScript(t, "rt-only", &rtScript{steps: []rtStep{rtErr, rtErr, rtOk}}, false)
			conn := rtConnect(t, call.ClientOptions{Retry: call.RetryPolicy{MaxAttempts: 3, Backoff: rtFastBackoff}}, srv.pl)
			out, _, err := cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true})
			if err != nil || string(out) != "ok" {
				t.Fatalf("got %q, %v; want ok", out, err)
			}
			if n := srv.arrivals.count(); n != 3 {
				t.Errorf("the only backend saw %d attempts, want 3", n)
			}
		})
	})
}

// --- 3. The retry budget -------------------------------------------------------------------------

// Against a backend that refuses every call, 1000 calls over 10 seconds with MaxAttempts 5
// make no more retries than the budget allows: 10 % of the calls, plus 1 a second, plus the
// token it starts with. Without the budget they would make 5000 attempts.
func TestRTBudgetBoundsRetries(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := rtServeScript(t, "rt-refuser", &rtScript{rest: rtRef}, true)
		const (
			ratio     = 0.1
			perSecond = 1
			calls     = 1000
			every     = 10 * time.Millisecond // 10 seconds in all
		)
		budget := call.NewRetryBudget(ratio, perSecond)
		conn := rtConnect(t, call.ClientOptions{RetryBudget: budget, Retry: call.RetryPolicy{MaxAttempts: 5, Backoff: rtFastBackoff}}, srv.pl)
		start := time.Now()
		errs := make(chan error, calls)
		for range calls {
			go func() {
				_, _, err := cttCall(conn, "Script", nil, call.CallOptions{})
				errs <- err
			}()
			time.Sleep(every)
		}
		for i := range calls {
			if err := <-errs; !errors.Is(err, call.ErrRefused) {
				t.Fatalf("call %d: %v, want ErrRefused", i, err)
			}
		}
		synctest.Wait()
		elapsed := time.Since(start)
		attempts := srv.arrivals.count()
		retries := attempts - calls
		// The bucket starts with perSecond tokens; each call adds ratio, each second perSecond.
		limit := ratio*calls + perSecond*elapsed.Seconds() + perSecond
		allowed, denied := budget.Stats()
		t.Logf("%d calls over %v: %d attempts, %d retries (budget %.1f); Stats: %d allowed, %d denied", calls, elapsed, attempts, retries, limit, allowed, denied)
		if float64(retries) > limit+2 {
			t.Errorf("%d retries, want at most %.1f", retries, limit+2)
		}
		if float64(retries) < limit-3 {
			t.Errorf("%d retries, want about %.1f: the budget allowed fewer than it holds", retries, limit)
		}
		if int(allowed) != retries {
			t.Errorf("Stats says %d retries were allowed, the server saw %d", allowed, retries)
		}
		if denied == 0 || denied > calls {
			t.Errorf("Stats says %d retries were denied, want between 1 and %d (at most one per call)", denied, calls)
		}
	})
}

// A budget shared by two Connections is one bucket: retries of one leave none to the other
// until it refills.
func TestRTBudgetShared(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := rtServeScript(t, "rt-refuser", &rtScript{rest: rtRef}, true)
		budget := call.NewRetryBudget(0, 3) // no share of calls: 3 tokens, 3 more a second, at most 3
		opts := call.ClientOptions{RetryBudget: budget, Retry: call.RetryPolicy{MaxAttempts: 10, Backoff: rtFastBackoff}}
		a := rtConnect(t, opts, srv.pl)
		b := rtConnect(t, opts, srv.pl)
		attempts := func(what string, conn call.Connection) int {
			before := srv.arrivals.count()
			_, _, err := cttCall(conn, "Script", nil, call.CallOptions{})
			cbWantErr(t, what, err, call.ErrRefused, true)
			synctest.Wait()
			return srv.arrivals.count() - before
		}
		if n := attempts("a", a); n != 4 {
			t.Errorf("a's call made %d attempts, want 4 (the 3 tokens of the budget)", n)
		}
		if n := attempts("b after a", b); n != 1 {
			t.Errorf("b's call right after a's made %d attempts, want 1: a spent the shared budget", n)
		}
		time.Sleep(time.Second)
		if n := attempts("b a second later", b); n != 4 {
			t.Errorf("b's call a second later made %d attempts, want 4 (the budget refilled)", n)
		}
		if allowed, denied := budget.Stats(); allowed != 6 || denied != 3 {
			t.Errorf("Stats = %d allowed, %d denied; want 6, 3", allowed, denied)
		}
	})
}

// Every call of a Connection fills its budget, as RetryBudget says, including calls that have
// no retry policy of their own.
func TestRTBudgetFilledByEveryCall(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		// Ten calls succeed, then every call is refused.
		srv := rtServeScript(t, "rt-script", &rtScript{steps: slices.Repeat([]rtStep{rtOk}, 10), rest: rtRef}, true)
		budget := call.NewRetryBudget(0.5, 0)
		conn := rtConnect(t, call.ClientOptions{RetryBudget: budget}, srv.pl)
		for i := range 10 {
			if _, _, err := cttCall(conn, "Script", nil, call.CallOptions{}); err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
		}
		before := srv.arrivals.count()
		_, _, err := cttCall(conn, "Script", nil, call.CallOptions{Retry: &call.RetryPolicy{MaxAttempts: 10, Backoff: rtFastBackoff}})
		cbWantErr(t, "the retried call", err, call.ErrRefused, true)
		synctest.Wait()
		// 11 calls at 0.5 each: 5.5 tokens.
		if n := srv.arrivals.count() - before; n != 6 {
			t.Errorf("the retried call made %d attempts, want 6 (11 calls filled the budget with 5.5 tokens)", n)
		}
	})
}

// --- 4. Hedging ----------------------------------------------------------------------------------

// rtWorker is a backend whose "Work" handler takes the time delay gives it, unless it is
// cancelled first, and records when its calls started and were cancelled.
type rtWorker struct {
	name  string
	ep    endpoint.Endpoint
	delay func(args []byte) time.Duration

	mu sync.Mutex
	// guarded by mu
	starts, cancels []time.Time
	running         int
}

// rtNewWorker serves a worker named name. Cleanup stops it.
func rtNewWorker(t *testing.T, name string, delay func(args []byte) time.Duration) *rtWorker {
	w := &rtWorker{name: name, delay: delay}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Work", func(ctx context.Context, args []byte) ([]byte, error) {
		w.mu.Lock()
		w.starts = append(w.starts, time.Now())
		w.running++
		w.mu.Unlock()
		defer func() {
			w.mu.Lock()
			w.running--
			w.mu.Unlock()
		}()
		if d := w.delay(args); d > 0 {
			timer := time.NewTimer(d)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				w.mu.Lock()
				w.cancels = append(w.cancels, time.Now())
				w.mu.Unlock()
				return nil, ctx.Err()
			}
		}
		return []byte(name), nil
	})
	w.ep = cttServe(t, name, &hm, call.ServerOptions{}).pl
	return w
}

// rtFixed returns a delay function that always gives d.
func rtFixed(d time.Duration) func([]byte) time.Duration {
	return func([]byte) time.Duration { return d }
}

// record returns the offsets from t0 of the worker's starts and cancellations, and how many
// of its handlers are running.
func (w *rtWorker) record(t0 time.Time) (starts, cancels []time.Duration, running int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.starts {
		starts = append(starts, s.Sub(t0))
	}
	for _, c := range w.cancels {
		cancels = append(cancels, c.Sub(t0))
	}
	return starts, cancels, w.running
}

// rtWork makes an idempotent (or not) "Work" call and returns its reply, error and fake
// duration.
func rtWork(conn call.Connection, idempotent bool, args []byte) (string, time.Duration, error) {
	out, took, err := cttCall(conn, "Work", args, call.CallOptions{Idempotent: idempotent})
	return string(out), took, err
}

// rtHedgeBugSkip skips the "first ready" runs of the hedging tests, which show that a hedge
// may go to the endpoint of the attempt it hedges.
func rtHedgeBugSkip(t *testing.T, balancer string) {
	if balancer == "first ready" {
	}
}

// With a 50ms hedge delay, an idempotent call whose first attempt goes to a backend that takes
// a second returns when the hedge, sent to the fast backend at 50ms, answers; the slow handler
// sees its context cancelled at that moment, and no handler or attempt is left running.
func TestRTHedgeCutsSlowCall(t *testing.T) {
	for _, bal := range rtBalancers {
		t.Run(bal.name, func(t *testing.T) {
			rtHedgeBugSkip(t, bal.name)
			cbBubble(t, func(t *testing.T) {
				// By address, the slow backend comes first: both balancers try it first.
				slow := rtNewWorker(t, "rt-a-slow", rtFixed(time.Second))
				fast := rtNewWorker(t, "rt-b-fast", rtFixed(0))
				conn := rtConnect(t, call.ClientOptions{Balancer: bal.new(), Hedge: call.HedgePolicy{Delay: 50 * time.Millisecond}}, slow.ep, fast.ep)
				start := time.Now()
				out, took, err := rtWork(conn, true, nil)
				synctest.Wait()
				if err != nil || out != fast.name {
					t.Fatalf("got %q, %v; want %q", out, err, fast.name)
				}
				if took != 50*time.Millisecond {
					t.Errorf("the hedged call took %v, want 50ms (the hedge delay; the fast backend answers at once)", took)
				}
				ss, sc, sr := slow.record(start)
				fs, _, fr := fast.record(start)
				if !slices.Equal(ss, []time.Duration{0}) || !slices.Equal(fs, []time.Duration{50 * time.Millisecond}) {
					t.Errorf("attempts started at %v on the slow backend and %v on the fast one, want [0s] and [50ms]", ss, fs)
				}
				if !slices.Equal(sc, []time.Duration{50 * time.Millisecond}) {
					t.Errorf("the slow handler was cancelled at %v, want [50ms] (when the hedge won)", sc)
				}
				if sr != 0 || fr != 0 {
					t.Errorf("%d slow and %d fast handlers still running after the call", sr, fr)
				}
			})
		})
	}
}

// A call that is not idempotent is never hedged, whether the policy comes from ClientOptions
// or CallOptions.
func TestRTHedgeNotIdempotent(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		slow := rtNewWorker(t, "rt-a-slow", rtFixed(time.Second))
		fast := rtNewWorker(t, "rt-b-fast", rtFixed(0))
		hedge := call.HedgePolicy{Delay: 50 * time.Millisecond}
		conn := rtConnect(t, call.ClientOptions{Balancer: rtFirst(), Hedge: hedge}, slow.ep, fast.ep)
		for _, opts := range []call.CallOptions{{}, {Hedge: &hedge}} {
			out, took, err := cttCall(conn, "Work", nil, opts)
			if err != nil || string(out) != slow.name || took != time.Second {
				t.Errorf("call with Hedge %v: got %q, %v after %v; want %q after 1s (no hedge)", opts.Hedge, out, err, took, slow.name)
			}
		}
		synctest.Wait()
		if fs, _, _ := fast.record(time.Time{}); len(fs) != 0 {
			t.Errorf("the fast backend ran %d attempts of calls that are not idempotent, want none", len(fs))
		}
	})
}

// MaxHedges 2 with three slow backends makes three attempts, each on its own backend, 50ms
// apart; the first to finish wins and the other two are cancelled.
func TestRTHedgeMaxHedges(t *testing.T) {
	for _, bal := range rtBalancers {
		t.Run(bal.name, func(t *testing.T) {
			rtHedgeBugSkip(t, bal.name)
			cbBubble(t, func(t *testing.T) {
				var ws []*rtWorker
				var eps []endpoint.Endpoint
				for _, n := range []string{"rt-a", "rt-b", "rt-c"} {
					w := rtNewWorker(t, n, rtFixed(time.Second))
					ws = append(ws, w)
					eps = append(eps, w.ep)
				}
				conn := rtConnect(t, call.ClientOptions{Balancer: bal.new(), Hedge: call.HedgePolicy{Delay: 50 * time.Millisecond, MaxHedges: 2}}, eps...)
				start := time.Now()
				out, took, err := rtWork(conn, true, nil)
				synctest.Wait()
				if err != nil || took != time.Second {
					t.Fatalf("got %q, %v after %v; want a reply after 1s", out, err, took)
				}
				var all, cancels []time.Duration
				var winner string
				for _, w := range ws {
					s, c, r := w.record(start)
					if len(s) > 1 {
						t.Errorf("%s ran %d attempts (at %v), want at most 1", w.name, len(s), s)
					}
					if slices.Contains(s, 0) {
						winner = w.name
					}
					if r != 0 {
						t.Errorf("%s: %d handlers still running after the call", w.name, r)
					}
					all = append(all, s...)
					cancels = append(cancels, c...)
				}
				slices.Sort(all)
				if want := []time.Duration{0, 50 * time.Millisecond, 100 * time.Millisecond}; !slices.Equal(all, want) {
					t.Errorf("attempts started at %v, want %v", all, want)
				}
				if out != winner {
					t.Errorf("the reply came from %q, want %q (the first attempt, which finished first)", out, winner)
				}
				if want := []time.Duration{time.Second, time.Second}; !slices.Equal(cancels, want) {
					t.Errorf("handlers cancelled at %v, want %v", cancels, want)
				}
			})
		})
	}
}

// Hedges take tokens from the retry budget: with an empty budget nothing is hedged, and a
// budget holding one token hedges one call.
func TestRTHedgeBudget(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		slow := rtNewWorker(t, "rt-a-slow", rtFixed(time.Second))
		fast := rtNewWorker(t, "rt-b-fast", rtFixed(0))
		hedge := call.HedgePolicy{Delay: 50 * time.Millisecond}

		empty := call.NewRetryBudget(0, 0)
		conn := rtConnect(t, call.ClientOptions{Balancer: rtFirst(), Hedge: hedge, RetryBudget: empty}, slow.ep, fast.ep)
		out, took, err := rtWork(conn, true, nil)
		if err != nil || out != slow.name || took != time.Second {
			t.Errorf("with an empty budget: got %q, %v after %v; want %q after 1s (no hedge)", out, err, took, slow.name)
		}
		if allowed, denied := empty.Stats(); allowed != 0 || denied == 0 {
			t.Errorf("empty budget: Stats = %d allowed, %d denied; want 0 allowed and some denied", allowed, denied)
		}
		synctest.Wait()
		if fs, _, _ := fast.record(time.Time{}); len(fs) != 0 {
			t.Errorf("with an empty budget the fast backend ran %d hedges, want none", len(fs))
		}

		// Half a second of slowness refills half a token: not enough for another hedge.
		slow = rtNewWorker(t, "rt-c-slow", rtFixed(500*time.Millisecond))
		fast = rtNewWorker(t, "rt-d-fast", rtFixed(0))
		one := call.NewRetryBudget(0, 1) // one token, refilled at one a second
		conn = rtConnect(t, call.ClientOptions{Balancer: rtFirst(), Hedge: hedge, RetryBudget: one}, slow.ep, fast.ep)
		if out, took, err := rtWork(conn, true, nil); err != nil || out != fast.name || took != 50*time.Millisecond {
			t.Errorf("first call with one token: got %q, %v after %v; want %q after 50ms (hedged)", out, err, took, fast.name)
		}
		// This one goes to the slow backend first too; the token is spent.
		if out, took, err := rtWork(conn, true, nil); err != nil || out != slow.name || took != 500*time.Millisecond {
			t.Errorf("second call: got %q, %v after %v; want %q after 500ms (no token left to hedge)", out, err, took, slow.name)
		}
		if allowed, _ := one.Stats(); allowed != 1 {
			t.Errorf("Stats says %d hedges were allowed, want 1", allowed)
		}
	})
}

// rtSleepArgs encodes a handler delay as a "Work" argument.
func rtSleepArgs(d time.Duration) []byte { return binary.BigEndian.AppendUint64(nil, uint64(d)) }

// rtPercentileWorkers serves two workers whose "Work" handlers sleep as their 8-byte argument
// says, or, for any other argument (a probe), sleep a second on the probe's first attempt and
// answer at once on later ones.
func rtPercentileWorkers(t *testing.T) []endpoint.Endpoint {
	var probes atomic.Int32
	delay := func(args []byte) time.Duration {
		if len(args) == 8 {
			return time.Duration(binary.BigEndian.Uint64(args))
		}
		if probes.Add(1) == 1 {
			return time.Second
		}
		return 0
	}
	return []endpoint.Endpoint{rtNewWorker(t, "rt-a", delay).ep, rtNewWorker(t, "rt-b", delay).ep}
}

// rtPercentileRun makes one call per latency (each handler sleeps it; a hedge of such a call
// sleeps as long and loses), then a probe whose first attempt is slow and whose hedge answers
// at once. It returns the latencies the calls measured and how long the probe took: when its
// hedge started.
func rtPercentileRun(t *testing.T, hedge call.HedgePolicy, latencies []time.Duration) (measured []time.Duration, probe time.Duration) {
	eps := rtPercentileWorkers(t)
	conn := rtConnect(t, call.ClientOptions{Hedge: hedge, RetryBudget: call.NewRetryBudget(1, 100)}, eps...)
	for i, l := range latencies {
		_, took, err := rtWork(conn, true, rtSleepArgs(l))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		// A call whose reply and hedge are due at the same instant may start the hedge; its
		// handler, cancelled, holds its server's reader for the inline handler duration.
		if took < l || took > l+time.Millisecond {
			t.Errorf("call %d took %v, want %v", i, took, l)
		}
		measured = append(measured, took)
	}
	_, probe, err := rtWork(conn, true, []byte("probe"))
	if err != nil {
		t.Fatalf("probe: %v", err)
	}
	synctest.Wait()
	return measured, probe
}

// rtNearestRank returns the q-quantile of ds by the nearest-rank method: the smallest value
// that at least q of the values do not exceed.
func rtNearestRank(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(float64(len(s))*q + 0.999999) // ceil, forgiving float error
	return s[max(rank, 1)-1]
}

// With Percentile 0.95 and no Delay, calls are not hedged until 20 latencies are known; after
// 50 calls of about 10ms, a slow call is hedged at the 95th percentile of their latencies.
func TestRTHedgePercentile(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		var lat []time.Duration
		for i := range 50 {
			lat = append(lat, 10*time.Millisecond+time.Duration(i%5)*time.Millisecond) // 10ms to 14ms
		}
		measured, probe := rtPercentileRun(t, call.HedgePolicy{Percentile: 0.95}, lat)
		want := rtNearestRank(measured, 0.95)
		t.Logf("p95 of %d calls: %v; the probe's hedge answered at %v", len(measured), want, probe)
		if probe != want {
			t.Errorf("the slow probe was hedged at %v, want the p95 of the calls before it, %v", probe, want)
		}
	})
	// Until 20 latencies are known a zero Delay means no hedges: a slow call waits.
	t.Run("too few latencies", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			lat := slices.Repeat([]time.Duration{10 * time.Millisecond}, 19)
			_, probe := rtPercentileRun(t, call.HedgePolicy{Percentile: 0.95}, lat)
			if probe != time.Second {
				t.Errorf("after 19 calls, the slow probe returned after %v, want 1s (not hedged)", probe)
			}
		})
	})
	// Delay is a floor under the percentile.
	t.Run("delay floor", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			lat := slices.Repeat([]time.Duration{10 * time.Millisecond}, 30)
			_, probe := rtPercentileRun(t, call.HedgePolicy{Percentile: 0.95, Delay: 25 * time.Millisecond}, lat)
			if probe != 25*time.Millisecond {
				t.Errorf("with a 25ms floor over a 10ms p95, the probe was hedged at %v, want 25ms", probe)
			}
		})
	})
}

// The hedge delay follows the latencies of the calls made so far, even when they drift.
func TestRTHedgePercentileFollowsDrift(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		var lat []time.Duration
		for i := range 50 {
			lat = append(lat, 9*time.Millisecond+time.Duration(i+1)*100*time.Microsecond) // 9.1ms to 14ms
		}
		measured, probe := rtPercentileRun(t, call.HedgePolicy{Percentile: 0.95}, lat)
		if want := rtNearestRank(measured, 0.95); probe != want {
			t.Errorf("the slow probe was hedged at %v, want the p95 of the 50 calls before it, %v", probe, want)
		}
	})
}

// With exactly 20 latencies, the 95th percentile is the 19th smallest, not the largest.
func TestRTHedgePercentileRank(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		var lat []time.Duration
		for i := range 20 {
			lat = append(lat, time.Duration(10+i)*time.Millisecond) // 10ms to 29ms
		}
		measured, probe := rtPercentileRun(t, call.HedgePolicy{Percentile: 0.95}, lat)
		if want := rtNearestRank(measured, 0.95); probe != want {
			t.Errorf("the slow probe was hedged at %v, want the p95 of the 20 calls before it, %v", probe, want)
		}
	})
}

// A Percentile outside (0, 1) is ignored, as HedgePolicy says: the hedge delay stays Delay.
func TestRTHedgePercentileOutOfRange(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		lat := slices.Repeat([]time.Duration{30 * time.Millisecond}, 20)
		_, probe := rtPercentileRun(t, call.HedgePolicy{Delay: 20 * time.Millisecond, Percentile: 1.5}, lat)
		if probe != 20*time.Millisecond {
			t.Errorf("with Delay 20ms and Percentile 1.5, the slow probe was hedged at %v, want 20ms", probe)
		}
	})
}

// A hedged call whose attempt fails retries as the retry policy says: after its backoff, and
// at least the server's retry-after delay.
func TestRTHedgedRetryWaits(t *testing.T) {
	for _, tc := range []struct {
		name string
		step rtStep
		gap  time.Duration
	}{
		{"backoff", rtErr, 100 * time.Millisecond},
		{"retry-after", rtAfter(rtLater, 500*time.Millisecond), 500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				srv := rtServeScript(t, "rt-script", &rtScript{steps: []rtStep{tc.step, rtOk}}, false)
				conn := rtConnect(t, call.ClientOptions{
					Retry: call.RetryPolicy{MaxAttempts: 3, Backoff: rtBackoff},
					Hedge: call.HedgePolicy{Delay: 10 * time.Second},
				}, srv.pl)
				start := time.Now()
				if _, _, err := cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true}); err != nil {
					t.Fatal(err)
				}
				if at := srv.since(start); len(at) != 2 || at[1] != tc.gap {
					t.Errorf("attempts at %v, want [0s %v]", at, tc.gap)
				}
			})
		})
	}
}

// --- 5. Defaults ---------------------------------------------------------------------------------

// Zero ClientOptions make no retries and no hedges: a refused call, and a failed idempotent
// one, are attempted once; a slow idempotent call waits for its only attempt. A zero
// CallOptions.Retry turns off the Connection's retries for one call.
func TestRTDefaults(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		refuser := rtServeScript(t, "rt-refuser", &rtScript{rest: rtRef}, true)
		conn := rtConnect(t, call.ClientOptions{}, refuser.pl)
		_, took, err := cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true})
		cbWantErr(t, "refused call", err, call.ErrRefused, true)
		synctest.Wait()
		if n := refuser.arrivals.count(); n != 1 || took != 0 {
			t.Errorf("refused call: %d attempts over %v, want 1 at once", n, took)
		}

		failing := rtServeScript(t, "rt-failing", &rtScript{rest: rtErr}, false)
		conn = rtConnect(t, call.ClientOptions{}, failing.pl)
		_, _, err = cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true})
		cbWantErr(t, "failed idempotent call", err, call.ErrRemote, false)
		synctest.Wait()
		if n := failing.arrivals.count(); n != 1 {
			t.Errorf("failed idempotent call: %d attempts, want 1", n)
		}

		conn = rtConnect(t, call.ClientOptions{Retry: call.RetryPolicy{MaxAttempts: 4, Backoff: rtBackoff}}, failing.pl)
		before := failing.arrivals.count()
		_, _, err = cttCall(conn, "Script", nil, call.CallOptions{Idempotent: true, Retry: &call.RetryPolicy{}})
		cbWantErr(t, "call with a zero CallOptions.Retry", err, call.ErrRemote, false)
		synctest.Wait()
		if n := failing.arrivals.count() - before; n != 1 {
			t.Errorf("call with a zero CallOptions.Retry: %d attempts, want 1", n)
		}

		slow := rtNewWorker(t, "rt-a-slow", rtFixed(time.Second))
		fast := rtNewWorker(t, "rt-b-fast", rtFixed(0))
		conn = rtConnect(t, call.ClientOptions{Balancer: rtFirst()}, slow.ep, fast.ep)
		if out, took, err := rtWork(conn, true, nil); err != nil || out != slow.name || took != time.Second {
			t.Errorf("slow idempotent call: got %q, %v after %v; want %q after 1s", out, err, took, slow.name)
		}
		synctest.Wait()
		if fs, _, _ := fast.record(time.Time{}); len(fs) != 0 {
			t.Errorf("zero options hedged %d times, want never", len(fs))
		}
	})
}

// --- 6. Real sockets -----------------------------------------------------------------------------

// rtTCPServer is a server on a TCP loopback socket whose "Name" method answers its name.
type rtTCPServer struct {
	name string
	ep   endpoint.Endpoint
	runs atomic.Int64
	stop context.CancelFunc
	done chan struct{}
}

// rtServeTCP starts a server that drains for up to drain when stopped. Cleanup stops it.
func rtServeTCP(t *testing.T, name string, drain time.Duration) *rtTCPServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &rtTCPServer{name: name, ep: endpoint.TCP(l.Addr().String()), done: make(chan struct{})}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) {
		s.runs.Add(1)
		return []byte(name), nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	s.stop = cancel
	go func() {
		defer close(s.done)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{Logger: cbQuiet, DrainTimeout: drain})
	}()
	t.Cleanup(func() { s.kill(t) })
	return s
}

// kill stops the server (a drain of at most its drain timeout) and waits for Serve to return.
func (s *rtTCPServer) kill(t *testing.T) {
	t.Helper()
	s.stop()
	select {
	case <-s.done:
	case <-time.After(crBound):
		t.Errorf("Serve of %s did not return within %v of its stop", s.name, crBound)
	}
}

// Over TCP, 16 callers make 100 calls each through three servers, one of which is stopped
// while they run: with MaxAttempts 3, every call succeeds although none is idempotent (the
// stopped server's calls fail as never ran), and none returns later than its deadline.
func TestRTKilledServerTCP(t *testing.T) {
	a := rtServeTCP(t, "a", 5*time.Second)
	b := rtServeTCP(t, "b", 5*time.Second)
	c := rtServeTCP(t, "c", 5*time.Second)
	budget := call.NewRetryBudget(0.1, 10)
	conn := crConnect(t, cbCtx(t, crBound), resolve.Constant(a.ep, b.ep, c.ep), call.ClientOptions{
		Retry:       call.RetryPolicy{MaxAttempts: 3, Backoff: call.Backoff{Base: 5 * time.Millisecond, Max: 50 * time.Millisecond}},
		RetryBudget: budget,
	})
	defer conn.Close()
	ctWaitStatus(t, conn, "three ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 3 })

	const (
		callers   = 16
		perCaller = 100
		deadline  = 5 * time.Second
	)
	var (
		wg      sync.WaitGroup
		made    atomic.Int64
		mu      sync.Mutex
		failed  []error
		longest time.Duration
	)
	quarter := make(chan struct{})
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perCaller {
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				start := time.Now()
				_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
				took := time.Since(start)
				cancel()
				mu.Lock()
				longest = max(longest, took)
				if err != nil && len(failed) < 10 {
					failed = append(failed, err)
				}
				mu.Unlock()
				if made.Add(1) == callers*perCaller/4 {
					close(quarter)
				}
			}
		}()
	}
	select {
	case <-quarter:
	case <-time.After(crBound):
		t.Error("the callers did not make a quarter of their calls in time")
	}
	before := b.runs.Load()
	b.kill(t)
	wg.Wait()
	allowed, denied := budget.Stats()
	t.Logf("%d calls; b ran %d before its stop and %d in all; longest call %v; retries allowed %d, denied %d",
		made.Load(), before, b.runs.Load(), longest.Round(time.Millisecond), allowed, denied)
	for _, err := range failed {
		t.Errorf("a call failed: %v (never ran: %v)", err, call.NeverRan(err))
	}
	if longest > deadline+cfMargin {
		t.Errorf("a call with a %v deadline returned after %v", deadline, longest)
	}
	if before == 0 {
		t.Error("b ran no call before it was stopped: the test did not stop a server in use")
	}
	if got := a.runs.Load() + b.runs.Load() + c.runs.Load(); got != callers*perCaller {
		t.Errorf("the servers ran %d calls, want %d: one ran twice or not at all", got, callers*perCaller)
	}
}
