package call_test

// Tests of Connect's pool: its size (one connection per endpoint, a subset of the endpoints,
// several connections per endpoint), active health checks that evict, the ejection of
// endpoints whose calls fail, degraded mode, and the health signal (Status().Healthy,
// OnHealthChange). Every test runs in a testing/synctest bubble over in-memory pipes, so
// intervals are checked exactly on the bubble's fake clock. Identifiers of this file start
// with "cp".

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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

// cpEndpoint is an endpoint whose connections pass through a relay in the bubble, so that a
// test can make dials fail or wait, hold every byte in both directions without closing
// anything (a blackhole: no FIN, no RST, as in a network partition), add latency, break every
// connection, and count the PING frames that reach the server.
type cpEndpoint struct {
	inner endpoint.Endpoint
	wg    sync.WaitGroup // the relays' goroutines

	mu sync.Mutex
	// guarded by mu
	fail     bool          // dials fail with ECONNREFUSED
	gate     chan struct{} // if not nil, dials wait until it is closed
	hole     chan struct{} // if not nil, a blackhole; closed when it heals
	latency  time.Duration // added to every chunk in each direction
	dials    []time.Time
	accepted int // dials that reached the server
	pings    int // PING frames delivered to the server
	relays   map[*cpRelay]struct{}
	closed   bool
}

// cpNewEndpoint returns an endpoint dialling inner. Cleanup closes every relay and joins
// their goroutines.
func cpNewEndpoint(t *testing.T, inner endpoint.Endpoint) *cpEndpoint {
	e := &cpEndpoint{inner: inner, relays: map[*cpRelay]struct{}{}}
	t.Cleanup(e.close)
	return e
}

func (e *cpEndpoint) Address() string { return e.inner.Address() }

func (e *cpEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	e.mu.Lock()
	e.dials = append(e.dials, time.Now())
	gate := e.gate
	e.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	e.mu.Lock()
	refused := e.fail || e.closed
	e.mu.Unlock()
	if refused {
		return nil, &net.OpError{Op: "dial", Net: "cp", Err: syscall.ECONNREFUSED}
	}
	sc, err := e.inner.Dial(ctx)
	if err != nil {
		return nil, err
	}
	cc, mid := net.Pipe()
	r := &cpRelay{e: e, mid: mid, srv: sc, done: make(chan struct{})}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		cc.Close()
		mid.Close()
		sc.Close()
		return nil, &net.OpError{Op: "dial", Net: "cp", Err: syscall.ECONNREFUSED}
	}
	e.accepted++
	e.relays[r] = struct{}{}
	e.wg.Add(2)
	e.mu.Unlock()
	go r.pump(mid, sc, true)
	go r.pump(sc, mid, false)
	return cc, nil
}

// setFail makes later dials fail (true) or succeed (false).
func (e *cpEndpoint) setFail(fail bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fail = fail
}

// block makes later dials wait until unblock.
func (e *cpEndpoint) block() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gate == nil {
		e.gate = make(chan struct{})
	}
}

func (e *cpEndpoint) unblock() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gate != nil {
		close(e.gate)
		e.gate = nil
	}
}

// blackhole holds every byte of every connection, current and new, until heal.
func (e *cpEndpoint) blackhole() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.hole == nil {
		e.hole = make(chan struct{})
	}
}

// heal forwards what the blackhole held, and everything after it.
func (e *cpEndpoint) heal() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.hole != nil {
		close(e.hole)
		e.hole = nil
	}
}

func (e *cpEndpoint) setLatency(d time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.latency = d
}

// breakAll closes every connection through the endpoint, on both sides.
func (e *cpEndpoint) breakAll() {
	e.mu.Lock()
	rs := make([]*cpRelay, 0, len(e.relays))
	for r := range e.relays {
		rs = append(rs, r)
	}
	e.mu.Unlock()
	for _, r := range rs {
		r.close()
	}
}

func (e *cpEndpoint) close() {
	e.mu.Lock()
	e.closed = true
	if e.hole != nil {
		close(e.hole)
		e.hole = nil
	}
	if e.gate != nil {
		close(e.gate)
		e.gate = nil
	}
	e.mu.Unlock()
	e.breakAll()
	e.wg.Wait()
}

func (e *cpEndpoint) dialTimes() []time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.dials)
}

// open returns the number of connections through the endpoint that are open.
func (e *cpEndpoint) open() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.relays)
}

// counts returns the dials so far, those that reached the server, and the PING frames
// delivered to it.
func (e *cpEndpoint) counts() (dials, accepted, pings int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.dials), e.accepted, e.pings
}

// pass waits while the endpoint is blackholed. It returns false if r closed meanwhile.
func (e *cpEndpoint) pass(r *cpRelay) bool {
	for {
		e.mu.Lock()
		hole := e.hole
		e.mu.Unlock()
		if hole == nil {
			select {
			case <-r.done:
				return false
			default:
				return true
			}
		}
		select {
		case <-hole:
		case <-r.done:
			return false
		}
	}
}

// cpRelay is one connection through a cpEndpoint: the relay's end of the client's pipe and
// its connection to the server.
type cpRelay struct {
	e        *cpEndpoint
	mid, srv net.Conn
	once     sync.Once
	done     chan struct{}
}

func (r *cpRelay) close() {
	r.once.Do(func() {
		close(r.done)
		r.mid.Close()
		r.srv.Close()
		r.e.mu.Lock()
		delete(r.e.relays, r)
		r.e.mu.Unlock()
	})
}

