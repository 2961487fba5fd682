package call_test

// Timing tests of Connect: reconnection backoff, resolver retries, calls waiting for connecting
// endpoints, failing fast, sharding across a flapping owner and go-aways. Every test runs inside
// a testing/synctest bubble over in-memory pipes, so intervals are measured exactly on the
// bubble's fake clock. Identifiers of this file start with "ctt".

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

// The default backoff, as ClientOptions documents it.
const (
	cttBase   = time.Second
	cttFactor = 1.6
	cttJitter = 0.2
	cttMax    = 2 * time.Minute
)

// cttMode says what a cttEndpoint's Dial does.
type cttMode int

const (
	cttPass  cttMode = iota // dial the inner endpoint
	cttFail                 // fail at once with ECONNREFUSED
	cttBlock                // block until the mode changes or the dial's context ends
	cttDying                // dial the inner endpoint; the connection dies right after the handshake
)

// cttDial is one Dial of a cttEndpoint: when it started, and the mode it ended in.
type cttDial struct {
	at   time.Time
	mode cttMode
}

// cttEndpoint is an endpoint whose Dial the test controls, recording every dial on the bubble's
// clock.
type cttEndpoint struct {
	addr  string
	inner endpoint.Endpoint // nil: every dial fails whatever the mode

	mu      sync.Mutex
	mode    cttMode
	changed chan struct{} // closed and replaced by setMode
	dials   []cttDial
}

// cttNewEndpoint returns an endpoint dialling inner (its address is inner's), or, if inner is
// nil, an endpoint named addr that never connects.
func cttNewEndpoint(addr string, inner endpoint.Endpoint, mode cttMode) *cttEndpoint {
	if inner != nil {
		addr = inner.Address()
	}
	return &cttEndpoint{addr: addr, inner: inner, mode: mode, changed: make(chan struct{})}
}

func (e *cttEndpoint) Address() string { return e.addr }

func (e *cttEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	e.mu.Lock()
	i := len(e.dials)
	e.dials = append(e.dials, cttDial{at: time.Now()})
	for {
		mode, changed := e.mode, e.changed
		e.dials[i].mode = mode
		e.mu.Unlock()
		if e.inner == nil {
			mode = cttFail
		}
		switch mode {
		case cttPass:
			return e.inner.Dial(ctx)
		case cttDying:
			c, err := e.inner.Dial(ctx)
			if err != nil {
				return nil, err
			}
			// The server's hello gets through; the read after it fails and closes the pipe.
			return testkit.WrapConn(c, testkit.Fault{ReadAfter: cbHelloSize, WriteAfter: -1}), nil
		case cttFail:
			return nil, &net.OpError{Op: "dial", Net: "ctt", Err: syscall.ECONNREFUSED}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		e.mu.Lock()
	}
}

func (e *cttEndpoint) setMode(m cttMode) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mode = m
	close(e.changed)
	e.changed = make(chan struct{})
}

// dialTimes returns the start times of the dials so far.
func (e *cttEndpoint) dialTimes() []time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]time.Time, len(e.dials))
	for i, d := range e.dials {
		out[i] = d.at
	}
	return out
}

// dialLog returns the dials so far.
func (e *cttEndpoint) dialLog() []cttDial {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]cttDial(nil), e.dials...)
}

// cttServer is call.Serve on a PipeListener named name inside the bubble. It remembers the
// server ends of the connections it accepted, so a test can kill them.
type cttServer struct {
	pl     *testkit.PipeListener
	cancel context.CancelFunc
	done   chan error
	once   sync.Once

	mu    sync.Mutex
	conns []net.Conn
}

// cttServe starts call.Serve with hm on a new PipeListener named name. opts.DrainTimeout zero
// means a hard stop. Cleanup stops it and waits for Serve to return.
func cttServe(t *testing.T, name string, hm *call.HandlerMap, opts call.ServerOptions) *cttServer {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = -1
	}
	s := &cttServer{pl: testkit.NewPipeListener(name), done: make(chan error, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	s.cancel = cancel
	go func() { s.done <- call.Serve(ctx, call.NetListener(cttTracker{s}, hm), opts) }()
	t.Cleanup(func() { s.stop(t) })
	return s
}

// stop cancels Serve's context (a drain or a hard stop, as the options say) and waits for
// Serve to return.
func (s *cttServer) stop(t *testing.T) {
	t.Helper()
	s.once.Do(func() {
		s.cancel()
		select {
		case <-s.done:
		case <-time.After(time.Hour):
			t.Errorf("Serve on %s did not return within an hour (fake time) of its context ending", s.pl.Address())
		}
	})
}

// kill closes the server end of every connection the server accepted so far.
func (s *cttServer) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// cttTracker is the server's listener: its PipeListener, recording what it accepts.
type cttTracker struct{ s *cttServer }

func (l cttTracker) Accept() (net.Conn, error) {
	c, err := l.s.pl.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.conns = append(l.s.conns, c)
		l.s.mu.Unlock()
	}
	return c, err
}

