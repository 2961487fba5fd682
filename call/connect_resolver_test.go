package call_test

// Black-box tests of call.Connect following a resolver over real sockets: updates and flaps
// (RELIABILITY.md scenario 17), draining removed endpoints, reviving returning ones, empty
// sets, resolver errors, a server's graceful drain (scenario 13), Close, sharding over the
// resolved set and per-call balancers. Identifiers of this file start with "cr".

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

// crTransports are the transports every test of this file runs over.
var crTransports = []string{"tcp", "unix", "mtls"}

// crBound is the generous bound on anything that must not hang.
const crBound = 20 * time.Second

// crSignal wakes waiters whenever something it guards changes.
type crSignal struct {
	mu sync.Mutex
	ch chan struct{}
}

// wait returns a channel closed by the next pulse. Take it before checking the condition.
func (s *crSignal) wait() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

func (s *crSignal) pulse() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}

// crWaitFor waits until cond holds, re-checking it on every pulse of sig.
func crWaitFor(t testing.TB, what string, sig *crSignal, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(crBound)
	defer timeout.Stop()
	for {
		ch := sig.wait()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("timed out after %v waiting for %s", crBound, what)
		}
	}
}

// crListener counts the connections a listener accepts and how many of them were closed by
// the server. It sits below TLS, so the server still sees a *tls.Conn over mTLS.
type crListener struct {
	net.Listener
	sig crSignal

	mu sync.Mutex
	// guarded by mu
	accepted, closed int
}

func (l *crListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.accepted++
	l.mu.Unlock()
	l.sig.pulse()
	return &crConn{Conn: c, l: l}, nil
}

// counts returns the connections accepted and closed so far.
func (l *crListener) counts() (accepted, closed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.accepted, l.closed
}

type crConn struct {
	net.Conn
	l    *crListener
	once sync.Once
}

func (c *crConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.closed++
		c.l.mu.Unlock()
		c.l.sig.pulse()
	})
	return c.Conn.Close()
}

// crServer is one server of a test: its "Name" method returns its name, and its "Block" method
// signals entered, then blocks until release is closed (or its context ends) and returns its
// name.
type crServer struct {
	name    string
	l       net.Listener // what Serve accepts from
	count   *crListener
	ep      endpoint.Endpoint
	hm      *call.HandlerMap
	entered chan string
	release chan struct{}
	relOnce sync.Once
}