// pump forwards src to dst. A blackhole holds the chunk it read last and the end of src.
// Upstream (client to server), it counts the PING frames it delivers.
func (r *cpRelay) pump(src, dst net.Conn, upstream bool) {
	defer r.e.wg.Done()
	defer r.close()
	scan := cpFrameScanner{count: testkit.TypePing}
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if !r.e.pass(r) {
			return
		}
		if n > 0 {
			r.e.mu.Lock()
			if upstream {
				r.e.pings += scan.feed(buf[:n])
			}
			lat := r.e.latency
			r.e.mu.Unlock()
			if lat > 0 {
				time.Sleep(lat)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// cpFrameScanner follows a client's byte stream (a hello, then frames) and counts its frames
// of one type.
type cpFrameScanner struct {
	count byte // the frame type counted
	buf   []byte
	hello bool // the hello has been skipped
}

// feed adds b to the stream and returns the number of frames of the counted type it completes.
func (s *cpFrameScanner) feed(b []byte) int {
	s.buf = append(s.buf, b...)
	seen := 0
	for {
		if !s.hello {
			if len(s.buf) < testkit.HelloPrefixSize {
				return seen
			}
			n := testkit.HelloPrefixSize + testkit.HelloRestLen(s.buf)
			if len(s.buf) < n {
				return seen
			}
			s.buf, s.hello = s.buf[n:], true
			continue
		}
		if len(s.buf) < testkit.HeaderSize {
			return seen
		}
		f, n := testkit.ParseFrameHeader(s.buf)
		total := testkit.HeaderSize + int(n)
		if len(s.buf) < total {
			return seen
		}
		if f.Type == s.count {
			seen++
		}
		s.buf = s.buf[total:]
	}
}

// cpBackend is a server in the bubble and the cpEndpoint that reaches it. Its "Name" method
// answers its name (or fails while failing is set), "Block" blocks until released or
// cancelled, and "Break" closes the server's connections under its caller.
type cpBackend struct {
	name     string
	srv      *cttServer
	ep       *cpEndpoint
	runs     atomic.Int64 // "Name" calls run
	failing  atomic.Bool
	entered  chan struct{} // one value per "Block" call that started
	release  chan struct{}
	released sync.Once
}

// cpNewBackend serves a backend named name with sopts. Cleanup stops it.
func cpNewBackend(t *testing.T, name string, sopts call.ServerOptions) *cpBackend {
	t.Helper()
	b := &cpBackend{name: name, entered: make(chan struct{}, 256), release: make(chan struct{})}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) {
		b.runs.Add(1)
		if b.failing.Load() {
			return nil, errors.New("cp: " + name + " is failing")
		}
		return []byte(name), nil
	})
	hm.Set(cbComponent, "Block", func(ctx context.Context, _ []byte) ([]byte, error) {
		b.entered <- struct{}{}
		select {
		case <-b.release:
			return []byte(name), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	hm.Set(cbComponent, "Break", func(ctx context.Context, _ []byte) ([]byte, error) {
		b.srv.kill()
		<-ctx.Done()
		return nil, ctx.Err()
	})
	b.srv = cttServe(t, name, &hm, sopts)
	b.ep = cpNewEndpoint(t, b.srv.pl)
	t.Cleanup(b.releaseAll)
	return b
}

func (b *cpBackend) releaseAll() { b.released.Do(func() { close(b.release) }) }

func (b *cpBackend) addr() string { return b.ep.Address() }

// cpBackends serves one backend per name with default options.
func cpBackends(t *testing.T, names ...string) []*cpBackend {
	t.Helper()
	var bs []*cpBackend
	for _, n := range names {
		bs = append(bs, cpNewBackend(t, n, call.ServerOptions{}))
	}
	return bs
}

// cpEndpoints returns the endpoints of bs.
func cpEndpoints(bs ...*cpBackend) []endpoint.Endpoint {
	var eps []endpoint.Endpoint
	for _, b := range bs {
		eps = append(eps, b.ep)
	}
	return eps
}

// cpConnect connects to the backends' endpoints (a constant resolver) with opts.
func cpConnect(t *testing.T, opts call.ClientOptions, bs ...*cpBackend) call.Connection {
	t.Helper()
	return cttConnect(t, resolve.Constant(cpEndpoints(bs...)...), opts)
}

// cpByAddr returns the status of every endpoint of st by address.
func cpByAddr(st call.ConnectionStatus) map[string]call.EndpointStatus {
	m := map[string]call.EndpointStatus{}
	for _, e := range st.Endpoints {
		m[e.Address] = e
	}
	return m
}

// cpRuns returns how many "Name" calls each backend ran.
func cpRuns(bs ...*cpBackend) []int64 {
	var out []int64
	for _, b := range bs {
		out = append(out, b.runs.Load())
	}
	return out
}

// cpCalls makes n "Name" calls that must succeed at once, and returns how many each backend
// of bs ran.
func cpCalls(t *testing.T, what string, conn call.Connection, n int, opts call.CallOptions, bs ...*cpBackend) []int64 {
	t.Helper()
	before := cpRuns(bs...)
	for i := range n {
		out, took, err := cttCall(conn, "Name", nil, opts)
		if err != nil {
			t.Fatalf("%s: call %d: %v", what, i, err)
		}
		if took != 0 {
			t.Errorf("%s: call %d (answered by %s) took %v of fake time, want 0", what, i, out, took)
		}
	}
	after := cpRuns(bs...)
	for i := range after {
		after[i] -= before[i]
	}
	return after
}

// cpFail makes n calls of "Name" pinned to b that must fail with ErrRemote (b is failing).
func cpFail(t *testing.T, conn call.Connection, b *cpBackend, n int) {
	t.Helper()
	b.failing.Store(true)
	defer b.failing.Store(false)
	for i := range n {
		_, _, err := cttCall(conn, "Name", nil, call.CallOptions{Balancer: crTo(b.addr())})
		if !errors.Is(err, call.ErrRemote) {
			t.Fatalf("failing call %d to %s: %v, want ErrRemote", i, b.name, err)
		}
	}
}

// cpSleepUntil sleeps until the fake time at, then waits for the bubble to settle.
func cpSleepUntil(at time.Time) {
	time.Sleep(time.Until(at))
	synctest.Wait()
}

// --- 1. Pool sizing ------------------------------------------------------------------------------

// Pool options that have no meaning are rejected by Connect, which then starts nothing.
func TestCPOptionsInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		pool call.PoolOptions
	}{
		{"negative size", call.PoolOptions{Size: -1}},
		{"negative min healthy", call.PoolOptions{MinHealthy: -1}},
		{"negative fraction", call.PoolOptions{MaxEjectedFraction: -0.1}},
		{"fraction above 1", call.PoolOptions{MaxEjectedFraction: 1.5}},
		{"NaN fraction", call.PoolOptions{MaxEjectedFraction: math.NaN()}},
		{"negative ejection time", call.PoolOptions{EjectionTime: -time.Second}},
		{"negative max ejection time", call.PoolOptions{MaxEjectionTime: -time.Second}},
		{"negative health check timeout", call.PoolOptions{HealthCheckTimeout: -time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := call.Connect(cbCtx(t, 10*time.Second), resolve.Constant(), call.ClientOptions{Logger: cbQuiet, Pool: tc.pool})
			if err == nil {
				conn.Close()
				t.Fatalf("Connect with %+v succeeded, want an error", tc.pool)
			}
			if !strings.HasPrefix(err.Error(), "call: PoolOptions.") {
				t.Errorf("Connect with %+v: %q, want an error naming the PoolOptions field", tc.pool, err)
			}
		})
	}
}

// Size 0: one connection per endpoint.
func TestCPSizeDefault(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		conn := cpConnect(t, call.ClientOptions{}, bs...)
		synctest.Wait()
		st := cttStatus(t, conn)
		if st.Wanted != 3 {
			t.Errorf("Wanted = %d, want 3", st.Wanted)
		}
		for _, b := range bs {
			e := cpByAddr(st)[b.addr()]
			if e.State != call.EndpointReady || e.Wanted != 1 || e.Connections != 1 || !e.Healthy {
				t.Errorf("%s: %v, Wanted %d, Connections %d, Healthy %v; want ready, 1, 1, true", b.name, e.State, e.Wanted, e.Connections, e.Healthy)
			}
			if dials, accepted, _ := b.ep.counts(); dials != 1 || accepted != 1 {
				t.Errorf("%s: %d dials, %d reached the server; want 1 and 1", b.name, dials, accepted)
			}
		}
		if got := cpCalls(t, "round robin", conn, 30, call.CallOptions{}, bs...); !slices.Equal(got, []int64{10, 10, 10}) {
			t.Errorf("30 calls ran %v on a, b, c; want 10 each", got)
		}
	})
}

// Size 2 over 5 endpoints: exactly two are connected and take calls; the others are idle.
// The choice is kept across updates of the set that keep the chosen endpoints (even as new
// endpoints arrive), and moves when one of them is removed.
func TestCPSubset(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n")
		m := resolve.NewManual(cpEndpoints(bs[:5]...)...)
		conn := cttConnect(t, m, call.ClientOptions{Pool: call.PoolOptions{Size: 2}})
		synctest.Wait()

		chosen := cpCheckSubset(t, "first set", conn, 2, bs[:5])
		if t.Failed() {
			return
		}
		var in []*cpBackend
		for _, b := range bs {
			if slices.Contains(chosen, b.addr()) {
				in = append(in, b)
			}
		}
		got := cpCalls(t, "calls over the subset", conn, 20, call.CallOptions{}, bs[:5]...)
		for i, b := range bs[:5] {
			want := int64(0)
			if slices.Contains(chosen, b.addr()) {
				want = 10
			}
			if got[i] != want {
				t.Errorf("%s ran %d of 20 calls, want %d", b.name, got[i], want)
			}
		}

		// Updates that add endpoints (each new one with its own random rank, so some would
		// win a fresh choice) and remove an idle one keep the choice and its connections.
		var kept []endpoint.Endpoint
		removedIdle := false
		for _, b := range bs[:5] {
			if !removedIdle && !slices.Contains(chosen, b.addr()) {
				removedIdle = true
				continue
			}
			kept = append(kept, b.ep)
		}
		var keep []endpoint.Endpoint
		for round := range 3 {
			keep = append(slices.Clone(kept), cpEndpoints(bs[5+3*round:8+3*round]...)...)
			time.Sleep(time.Second)
			m.Update(keep...)
			synctest.Wait()
			if again := cpCheckSubset(t, fmt.Sprint("update ", round), conn, 2, nil); !slices.Equal(again, chosen) {
				t.Errorf("subset after update %d, which kept it: %v, want %v", round, again, chosen)
			}
		}
		for _, b := range in {
			if dials, _, _ := b.ep.counts(); dials != 1 {
				t.Errorf("%s was dialled %d times, want once (its connection is kept)", b.name, dials)
			}
		}

		// Removing a chosen endpoint moves its connection to another endpoint; the removed
		// one drains and leaves.
		time.Sleep(time.Second)
		var rest []endpoint.Endpoint
		for _, ep := range keep {
			if ep.Address() != in[0].addr() {
				rest = append(rest, ep)
			}
		}
		m.Update(rest...)
		synctest.Wait()
		after := cpCheckSubset(t, "after removing a chosen endpoint", conn, 2, nil)
		if slices.Contains(after, in[0].addr()) || !slices.Contains(after, in[1].addr()) {
			t.Errorf("subset after removing %s: %v; want %s kept and another endpoint added", in[0].name, after, in[1].name)
		}
		if _, ok := cpByAddr(cttStatus(t, conn))[in[0].addr()]; ok {
			t.Errorf("removed endpoint %s is still listed after its connection drained", in[0].name)
		}
	})
}

// cpCheckSubset checks that exactly size endpoints of conn are ready with one connection
// each, and every other endpoint is idle with nothing wanted; if among is not nil, the status
// lists exactly its endpoints. It returns the addresses of the ready ones.
func cpCheckSubset(t *testing.T, what string, conn call.Connection, size int, among []*cpBackend) []string {
	t.Helper()
	st := cttStatus(t, conn)
	if st.Wanted != size {
		t.Errorf("%s: Wanted = %d, want %d", what, st.Wanted, size)
	}
	if among != nil && len(st.Endpoints) != len(among) {
		t.Errorf("%s: %d endpoints listed, want %d", what, len(st.Endpoints), len(among))
	}
	var ready []string
	for _, e := range st.Endpoints {
		switch {
		case e.State == call.EndpointReady && e.Wanted == 1 && e.Connections == 1:
			ready = append(ready, e.Address)
		case e.State == call.EndpointIdle && e.Wanted == 0 && e.Connections == 0:
		default:
			t.Errorf("%s: endpoint %s is %v with Wanted %d and %d connections; want ready with 1 and 1, or idle with 0 and 0", what, e.Address, e.State, e.Wanted, e.Connections)
		}
	}
	if len(ready) != size {
		t.Errorf("%s: %d endpoints ready (%v), want %d", what, len(ready), ready, size)
	}
	return ready
}