func (l cttTracker) Close() error   { return l.s.pl.Close() }
func (l cttTracker) Addr() net.Addr { return l.s.pl.Addr() }

// cttNamed returns handlers where "Name" answers name and "Shard" answers name and records its
// argument (a shard key) in *keys.
func cttNamed(name string, mu *sync.Mutex, keys *[]uint64) *call.HandlerMap {
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
	hm.Set(cbComponent, "Shard", func(_ context.Context, args []byte) ([]byte, error) {
		if mu != nil {
			mu.Lock()
			*keys = append(*keys, binary.BigEndian.Uint64(args))
			mu.Unlock()
		}
		return []byte(name), nil
	})
	return &hm
}

// cttConnect connects with opts (quiet by default); cleanup closes the Connection.
func cttConnect(t *testing.T, r resolve.Resolver, opts call.ClientOptions) call.Connection {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := call.Connect(ctx, r, opts)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(conn.Close)
	return conn
}

func cttStatus(t *testing.T, conn call.Connection) call.ConnectionStatus {
	t.Helper()
	in, ok := conn.(call.Inspectable)
	if !ok {
		t.Fatalf("%T does not implement call.Inspectable", conn)
	}
	return in.Status()
}

// cttState returns the state of the endpoint with address addr, failing t if there is none.
func cttState(t *testing.T, conn call.Connection, addr string) call.EndpointStatus {
	t.Helper()
	st := cttStatus(t, conn)
	for _, e := range st.Endpoints {
		if e.Address == addr {
			return e
		}
	}
	t.Fatalf("no endpoint %s in status %+v", addr, st)
	return call.EndpointStatus{}
}

func cttWantState(t *testing.T, conn call.Connection, addr string, want call.EndpointState) {
	t.Helper()
	if e := cttState(t, conn, addr); e.State != want {
		t.Fatalf("endpoint %s is %v (err %v), want %v", addr, e.State, e.Err, want)
	}
}

// cttCall makes a call with a deadline of a minute and returns its reply, its error and the
// fake time it took.
func cttCall(conn call.Connection, method string, args []byte, opts call.CallOptions) ([]byte, time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	out, err := conn.Call(ctx, cbKey(method), args, opts)
	return out, time.Since(start), err
}

// cttWantReply makes a call that must succeed at once with reply want.
func cttWantReply(t *testing.T, what string, conn call.Connection, method string, args []byte, opts call.CallOptions, want string) {
	t.Helper()
	out, took, err := cttCall(conn, method, args, opts)
	if err != nil || string(out) != want {
		t.Fatalf("%s: got %q, %v; want %q", what, out, err, want)
	}
	if took != 0 {
		t.Errorf("%s took %v of fake time, want 0", what, took)
	}
}

// cttWantFailFast makes a call that must fail at once with ErrUnreachable, never ran.
func cttWantFailFast(t *testing.T, what string, conn call.Connection, opts call.CallOptions) {
	t.Helper()
	out, took, err := cttCall(conn, "Name", nil, opts)
	if err == nil {
		t.Fatalf("%s: got reply %q, want ErrUnreachable", what, out)
	}
	cbWantErr(t, what, err, call.ErrUnreachable, true)
	if took != 0 {
		t.Errorf("%s: failed after %v of fake time, want at once", what, took)
	}
}

// cttNominal is the default backoff's delay before retry k (0-based), before jitter.
func cttNominal(k int) time.Duration {
	if k == 0 {
		return 0
	}
	d := float64(cttBase)
	for range k - 1 {
		d *= cttFactor
		if d >= float64(cttMax) {
			return cttMax
		}
	}
	return time.Duration(d)
}

// cttCheckBackoff checks that the intervals between consecutive times follow the default
// backoff: the first is zero (the fast first retry), interval k is within ±20 % of its nominal
// value, none exceeds the jittered cap, and the delays are jittered. It returns whether the
// intervals reached the cap.
func cttCheckBackoff(t *testing.T, what string, times []time.Time) (capped bool) {
	t.Helper()
	jittered := 0
	for k := 1; k < len(times); k++ {
		iv := times[k].Sub(times[k-1])
		nom := cttNominal(k - 1)
		lo := time.Duration(float64(nom)*(1-cttJitter)) - time.Millisecond
		hi := time.Duration(float64(nom)*(1+cttJitter)) + time.Millisecond
		switch {
		case k == 1 && iv != 0:
			t.Errorf("%s: first retry %v after the first attempt, want immediate", what, iv)
		case k > 1 && (iv < lo || iv > hi):
			t.Errorf("%s: interval %d is %v, want %v ±20%% (%v..%v)", what, k-1, iv, nom, lo, hi)
		}
		if iv > time.Duration(float64(cttMax)*(1+cttJitter))+time.Millisecond {
			t.Errorf("%s: interval %d is %v, above the jittered cap", what, k-1, iv)
		}
		if nom == cttMax {
			capped = true
		}
		if nom > 0 && (iv < nom*995/1000 || iv > nom*1005/1000) {
			jittered++
		}
	}
	if len(times) > 6 && jittered == 0 {
		t.Errorf("%s: every interval is within 0.5%% of its nominal value: no jitter (%v)", what, times)
	}
	if t.Failed() {
		t.Logf("%s: attempts at %v", what, times)
	}
	return capped
}