// crNewServer makes a server's listener and handlers over tr; it does not serve yet.
func crNewServer(t testing.TB, tr testkit.Transport, name string) *crServer {
	t.Helper()
	s := &crServer{name: name, hm: &call.HandlerMap{}, entered: make(chan string, 64), release: make(chan struct{})}
	if tr.Name == "mtls" {
		// As the "mtls" transport does, with the counting listener below TLS.
		ca := testkit.NewCA(t)
		server := ca.Issue(t, testkit.CertOptions{
			CommonName: testkit.MTLSServerName,
			DNSNames:   []string{testkit.MTLSServerName},
			IPs:        []net.IP{net.IPv4(127, 0, 0, 1)},
		})
		client := ca.Issue(t, testkit.CertOptions{CommonName: testkit.MTLSClientName, Client: true})
		raw, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { raw.Close() })
		s.count = &crListener{Listener: raw}
		s.l = tls.NewListener(s.count, testkit.ServerTLS(t, ca, server))
		s.ep = endpoint.MTLS(testkit.ClientTLS(t, ca, client, testkit.MTLSServerName), endpoint.TCP(raw.Addr().String()))
	} else {
		l, ep := tr.Listen(t)
		s.count = &crListener{Listener: l}
		s.l, s.ep = s.count, ep
	}
	s.hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
	s.hm.Set(cbComponent, "Block", func(ctx context.Context, _ []byte) ([]byte, error) {
		s.entered <- name
		select {
		case <-s.release:
			return []byte(name), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	return s
}

// releaseAll lets every blocked and future "Block" call return.
func (s *crServer) releaseAll() { s.relOnce.Do(func() { close(s.release) }) }

// crServers makes and serves (with cbServe, which stops hard at cleanup) one server per name.
func crServers(t testing.TB, tr testkit.Transport, names ...string) []*crServer {
	t.Helper()
	var out []*crServer
	for _, name := range names {
		s := crNewServer(t, tr, name)
		cbServe(t, s.l, s.hm, call.ServerOptions{})
		t.Cleanup(s.releaseAll) // runs before cbServe's cleanup
		out = append(out, s)
	}
	return out
}

// crRun is a Serve that the test stops itself.
type crRun struct {
	cancel context.CancelFunc
	done   chan error
}

// crServeRun serves s until stop (or cleanup, which stops it, releases the server's blocked
// calls and joins Serve).
func crServeRun(t testing.TB, s *crServer, opts call.ServerOptions) *crRun {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &crRun{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- call.Serve(ctx, call.NetListener(s.l, s.hm), opts) }()
	t.Cleanup(func() {
		cancel()
		s.releaseAll()
		select {
		case err := <-r.done:
			r.done <- err
		case <-time.After(15 * time.Second):
			t.Errorf("Serve of %s did not return within 15s of its stop", s.name)
		}
	})
	return r
}

// wait returns Serve's error, failing t if Serve does not return within crBound.
func (r *crRun) wait(t testing.TB, what string) error {
	t.Helper()
	err := cbWait(t, what, r.done, crBound)
	r.done <- err // for cleanup
	return err
}

// crAddrs returns the addresses of servers.
func crAddrs(servers ...*crServer) []string {
	var out []string
	for _, s := range servers {
		out = append(out, s.ep.Address())
	}
	return out
}

// crEndpoints returns the endpoints of servers.
func crEndpoints(servers ...*crServer) []endpoint.Endpoint {
	var out []endpoint.Endpoint
	for _, s := range servers {
		out = append(out, s.ep)
	}
	return out
}

// crStates maps the address of each of st's endpoints to its state.
func crStates(st call.ConnectionStatus) map[string]call.EndpointState {
	m := map[string]call.EndpointState{}
	for _, e := range st.Endpoints {
		m[e.Address] = e.State
	}
	return m
}

// crWaitEndpoints waits until conn's status lists exactly the endpoints of want, each in its
// state.
func crWaitEndpoints(t testing.TB, conn call.Connection, what string, want map[string]call.EndpointState) call.ConnectionStatus {
	t.Helper()
	return ctWaitStatus(t, conn, what, func(st call.ConnectionStatus) bool {
		return st.Resolved && len(st.Endpoints) == len(want) && maps.Equal(crStates(st), want)
	})
}

// crReady maps the addresses of servers to EndpointReady.
func crReady(servers ...*crServer) map[string]call.EndpointState {
	m := map[string]call.EndpointState{}
	for _, a := range crAddrs(servers...) {
		m[a] = call.EndpointReady
	}
	return m
}

// crState returns the state of addr in st, and whether st lists it.
func crState(st call.ConnectionStatus, addr string) (call.EndpointState, bool) {
	for _, e := range st.Endpoints {
		if e.Address == addr {
			return e.State, true
		}
	}
	return 0, false
}

// crTo returns a balancer that picks the member with address addr, ready or not.
func crTo(addr string) balance.Balancer {
	return balance.Func(func(info balance.PickInfo) (balance.Member, error) {
		for _, m := range info.Members {
			if m.Endpoint().Address() == addr {
				return m, nil
			}
		}
		return nil, balance.ErrNoMember
	})
}

// crCalls makes n sequential "Name" calls with opts and counts the replies by server name.
func crCalls(t testing.TB, ctx context.Context, conn call.Connection, n int, opts call.CallOptions) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for i := range n {
		out, err := conn.Call(ctx, cbKey("Name"), nil, opts)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		counts[string(out)]++
	}
	return counts
}

// crWantServers checks that the calls counted in counts reached exactly the named servers.
func crWantServers(t testing.TB, what string, counts map[string]int, names ...string) {
	t.Helper()
	got := slices.Sorted(maps.Keys(counts))
	want := slices.Clone(names)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s: calls reached servers %v, want exactly %v", what, counts, want)
	}
}