// Different clients choose different subsets (a random order per client).
func TestCPSubsetRandom(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c", "d", "e")
		seen := map[string]int{}
		for range 12 {
			conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: 2}}, bs...)
			synctest.Wait()
			seen[strings.Join(cpCheckSubset(t, "a client", conn, 2, bs), ",")]++
			conn.Close()
		}
		if len(seen) < 2 {
			t.Errorf("12 clients all chose the subset %v; want a random choice per client", seen)
		}
	})
}

// Size above the number of endpoints: several connections to each, spread evenly.
func TestCPSeveralPerEndpoint(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size, eps int
		want      []int
	}{
		{"4 over 2", 4, 2, []int{2, 2}},
		{"3 over 1", 3, 1, []int{3}},
		{"5 over 2", 5, 2, nil}, // 3 and 2, in either order
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				// Each server connection runs at most 2 calls at once.
				var bs []*cpBackend
				for _, name := range []string{"a", "b"}[:tc.eps] {
					bs = append(bs, cpNewBackend(t, name, call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: 2}}))
				}
				conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: tc.size}}, bs...)
				synctest.Wait()
				st := cttStatus(t, conn)
				if st.Wanted != tc.size {
					t.Errorf("Wanted = %d, want %d", st.Wanted, tc.size)
				}
				var got []int
				for _, b := range bs {
					e := cpByAddr(st)[b.addr()]
					_, accepted, _ := b.ep.counts()
					if e.Connections != e.Wanted || accepted != e.Connections || e.State != call.EndpointReady {
						t.Errorf("%s: %v with %d connections, %d wanted, %d accepted by the server; want ready and all equal", b.name, e.State, e.Connections, e.Wanted, accepted)
					}
					got = append(got, e.Connections)
				}
				if tc.want == nil {
					slices.Sort(got)
					tc.want = []int{2, 3}
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("connections per endpoint %v, want %v", got, tc.want)
				}

				// Calls to one endpoint go to its connection with the fewest calls: 2 blocking
				// calls per connection all run (a connection takes 2 at once).
				b := bs[0]
				n := cpByAddr(st)[b.addr()].Connections
				var chans []<-chan cbResult
				for range 2 * n {
					chans = append(chans, cbGo(cbCtx(t, time.Minute), conn, cbKey("Block"), nil, call.CallOptions{Balancer: crTo(b.addr())}))
					// A blocked handler leaves the server's reader after InlineHandlerDuration
					// (50µs) of fake time, which passes only while the test sleeps.
					time.Sleep(time.Millisecond)
				}
				if e := cttState(t, conn, b.addr()); e.InFlight != 2*n {
					t.Errorf("%s: InFlight = %d with %d blocked calls, want %d", b.name, e.InFlight, 2*n, 2*n)
				}
				if running := len(b.entered); running != 2*n {
					t.Errorf("%s: %d of %d blocked calls run, want all (2 on each of %d connections)", b.name, running, 2*n, n)
				}
				b.releaseAll()
				for i, ch := range chans {
					if r := cbAwait(t, "blocked call", ch, time.Minute); r.err != nil {
						t.Errorf("blocked call %d: %v", i, r.err)
					}
				}
				if dials, _, _ := b.ep.counts(); dials != n {
					t.Errorf("%s dialled %d times, want %d", b.name, dials, n)
				}
			})
		})
	}
}

// In subset mode an endpoint whose dials fail is replaced by an idle one.
func TestCPSubsetReplacesFailing(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: 2}}, bs...)
		synctest.Wait()
		chosen := cpCheckSubset(t, "start", conn, 2, bs)
		if t.Failed() {
			return
		}
		var bad, idle *cpBackend
		for _, b := range bs {
			switch {
			case !slices.Contains(chosen, b.addr()):
				idle = b
			case bad == nil:
				bad = b
			}
		}
		// bad's connection breaks after a while and every redial fails.
		time.Sleep(5 * time.Second)
		bad.ep.setFail(true)
		bad.ep.breakAll()
		synctest.Wait()
		st := cttStatus(t, conn)
		e, i := cpByAddr(st)[bad.addr()], cpByAddr(st)[idle.addr()]
		if e.Wanted != 0 || e.Connections != 0 {
			t.Errorf("failing %s: Wanted %d, Connections %d; want 0 and 0", bad.name, e.Wanted, e.Connections)
		}
		if e.Err == nil || !errors.Is(e.Err, call.ErrUnreachable) {
			t.Errorf("failing %s: Err = %v, want its dial failure", bad.name, e.Err)
		}
		if i.State != call.EndpointReady || i.Wanted != 1 || i.Connections != 1 {
			t.Errorf("idle %s after %s failed: %v, Wanted %d, Connections %d; want ready, 1, 1", idle.name, bad.name, i.State, i.Wanted, i.Connections)
		}
		if st.Wanted != 2 {
			t.Errorf("Wanted = %d, want 2", st.Wanted)
		}
		got := cpCalls(t, "calls after the replacement", conn, 10, call.CallOptions{}, bad, idle)
		if got[0] != 0 || got[1] != 5 {
			t.Errorf("10 calls ran %d on failing %s and %d on %s, want 0 and 5", got[0], bad.name, got[1], idle.name)
		}
	})
}

// With every endpoint down, subset mode redials with the backoff: no more dials than a pool
// that keeps one connection per endpoint (RELIABILITY.md scenario 19: no reconnect storm).
func TestCPSubsetAllDownBackoff(t *testing.T) {
	for _, size := range []int{0, 1, 2} {
		t.Run(fmt.Sprint("size ", size), func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				var eps []endpoint.Endpoint
				var cps []*cpEndpoint
				for _, name := range []string{"a", "b", "c"} {
					e := cpNewEndpoint(t, testkit.NewPipeListener(name))
					e.setFail(true)
					cps = append(cps, e)
					eps = append(eps, e)
				}
				cttConnect(t, resolve.Constant(eps...), call.ClientOptions{Pool: call.PoolOptions{Size: size}})
				time.Sleep(10 * time.Minute)
				total := 0
				for _, e := range cps {
					d, _, _ := e.counts()
					total += d
				}
				// One link backing off from 1s to 2 minutes dials at most 20 times in 10
				// minutes (see TestCTReconnectBackoffDialFailures); three endpoints, 60.
				if total > 60 {
					t.Errorf("%d dials in 10 minutes to 3 endpoints that are down, want at most 60", total)
				}
				t.Logf("size %d: %d dials in 10 minutes", size, total)
			})
		})
	}
}

// A balancer that picks an idle endpoint (a shard's owner) makes the pool connect to it; the
// call waits for the connection, up to its deadline.
func TestCPDemandIdle(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: 1}, Balancer: balance.Sharded()}, bs...)
		synctest.Wait()
		chosen := cpCheckSubset(t, "start", conn, 1, bs)
		if t.Failed() {
			return
		}
		// Sharded maps key k to member k mod 3 of the set in address order (a, b, c).
		var key uint64
		var owner *cpBackend
		for i, b := range bs {
			if !slices.Contains(chosen, b.addr()) {
				key, owner = uint64(i), b
				break
			}
		}
		owner.ep.block()
		start := time.Now()
		short := cbGo(cbCtx(t, time.Second), conn, cbKey("Name"), nil, call.CallOptions{ShardKey: key, Sharded: true})
		long := cbGo(cbCtx(t, 5*time.Second), conn, cbKey("Name"), nil, call.CallOptions{ShardKey: key, Sharded: true})
		synctest.Wait()
		if e := cttState(t, conn, owner.addr()); e.State != call.EndpointConnecting || e.Wanted != 1 {
			t.Errorf("idle owner %s after a call picked it: %v with Wanted %d; want connecting with 1", owner.name, e.State, e.Wanted)
		}
		r := cbAwait(t, "call with a 1s deadline", short, time.Minute)
		cbWantErr(t, "call with a 1s deadline to a connecting owner", r.err, context.DeadlineExceeded, true)
		if took := r.at.Sub(start); took != time.Second {
			t.Errorf("call with a 1s deadline returned after %v, want 1s", took)
		}
		time.Sleep(time.Second)
		owner.ep.unblock()
		r = cbAwait(t, "call with a 5s deadline", long, time.Minute)
		if r.err != nil || string(r.out) != owner.name {
			t.Fatalf("call with key %d: %q, %v; want %q", key, r.out, r.err, owner.name)
		}
		if took := r.at.Sub(start); took != 2*time.Second {
			t.Errorf("call returned after %v, want 2s (when the dial was let through)", took)
		}
		st := cttStatus(t, conn)
		if e := cpByAddr(st)[owner.addr()]; e.State != call.EndpointReady || e.Wanted != 1 {
			t.Errorf("owner %s: %v with Wanted %d, want ready with 1", owner.name, e.State, e.Wanted)
		}
		if st.Wanted != 2 {
			t.Errorf("Wanted = %d, want 2 (the pool's one and the shard owner's)", st.Wanted)
		}
		cttWantReply(t, "next call with the key", conn, "Name", nil, call.CallOptions{ShardKey: key, Sharded: true}, owner.name)
	})
}