// --- 1. Reconnection backoff ---------------------------------------------------------------------

func TestCTReconnectBackoffDialFailures(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		ep := cttNewEndpoint("ctt://down", nil, cttFail)
		start := time.Now()
		conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{})
		synctest.Wait()
		e := cttState(t, conn, ep.Address())
		if e.State != call.EndpointFailed || !errors.Is(e.Err, call.ErrUnreachable) {
			t.Errorf("endpoint after failed dials: %v, err %v; want failed with an ErrUnreachable reason", e.State, e.Err)
		}
		time.Sleep(10 * time.Minute)
		times := ep.dialTimes()
		if len(times) == 0 || !times[0].Equal(start) {
			t.Fatalf("dials at %v; want the first at Connect (%v)", times, start)
		}
		if !cttCheckBackoff(t, "dial failures", times) {
			t.Errorf("after 10 minutes the %d dial intervals never reached the 2-minute cap: %v", len(times)-1, times)
		}
		if len(times) > 20 {
			t.Errorf("%d dials in 10 minutes, want at most 20", len(times))
		}
	})
}

// ClientOptions.Backoff is followed as given: with a negative Jitter (no jitter) the
// redials come exactly at Base, Base·Factor, ... capped at Max.
func TestCTReconnectBackoffCustomNoJitter(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		ep := cttNewEndpoint("ctt://down", nil, cttFail)
		start := time.Now()
		cttConnect(t, resolve.Constant(ep), call.ClientOptions{Backoff: call.Backoff{Base: 2 * time.Second, Factor: 2, Jitter: -1, Max: 30 * time.Second}})
		time.Sleep(100 * time.Second)
		var got []time.Duration
		for _, at := range ep.dialTimes() {
			got = append(got, at.Sub(start))
		}
		want := []time.Duration{0, 0, 2 * time.Second, 6 * time.Second, 14 * time.Second, 30 * time.Second, 60 * time.Second, 90 * time.Second}
		if !slices.Equal(got, want) {
			t.Errorf("dials at %v after Connect, want %v (Base 2s, Factor 2, Max 30s, no jitter)", got, want)
		}
	})
}

// A ready connection that is lost is redialled at once; a connection that keeps dying right
// after it is made backs off like a failing dial; once the endpoint is healthy again it
// reconnects.
func TestCTReconnectAfterLostConnection(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
		ep := cttNewEndpoint("", srv.pl, cttPass)
		conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{})
		synctest.Wait()
		cttWantState(t, conn, ep.Address(), call.EndpointReady)
		cttWantReply(t, "first call", conn, "Name", nil, call.CallOptions{}, "a")

		// A connection that has been up for a while and dies is redialled at once.
		time.Sleep(5 * time.Second)
		lost := time.Now()
		srv.kill()
		synctest.Wait()
		if times := ep.dialTimes(); len(times) != 2 || !times[1].Equal(lost) {
			t.Fatalf("dials at %v; want a second one when the connection was lost (%v)", times, lost)
		}
		cttWantState(t, conn, ep.Address(), call.EndpointReady)
		cttWantReply(t, "call after the redial", conn, "Name", nil, call.CallOptions{}, "a")

		// From now on every connection dies right after its handshake.
		time.Sleep(5 * time.Second)
		ep.setMode(cttDying)
		n0 := len(ep.dialTimes())
		lost = time.Now()
		srv.kill()
		synctest.Wait()
		cttWantState(t, conn, ep.Address(), call.EndpointFailed)
		cttWantFailFast(t, "call while the connection flaps", conn, call.CallOptions{})
		time.Sleep(2 * time.Minute)
		times := ep.dialTimes()[n0:]
		if len(times) == 0 || !times[0].Equal(lost) {
			t.Fatalf("dials at %v; want the first at once when the connection was lost (%v)", times, lost)
		}
		cttCheckBackoff(t, "connections dying after the handshake", times)
		if len(times) < 5 || len(times) > 15 {
			t.Errorf("%d dials in 2 minutes of dying connections, want 5 to 15 (a backoff, not a loop)", len(times))
		}

		// Healthy again: the next redial (at most the current backoff later) sticks.
		ep.setMode(cttPass)
		time.Sleep(3 * time.Minute)
		cttWantState(t, conn, ep.Address(), call.EndpointReady)
		cttWantReply(t, "call after recovery", conn, "Name", nil, call.CallOptions{}, "a")
	})
}

// --- 2. Resolver retry ---------------------------------------------------------------------------

// cttResolver is a non-constant resolver answering with answer(ctx, n, version) on its n-th call
// (from 0), recording when it is called.
type cttResolver struct {
	answer func(ctx context.Context, n int, v *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error)

	mu    sync.Mutex
	calls []time.Time
}

func (r *cttResolver) IsConstant() bool { return false }

