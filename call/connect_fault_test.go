package call_test

// Fault tests of Connect's pool over real sockets (TCP and Unix), with testkit.Proxy in front
// of a backend to blackhole it: a killed backend, a partitioned one (RELIABILITY.md scenario
// 14), a slow one under a least-loaded balancer, and a resolved set that flaps under load
// (scenario 17). Over real sockets these tests assert only that nothing hangs (generous bounds)
// and where calls go, never a speed; they log how long traffic took to move. Identifiers of
// this file start with "cf".

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

// cfNetworks are the transports of this file's tests.
var cfNetworks = []string{"tcp", "unix"}

// cfMargin is how far past its deadline a call may return before it counts as hung.
const cfMargin = 3 * time.Second

// cfBackend is a server over a real socket whose "Name" method answers its name after delay.
type cfBackend struct {
	name  string
	addr  string // the listener's address
	ep    endpoint.Endpoint
	runs  atomic.Int64
	delay time.Duration
	stop  context.CancelFunc
	done  chan struct{}
}

// cfServe starts a backend on network; cleanup stops it hard and joins Serve.
func cfServe(t *testing.T, network, name string, delay time.Duration) *cfBackend {
	t.Helper()
	var tr testkit.Transport
	for _, x := range testkit.Transports() {
		if x.Name == network {
			tr = x
		}
	}
	l, ep := tr.Listen(t)
	b := &cfBackend{name: name, addr: l.Addr().String(), ep: ep, delay: delay, done: make(chan struct{})}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(ctx context.Context, _ []byte) ([]byte, error) {
		b.runs.Add(1)
		if b.delay > 0 {
			timer := time.NewTimer(b.delay)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return []byte(name), nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	b.stop = cancel
	go func() {
		defer close(b.done)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{Logger: cbQuiet, DrainTimeout: -1})
	}()
	t.Cleanup(func() { b.kill(t) })
	return b
}

// kill stops the backend at once (a hard stop: its connections close, its listener closes)
// and waits for Serve to return.
func (b *cfBackend) kill(t *testing.T) {
	t.Helper()
	b.stop()
	select {
	case <-b.done:
	case <-time.After(crBound):
		t.Errorf("Serve of %s did not return within %v of a hard stop", b.name, crBound)
	}
}

// cfProxy puts a testkit.Proxy in front of b; cleanup closes it.
func cfProxy(t *testing.T, network string, b *cfBackend) *testkit.Proxy {
	t.Helper()
	p, err := testkit.NewProxy(network, b.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// cfPicks is a balancer that records when it last picked each endpoint.
type cfPicks struct {
	inner balance.Balancer

	mu sync.Mutex
	// guarded by mu
	last map[string]time.Time
	n    map[string]int
}

func cfRecord(inner balance.Balancer) *cfPicks {
	return &cfPicks{inner: inner, last: map[string]time.Time{}, n: map[string]int{}}
}

func (p *cfPicks) Pick(info balance.PickInfo) (balance.Member, error) {
	m, err := p.inner.Pick(info)
	if err == nil {
		now := time.Now()
		p.mu.Lock()
		p.last[m.Endpoint().Address()] = now
		p.n[m.Endpoint().Address()]++
		p.mu.Unlock()
	}
	return m, err
}

// lastPick returns when addr was last picked, and how often it was.
func (p *cfPicks) lastPick(addr string) (time.Time, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last[addr], p.n[addr]
}

// cfLoad is callers making "Name" calls in a loop, each with a deadline.
type cfLoad struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu sync.Mutex
	// guarded by mu
	calls, ok int
	errs      map[string]int // failed calls by category
	maxTook   time.Duration
	bad       []error // errors outside what the test allows
}

// cfStartLoad starts callers that call conn with deadline d until finish. allowed says which
// errors are expected; others are recorded as bad. Cleanup joins the callers.
func cfStartLoad(t *testing.T, conn call.Connection, callers int, d time.Duration, opts call.CallOptions, allowed func(error) bool) *cfLoad {
	l := &cfLoad{stop: make(chan struct{}), errs: map[string]int{}}
	for range callers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), d)
				start := time.Now()
				_, err := conn.Call(ctx, cbKey("Name"), nil, opts)
				took := time.Since(start)
				cancel()
				l.mu.Lock()
				l.calls++
				l.maxTook = max(l.maxTook, took)
				switch {
				case err == nil:
					l.ok++
				case allowed(err):
					l.errs[cfCategory(err)]++
				default:
					l.errs[cfCategory(err)]++
					if len(l.bad) < 10 {
						l.bad = append(l.bad, err)
					}
				}
				l.mu.Unlock()
				if err != nil && !errors.Is(err, context.DeadlineExceeded) {
					// A failing call returns at once: do not spin.
					time.Sleep(time.Millisecond)
				}
			}
		}()
	}
	t.Cleanup(l.finish)
	return l
}