// cpStaleBalancer picks, on its first Pick, the ready member at addr and, before returning
// it, runs down (in the balancer, on the caller's goroutine: the endpoint goes down while the
// call holds a snapshot in which it was ready, the window any concurrent call may hit). Later
// picks are round robin over the ready members.
func cpStaleBalancer(addr string, down func()) balance.Balancer {
	var first atomic.Bool
	rr := balance.RoundRobin()
	return balance.Func(func(info balance.PickInfo) (balance.Member, error) {
		if first.CompareAndSwap(false, true) {
			for _, m := range info.Ready {
				if m.Endpoint().Address() == addr {
					down()
					return m, nil
				}
			}
		}
		return rr.Pick(info)
	})
}

// A call whose balancer picked a ready member that failed before the pick was checked goes to
// another ready member; it does not fail as unreachable while others are up.
func TestCPStalePickFailed(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a, b := bs[0], bs[1]
		conn := cpConnect(t, call.ClientOptions{}, bs...)
		synctest.Wait()
		time.Sleep(5 * time.Second)
		bal := cpStaleBalancer(b.addr(), func() {
			b.ep.setFail(true)
			b.ep.breakAll()
			synctest.Wait()
		})
		out, _, err := cttCall(conn, "Name", nil, call.CallOptions{Balancer: bal})
		if err != nil || string(out) != a.name {
			t.Errorf("call whose pick went down meanwhile: %q, %v; want it sent to a", out, err)
		}
	})
}

// In subset mode a call that picked a member just replaced (now idle) from a stale snapshot
// does not make the pool keep a connection to it for ever.
func TestCPStalePickIdle(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: 1}}, bs...)
		synctest.Wait()
		chosen := cpCheckSubset(t, "start", conn, 1, bs)
		if t.Failed() {
			return
		}
		var x *cpBackend
		for _, b := range bs {
			if b.addr() == chosen[0] {
				x = b
			}
		}
		time.Sleep(5 * time.Second)
		bal := cpStaleBalancer(x.addr(), func() {
			x.ep.setFail(true)
			x.ep.breakAll()
			synctest.Wait()
		})
		if out, _, err := cttCall(conn, "Name", nil, call.CallOptions{Balancer: bal}); err != nil || string(out) == x.name {
			t.Errorf("call whose pick was replaced meanwhile: %q, %v; want it answered by the replacement", out, err)
		}
		time.Sleep(time.Minute)
		st := cttStatus(t, conn)
		if e := cpByAddr(st)[x.addr()]; e.Wanted != 0 || st.Wanted != 1 {
			t.Errorf("a minute later: failed %s has Wanted %d, the pool %d; want 0 and 1 (Size 1)", x.name, e.Wanted, st.Wanted)
		}
	})
}

// Removing endpoints while Size > 0 moves their connections to the rest, and the removed ones
// close their connections.
func TestCPRemoveMovesConnections(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c", "d")
		m := resolve.NewManual(cpEndpoints(bs...)...)
		conn := cttConnect(t, m, call.ClientOptions{Pool: call.PoolOptions{Size: 2}})
		synctest.Wait()
		chosen := cpCheckSubset(t, "start", conn, 2, bs)
		var rest []*cpBackend
		for _, b := range bs {
			if !slices.Contains(chosen, b.addr()) {
				rest = append(rest, b)
			}
		}
		time.Sleep(time.Second)
		m.Update(cpEndpoints(rest...)...)
		synctest.Wait()
		after := cpCheckSubset(t, "after removing the chosen endpoints", conn, 2, rest)
		for _, b := range rest {
			if !slices.Contains(after, b.addr()) {
				t.Errorf("%s is not connected after the chosen endpoints were removed", b.name)
			}
		}
		for _, b := range bs {
			if slices.Contains(chosen, b.addr()) {
				if open := b.ep.open(); open != 0 {
					t.Errorf("removed %s still has %d open connections", b.name, open)
				}
			}
		}
		got := cpCalls(t, "calls after the move", conn, 10, call.CallOptions{}, rest...)
		if !slices.Equal(got, []int64{5, 5}) {
			t.Errorf("10 calls ran %v on the remaining endpoints, want 5 each", got)
		}
	})
}

// --- 2. Active health checks ---------------------------------------------------------------------

// A blackholed connection misses its pong and is evicted exactly HealthCheckTimeout after the
// check that found it; calls go to the other endpoint, a replacement is dialled, and when the
// blackhole heals the replacement connects and calls return.
func TestCPHealthCheckEvicts(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a, b := bs[0], bs[1]
		start := time.Now()
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{
			HealthCheckInterval: time.Second, HealthCheckTimeout: 500 * time.Millisecond, EjectAfter: -1,
		}}, bs...)
		synctest.Wait()
		cpSleepUntil(start.Add(2250 * time.Millisecond))
		if _, _, pings := a.ep.counts(); pings != 2 {
			t.Errorf("%d pings reached a in 2.25s, want 2 (one a second)", pings)
		}
		a.ep.blackhole()

		// The check at 3s finds it; it is evicted at 3.5s, not before.
		cpSleepUntil(start.Add(3500*time.Millisecond - time.Millisecond))
		if e := cttState(t, conn, a.addr()); !e.Healthy || e.State != call.EndpointReady {
			t.Fatalf("a just before its health check timed out: %v, Healthy %v; want ready and healthy", e.State, e.Healthy)
		}
		cpSleepUntil(start.Add(3500 * time.Millisecond))
		evicted := time.Now()
		e := cttState(t, conn, a.addr())
		if e.Healthy || e.State == call.EndpointReady || e.Connections != 0 {
			t.Errorf("a when its health check timed out: %v, Healthy %v, Connections %d; want not ready, unhealthy, 0", e.State, e.Healthy, e.Connections)
		}
		if n := len(e.RecentErrors); n == 0 || !strings.Contains(e.RecentErrors[n-1].Err.Error(), "health check") {
			t.Errorf("a's recent errors %v, want the failed health check last", e.RecentErrors)
		}
		if times := a.ep.dialTimes(); len(times) != 2 || !times[1].Equal(evicted) {
			t.Errorf("a dialled at %v; want a replacement dial at the eviction (%v)", times, evicted)
		}
		st := cttStatus(t, conn)
		if !st.Healthy || st.Degraded {
			t.Errorf("Connection with b healthy: Healthy %v, Degraded %v; want true, false", st.Healthy, st.Degraded)
		}
		if got := cpCalls(t, "calls while a is blackholed", conn, 10, call.CallOptions{}, a, b); !slices.Equal(got, []int64{0, 10}) {
			t.Errorf("10 calls ran %v on a, b; want all on b", got)
		}

		// The blackhole heals: the replacement's handshake completes and calls return to a.
		time.Sleep(1500 * time.Millisecond)
		a.ep.heal()
		synctest.Wait()
		if e := cttState(t, conn, a.addr()); !e.Healthy || e.State != call.EndpointReady || e.Connections != 1 {
			t.Errorf("a after the heal: %v, Healthy %v, Connections %d; want ready, healthy, 1", e.State, e.Healthy, e.Connections)
		}
		if dials, accepted, _ := a.ep.counts(); dials != 2 || accepted != 2 {
			t.Errorf("a: %d dials, %d reached the server; want 2 and 2 (the replacement waited for the heal)", dials, accepted)
		}
		if got := cpCalls(t, "calls after the heal", conn, 10, call.CallOptions{}, a, b); !slices.Equal(got, []int64{5, 5}) {
			t.Errorf("10 calls ran %v on a, b; want 5 each", got)
		}
	})
}

// The replacement of an evicted connection is dialled at once however often the endpoint was
// evicted before, when it had been healthy for long in between: the backoff is for endpoints
// that keep failing, not a count kept for ever.
func TestCPEvictionBackoffResets(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a := bs[0]
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{
			HealthCheckInterval: time.Second, HealthCheckTimeout: 500 * time.Millisecond, EjectAfter: -1,
		}}, bs...)
		synctest.Wait()
		for i := range 6 {
			time.Sleep(10 * time.Minute)
			n := len(a.ep.dialTimes())
			a.ep.blackhole()
			var evicted time.Time
			for range 30 {
				time.Sleep(100 * time.Millisecond)
				if e := cttState(t, conn, a.addr()); e.State != call.EndpointReady {
					evicted = time.Now()
					break
				}
			}
			a.ep.heal()
			if evicted.IsZero() {
				t.Fatalf("eviction %d: a was not evicted within 3s of the blackhole", i+1)
			}
			time.Sleep(5 * time.Minute)
			times := a.ep.dialTimes()[n:]
			if len(times) == 0 || times[0].Sub(evicted) > 100*time.Millisecond {
				t.Errorf("eviction %d (after 10 healthy minutes): replacement dialled at %v after the eviction was seen, want at once", i+1, cpSince(times, evicted))
			}
			if e := cttState(t, conn, a.addr()); e.State != call.EndpointReady || !e.Healthy {
				t.Fatalf("eviction %d: a not back after 5 minutes: %v", i+1, e.State)
			}
		}
	})
}

// cpSince returns the times relative to t0.
func cpSince(times []time.Time, t0 time.Time) []time.Duration {
	var out []time.Duration
	for _, at := range times {
		out = append(out, at.Sub(t0))
	}
	return out
}