func (r *cttResolver) Resolve(ctx context.Context, v *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
	r.mu.Lock()
	n := len(r.calls)
	r.calls = append(r.calls, time.Now())
	r.mu.Unlock()
	return r.answer(ctx, n, v)
}

func (r *cttResolver) times() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.calls...)
}

// cttBlockResolve is the answer of a resolver that has nothing newer: it blocks until ctx ends.
func cttBlockResolve(ctx context.Context) ([]endpoint.Endpoint, *resolve.Version, error) {
	<-ctx.Done()
	return nil, nil, ctx.Err()
}

var errCTTResolver = errors.New("ctt: resolver down")

// cttWithin checks that d is within ±20 % of nom.
func cttWithin(t *testing.T, what string, d, nom time.Duration) {
	t.Helper()
	lo := time.Duration(float64(nom)*(1-cttJitter)) - time.Millisecond
	hi := time.Duration(float64(nom)*(1+cttJitter)) + time.Millisecond
	if d < lo || d > hi {
		t.Errorf("%s: %v, want %v ±20%% (%v..%v)", what, d, nom, lo, hi)
	}
}

func TestCTResolverRetry(t *testing.T) {
	// Four failures, then a set: the retries back off from 1s; calls fail fast meanwhile
	// (WaitForReady calls wait), and the set is used once it arrives.
	t.Run("fails then succeeds", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			const failures = 4
			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			r := &cttResolver{answer: func(ctx context.Context, n int, _ *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
				switch {
				case n < failures:
					return nil, nil, errCTTResolver
				case n == failures:
					return []endpoint.Endpoint{srv.pl}, &resolve.Version{Opaque: "1"}, nil
				}
				return cttBlockResolve(ctx)
			}}
			conn := cttConnect(t, r, call.ClientOptions{})
			synctest.Wait()
			st := cttStatus(t, conn)
			if st.Resolved || !errors.Is(st.ResolveErr, errCTTResolver) {
				t.Errorf("status after the first failure: Resolved %v, ResolveErr %v; want false and the resolver's error", st.Resolved, st.ResolveErr)
			}
			cttWantFailFast(t, "call while the resolver fails", conn, call.CallOptions{})
			ctx := cbCtx(t, time.Minute)
			waiting := cbGo(ctx, conn, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})

			time.Sleep(15 * time.Second)
			times := r.times()
			if len(times) != failures+2 {
				t.Fatalf("resolver called at %v; want %d calls (%d failures, a success, a blocked call)", times, failures+2, failures)
			}
			for k := range failures {
				cttWithin(t, "gap after failure "+strconv.Itoa(k+1), times[k+1].Sub(times[k]), cttNominal(k+1))
			}
			// The first versioned Resolve follows the first success at once: it blocks.
			if gap := times[failures+1].Sub(times[failures]); gap != 0 {
				t.Errorf("next Resolve %v after the success, want at once", gap)
			}
			res := cbAwait(t, "WaitForReady call", waiting, time.Minute)
			if res.err != nil || string(res.out) != "a" {
				t.Fatalf("WaitForReady call: got %q, %v; want \"a\"", res.out, res.err)
			}
			if !res.at.Equal(times[failures]) {
				t.Errorf("WaitForReady call returned at %v, want when the resolver succeeded (%v)", res.at, times[failures])
			}
			st = cttStatus(t, conn)
			if !st.Resolved || st.ResolveErr != nil {
				t.Errorf("status after the success: Resolved %v, ResolveErr %v; want true, nil", st.Resolved, st.ResolveErr)
			}
			cttWantReply(t, "call after the resolver succeeded", conn, "Name", nil, call.CallOptions{}, "a")

			time.Sleep(time.Minute)
			if n := len(r.times()); n != failures+2 {
				t.Errorf("resolver called %d times, want still %d while its answer blocks", n, failures+2)
			}
		})
	})

	// A good set, then errors: the set is kept (calls keep working) and retries back off.
	t.Run("errors after a good set", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			const failures = 4
			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			r := &cttResolver{answer: func(ctx context.Context, n int, _ *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
				switch {
				case n == 0:
					return []endpoint.Endpoint{srv.pl}, &resolve.Version{Opaque: "1"}, nil
				case n <= failures:
					return nil, nil, errCTTResolver
				}
				return cttBlockResolve(ctx)
			}}
			conn := cttConnect(t, r, call.ClientOptions{})
			synctest.Wait()
			cttWantReply(t, "call after the first set", conn, "Name", nil, call.CallOptions{}, "a")
			time.Sleep(500 * time.Millisecond)
			st := cttStatus(t, conn)
			if !errors.Is(st.ResolveErr, errCTTResolver) {
				t.Errorf("ResolveErr after a failure = %v, want the resolver's error", st.ResolveErr)
			}
			cttWantState(t, conn, srv.pl.Address(), call.EndpointReady)
			cttWantReply(t, "call while the resolver fails", conn, "Name", nil, call.CallOptions{}, "a")

			time.Sleep(15 * time.Second)
			times := r.times()
			if len(times) != failures+2 {
				t.Fatalf("resolver called at %v; want %d calls", times, failures+2)
			}
			if gap := times[1].Sub(times[0]); gap != 0 {
				t.Errorf("second Resolve %v after the first, want at once (it is the first versioned one)", gap)
			}
			for k := 1; k <= failures; k++ {
				cttWithin(t, "gap after failure "+strconv.Itoa(k), times[k+1].Sub(times[k]), cttNominal(k))
			}
			cttWantReply(t, "call after the retries", conn, "Name", nil, call.CallOptions{}, "a")
		})
	})

	// "Ask again after a delay": the same version again is re-asked after the backoff base,
	// not at once, and still re-asked.
	t.Run("same version", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			r := &cttResolver{answer: func(context.Context, int, *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
				return []endpoint.Endpoint{srv.pl}, &resolve.Version{Opaque: "1"}, nil
			}}
			conn := cttConnect(t, r, call.ClientOptions{})
			time.Sleep(time.Minute)
			times := r.times()
			if len(times) < 40 || len(times) > 77 {
				t.Errorf("resolver answering the same version called %d times in a minute, want one every 0.8s to 1.2s", len(times))
			}
			if len(times) > 1 {
				if gap := times[1].Sub(times[0]); gap != 0 {
					t.Errorf("second Resolve %v after the first, want at once (it is the first versioned one)", gap)
				}
			}
			for k := 2; k < len(times); k++ {
				cttWithin(t, "gap "+strconv.Itoa(k-1)+" after the same version", times[k].Sub(times[k-1]), cttBase)
			}
			cttWantReply(t, "call", conn, "Name", nil, call.CallOptions{}, "a")
		})
	})

	// A misbehaving resolver answering a new version at once every time is called at most
	// every 100ms.
	t.Run("new version every time", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			r := &cttResolver{answer: func(_ context.Context, n int, _ *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
				return []endpoint.Endpoint{srv.pl}, &resolve.Version{Opaque: strconv.Itoa(n + 1)}, nil
			}}
			conn := cttConnect(t, r, call.ClientOptions{})
			time.Sleep(time.Minute)
			times := r.times()
			if len(times) < 2 || len(times) > 602 { // 600 spaced calls, plus the first two at once
				t.Errorf("resolver called %d times in a minute, want at most 10 a second", len(times))
			}
			// The first versioned Resolve follows the unversioned one at once; every answer
			// to a versioned Resolve that comes back at once spaces the next by 100ms.
			if len(times) > 1 && times[1] != times[0] {
				t.Errorf("first versioned Resolve came %v after the first, want at once", times[1].Sub(times[0]))
			}
			for k := 2; k < len(times); k++ {
				if gap := times[k].Sub(times[k-1]); gap < 100*time.Millisecond {
					t.Fatalf("Resolve %d came %v after the previous one, want at least 100ms", k, gap)
				}
			}
			cttWantReply(t, "call", conn, "Name", nil, call.CallOptions{}, "a")
		})
	})
}