// crWantCounts checks a server's accepted and server-closed connections.
func crWantCounts(t testing.TB, s *crServer, accepted, closed int) {
	t.Helper()
	a, c := s.count.counts()
	if a != accepted || c != closed {
		t.Errorf("server %s accepted %d connections and closed %d, want %d and %d", s.name, a, c, accepted, closed)
	}
}

// crWaitClosed waits until the server has closed n of its connections.
func crWaitClosed(t testing.TB, s *crServer, n int) {
	t.Helper()
	crWaitFor(t, fmt.Sprintf("server %s to close %d connections", s.name, n), &s.count.sig, func() bool {
		_, c := s.count.counts()
		return c >= n
	})
}

// crConnect connects to resolver with quiet logging; the test closes the connection.
func crConnect(t testing.TB, ctx context.Context, r resolve.Resolver, opts call.ClientOptions) call.Connection {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	conn, err := call.Connect(ctx, r, opts)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	return conn
}

// crBlockOn starts a "Block" call pinned to s and waits until its handler runs.
func crBlockOn(t testing.TB, ctx context.Context, conn call.Connection, s *crServer) <-chan cbResult {
	t.Helper()
	ch := cbGo(ctx, conn, cbKey("Block"), nil, call.CallOptions{Balancer: crTo(s.ep.Address())})
	select {
	case <-s.entered:
	case r := <-ch:
		t.Fatalf("blocking call on %s returned early: %q, %v", s.name, r.out, r.err)
	case <-time.After(crBound):
		t.Fatalf("blocking call on %s did not reach its handler within %v", s.name, crBound)
	}
	return ch
}

// crWantReply checks that a call succeeded with the reply want.
func crWantReply(t testing.TB, what string, r cbResult, want string) {
	t.Helper()
	if r.err != nil || string(r.out) != want {
		t.Errorf("%s: got %q, %v; want %q", what, r.out, r.err, want)
	}
}

// TestCRFlap follows RELIABILITY.md scenario 17's flap A → {A,B} → {B,C}: after each update
// the ready set is the resolved one, calls reach exactly its servers, the retained endpoint B
// keeps its one connection, and the removed A's connection is closed.
func TestCRFlap(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b", "c")
			a, b, c := srv[0], srv[1], srv[2]
			r := resolve.NewManual(a.ep)
			conn := crConnect(t, ctx, r, call.ClientOptions{})
			defer conn.Close()

			crWaitEndpoints(t, conn, "{A} ready", crReady(a))
			crWantServers(t, "set {A}", crCalls(t, ctx, conn, 6, call.CallOptions{}), "a")

			r.Update(a.ep, b.ep)
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))
			crWantServers(t, "set {A,B}", crCalls(t, ctx, conn, 12, call.CallOptions{}), "a", "b")
			crWantCounts(t, a, 1, 0)

			r.Update(b.ep, c.ep)
			crWaitEndpoints(t, conn, "{B,C} ready and A gone", crReady(b, c))
			crWantServers(t, "set {B,C}", crCalls(t, ctx, conn, 12, call.CallOptions{}), "b", "c")

			crWaitClosed(t, a, 1)
			crWantCounts(t, a, 1, 1)
			crWantCounts(t, b, 1, 0)
			crWantCounts(t, c, 1, 0)
		})
	}
}

// TestCRRemovedEndpointDrains removes an endpoint with a call in flight: new calls go to the
// other endpoint, the call in flight completes after its release, and only then is the removed
// endpoint's connection closed and the endpoint forgotten.
func TestCRRemovedEndpointDrains(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b")
			a, b := srv[0], srv[1]
			r := resolve.NewManual(a.ep, b.ep)
			conn := crConnect(t, ctx, r, call.ClientOptions{})
			defer conn.Close()
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))

			blocked := crBlockOn(t, ctx, conn, a)
			r.Update(b.ep)
			st := crWaitEndpoints(t, conn, "A draining", map[string]call.EndpointState{
				a.ep.Address(): call.EndpointDraining, b.ep.Address(): call.EndpointReady,
			})
			if got := st.Endpoints[len(st.Endpoints)-1]; got.Address != a.ep.Address() || got.InFlight != 1 {
				t.Errorf("status lists %+v last, want the draining A with 1 call in flight", got)
			}
			crWantServers(t, "calls after removing A", crCalls(t, ctx, conn, 10, call.CallOptions{}), "b")
			// A is out of the resolved set: a balancer cannot pick it.
			_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{Balancer: crTo(a.ep.Address())})
			cbWantErr(t, "call pinned to the removed A", err, call.ErrUnreachable, true)
			select {
			case res := <-blocked:
				t.Fatalf("the call in flight on A returned before its release: %q, %v", res.out, res.err)
			default:
			}
			crWantCounts(t, a, 1, 0)

			a.releaseAll()
			crWantReply(t, "the call in flight on the removed A", cbAwait(t, "call on A", blocked, crBound), "a")
			crWaitClosed(t, a, 1)
			crWaitEndpoints(t, conn, "A forgotten", crReady(b))
			crWantCounts(t, a, 1, 1)
			crWantCounts(t, b, 1, 0)
		})
	}
}