// Conn.Ping, the health check's primitive: it returns the round trip, ends at its context's
// deadline on a partitioned connection, and fails on a closed one.
func TestCPConnPing(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := cpNewBackend(t, "a", call.ServerOptions{})
		const lat = 2 * time.Millisecond
		b.ep.setLatency(lat)
		c := cbDial(t, b.ep, call.ClientOptions{KeepaliveInterval: -1})
		rtt, err := c.Ping(cbCtx(t, time.Minute))
		if err != nil || rtt != 2*lat {
			t.Errorf("Ping through a relay adding %v each way: %v, %v; want %v", lat, rtt, err, 2*lat)
		}

		b.ep.blackhole()
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = c.Ping(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) != time.Second {
			t.Errorf("Ping with a 1s deadline in a partition: %v after %v; want a deadline error after 1s", err, time.Since(start))
		}
		b.ep.heal()
		if _, err := c.Ping(cbCtx(t, time.Minute)); err != nil {
			t.Errorf("Ping after the heal: %v", err)
		}

		// The connection breaks while a ping waits.
		b.ep.blackhole()
		pinged := make(chan error, 1)
		go func() {
			_, err := c.Ping(cbCtx(t, time.Minute))
			pinged <- err
		}()
		time.Sleep(time.Second)
		b.ep.breakAll()
		b.ep.heal()
		if err := cbWait(t, "a ping on a breaking connection", pinged, time.Minute); !errors.Is(err, call.ErrCommunication) {
			t.Errorf("Ping on a connection that broke: %v, want ErrCommunication", err)
		}
		if _, err := c.Ping(cbCtx(t, time.Minute)); !errors.Is(err, call.ErrUnreachable) {
			t.Errorf("Ping on a closed connection: %v, want ErrUnreachable", err)
		}
	})
}

// Status reports the round trip of the last health check.
func TestCPHealthCheckRTT(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := cpNewBackend(t, "a", call.ServerOptions{})
		const lat = 3 * time.Millisecond
		b.ep.setLatency(lat)
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{HealthCheckInterval: time.Second}}, b)
		synctest.Wait()
		if e := cttState(t, conn, b.addr()); e.RTT != 0 {
			t.Errorf("RTT before any health check = %v, want 0", e.RTT)
		}
		time.Sleep(1500 * time.Millisecond)
		if e := cttState(t, conn, b.addr()); e.RTT != 2*lat {
			t.Errorf("RTT through a relay adding %v each way = %v, want %v", lat, e.RTT, 2*lat)
		}
		b.ep.setLatency(4 * lat)
		time.Sleep(time.Second)
		if e := cttState(t, conn, b.addr()); e.RTT != 8*lat {
			t.Errorf("RTT after the latency grew to %v each way = %v, want %v", 4*lat, e.RTT, 8*lat)
		}
	})
}

// With health checks disabled no pings are sent (keepalive is disabled too), and a blackholed
// connection is not evicted; with them, one ping per interval.
func TestCPHealthChecksDisabled(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		off := cpNewBackend(t, "off", call.ServerOptions{})
		on := cpNewBackend(t, "on", call.ServerOptions{})
		connOff := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{HealthCheckInterval: -1}}, off)
		connOn := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{HealthCheckInterval: time.Second}}, on)
		time.Sleep(time.Minute + time.Millisecond)
		if _, _, pings := off.ep.counts(); pings != 0 {
			t.Errorf("health checks disabled: %d pings in a minute, want 0", pings)
		}
		if _, _, pings := on.ep.counts(); pings != 60 {
			t.Errorf("health checks every second: %d pings in a minute, want 60", pings)
		}
		off.ep.blackhole()
		time.Sleep(time.Minute)
		if e := cttState(t, connOff, off.addr()); e.State != call.EndpointReady || !e.Healthy {
			t.Errorf("blackholed for a minute without health checks: %v, Healthy %v; want still ready and healthy (nothing checks it)", e.State, e.Healthy)
		}
		if dials, _, _ := off.ep.counts(); dials != 1 {
			t.Errorf("%d dials, want 1 (no eviction)", dials)
		}
		off.ep.heal()
		cttWantReply(t, "call after the heal", connOff, "Name", nil, call.CallOptions{}, "off")
		cttWantReply(t, "call with health checks", connOn, "Name", nil, call.CallOptions{}, "on")
	})
}

// Health checks more frequent than the server's ping rate limit (10 a second after a burst of
// 64) must not get the connection disconnected as a ping flood.
func TestCPHealthCheckFastInterval(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := cpNewBackend(t, "a", call.ServerOptions{})
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{HealthCheckInterval: 50 * time.Millisecond, HealthCheckTimeout: 25 * time.Millisecond}}, b)
		time.Sleep(30 * time.Second)
		e := cttState(t, conn, b.addr())
		dials, _, pings := b.ep.counts()
		if dials != 1 || len(e.RecentErrors) != 0 {
			t.Errorf("after 30s of health checks every 50ms (%d pings): %d dials, recent errors %v; want 1 connection that is never lost", pings, dials, e.RecentErrors)
		}
	})
}

// In subset mode a connection that fails its health check is replaced by one to an idle
// endpoint, also when it was the pool's only connection (Size 1): the idle endpoints are there
// to take over, so the pool should not settle into degraded mode on the blackholed one.
func TestCPSubsetEvictionReplaces(t *testing.T) {
	for _, size := range []int{2, 1} {
		t.Run(fmt.Sprint("size ", size), func(t *testing.T) {
			if size == 1 {
			}
			cbBubble(t, func(t *testing.T) {
				bs := cpBackends(t, "a", "b", "c", "d")
				start := time.Now()
				conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{
					Size: size, HealthCheckInterval: time.Second, HealthCheckTimeout: 500 * time.Millisecond, EjectAfter: -1,
				}}, bs...)
				synctest.Wait()
				chosen := cpCheckSubset(t, "start", conn, size, bs)
				if t.Failed() {
					return
				}
				var holed *cpBackend
				for _, b := range bs {
					if b.addr() == chosen[0] {
						holed = b
					}
				}
				cpSleepUntil(start.Add(2250 * time.Millisecond))
				holed.ep.blackhole()
				cpSleepUntil(start.Add(3500 * time.Millisecond))
				time.Sleep(time.Millisecond)
				st := cttStatus(t, conn)
				if !st.Healthy || st.Degraded {
					t.Errorf("after the eviction of %s: Healthy %v, Degraded %v; want true, false", holed.name, st.Healthy, st.Degraded)
				}
				now := cpCheckSubset(t, "after the eviction", conn, size, nil)
				if slices.Contains(now, holed.addr()) {
					t.Errorf("blackholed %s is still in the subset %v", holed.name, now)
				}
				got := cpCalls(t, "calls after the eviction", conn, 10, call.CallOptions{}, holed)
				if got[0] != 0 {
					t.Errorf("%d calls went to blackholed %s", got[0], holed.name)
				}
			})
		})
	}
}

// In subset mode an endpoint whose calls fail is ejected and replaced by an idle one, also
// when it was the pool's only connection.
func TestCPSubsetEjectionReplaces(t *testing.T) {
	for _, size := range []int{2, 1} {
		t.Run(fmt.Sprint("size ", size), func(t *testing.T) {
			if size == 1 {
			}
			cbBubble(t, func(t *testing.T) {
				bs := cpBackends(t, "a", "b", "c", "d")
				conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{Size: size, EjectAfter: 3, EjectionTime: time.Minute}}, bs...)
				synctest.Wait()
				chosen := cpCheckSubset(t, "start", conn, size, bs)
				if t.Failed() {
					return
				}
				var bad *cpBackend
				for _, b := range bs {
					if b.addr() == chosen[0] {
						bad = b
					}
				}
				cpFail(t, conn, bad, 5)
				synctest.Wait()
				e := cttState(t, conn, bad.addr())
				if !e.Ejected {
					t.Fatalf("%s after 5 failed calls in a row: not ejected (Errors %d)", bad.name, e.Errors)
				}
				st := cttStatus(t, conn)
				ready := 0
				for _, x := range st.Endpoints {
					if x.Address != bad.addr() && x.State == call.EndpointReady && x.Healthy {
						ready++
					}
				}
				if ready != size || !st.Healthy {
					t.Errorf("after ejecting %s: %d other healthy endpoints, Healthy %v; want %d (replaced from the idle ones) and true", bad.name, ready, st.Healthy, size)
				}
				got := cpCalls(t, "calls after the ejection", conn, 10, call.CallOptions{}, bad)
				if got[0] != 0 {
					t.Errorf("%d calls went to ejected %s", got[0], bad.name)
				}
			})
		})
	}
}