// finish stops the callers and waits for them. It can be called more than once.
func (l *cfLoad) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// check stops the load and checks that no call took longer than its deadline d plus cfMargin
// and that every error was allowed.
func (l *cfLoad) check(t *testing.T, what string, d time.Duration) {
	t.Helper()
	l.finish()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("%s: %d calls, %d succeeded, failures by category %v, longest %v", what, l.calls, l.ok, l.errs, l.maxTook.Round(time.Millisecond))
	if l.maxTook > d+cfMargin {
		t.Errorf("%s: a call with a %v deadline returned after %v", what, d, l.maxTook)
	}
	for _, err := range l.bad {
		t.Errorf("%s: unexpected error %v (never ran: %v)", what, err, call.NeverRan(err))
	}
	if l.ok == 0 {
		t.Errorf("%s: no call succeeded", what)
	}
}

// cfCategory names the category of a call's error.
func cfCategory(err error) string {
	for _, c := range cbCategories {
		if errors.Is(err, c) {
			return c.Error()
		}
	}
	return "uncategorized"
}

// cfWantNoPicks makes n sequential calls that must succeed, none of them picked at addr.
func cfWantNoPicks(t *testing.T, what string, conn call.Connection, picks *cfPicks, addr string, n int) {
	t.Helper()
	_, before := picks.lastPick(addr)
	ctx := cbCtx(t, crBound)
	for i := range n {
		if _, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{}); err != nil {
			t.Fatalf("%s: call %d: %v", what, i, err)
		}
	}
	if _, after := picks.lastPick(addr); after != before {
		t.Errorf("%s: %d of %d calls went to %s", what, after-before, n, addr)
	}
}