// --- 3. Calls wait while endpoints are connecting ------------------------------------------------

func TestCTCallsWaitWhileConnecting(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
		ep := cttNewEndpoint("", srv.pl, cttBlock)
		conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{})
		synctest.Wait()
		cttWantState(t, conn, ep.Address(), call.EndpointConnecting)

		start := time.Now()
		long := cbGo(cbCtx(t, 5*time.Second), conn, cbKey("Name"), nil, call.CallOptions{})
		short := cbGo(cbCtx(t, time.Second), conn, cbKey("Name"), nil, call.CallOptions{})
		time.Sleep(2 * time.Second)
		select {
		case r := <-long:
			t.Fatalf("call with a 5s deadline returned before the dial was released: %q, %v", r.out, r.err)
		default:
		}
		r := cbAwait(t, "call with a 1s deadline", short, time.Minute)
		cbWantErr(t, "call with a 1s deadline", r.err, context.DeadlineExceeded, true)
		if took := r.at.Sub(start); took != time.Second {
			t.Errorf("call with a 1s deadline returned after %v, want exactly 1s", took)
		}

		ep.setMode(cttPass)
		r = cbAwait(t, "call with a 5s deadline", long, time.Minute)
		if r.err != nil || string(r.out) != "a" {
			t.Fatalf("call with a 5s deadline: got %q, %v; want \"a\"", r.out, r.err)
		}
		if took := r.at.Sub(start); took != 2*time.Second {
			t.Errorf("call with a 5s deadline returned after %v, want 2s (when the dial was released)", took)
		}
		if n := len(ep.dialTimes()); n != 1 {
			t.Errorf("%d dials, want 1", n)
		}
	})
}

// --- 4. Fail fast --------------------------------------------------------------------------------