// TestCRDrainingEndpointRevived removes an endpoint with a call in flight and adds it back
// while it drains: it is ready again on the same connection, and takes calls.
func TestCRDrainingEndpointRevived(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b")
			a, b := srv[0], srv[1]
			r := resolve.NewManual(a.ep, b.ep)
			conn := crConnect(t, ctx, r, call.ClientOptions{})
			defer conn.Close()
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))

			blocked := crBlockOn(t, ctx, conn, a)
			r.Update(b.ep)
			crWaitEndpoints(t, conn, "A draining", map[string]call.EndpointState{
				a.ep.Address(): call.EndpointDraining, b.ep.Address(): call.EndpointReady,
			})
			r.Update(a.ep, b.ep)
			crWaitEndpoints(t, conn, "A revived", crReady(a, b))

			crWantServers(t, "calls pinned to the revived A", crCalls(t, ctx, conn, 5, call.CallOptions{Balancer: crTo(a.ep.Address())}), "a")
			crWantServers(t, "round-robin calls", crCalls(t, ctx, conn, 10, call.CallOptions{}), "a", "b")

			a.releaseAll()
			crWantReply(t, "the call in flight across the revival", cbAwait(t, "call on A", blocked, crBound), "a")
			// The revived connection is not drained by its last call returning.
			crWantServers(t, "calls on A after the release", crCalls(t, ctx, conn, 3, call.CallOptions{Balancer: crTo(a.ep.Address())}), "a")
			crWaitEndpoints(t, conn, "A still ready", crReady(a, b))
			crWantCounts(t, a, 1, 0)
			crWantCounts(t, b, 1, 0)
		})
	}
}

// TestCREmptyList updates the resolver to no endpoints: calls fail at once as unreachable and
// never ran (calls waiting for readiness wait), the old connections drain, and an update back
// to a set makes calls succeed again.
func TestCREmptyList(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b")
			a, b := srv[0], srv[1]
			r := resolve.NewManual(a.ep, b.ep)
			conn := crConnect(t, ctx, r, call.ClientOptions{})
			defer conn.Close()
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))

			r.Update()
			crWaitEndpoints(t, conn, "no endpoints", map[string]call.EndpointState{})
			crWaitClosed(t, a, 1)
			crWaitClosed(t, b, 1)

			waiting := cbGo(ctx, conn, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})
			for i := range 3 {
				cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
				start := time.Now()
				_, err := conn.Call(cctx, cbKey("Name"), nil, call.CallOptions{})
				elapsed := time.Since(start)
				cancel()
				cbWantErr(t, fmt.Sprintf("call %d with no endpoints", i), err, call.ErrUnreachable, true)
				if elapsed > 10*time.Second {
					t.Errorf("call %d with no endpoints took %v, want it to fail at once", i, elapsed)
				}
			}
			select {
			case res := <-waiting:
				t.Fatalf("a WaitForReady call returned with no endpoints: %q, %v", res.out, res.err)
			default:
			}

			r.Update(a.ep, b.ep)
			if res := cbAwait(t, "the WaitForReady call", waiting, crBound); res.err != nil || (string(res.out) != "a" && string(res.out) != "b") {
				t.Errorf("WaitForReady call: got %q, %v; want a reply from A or B", res.out, res.err)
			}
			crWaitEndpoints(t, conn, "{A,B} ready again", crReady(a, b))
			crWantServers(t, "calls after the set returned", crCalls(t, ctx, conn, 10, call.CallOptions{}), "a", "b")
			crWantCounts(t, a, 2, 1)
			crWantCounts(t, b, 2, 1)
		})
	}
}