// A probe that fails ejects the endpoint again, for longer, and evicts its connection; once
// the endpoint answers again, the probe at the end of the longer ejection re-admits it.
func TestCPProbeFails(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		a := bs[0]
		conn := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{
			HealthCheckInterval: -1, HealthCheckTimeout: time.Second, EjectAfter: 2, EjectionTime: 10 * time.Second,
		}}, bs...)
		synctest.Wait()
		cpFail(t, conn, a, 2)
		ejected := time.Now()
		if e := cttState(t, conn, a.addr()); !e.Ejected || !e.EjectedUntil.Equal(ejected.Add(10*time.Second)) {
			t.Fatalf("a after 2 failures: Ejected %v, EjectedUntil now+%v; want true, now+10s", e.Ejected, e.EjectedUntil.Sub(ejected))
		}
		a.ep.blackhole()
		// The probe at 10s gets no pong within 1s: ejected again for 2 × 10s from then, and
		// its connection is evicted.
		cpSleepUntil(ejected.Add(11 * time.Second))
		e := cttState(t, conn, a.addr())
		if !e.Ejected || e.Ejections != 2 || !e.EjectedUntil.Equal(ejected.Add(31*time.Second)) {
			t.Errorf("a after a failed probe: Ejected %v, Ejections %d, EjectedUntil %v after the ejection; want true, 2, 31s", e.Ejected, e.Ejections, e.EjectedUntil.Sub(ejected))
		}
		if e.State == call.EndpointReady {
			t.Errorf("a is still ready after its probe failed outside degraded mode; want its connection evicted")
		}
		// The partition heals before the second ejection ends: the redial connects, and the
		// probe at its end re-admits a.
		cpSleepUntil(ejected.Add(15 * time.Second))
		a.ep.heal()
		synctest.Wait()
		if e := cttState(t, conn, a.addr()); !e.Ejected || e.State != call.EndpointReady {
			t.Errorf("a after the heal, before its ejection ends: %v, Ejected %v; want ready and still ejected", e.State, e.Ejected)
		}
		if got := cpCalls(t, "calls while a is ejected", conn, 6, call.CallOptions{}, bs...); got[0] != 0 {
			t.Errorf("%d calls went to ejected a", got[0])
		}
		cpSleepUntil(ejected.Add(31 * time.Second))
		if e := cttState(t, conn, a.addr()); e.Ejected || !e.Healthy {
			t.Errorf("a at the end of its second ejection: Ejected %v, Healthy %v; want re-admitted", e.Ejected, e.Healthy)
		}
		if got := cpCalls(t, "calls after re-admission", conn, 6, call.CallOptions{}, bs...); got[0] != 2 {
			t.Errorf("%d of 6 calls went to re-admitted a, want 2", got[0])
		}
	})
}

// MinHealthy above the pool's Size can never be met: Connect should reject it (or cap it), not
// return a Connection that stays unhealthy and degraded for ever.
func TestCPMinHealthyAboveSize(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c", "d")
		ctx := cbCtx(t, time.Minute)
		conn, err := call.Connect(ctx, resolve.Constant(cpEndpoints(bs...)...), call.ClientOptions{Logger: cbQuiet, Pool: call.PoolOptions{Size: 2, MinHealthy: 3}})
		if err != nil {
			return // rejected: fine
		}
		defer conn.Close()
		time.Sleep(time.Minute)
		if st := cttStatus(t, conn); !st.Healthy || st.Degraded {
			t.Errorf("Size 2, MinHealthy 3, every kept connection healthy: Healthy %v, Degraded %v", st.Healthy, st.Degraded)
		}
	})
}

// --- 3. Ejection ---------------------------------------------------------------------------------

// An endpoint whose calls fail EjectAfter times in a row is ejected for EjectionTime, takes
// no calls meanwhile, and is re-admitted by a ping probe when it ends. A success resets the
// count. Ejections in a row last EjectionTime × n, capped at MaxEjectionTime; an endpoint that
// stayed admitted for MaxEjectionTime starts again from EjectionTime.
func TestCPEjection(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a, b := bs[0], bs[1]
		conn := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{
			HealthCheckInterval: -1, EjectAfter: 3, EjectionTime: 10 * time.Second, MaxEjectionTime: 25 * time.Second,
		}}, bs...)
		synctest.Wait()
		time.Sleep(time.Second)

		// Two failures, a success, two failures: not ejected.
		cpFail(t, conn, a, 2)
		cttWantReply(t, "a success in between", conn, "Name", nil, call.CallOptions{Balancer: crTo(a.addr())}, "a")
		cpFail(t, conn, a, 2)
		if e := cttState(t, conn, a.addr()); e.Ejected || !e.Healthy || e.Errors != 4 {
			t.Fatalf("a after 2 failures, a success and 2 failures: Ejected %v, Healthy %v, Errors %d; want false, true, 4", e.Ejected, e.Healthy, e.Errors)
		}

		for i, want := range []time.Duration{10 * time.Second, 20 * time.Second, 25 * time.Second, 25 * time.Second} {
			what := fmt.Sprintf("ejection %d", i+1)
			before := cttStatus(t, conn).Changed
			n := 3
			if i == 0 {
				n = 1 // the third failure in a row
			}
			cpFail(t, conn, a, n)
			ejected := time.Now()
			e := cttState(t, conn, a.addr())
			if !e.Ejected || e.Healthy || !e.EjectedUntil.Equal(ejected.Add(want)) || e.Ejections != i+1 {
				t.Fatalf("%s: Ejected %v, Healthy %v, EjectedUntil now+%v, Ejections %d; want true, false, now+%v, %d", what, e.Ejected, e.Healthy, e.EjectedUntil.Sub(ejected), e.Ejections, want, i+1)
			}
			select {
			case <-before:
			default:
				t.Errorf("%s: Status().Changed was not closed", what)
			}
			if e.State != call.EndpointReady || e.Connections != 1 {
				t.Errorf("%s: %v with %d connections, want ready with 1 (kept for the probe)", what, e.State, e.Connections)
			}
			if got := cpCalls(t, what+": calls", conn, 10, call.CallOptions{}, a, b); !slices.Equal(got, []int64{0, 10}) {
				t.Errorf("%s: 10 calls ran %v on a, b; want all on b", what, got)
			}
			_, _, pings := a.ep.counts()
			cpSleepUntil(ejected.Add(want - time.Millisecond))
			if e := cttState(t, conn, a.addr()); !e.Ejected {
				t.Fatalf("%s: re-admitted %v early", what, time.Millisecond)
			}
			cpSleepUntil(ejected.Add(want))
			if e := cttState(t, conn, a.addr()); e.Ejected || !e.Healthy {
				t.Fatalf("%s: at its end Ejected %v, Healthy %v; want re-admitted by the probe", what, e.Ejected, e.Healthy)
			}
			if _, _, p := a.ep.counts(); p != pings+1 {
				t.Errorf("%s: %d pings during the ejection, want 1 (the probe; periodic checks are off)", what, p-pings)
			}
			if got := cpCalls(t, what+": calls after re-admission", conn, 10, call.CallOptions{}, a, b); !slices.Equal(got, []int64{5, 5}) {
				t.Errorf("%s: 10 calls after re-admission ran %v on a, b; want 5 each", what, got)
			}
			if i == 2 {
				// Stay admitted for MaxEjectionTime: the next ejection is a first one again.
				time.Sleep(25 * time.Second)
				want = 10 * time.Second
				cpFail(t, conn, a, 3)
				ejected = time.Now()
				e := cttState(t, conn, a.addr())
				if !e.Ejected || !e.EjectedUntil.Equal(ejected.Add(want)) {
					t.Fatalf("ejection after %v admitted: Ejected %v, EjectedUntil now+%v; want now+%v", 25*time.Second, e.Ejected, e.EjectedUntil.Sub(ejected), want)
				}
				cpSleepUntil(ejected.Add(want))
				if e := cttState(t, conn, a.addr()); e.Ejected {
					t.Fatalf("not re-admitted at the end of its ejection")
				}
				return
			}
		}
	})
}

// Status().Ejections counts every ejection of the endpoint, as EndpointStatus documents.
func TestCPEjectionsCounted(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a := bs[0]
		conn := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{
			HealthCheckInterval: -1, EjectAfter: 1, EjectionTime: time.Second, MaxEjectionTime: 2 * time.Second,
		}}, bs...)
		synctest.Wait()
		for i := range 2 {
			cpFail(t, conn, a, 1)
			time.Sleep(10 * time.Second) // re-admitted, then admitted for longer than MaxEjectionTime
			if e := cttState(t, conn, a.addr()); e.Ejected || e.Ejections != i+1 {
				t.Errorf("after ejection %d: Ejected %v, Ejections %d; want false, %d", i+1, e.Ejected, e.Ejections, i+1)
			}
		}
	})
}

// A connection that breaks under calls (ErrCommunication, may have run) counts against its
// endpoint.
func TestCPEjectCommunication(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a := bs[0]
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{EjectAfter: 2, EjectionTime: time.Minute}}, bs...)
		synctest.Wait()
		for i := range 2 {
			time.Sleep(5 * time.Second)
			_, _, err := cttCall(conn, "Break", nil, call.CallOptions{Balancer: crTo(a.addr())})
			cbWantErr(t, fmt.Sprint("call ", i, " whose connection broke"), err, call.ErrCommunication, false)
			synctest.Wait()
		}
		e := cttState(t, conn, a.addr())
		if !e.Ejected || e.Errors != 2 {
			t.Errorf("a after 2 broken calls: Ejected %v, Errors %d; want true, 2", e.Ejected, e.Errors)
		}
		if got := cpCalls(t, "calls after the ejection", conn, 6, call.CallOptions{}, bs...); !slices.Equal(got, []int64{0, 6}) {
			t.Errorf("6 calls ran %v on a, b; want all on b", got)
		}
	})
}