func TestCTFailFast(t *testing.T) {
	t.Run("every endpoint failed", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			a := cttNewEndpoint("ctt://a", nil, cttFail)
			b := cttNewEndpoint("ctt://b", nil, cttFail)
			conn := cttConnect(t, resolve.Constant(a, b), call.ClientOptions{})
			synctest.Wait()
			st := cttStatus(t, conn)
			if n := ctCount(st, call.EndpointFailed); n != 2 {
				t.Fatalf("%d endpoints failed, want 2: %+v", n, st)
			}
			cttWantFailFast(t, "call with every endpoint failed", conn, call.CallOptions{})
			time.Sleep(3 * time.Second) // between redials too
			cttWantFailFast(t, "call 3s later", conn, call.CallOptions{})
		})
	})

	t.Run("wait for ready", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			ep := cttNewEndpoint("", srv.pl, cttFail)
			conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{})
			synctest.Wait()
			cttWantState(t, conn, ep.Address(), call.EndpointFailed)

			// Waiting for readiness ends at the deadline if no endpoint comes up.
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})
			cancel()
			if err == nil {
				t.Fatalf("WaitForReady call with a down endpoint: got %q, want a deadline error", out)
			}
			cbWantErr(t, "WaitForReady call with a 2s deadline", err, context.DeadlineExceeded, true)
			if took := time.Since(start); took != 2*time.Second {
				t.Errorf("WaitForReady call with a 2s deadline returned after %v, want exactly 2s", took)
			}

			// It succeeds once the endpoint comes up.
			waiting := cbGo(cbCtx(t, time.Minute), conn, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})
			time.Sleep(3 * time.Second)
			up := time.Now()
			ep.setMode(cttPass)
			r := cbAwait(t, "WaitForReady call", waiting, time.Minute)
			if r.err != nil || string(r.out) != "a" {
				t.Fatalf("WaitForReady call: got %q, %v; want \"a\"", r.out, r.err)
			}
			var connected time.Time
			for _, d := range ep.dialLog() {
				if d.mode == cttPass {
					connected = d.at
					break
				}
			}
			if connected.Before(up) || !r.at.Equal(connected) {
				t.Errorf("WaitForReady call returned at %v, want when the first dial after %v succeeded (%v)", r.at, up, connected)
			}
		})
	})

	t.Run("empty set", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			conn := cttConnect(t, resolve.Constant(), call.ClientOptions{})
			synctest.Wait()
			cttWantFailFast(t, "call with a constant empty set", conn, call.CallOptions{})

			srv := cttServe(t, "a", cttNamed("a", nil, nil), call.ServerOptions{})
			m := resolve.NewManual()
			conn = cttConnect(t, m, call.ClientOptions{})
			synctest.Wait()
			cttWantFailFast(t, "call with an empty manual set", conn, call.CallOptions{})
			start := time.Now()
			waiting := cbGo(cbCtx(t, time.Minute), conn, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})
			time.Sleep(3 * time.Second)
			m.Update(srv.pl)
			r := cbAwait(t, "WaitForReady call", waiting, time.Minute)
			if r.err != nil || string(r.out) != "a" {
				t.Fatalf("WaitForReady call: got %q, %v; want \"a\"", r.out, r.err)
			}
			if took := r.at.Sub(start); took != 3*time.Second {
				t.Errorf("WaitForReady call returned after %v, want 3s (when the set was updated)", took)
			}
		})
	})
}

// --- 5. Sharding with a flapping owner -----------------------------------------------------------