// A backend that is killed gets no more calls once its connection is seen to close; no call
// hangs past its deadline meanwhile. It is killed in two ways: its server stops at once (a
// hard stop: a go-away, then its connections and listener close), or a proxy in front of it
// resets every connection, current and new (a crashed host; over Unix sockets a plain close).
func TestCFKillBackend(t *testing.T) {
	for _, network := range cfNetworks {
		for _, how := range []string{"stop", "reset"} {
			t.Run(network+" "+how, func(t *testing.T) {
				a := cfServe(t, network, "a", 0)
				b := cfServe(t, network, "b", 0)
				c := cfServe(t, network, "c", 0)
				bep, kill := b.ep, func() { b.kill(t) }
				if how == "reset" {
					px := cfProxy(t, network, b)
					bep, kill = px.Endpoint(), px.Reset
				}
				picks := cfRecord(balance.RoundRobin())
				conn := crConnect(t, cbCtx(t, crBound), resolve.Constant(a.ep, bep, c.ep), call.ClientOptions{Balancer: picks})
				defer conn.Close()
				ctWaitStatus(t, conn, "three ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 3 })

				const deadline = 2 * time.Second
				// A call in flight when b dies may fail either way; new calls must not.
				load := cfStartLoad(t, conn, 8, deadline, call.CallOptions{}, func(err error) bool {
					return errors.Is(err, call.ErrCommunication) || call.NeverRan(err)
				})
				time.Sleep(200 * time.Millisecond)
				killed := time.Now()
				kill()
				ctWaitStatus(t, conn, "b not ready after its kill", func(st call.ConnectionStatus) bool {
					s, _ := crState(st, bep.Address())
					return s != call.EndpointReady
				})
				detected := time.Since(killed)
				time.Sleep(300 * time.Millisecond)
				load.check(t, "load while b was killed", deadline)
				last, n := picks.lastPick(bep.Address())
				t.Logf("kill (%s): b seen down %v after its kill; the last of its %d calls was picked %v after the kill", how, detected.Round(time.Millisecond), n, last.Sub(killed).Round(time.Millisecond))
				cfWantNoPicks(t, "calls after b was killed", conn, picks, bep.Address(), 30)
			})
		}
	}
}

// A backend behind a blackholed proxy (a partition: no FIN, no RST) fails its health check and
// is evicted; calls stuck on it end at their deadline, new calls go elsewhere, and traffic
// returns once the partition heals.
func TestCFBlackhole(t *testing.T) {
	for _, network := range cfNetworks {
		t.Run(network, func(t *testing.T) {
			a := cfServe(t, network, "a", 0)
			b := cfServe(t, network, "b", 0)
			c := cfServe(t, network, "c", 0)
			px := cfProxy(t, network, b)
			bep := px.Endpoint()
			picks := cfRecord(balance.RoundRobin())
			conn := crConnect(t, cbCtx(t, crBound), resolve.Constant(a.ep, bep, c.ep), call.ClientOptions{
				Balancer: picks,
				// Ejection is off so that the calls timing out in the partition do not keep b
				// out after the heal: this test is about health checks.
				Pool: call.PoolOptions{HealthCheckInterval: 200 * time.Millisecond, HealthCheckTimeout: 200 * time.Millisecond, EjectAfter: -1},
			})
			defer conn.Close()
			ctWaitStatus(t, conn, "three healthy endpoints", func(st call.ConnectionStatus) bool {
				n := 0
				for _, e := range st.Endpoints {
					if e.Healthy {
						n++
					}
				}
				return n == 3
			})

			const deadline = 2 * time.Second
			// Calls caught in the partition end at their deadline; nothing else may fail.
			load := cfStartLoad(t, conn, 8, deadline, call.CallOptions{}, func(err error) bool {
				return errors.Is(err, context.DeadlineExceeded) || call.NeverRan(err)
			})
			time.Sleep(200 * time.Millisecond)
			holed := time.Now()
			px.Blackhole()
			ctWaitStatus(t, conn, "b unhealthy in the partition", func(st call.ConnectionStatus) bool {
				for _, e := range st.Endpoints {
					if e.Address == bep.Address() {
						return !e.Healthy
					}
				}
				return false
			})
			detected := time.Since(holed)
			time.Sleep(deadline + 500*time.Millisecond) // every call caught in the partition has ended
			load.check(t, "load during the partition", deadline)
			last, n := picks.lastPick(bep.Address())
			t.Logf("blackhole: b evicted %v after the partition began (checks every 200ms, 200ms timeout); the last of its %d calls was picked %v after it began", detected.Round(time.Millisecond), n, last.Sub(holed).Round(time.Millisecond))
			cfWantNoPicks(t, "calls during the partition, after the eviction", conn, picks, bep.Address(), 30)

			px.Pass()
			healed := time.Now()
			ctWaitStatus(t, conn, "b healthy after the heal", func(st call.ConnectionStatus) bool {
				for _, e := range st.Endpoints {
					if e.Address == bep.Address() {
						return e.Healthy && e.State == call.EndpointReady
					}
				}
				return false
			})
			t.Logf("blackhole: b healthy again %v after the heal", time.Since(healed).Round(time.Millisecond))
			before := b.runs.Load()
			crCalls(t, cbCtx(t, crBound), conn, 30, call.CallOptions{})
			// About 10; fewer if a health check of a loaded machine evicts a connection.
			if got := b.runs.Load() - before; got == 0 {
				t.Errorf("30 round-robin calls after the heal ran none on b")
			}
		})
	}
}

// With one slow backend (each reply delayed 20ms by its handler), LeastLoaded sends it a
// smaller share of the calls of 16 concurrent callers than RoundRobin does.
func TestCFSlowBackendLeastLoaded(t *testing.T) {
	a := cfServe(t, "tcp", "a", 0)
	b := cfServe(t, "tcp", "b", 0)
	slow := cfServe(t, "tcp", "slow", 20*time.Millisecond)
	conn := crConnect(t, cbCtx(t, crBound), resolve.Constant(a.ep, b.ep, slow.ep), call.ClientOptions{})
	defer conn.Close()
	ctWaitStatus(t, conn, "three ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 3 })

	const callers, perCaller = 16, 30
	share := func(bal balance.Balancer) float64 {
		before := slow.runs.Load()
		var wg sync.WaitGroup
		errs := make(chan error, callers)
		for range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), crBound)
				defer cancel()
				for range perCaller {
					if _, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{Balancer: bal}); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("call: %v", err)
		}
		return float64(slow.runs.Load()-before) / (callers * perCaller)
	}
	rr := share(balance.RoundRobin())
	p2c := share(balance.LeastLoaded())
	t.Logf("share of the slow backend: round robin %.3f, least loaded %.3f", rr, p2c)
	if p2c >= rr {
		t.Errorf("least loaded sent %.3f of the calls to the slow backend, round robin %.3f; want less", p2c, rr)
	}
}