// crResolver is a Manual resolver that can be told to fail. It counts its Resolve calls.
type crResolver struct {
	m   *resolve.Manual
	sig crSignal

	mu sync.Mutex
	// guarded by mu
	err   error
	calls int
}

var _ resolve.Resolver = (*crResolver)(nil)

func (r *crResolver) IsConstant() bool { return false }

func (r *crResolver) Resolve(ctx context.Context, v *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
	r.mu.Lock()
	r.calls++
	err := r.err
	r.mu.Unlock()
	r.sig.pulse()
	if err != nil {
		return nil, nil, err
	}
	eps, nv, err := r.m.Resolve(ctx, v)
	if err == nil {
		r.mu.Lock()
		ferr := r.err
		r.mu.Unlock()
		if ferr != nil {
			return nil, nil, ferr
		}
	}
	return eps, nv, err
}

// setErr makes Resolve fail with err (or succeed again if err is nil), waking a blocked one.
func (r *crResolver) setErr(err error) {
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
	r.m.Update(r.m.Endpoints()...)
}

func (r *crResolver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

// crWaitResolves waits until the resolver has been called at least n times.
func crWaitResolves(t testing.TB, r *crResolver, n int) {
	t.Helper()
	crWaitFor(t, fmt.Sprintf("%d calls of the resolver", n), &r.sig, func() bool { return r.count() >= n })
}

// crFastBackoff keeps resolver retries quick.
var crFastBackoff = call.Backoff{Base: 10 * time.Millisecond, Max: 50 * time.Millisecond}

var errCRResolver = errors.New("cr: resolver is down")

// crMinResolveInterval is the least spacing of Resolve calls a client must keep (the client's
// own floor is 100ms; a failing resolver is asked no more often than that).
const crMinResolveInterval = 100 * time.Millisecond

// TestCRResolverErrorKeepsLastGoodSet makes the resolver fail after a good answer: calls keep
// going to the last good set, Status reports the error, the resolver is retried but not
// hammered, and its recovery is followed.
func TestCRResolverErrorKeepsLastGoodSet(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b")
			a, b := srv[0], srv[1]
			r := &crResolver{m: resolve.NewManual(a.ep, b.ep)}
			conn := crConnect(t, ctx, r, call.ClientOptions{Backoff: crFastBackoff})
			defer conn.Close()
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))

			start, before := time.Now(), r.count()
			r.setErr(errCRResolver)
			st := ctWaitStatus(t, conn, "the resolver error in Status", func(st call.ConnectionStatus) bool {
				return st.ResolveErr != nil
			})
			if !errors.Is(st.ResolveErr, errCRResolver) {
				t.Errorf("Status().ResolveErr = %v, want %v", st.ResolveErr, errCRResolver)
			}
			if !st.Resolved || !maps.Equal(crStates(st), crReady(a, b)) {
				t.Errorf("status after the resolver failed: resolved %v, endpoints %v; want {A,B} ready", st.Resolved, crStates(st))
			}
			crWantServers(t, "calls while the resolver fails", crCalls(t, ctx, conn, 10, call.CallOptions{}), "a", "b")
			crWaitResolves(t, r, before+4) // it is retried
			calls, elapsed := r.count()-before, time.Since(start)
			if limit := int(elapsed/crMinResolveInterval) + 2; calls > limit {
				t.Errorf("the failing resolver was called %d times in %v, want at most %d", calls, elapsed, limit)
			}

			r.setErr(nil)
			r.m.Update(b.ep)
			st = crWaitEndpoints(t, conn, "the recovered resolver's set {B}", crReady(b))
			if st.ResolveErr != nil {
				t.Errorf("Status().ResolveErr = %v after the resolver recovered, want nil", st.ResolveErr)
			}
			crWantServers(t, "calls after the recovery", crCalls(t, ctx, conn, 5, call.CallOptions{}), "b")
			crWaitClosed(t, a, 1) // the removed endpoint's connection closes once drained, asynchronously
			crWantCounts(t, a, 1, 1)
			crWantCounts(t, b, 1, 0)
		})
	}
}