func TestCTShardedOwnerFlap(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		names := []string{"a", "b", "c"}
		var mu sync.Mutex
		seen := map[string]*[]uint64{}
		var srvs []*cttServer
		var eps []*cttEndpoint
		var reps []endpoint.Endpoint
		for _, name := range names {
			keys := new([]uint64)
			seen[name] = keys
			srv := cttServe(t, name, cttNamed(name, &mu, keys), call.ServerOptions{})
			srvs = append(srvs, srv)
			ep := cttNewEndpoint("", srv.pl, cttPass)
			eps = append(eps, ep)
			reps = append(reps, ep)
		}
		conn := cttConnect(t, resolve.Constant(reps...), call.ClientOptions{Balancer: balance.Sharded()})
		keyArgs := func(k uint64) []byte { return binary.BigEndian.AppendUint64(nil, k) }
		sharded := func(k uint64) call.CallOptions { return call.CallOptions{ShardKey: k, Sharded: true} }
		synctest.Wait()
		if n := ctCount(cttStatus(t, conn), call.EndpointReady); n != 3 {
			t.Fatalf("%d endpoints ready, want 3", n)
		}
		for k := range uint64(6) {
			cttWantReply(t, "key "+strconv.Itoa(int(k)), conn, "Shard", keyArgs(k), sharded(k), names[k%3])
		}

		// Key 1's owner is b. Its connection dies and its redial hangs: b is connecting.
		const key = 1
		owner := eps[key]
		time.Sleep(2 * time.Second)
		owner.setMode(cttBlock)
		srvs[key].kill()
		synctest.Wait()
		cttWantState(t, conn, owner.Address(), call.EndpointConnecting)
		waiting := cbGo(cbCtx(t, time.Minute), conn, cbKey("Shard"), keyArgs(key), sharded(key))
		cttWantReply(t, "key 0 while b connects", conn, "Shard", keyArgs(0), sharded(0), "a")
		cttWantReply(t, "key 2 while b connects", conn, "Shard", keyArgs(2), sharded(2), "c")
		time.Sleep(time.Second)
		select {
		case r := <-waiting:
			t.Fatalf("call with key %d returned while its owner was connecting: %q, %v", key, r.out, r.err)
		default:
		}

		// b's dial fails: the waiting call and new calls with key 1 fail as unreachable.
		failed := time.Now()
		owner.setMode(cttFail)
		r := cbAwait(t, "call waiting for b", waiting, time.Minute)
		cbWantErr(t, "call waiting for b when b failed", r.err, call.ErrUnreachable, true)
		if !r.at.Equal(failed) {
			t.Errorf("call waiting for b returned at %v, want when b failed (%v)", r.at, failed)
		}
		synctest.Wait()
		cttWantState(t, conn, owner.Address(), call.EndpointFailed)
		cttWantFailFast(t, "call with key 1 while b is down", conn, sharded(key))
		cttWantFailFast(t, "call with key 4 while b is down", conn, sharded(key+3))
		cttWantReply(t, "key 3 while b is down", conn, "Shard", keyArgs(3), sharded(3), "a")

		// b comes back: key 1 reaches it again.
		owner.setMode(cttPass)
		time.Sleep(2 * time.Second)
		cttWantState(t, conn, owner.Address(), call.EndpointReady)
		for k := range uint64(6) {
			cttWantReply(t, "key "+strconv.Itoa(int(k))+" after b is back", conn, "Shard", keyArgs(k), sharded(k), names[k%3])
		}

		mu.Lock()
		defer mu.Unlock()
		for i, name := range names {
			for _, k := range *seen[name] {
				if int(k%3) != i {
					t.Errorf("server %s ran a call with key %d, owned by %s", name, k, names[k%3])
				}
			}
		}
		if n := len(*seen["b"]); n != 4 {
			t.Errorf("b ran %d calls, want 4 (keys 1 and 4, before and after the flap)", n)
		}
	})
}

// --- 6. Go-away ----------------------------------------------------------------------------------

// A real server drains (Serve's context cancelled, positive DrainTimeout): the call it runs
// finishes there, and new calls go to the other server without failing.
func TestCTGoAwayDrainingServer(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		entered := make(chan struct{}, 1)
		release := make(chan struct{})
		hmA := cttNamed("a", nil, nil)
		hmA.Set(cbComponent, "Block", func(ctx context.Context, _ []byte) ([]byte, error) {
			entered <- struct{}{}
			select {
			case <-release:
				return []byte("a finished"), nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		})
		a := cttServe(t, "a", hmA, call.ServerOptions{DrainTimeout: 10 * time.Second})
		b := cttServe(t, "b", cttNamed("b", nil, nil), call.ServerOptions{})
		conn := cttConnect(t, resolve.Constant(a.pl, b.pl), call.ClientOptions{})
		synctest.Wait()
		if n := ctCount(cttStatus(t, conn), call.EndpointReady); n != 2 {
			t.Fatalf("%d endpoints ready, want 2", n)
		}
		time.Sleep(2 * time.Second)
		blocked := cbGo(cbCtx(t, time.Minute), conn, cbKey("Block"), nil, call.CallOptions{Balancer: crTo(a.pl.Address())})
		cbWait(t, "the handler on a", entered, time.Minute)

		// a drains: it sends a go-away and finishes the call it runs.
		goAway := time.Now()
		a.cancel()
		synctest.Wait()
		if e := cttState(t, conn, a.pl.Address()); e.State == call.EndpointReady {
			t.Fatalf("a is still ready after its go-away")
		}
		for i := range 10 {
			cttWantReply(t, "call "+strconv.Itoa(i)+" after a's go-away", conn, "Name", nil, call.CallOptions{}, "b")
		}
		select {
		case r := <-blocked:
			t.Fatalf("call running on a returned before its handler did: %q, %v", r.out, r.err)
		default:
		}
		time.Sleep(time.Second)
		close(release)
		r := cbAwait(t, "call running on a", blocked, time.Minute)
		if r.err != nil || string(r.out) != "a finished" {
			t.Errorf("call running on a during its drain: got %q, %v; want \"a finished\"", r.out, r.err)
		}
		a.stop(t)
		if took := time.Since(goAway); took != time.Second {
			t.Errorf("a's Serve returned %v after the go-away, want 1s (when its last call finished)", took)
		}
		cttWantReply(t, "call after a stopped", conn, "Name", nil, call.CallOptions{}, "b")
	})
}