// The resolved set flaps every few milliseconds under load: every call succeeds or fails with
// an error that proves it never ran, and none hangs.
func TestCFFlappingSet(t *testing.T) {
	for _, network := range cfNetworks {
		t.Run(network, func(t *testing.T) {
			var eps []endpoint.Endpoint
			for _, name := range []string{"a", "b", "c", "d"} {
				eps = append(eps, cfServe(t, network, name, 0).ep)
			}
			m := resolve.NewManual(eps...)
			conn := crConnect(t, cbCtx(t, crBound), m, call.ClientOptions{Backoff: crFastBackoff})
			defer conn.Close()
			const deadline = 3 * time.Second
			load := cfStartLoad(t, conn, 8, deadline, call.CallOptions{}, call.NeverRan)

			stop := make(chan struct{})
			flapped := make(chan int)
			go func() {
				n := 0
				defer func() { flapped <- n }()
				for {
					select {
					case <-stop:
						return
					case <-time.After(3 * time.Millisecond):
					}
					var set []endpoint.Endpoint
					for _, ep := range eps {
						if rand.IntN(2) == 0 {
							set = append(set, ep)
						}
					}
					m.Update(set...)
					n++
				}
			}()
			time.Sleep(1500 * time.Millisecond)
			close(stop)
			n := <-flapped
			m.Update(eps...)
			load.check(t, fmt.Sprintf("load during %d updates of the set", n), deadline)
			ctWaitStatus(t, conn, "the full set ready again", func(st call.ConnectionStatus) bool {
				return len(st.Endpoints) == len(eps) && ctCount(st, call.EndpointReady) == len(eps)
			})
			counts := crCalls(t, cbCtx(t, crBound), conn, 40, call.CallOptions{})
			if len(counts) != len(eps) || slices.Min(cfValues(counts)) != 10 {
				t.Errorf("40 calls after the flapping stopped reached %v, want 10 on each of the 4 servers", counts)
			}
		})
	}
}

// cfValues returns the values of m.
func cfValues(m map[string]int) []int {
	out := make([]int, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}