// TestCRResolverFailsBeforeFirstAnswer makes the resolver fail from the start: calls fail at
// once as unreachable, wrapping the resolver's error; calls that wait for readiness wait
// until the resolver recovers, then succeed.
func TestCRResolverFailsBeforeFirstAnswer(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a")
			a := srv[0]
			r := &crResolver{m: resolve.NewManual(a.ep), err: errCRResolver}
			conn := crConnect(t, ctx, r, call.ClientOptions{Backoff: crFastBackoff})
			defer conn.Close()

			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			_, err := conn.Call(cctx, cbKey("Name"), nil, call.CallOptions{})
			cancel()
			cbWantErr(t, "call before any good answer", err, call.ErrUnreachable, true)
			if !errors.Is(err, errCRResolver) {
				t.Errorf("call before any good answer: error %q does not wrap the resolver's error", err)
			}
			st := conn.(call.Inspectable).Status()
			if st.Resolved || !errors.Is(st.ResolveErr, errCRResolver) || len(st.Endpoints) != 0 {
				t.Errorf("status = %+v, want unresolved with the resolver's error and no endpoints", st)
			}

			waiting := cbGo(ctx, conn, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})
			crWaitResolves(t, r, r.count()+2)
			select {
			case res := <-waiting:
				t.Fatalf("a WaitForReady call returned while the resolver fails: %q, %v", res.out, res.err)
			default:
			}
			r.setErr(nil)
			crWantReply(t, "the WaitForReady call", cbAwait(t, "the WaitForReady call", waiting, crBound), "a")
			crWantServers(t, "calls after the recovery", crCalls(t, ctx, conn, 3, call.CallOptions{}), "a")
			if st := conn.(call.Inspectable).Status(); !st.Resolved || st.ResolveErr != nil {
				t.Errorf("status after the recovery: resolved %v, error %v; want resolved, no error", st.Resolved, st.ResolveErr)
			}
		})
	}
}

// TestCRGracefulDrain is RELIABILITY.md scenario 13, graceful drain while calls are in
// flight: server A's Serve is cancelled with a drain timeout while it runs calls. The calls
// it admitted finish, new calls go to B, and none hang.
func TestCRGracefulDrain(t *testing.T) {
	const blocked = 4
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 40*time.Second)
			a := crNewServer(t, tr, "a")
			runA := crServeRun(t, a, call.ServerOptions{DrainTimeout: 30 * time.Second})
			b := crServers(t, tr, "b")[0]
			conn := crConnect(t, ctx, resolve.NewManual(a.ep, b.ep), call.ClientOptions{})
			defer conn.Close()
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))

			var inFlight []<-chan cbResult
			for range blocked {
				inFlight = append(inFlight, crBlockOn(t, ctx, conn, a))
			}
			runA.cancel() // graceful: a go-away, then up to 30s for the calls in flight

			// Calls racing the go-away either succeed (on A before it, or moved to B) or
			// provably never ran.
			var racing []<-chan cbResult
			for range 10 {
				racing = append(racing, cbGo(ctx, conn, cbKey("Name"), nil, call.CallOptions{}))
			}
			for i, ch := range racing {
				res := cbAwait(t, fmt.Sprintf("racing call %d", i), ch, crBound)
				if res.err != nil && !call.NeverRan(res.err) {
					t.Errorf("racing call %d: %v; want success or an error that never ran", i, res.err)
				}
			}

			ctWaitStatus(t, conn, "A no longer ready", func(st call.ConnectionStatus) bool {
				s, ok := crState(st, a.ep.Address())
				return ok && s != call.EndpointReady
			})
			crWantServers(t, "calls after A's go-away", crCalls(t, ctx, conn, 10, call.CallOptions{}), "b")
			for i, ch := range inFlight {
				select {
				case res := <-ch:
					t.Fatalf("call %d admitted by A returned before its release: %q, %v", i, res.out, res.err)
				default:
				}
			}

			a.releaseAll()
			for i, ch := range inFlight {
				crWantReply(t, fmt.Sprintf("call %d admitted by A", i), cbAwait(t, fmt.Sprintf("call %d admitted by A", i), ch, crBound), "a")
			}
			if err := runA.wait(t, "A's Serve to return after its drain"); !errors.Is(err, context.Canceled) {
				t.Errorf("A's Serve returned %v, want an error wrapping context.Canceled", err)
			}
			// Serve has returned, so every connection it accepted is closed. (A redial racing
			// the listener's close may have been accepted and refused.)
			if accepted, closed := a.count.counts(); accepted < 1 || closed != accepted {
				t.Errorf("A accepted %d connections and closed %d after its Serve returned, want them equal", accepted, closed)
			}
			crWantServers(t, "calls after A stopped", crCalls(t, ctx, conn, 5, call.CallOptions{}), "b")
		})
	}
}