// A fake server reads three calls and sends a go-away accepting only the first. The first gets
// its reply there. The two it did not accept never ran: one that may go anywhere (its balancer
// prefers the fake server while it is ready) is sent again to the other server and succeeds;
// one pinned to the fake server fails as never ran and reaches no other server. New calls go to
// the other server.
func TestCTGoAwayRefusesUnacceptedCall(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		fl := testkit.NewPipeListener("a")
		calls := make(chan uint64, 3)
		fake := make(chan error, 1)
		go func() { fake <- cttFakeGoAwayServer(fl, 3, calls) }()
		var mu sync.Mutex
		var atB []string
		var hmB call.HandlerMap
		hmB.Set(cbComponent, "Name", func(_ context.Context, args []byte) ([]byte, error) {
			mu.Lock()
			atB = append(atB, string(args))
			mu.Unlock()
			return []byte("b"), nil
		})
		b := cttServe(t, "b", &hmB, call.ServerOptions{})
		conn := cttConnect(t, resolve.Constant(fl, b.pl), call.ClientOptions{})
		synctest.Wait()
		if n := ctCount(cttStatus(t, conn), call.EndpointReady); n != 2 {
			t.Fatalf("%d endpoints ready, want 2", n)
		}

		pinned := call.CallOptions{Balancer: crTo(fl.Address())}
		preferA := call.CallOptions{Balancer: balance.Func(func(info balance.PickInfo) (balance.Member, error) {
			for _, m := range info.Ready {
				if m.Endpoint().Address() == fl.Address() {
					return m, nil
				}
			}
			if len(info.Ready) == 0 {
				return nil, balance.ErrNoMember
			}
			return info.Ready[0], nil
		})}
		var ids []uint64
		start := func(name string, opts call.CallOptions) <-chan cbResult {
			ch := cbGo(cbCtx(t, time.Minute), conn, cbKey("Name"), []byte(name), opts)
			ids = append(ids, cbWait(t, "the "+name+" CALL at the fake server", calls, time.Minute))
			return ch
		}
		accepted := start("accepted", pinned)
		refusedPinned := start("refused, pinned", pinned)
		refusedFree := start("refused, free", preferA)
		if ids[0] >= ids[1] || ids[1] >= ids[2] {
			t.Fatalf("request ids %v, want increasing in call order", ids)
		}

		goAway := time.Now()
		r := cbAwait(t, "pinned call the fake server refused", refusedPinned, time.Minute)
		if r.err == nil {
			t.Errorf("pinned call the fake server refused: got %q, want an error", r.out)
		} else if !call.NeverRan(r.err) || !errors.Is(r.err, call.ErrRefused) && !errors.Is(r.err, call.ErrUnreachable) {
			t.Errorf("pinned call the fake server refused: got %q (NeverRan %v), want ErrRefused or ErrUnreachable, never ran", r.err, call.NeverRan(r.err))
		}
		r = cbAwait(t, "free call the fake server refused", refusedFree, time.Minute)
		if r.err != nil || string(r.out) != "b" {
			t.Errorf("free call the fake server refused: got %q, %v; want it sent again to b", r.out, r.err)
		}
		if !r.at.Equal(goAway) {
			t.Errorf("free call the fake server refused ended %v after the go-away, want at once", r.at.Sub(goAway))
		}
		r = cbAwait(t, "accepted call", accepted, time.Minute)
		if r.err != nil || string(r.out) != "accepted" {
			t.Errorf("call the fake server accepted: got %q, %v; want \"accepted\"", r.out, r.err)
		}
		if err := cbWait(t, "the fake server", fake, time.Minute); err != nil {
			t.Fatalf("fake server: %v", err)
		}
		synctest.Wait()
		if e := cttState(t, conn, fl.Address()); e.State == call.EndpointReady {
			t.Fatalf("the fake server is still ready after its go-away")
		}
		for i := range 10 {
			cttWantReply(t, "call "+strconv.Itoa(i)+" after the go-away", conn, "Name", []byte("new"), call.CallOptions{}, "b")
		}
		mu.Lock()
		defer mu.Unlock()
		if want := append([]string{"refused, free"}, slices.Repeat([]string{"new"}, 10)...); !slices.Equal(atB, want) {
			t.Errorf("b ran %q, want %q", atB, want)
		}
	})
}

// cttFakeGoAwayServer accepts one connection on l and closes l. It reads n CALLs (sending their
// ids on calls), sends a GOAWAY whose last id is the first's, answers the first with
// "accepted", and reads until the client closes the connection.
func cttFakeGoAwayServer(l *testkit.PipeListener, n int, calls chan<- uint64) error {
	nc, err := l.Accept()
	l.Close()
	if err != nil {
		return err
	}
	p := testkit.NewRawPeer(nc)
	defer p.Close()
	p.SetDeadline(time.Now().Add(10 * time.Minute))
	if _, err := p.AcceptHandshake(cbServerHello()); err != nil {
		return err
	}
	var ids []uint64
	for len(ids) < n {
		f, err := p.ReadFrame()
		if err != nil {
			return err
		}
		if f.Type == testkit.TypeCall {
			ids = append(ids, f.ID)
			calls <- f.ID
		}
	}
	if err := p.WriteFrame(testkit.GoAway{LastID: ids[0], Code: testkit.CloseDrain}.Frame()); err != nil {
		return err
	}
	if err := p.Reply(ids[0], []byte("accepted")); err != nil {
		return err
	}
	for {
		f, err := p.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if f.Type == testkit.TypeCall {
			return errors.New("fake server: a CALL after the go-away")
		}
	}
}