// Failures that do not point at the server never eject it: the caller's cancellation, an
// unknown method, a refusal, and a deadline that expired while the call was still queued.
func TestCPEjectNotCounted(t *testing.T) {
	const n = 6 // each failure, more than EjectAfter times in a row
	pool := call.PoolOptions{EjectAfter: 2, EjectionTime: time.Minute}
	check := func(t *testing.T, conn call.Connection, addr string) {
		t.Helper()
		if e := cttState(t, conn, addr); e.Ejected || e.Errors != 0 || !e.Healthy {
			t.Errorf("after %d such failures: Ejected %v, Errors %d, Healthy %v; want false, 0, true", n, e.Ejected, e.Errors, e.Healthy)
		}
	}
	t.Run("cancelled by the caller", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			bs := cpBackends(t, "a", "b")
			a := bs[0]
			conn := cpConnect(t, call.ClientOptions{Pool: pool}, bs...)
			synctest.Wait()
			for i := range n {
				ctx, cancel := context.WithCancel(cbCtx(t, time.Minute))
				ch := cbGo(ctx, conn, cbKey("Block"), nil, call.CallOptions{Balancer: crTo(a.addr())})
				cbWait(t, "the blocked handler", a.entered, time.Minute)
				cancel()
				r := cbAwait(t, "cancelled call", ch, time.Minute)
				cbWantErr(t, fmt.Sprint("cancelled call ", i), r.err, context.Canceled, false)
			}
			synctest.Wait()
			check(t, conn, a.addr())
		})
	})
	t.Run("unknown method", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			bs := cpBackends(t, "a", "b")
			a := bs[0]
			conn := cpConnect(t, call.ClientOptions{Pool: pool}, bs...)
			synctest.Wait()
			for i := range n {
				_, _, err := cttCall(conn, "NoSuchMethod", nil, call.CallOptions{Balancer: crTo(a.addr())})
				cbWantErr(t, fmt.Sprint("unknown method ", i), err, call.ErrUnknownMethod, true)
			}
			check(t, conn, a.addr())
		})
	})
	t.Run("deadline while queued", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			a := cpNewBackend(t, "a", call.ServerOptions{Limits: call.Limits{MaxConcurrentCalls: 1}})
			b := cpNewBackend(t, "b", call.ServerOptions{})
			conn := cpConnect(t, call.ClientOptions{Pool: pool}, a, b)
			synctest.Wait()
			to := call.CallOptions{Balancer: crTo(a.addr())}
			blocked := cbGo(cbCtx(t, time.Hour), conn, cbKey("Block"), nil, to)
			cbWait(t, "the blocked handler", a.entered, time.Minute)
			for i := range n {
				start := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_, err := conn.Call(ctx, cbKey("Name"), nil, to)
				cancel()
				cbWantErr(t, fmt.Sprint("queued call ", i), err, context.DeadlineExceeded, true)
				if took := time.Since(start); took != time.Second {
					t.Errorf("queued call %d returned after %v, want 1s", i, took)
				}
			}
			check(t, conn, a.addr())
			a.releaseAll()
			if r := cbAwait(t, "blocked call", blocked, time.Minute); r.err != nil {
				t.Errorf("blocked call: %v", r.err)
			}
		})
	})
	t.Run("refused", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			refuser := cpRefuser(t, "a")
			b := cpNewBackend(t, "b", call.ServerOptions{})
			conn := cttConnect(t, resolve.Constant(refuser, b.ep), call.ClientOptions{Pool: pool})
			synctest.Wait()
			for i := range n {
				_, _, err := cttCall(conn, "Name", nil, call.CallOptions{Balancer: crTo(refuser.Address())})
				cbWantErr(t, fmt.Sprint("refused call ", i), err, call.ErrRefused, true)
			}
			check(t, conn, refuser.Address())
		})
	})
}

// cpRefuser is a fake server on a PipeListener that refuses every call (ERROR, code refused,
// never ran) and answers pings. Cleanup closes it and joins its goroutines.
func cpRefuser(t *testing.T, name string) *testkit.PipeListener {
	l := testkit.NewPipeListener(name)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				p := testkit.NewRawPeer(c)
				if _, err := p.AcceptHandshake(cbServerHello()); err != nil {
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
						err = p.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeRefused, Flags: testkit.ErrFlagNeverRan, Message: "busy"})
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return l
}

// Never more than MaxEjectedFraction of the set is ejected at once, and never so many that
// fewer than MinHealthy endpoints stay healthy.
func TestCPEjectBounds(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pool    call.PoolOptions
		ejected int
	}{
		{"fraction 0.5 of 4", call.PoolOptions{EjectAfter: 2, MaxEjectedFraction: 0.5}, 2},
		{"fraction 0.25 of 4", call.PoolOptions{EjectAfter: 2, MaxEjectedFraction: 0.25}, 1},
		{"fraction 0.1 of 4 still ejects one", call.PoolOptions{EjectAfter: 2, MaxEjectedFraction: 0.1}, 1},
		{"min healthy 3 of 4", call.PoolOptions{EjectAfter: 2, MaxEjectedFraction: 1, MinHealthy: 3}, 1},
		{"min healthy 1 of 4, fraction 1", call.PoolOptions{EjectAfter: 2, MaxEjectedFraction: 1, MinHealthy: 1}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				bs := cpBackends(t, "a", "b", "c", "d")
				conn := cpConnect(t, call.ClientOptions{Pool: tc.pool}, bs...)
				synctest.Wait()
				for round := range 3 {
					for _, b := range bs {
						cpFail(t, conn, b, 2)
					}
					st := cttStatus(t, conn)
					ejected := 0
					for _, e := range st.Endpoints {
						if e.Ejected {
							ejected++
						}
					}
					if ejected != tc.ejected {
						t.Errorf("round %d: %d of 4 failing endpoints ejected, want %d", round, ejected, tc.ejected)
					}
					if !st.Healthy {
						t.Errorf("round %d: the Connection is unhealthy; ejection must keep MinHealthy endpoints", round)
					}
				}
			})
		})
	}
}

// --- 4. Degraded mode ----------------------------------------------------------------------------

// With MinHealthy 2 of 3 endpoints and two blackholed, the Connection is degraded and
// unhealthy: the first failed check evicts (two healthy endpoints remain), the second leaves
// one healthy endpoint, so that connection is kept, calls go to it again, and nothing more is
// evicted while degraded. When the blackholes heal, the pool is healthy again.
func TestCPDegraded(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		a, b, c := bs[0], bs[1], bs[2]
		var mu sync.Mutex
		var health []bool
		start := time.Now()
		conn := cpConnect(t, call.ClientOptions{
			OnHealthChange: func(h bool) {
				mu.Lock()
				health = append(health, h)
				mu.Unlock()
			},
			Pool: call.PoolOptions{MinHealthy: 2, HealthCheckInterval: time.Second, HealthCheckTimeout: 500 * time.Millisecond, EjectAfter: -1},
		}, bs...)
		synctest.Wait()
		cpSleepUntil(start.Add(2250 * time.Millisecond))
		b.ep.blackhole()
		c.ep.blackhole()
		cpSleepUntil(start.Add(3500 * time.Millisecond))

		st := cttStatus(t, conn)
		if !st.Degraded || st.Healthy {
			t.Fatalf("two of three blackholed with MinHealthy 2: Degraded %v, Healthy %v; want true, false", st.Degraded, st.Healthy)
		}
		var kept, evicted *cpBackend
		for _, x := range []*cpBackend{b, c} {
			e := cpByAddr(st)[x.addr()]
			if e.Healthy {
				t.Errorf("blackholed %s is healthy", x.name)
			}
			if e.State == call.EndpointReady && e.Connections == 1 {
				if kept != nil {
					t.Errorf("both blackholed endpoints kept their connection; want the first to fail evicted (two healthy remained then)")
				}
				kept = x
			} else {
				evicted = x
			}
		}
		if kept == nil || evicted == nil {
			t.Fatalf("blackholed endpoints: %+v, %+v; want one evicted and one kept", cpByAddr(st)[b.addr()], cpByAddr(st)[c.addr()])
		}

		// Calls go to a and to the kept, unhealthy endpoint (where they wait for their
		// deadline).
		okA, lost := 0, 0
		for range 10 {
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
			cancel()
			switch {
			case err == nil && string(out) == "a":
				okA++
			case errors.Is(err, context.DeadlineExceeded):
				lost++
			default:
				t.Errorf("call while degraded: %q, %v", out, err)
			}
		}
		if okA != 5 || lost != 5 {
			t.Errorf("10 calls while degraded: %d answered by a, %d lost in %s's blackhole; want 5 and 5", okA, lost, kept.name)
		}

		// Nothing is evicted while degraded: the kept connection stays through more failed
		// checks.
		time.Sleep(5 * time.Second)
		if e := cttState(t, conn, kept.addr()); e.State != call.EndpointReady || e.Connections != 1 {
			t.Errorf("kept %s after 5s degraded: %v with %d connections; want still ready with 1", kept.name, e.State, e.Connections)
		}
		if dials, _, _ := kept.ep.counts(); dials != 1 {
			t.Errorf("kept %s was dialled %d times, want once", kept.name, dials)
		}
		if st := cttStatus(t, conn); !st.Degraded || st.Healthy {
			t.Errorf("after 5s: Degraded %v, Healthy %v; want still true, false", st.Degraded, st.Healthy)
		}

		// Heal: the next checks pass and the evicted endpoint's pending dial completes.
		b.ep.heal()
		c.ep.heal()
		time.Sleep(time.Second)
		st = cttStatus(t, conn)
		if st.Degraded || !st.Healthy {
			t.Errorf("after the heal: Degraded %v, Healthy %v; want false, true", st.Degraded, st.Healthy)
		}
		for _, x := range bs {
			if e := cpByAddr(st)[x.addr()]; !e.Healthy || e.State != call.EndpointReady {
				t.Errorf("%s after the heal: %v, Healthy %v; want ready and healthy", x.name, e.State, e.Healthy)
			}
		}
		if got := cpCalls(t, "calls after the heal", conn, 9, call.CallOptions{}, a, b, c); !slices.Equal(got, []int64{3, 3, 3}) {
			t.Errorf("9 calls after the heal ran %v on a, b, c; want 3 each", got)
		}
		mu.Lock()
		defer mu.Unlock()
		if want := []bool{true, false, true}; !slices.Equal(health, want) {
			t.Errorf("OnHealthChange saw %v, want %v", health, want)
		}
	})
}