// TestCRClose closes a Connection with calls in progress and a call waiting for readiness:
// they fail instead of hanging, later calls fail at once as unreachable and closed, and Close
// can be called again. The package's leak check verifies that every goroutine ended.
func TestCRClose(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b")
			a, b := srv[0], srv[1]
			conn := crConnect(t, ctx, resolve.NewManual(a.ep, b.ep), call.ClientOptions{})
			crWaitEndpoints(t, conn, "{A,B} ready", crReady(a, b))
			var inFlight []<-chan cbResult
			for _, s := range []*crServer{a, b, a} {
				inFlight = append(inFlight, crBlockOn(t, ctx, conn, s))
			}

			// A second Connection with no endpoints, and a call waiting for one.
			empty := crConnect(t, ctx, resolve.NewManual(), call.ClientOptions{})
			ctWaitStatus(t, empty, "the empty set resolved", func(st call.ConnectionStatus) bool { return st.Resolved })
			waiting := cbGo(ctx, empty, cbKey("Name"), nil, call.CallOptions{WaitForReady: true})

			closed := make(chan struct{})
			go func() {
				defer close(closed)
				conn.Close()
				empty.Close()
			}()
			cbWait(t, "Close to return", closed, crBound)
			for i, ch := range inFlight {
				res := cbAwait(t, fmt.Sprintf("call %d in progress at Close", i), ch, crBound)
				cbWantErr(t, fmt.Sprintf("call %d in progress at Close", i), res.err, call.ErrCommunication, false)
				if !errors.Is(res.err, call.ErrClosed) {
					t.Errorf("call %d in progress at Close: error %q does not wrap ErrClosed", i, res.err)
				}
			}
			res := cbAwait(t, "the WaitForReady call at Close", waiting, crBound)
			cbWantErr(t, "the WaitForReady call at Close", res.err, call.ErrUnreachable, true)

			conn.Close()
			empty.Close()
			for _, c := range []call.Connection{conn, empty} {
				for _, opts := range []call.CallOptions{{}, {WaitForReady: true}} {
					cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
					_, err := c.Call(cctx, cbKey("Name"), nil, opts)
					cancel()
					cbWantErr(t, fmt.Sprintf("call after Close (%+v)", opts), err, call.ErrUnreachable, true)
					if !errors.Is(err, call.ErrClosed) {
						t.Errorf("call after Close: error %q does not wrap ErrClosed", err)
					}
				}
				if st := c.(call.Inspectable).Status(); !st.Closed {
					t.Errorf("Status().Closed = false after Close")
				}
			}
			crWaitClosed(t, a, 1)
			crWaitClosed(t, b, 1)
		})
	}
}

// TestCRSharded shards calls over three servers: every key, 0 included, always reaches the
// same server, and keys are spread over all three. When a key's owner stops, its keys fail as
// unreachable and never ran, and other keys stay on their owners.
func TestCRSharded(t *testing.T) {
	keys := []uint64{0, 1, 2, 3, 4, 5, 6, math.MaxUint64}
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			var srv []*crServer
			runs := map[string]*crRun{}
			for _, name := range []string{"a", "b", "c"} {
				s := crNewServer(t, tr, name)
				runs[name] = crServeRun(t, s, call.ServerOptions{DrainTimeout: -1})
				srv = append(srv, s)
			}
			conn := crConnect(t, ctx, resolve.NewManual(crEndpoints(srv...)...), call.ClientOptions{Balancer: balance.Sharded()})
			defer conn.Close()
			crWaitEndpoints(t, conn, "three ready", crReady(srv...))

			owner := map[uint64]string{}
			for _, k := range keys {
				counts := crCalls(t, ctx, conn, 5, call.CallOptions{ShardKey: k, Sharded: true})
				if len(counts) != 1 {
					t.Fatalf("calls with key %d reached %v, want one server", k, counts)
				}
				for name := range counts {
					owner[k] = name
				}
			}
			if owner[0] != owner[3] || owner[1] != owner[4] || owner[2] != owner[5] || owner[0] != owner[6] {
				t.Errorf("owners %v: want keys equal mod 3 on the same server", owner)
			}
			if len(map[string]bool{owner[0]: true, owner[1]: true, owner[2]: true}) != 3 {
				t.Errorf("owners %v: want keys 0, 1, 2 on three different servers", owner)
			}

			// Stop key 0's owner hard.
			var down *crServer
			for _, s := range srv {
				if s.name == owner[0] {
					down = s
				}
			}
			runs[down.name].cancel()
			down.l.Close()
			runs[down.name].wait(t, "the stopped owner's Serve")
			ctWaitStatus(t, conn, "the stopped owner failed", func(st call.ConnectionStatus) bool {
				s, ok := crState(st, down.ep.Address())
				return ok && s == call.EndpointFailed
			})

			for round := range 3 {
				for _, k := range keys {
					cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
					out, err := conn.Call(cctx, cbKey("Name"), nil, call.CallOptions{ShardKey: k, Sharded: true})
					cancel()
					if owner[k] == down.name {
						cbWantErr(t, fmt.Sprintf("round %d, key %d of the stopped owner", round, k), err, call.ErrUnreachable, true)
						continue
					}
					if err != nil || string(out) != owner[k] {
						t.Errorf("round %d, key %d: got %q, %v; want its owner %q", round, k, out, err, owner[k])
					}
				}
			}
			counts := crCalls(t, ctx, conn, 12, call.CallOptions{})
			if counts[down.name] != 0 {
				t.Errorf("unsharded calls reached the stopped server: %v", counts)
			}
		})
	}
}

// crMember is a balance.Member of no Connection.
type crMember struct{ ep endpoint.Endpoint }

func (m crMember) Endpoint() endpoint.Endpoint { return m.ep }
func (crMember) Ready() bool                   { return true }
func (crMember) InFlight() int                 { return 0 }
func (crMember) Load() float64                 { return 0 }

// TestCRPerCallBalancer checks that CallOptions.Balancer overrides ClientOptions.Balancer, and
// that a balancer returning a member of no Connection fails the call as unreachable.
func TestCRPerCallBalancer(t *testing.T) {
	for _, tr := range cbTransports(crTransports...) {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			srv := crServers(t, tr, "a", "b", "c")
			a, b, c := srv[0], srv[1], srv[2]
			conn := crConnect(t, ctx, resolve.NewManual(a.ep, b.ep, c.ep), call.ClientOptions{Balancer: crTo(a.ep.Address())})
			defer conn.Close()
			crWaitEndpoints(t, conn, "three ready", crReady(a, b, c))

			crWantServers(t, "calls with the client's balancer", crCalls(t, ctx, conn, 6, call.CallOptions{}), "a")
			crWantServers(t, "calls with a balancer for B", crCalls(t, ctx, conn, 6, call.CallOptions{Balancer: crTo(b.ep.Address())}), "b")
			crWantServers(t, "calls with a balancer for C", crCalls(t, ctx, conn, 6, call.CallOptions{Balancer: crTo(c.ep.Address())}), "c")
			crWantServers(t, "round-robin calls", crCalls(t, ctx, conn, 9, call.CallOptions{Balancer: balance.RoundRobin()}), "a", "b", "c")
			crWantServers(t, "calls with the client's balancer again", crCalls(t, ctx, conn, 3, call.CallOptions{}), "a")

			stranger := balance.Func(func(balance.PickInfo) (balance.Member, error) { return crMember{ep: b.ep}, nil })
			_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{Balancer: stranger})
			cbWantErr(t, "call with a balancer returning a foreign member", err, call.ErrUnreachable, true)
		})
	}
}