// In degraded mode calls also go to ejected endpoints, and nothing is ejected.
func TestCPDegradedUsesEjected(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b", "c")
		a, b, c := bs[0], bs[1], bs[2]
		start := time.Now()
		conn := cpConnect(t, call.ClientOptions{Pool: call.PoolOptions{
			MinHealthy: 2, HealthCheckInterval: time.Second, HealthCheckTimeout: 500 * time.Millisecond,
			EjectAfter: 2, EjectionTime: time.Hour,
		}}, bs...)
		synctest.Wait()
		cpFail(t, conn, a, 2)
		if st := cttStatus(t, conn); !cpByAddr(st)[a.addr()].Ejected || st.Degraded || !st.Healthy {
			t.Fatalf("a ejected with b and c healthy: Ejected %v, Degraded %v, Healthy %v; want true, false, true", cpByAddr(st)[a.addr()].Ejected, st.Degraded, st.Healthy)
		}
		if got := cpCalls(t, "calls with a ejected", conn, 6, call.CallOptions{}, a); got[0] != 0 {
			t.Errorf("%d calls went to ejected a", got[0])
		}
		cpSleepUntil(start.Add(2250 * time.Millisecond))
		b.ep.blackhole()
		cpSleepUntil(start.Add(3500 * time.Millisecond))
		st := cttStatus(t, conn)
		if !st.Degraded || st.Healthy {
			t.Fatalf("a ejected and b blackholed, MinHealthy 2: Degraded %v, Healthy %v; want true, false", st.Degraded, st.Healthy)
		}
		if e := cpByAddr(st)[b.addr()]; e.State != call.EndpointReady {
			t.Errorf("b failed its check in degraded mode and was evicted (%v)", e.State)
		}
		// Round robin over a (ejected), b (unhealthy, its calls lost) and c.
		before := cpRuns(a, c)
		for range 6 {
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
			cancel()
		}
		after := cpRuns(a, c)
		if after[0]-before[0] != 2 || after[1]-before[1] != 2 {
			t.Errorf("6 calls while degraded ran %d on ejected a and %d on c, want 2 and 2", after[0]-before[0], after[1]-before[1])
		}
		// No ejection while degraded.
		cpFail(t, conn, c, 3)
		if e := cttState(t, conn, c.addr()); e.Ejected {
			t.Errorf("c was ejected while the Connection was degraded")
		}
		b.ep.heal()
	})
}

// A partition that lasts in degraded mode must not get the connection dropped when it heals:
// the health checks queued meanwhile must not arrive as a ping flood.
func TestCPDegradedHealFlood(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := cpNewBackend(t, "a", call.ServerOptions{})
		conn := cpConnect(t, call.ClientOptions{KeepaliveInterval: -1, Pool: call.PoolOptions{
			HealthCheckInterval: 100 * time.Millisecond, HealthCheckTimeout: 50 * time.Millisecond,
		}}, b)
		synctest.Wait()
		b.ep.blackhole()
		time.Sleep(20 * time.Second)
		if st := cttStatus(t, conn); !st.Degraded {
			t.Fatalf("the only endpoint blackholed: Degraded %v, want true", st.Degraded)
		}
		b.ep.heal()
		time.Sleep(time.Second)
		e := cttState(t, conn, b.addr())
		dials, _, pings := b.ep.counts()
		if dials != 1 || !e.Healthy {
			t.Errorf("after a 20s partition and its heal (%d pings reached the server): %d dials, Healthy %v, recent errors %v; want the connection kept and healthy", pings, dials, e.Healthy, e.RecentErrors)
		}
	})
}

// --- 5. Health signal ----------------------------------------------------------------------------

// OnHealthChange sees false→true on the first connection, true→false when every endpoint
// fails, true again on recovery and false at Close; its calls never overlap; Status().Healthy
// agrees and Changed is closed at every change.
func TestCPHealthSignal(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		var mu sync.Mutex
		var events []bool
		var inside, overlaps atomic.Int32
		onHealth := func(h bool) {
			if inside.Add(1) > 1 {
				overlaps.Add(1)
			}
			time.Sleep(10 * time.Millisecond) // a slow callback gives overlaps a chance
			mu.Lock()
			events = append(events, h)
			mu.Unlock()
			inside.Add(-1)
		}
		wantEvents := func(what string, want ...bool) {
			t.Helper()
			mu.Lock()
			defer mu.Unlock()
			if !slices.Equal(events, want) {
				t.Errorf("%s: OnHealthChange saw %v, want %v", what, events, want)
			}
		}
		// Dials wait until the first checks are done: a dial over pipes needs no time to pass.
		for _, b := range bs {
			b.ep.block()
		}
		conn := cpConnect(t, call.ClientOptions{OnHealthChange: onHealth}, bs...)
		synctest.Wait()
		wantEvents("right after Connect")
		if st := cttStatus(t, conn); st.Healthy {
			t.Errorf("Healthy before any connection")
		}
		for _, b := range bs {
			b.ep.unblock()
		}
		time.Sleep(time.Second)
		wantEvents("after connecting", true)
		st := cttStatus(t, conn)
		if !st.Healthy {
			t.Errorf("Status().Healthy = false after connecting")
		}

		// Every endpoint fails.
		time.Sleep(5 * time.Second)
		for _, b := range bs {
			b.ep.setFail(true)
			b.ep.breakAll()
		}
		time.Sleep(time.Second)
		wantEvents("after every endpoint failed", true, false)
		select {
		case <-st.Changed:
		default:
			t.Errorf("Changed was not closed when the Connection became unhealthy")
		}
		st = cttStatus(t, conn)
		if st.Healthy {
			t.Errorf("Status().Healthy = true with every endpoint down")
		}

		// One comes back (its next redial, within the backoff).
		bs[0].ep.setFail(false)
		time.Sleep(10 * time.Second)
		wantEvents("after a came back", true, false, true)
		select {
		case <-st.Changed:
		default:
			t.Errorf("Changed was not closed when the Connection became healthy again")
		}
		if st = cttStatus(t, conn); !st.Healthy {
			t.Errorf("Status().Healthy = false after a came back")
		}

		// Flap fast: calls of the callback still never overlap, and the last one matches
		// Status.
		for range 20 {
			bs[0].ep.breakAll()
			time.Sleep(3 * time.Millisecond)
		}
		time.Sleep(time.Minute)
		mu.Lock()
		last := events[len(events)-1]
		for i := 1; i < len(events); i++ {
			if events[i] == events[i-1] {
				t.Errorf("OnHealthChange reported %v twice in a row: %v", events[i], events)
				break
			}
		}
		mu.Unlock()
		if h := cttStatus(t, conn).Healthy; h != last {
			t.Errorf("last OnHealthChange(%v), Status().Healthy = %v", last, h)
		}
		conn.Close()
		mu.Lock()
		if final := events[len(events)-1]; final {
			t.Errorf("last OnHealthChange after Close was %v, want false: %v", final, events)
		}
		mu.Unlock()
		if n := overlaps.Load(); n != 0 {
			t.Errorf("OnHealthChange calls overlapped %d times", n)
		}
		if st := cttStatus(t, conn); st.Healthy || !st.Closed {
			t.Errorf("after Close: Healthy %v, Closed %v; want false, true", st.Healthy, st.Closed)
		}
	})
}

// A Connection that never became healthy reports nothing, even at Close.
func TestCPHealthSignalNeverHealthy(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		ep := cpNewEndpoint(t, testkit.NewPipeListener("down"))
		ep.setFail(true)
		var calls atomic.Int32
		conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{OnHealthChange: func(bool) { calls.Add(1) }})
		time.Sleep(time.Minute)
		conn.Close()
		if n := calls.Load(); n != 0 {
			t.Errorf("OnHealthChange called %d times for a Connection that was never healthy", n)
		}
	})
}
