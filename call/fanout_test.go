package call_test

// Tests of fan-out calls (FanOut.CallAll on a Connection from Connect): one reply per
// endpoint, identified and in arrival order, the error of an endpoint that is down beside the
// others' results, the caller's deadline over the whole fan-out, cancellation of the rest when
// the loop breaks, waiting for the resolver, an empty set, idle members and the ownership of
// results. Every test runs in a testing/synctest bubble over in-memory pipes, so arrival times
// are checked exactly on the bubble's fake clock. Identifiers of this file start with "ft".

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// ftEnd is how a "Slow" handler ended: when, and its context's error then.
type ftEnd struct {
	at  time.Time
	err error
}

// ftBackend is a server named name in the bubble. Its "Echo" method answers the name, a colon
// and the arguments; "Args" answers the argument slice itself; "Slow" answers the name after
// delay (at once if zero, never if negative: it waits for its context) and records how it
// ended.
type ftBackend struct {
	name  string
	srv   *cttServer
	delay atomic.Int64 // a time.Duration
	runs  atomic.Int64 // handlers started, all methods

	mu sync.Mutex
	// guarded by mu
	ends []ftEnd
}

// ftNewBackend serves a backend named name; cleanup stops it.
func ftNewBackend(t *testing.T, name string) *ftBackend {
	t.Helper()
	b := &ftBackend{name: name}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Echo", func(_ context.Context, args []byte) ([]byte, error) {
		b.runs.Add(1)
		return []byte(name + ":" + string(args)), nil
	})
	hm.Set(cbComponent, "Args", func(_ context.Context, args []byte) ([]byte, error) {
		b.runs.Add(1)
		return args, nil
	})
	hm.Set(cbComponent, "Slow", func(ctx context.Context, _ []byte) ([]byte, error) {
		b.runs.Add(1)
		var err error
		switch d := time.Duration(b.delay.Load()); {
		case d < 0:
			<-ctx.Done()
			err = ctx.Err()
		case d > 0:
			timer := time.NewTimer(d)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		b.mu.Lock()
		b.ends = append(b.ends, ftEnd{time.Now(), err})
		b.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return []byte(name), nil
	})
	b.srv = cttServe(t, name, &hm, call.ServerOptions{InlineHandlerDuration: -1})
	return b
}

func (b *ftBackend) ep() endpoint.Endpoint { return b.srv.pl }
func (b *ftBackend) addr() string          { return b.srv.pl.Address() }

func (b *ftBackend) ended() []ftEnd {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.ends)
}

// ftEndpoints returns the endpoints of bs.
func ftEndpoints(bs ...*ftBackend) []endpoint.Endpoint {
	var eps []endpoint.Endpoint
	for _, b := range bs {
		eps = append(eps, b.ep())
	}
	return eps
}

// ftReply is a Reply and the fake time it arrived after the fan-out started.
type ftReply struct {
	call.Reply
	after time.Duration
}

// ftFan returns conn as a FanOut, failing t if it is not one.
func ftFan(t *testing.T, conn call.Connection) call.FanOut {
	t.Helper()
	f, ok := conn.(call.FanOut)
	if !ok {
		t.Fatalf("%T does not implement call.FanOut", conn)
	}
	return f
}

// ftCollect runs a fan-out call of method to completion and returns its replies with their
// arrival times, and how long the whole loop took.
func ftCollect(t *testing.T, ctx context.Context, conn call.Connection, method string, args []byte, opts call.CallOptions) ([]ftReply, time.Duration) {
	t.Helper()
	start := time.Now()
	var out []ftReply
	for r := range ftFan(t, conn).CallAll(ctx, cbKey(method), args, opts) {
		out = append(out, ftReply{r, time.Since(start)})
	}
	return out, time.Since(start)
}

// ftByAddr returns the replies by endpoint address, failing t on duplicates.
func ftByAddr(t *testing.T, replies []ftReply) map[string]ftReply {
	t.Helper()
	m := map[string]ftReply{}
	for _, r := range replies {
		if _, dup := m[r.Endpoint]; dup {
			t.Errorf("two replies from %q", r.Endpoint)
		}
		m[r.Endpoint] = r
	}
	return m
}

// Three backends yield three replies, each identified by its endpoint's address, as they
// arrive: the slow one last, when it answers.
func TestFTRepliesInArrivalOrder(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a, b, c := ftNewBackend(t, "a"), ftNewBackend(t, "b"), ftNewBackend(t, "c")
		a.delay.Store(int64(time.Second))
		conn := cttConnect(t, resolve.Constant(ftEndpoints(a, b, c)...), call.ClientOptions{})
		replies, took := ftCollect(t, cbCtx(t, time.Minute), conn, "Slow", nil, call.CallOptions{})
		if len(replies) != 3 {
			t.Fatalf("got %d replies, want 3: %+v", len(replies), replies)
		}
		names := map[string]string{a.addr(): "a", b.addr(): "b", c.addr(): "c"}
		for i, r := range replies {
			if r.Err != nil || string(r.Result) != names[r.Endpoint] {
				t.Errorf("reply %d from %q: %q, %v; want its endpoint's name", i, r.Endpoint, r.Result, r.Err)
			}
		}
		if last := replies[2]; last.Endpoint != a.addr() || last.after != time.Second {
			t.Errorf("last reply from %q after %v, want the slow %q after 1s", last.Endpoint, last.after, a.addr())
		}
		for _, r := range replies[:2] {
			if r.after != 0 {
				t.Errorf("reply from %q after %v, want at once", r.Endpoint, r.after)
			}
		}
		if took != time.Second {
			t.Errorf("the fan-out took %v, want 1s", took)
		}
		if got := len(ftByAddr(t, replies)); got != 3 {
			t.Errorf("replies from %d distinct endpoints, want 3", got)
		}
	})
}

// An endpoint whose dials fail yields its error, which says the call never ran, and the others
// their results; each running backend runs the call once.
func TestFTOneDown(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a, b := ftNewBackend(t, "a"), ftNewBackend(t, "b")
		down := cttNewEndpoint("ctt://down", nil, cttFail)
		conn := cttConnect(t, resolve.Constant(a.ep(), down, b.ep()), call.ClientOptions{})
		replies, took := ftCollect(t, cbCtx(t, time.Minute), conn, "Echo", []byte("x"), call.CallOptions{})
		by := ftByAddr(t, replies)
		if len(replies) != 3 || len(by) != 3 {
			t.Fatalf("got %d replies, want 3: %+v", len(replies), replies)
		}
		for _, bk := range []*ftBackend{a, b} {
			if r := by[bk.addr()]; r.Err != nil || string(r.Result) != bk.name+":x" {
				t.Errorf("reply from %s: %q, %v; want %q", bk.addr(), r.Result, r.Err, bk.name+":x")
			}
			if n := bk.runs.Load(); n != 1 {
				t.Errorf("%s ran %d calls, want 1", bk.name, n)
			}
		}
		r, ok := by["ctt://down"]
		if !ok {
			t.Fatalf("no reply from the endpoint that is down")
		}
		cbWantErr(t, "reply from the endpoint that is down", r.Err, call.ErrUnreachable, true)
		if r.Result != nil {
			t.Errorf("reply from the endpoint that is down has result %q with its error", r.Result)
		}
		if took != 0 {
			t.Errorf("the fan-out took %v, want no time (the failed endpoint is not waited for)", took)
		}
	})
}

// The caller's deadline bounds the whole fan-out: a backend that never answers, and an
// endpoint that never connects, yield a deadline error exactly at the deadline (the first may
// have run, the second never ran), while the others answer at once.
func TestFTDeadline(t *testing.T) {
	for _, tc := range []struct {
		name     string
		neverRan bool
	}{
		{"handler never answers", false},
		{"endpoint never connects", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				a, b := ftNewBackend(t, "a"), ftNewBackend(t, "b")
				var bep endpoint.Endpoint = b.ep()
				if tc.neverRan {
					bep = cttNewEndpoint("", b.ep(), cttBlock)
				} else {
					b.delay.Store(-1)
				}
				conn := cttConnect(t, resolve.Constant(a.ep(), bep), call.ClientOptions{})
				replies, took := ftCollect(t, cbCtx(t, 2*time.Second), conn, "Slow", nil, call.CallOptions{})
				by := ftByAddr(t, replies)
				if len(replies) != 2 {
					t.Fatalf("got %d replies, want 2: %+v", len(replies), replies)
				}
				if r := by[a.addr()]; r.Err != nil || string(r.Result) != "a" || r.after != 0 {
					t.Errorf("reply from a: %q, %v after %v; want \"a\" at once", r.Result, r.Err, r.after)
				}
				r := by[b.addr()]
				cbWantErr(t, "reply from b", r.Err, context.DeadlineExceeded, tc.neverRan)
				if r.after != 2*time.Second {
					t.Errorf("b's error arrived after %v, want exactly at the 2s deadline", r.after)
				}
				if took != 2*time.Second {
					t.Errorf("the fan-out took %v, want 2s", took)
				}
				synctest.Wait()
				if !tc.neverRan {
					if e := b.ended(); len(e) != 1 || e[0].err == nil {
						t.Errorf("b's handler ended with %+v, want one ended by its context", e)
					}
				}
			})
		})
	}
}

// Breaking out of the loop after the first reply cancels the other calls (their handlers see
// their contexts end) and no call of the fan-out is still in flight when the loop has ended.
func TestFTBreakEarly(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a, b, c := ftNewBackend(t, "a"), ftNewBackend(t, "b"), ftNewBackend(t, "c")
		b.delay.Store(-1)
		c.delay.Store(-1)
		conn := cttConnect(t, resolve.Constant(ftEndpoints(a, b, c)...), call.ClientOptions{})
		ctx := cbCtx(t, time.Hour)
		// Connected first, so that b and c are surely running when a answers.
		for _, bk := range []*ftBackend{a, b, c} {
			cttWantReply(t, "warm-up call to "+bk.name, conn, "Echo", nil, call.CallOptions{Balancer: crTo(bk.addr())}, bk.name+":")
		}
		start := time.Now()
		n := 0
		for r := range ftFan(t, conn).CallAll(ctx, cbKey("Slow"), nil, call.CallOptions{}) {
			n++
			if r.Err != nil || string(r.Result) != "a" {
				t.Errorf("first reply %q, %v from %q; want \"a\"", r.Result, r.Err, r.Endpoint)
			}
			synctest.Wait() // b and c are running
			break
		}
		if n != 1 {
			t.Fatalf("the loop ran %d times, want 1", n)
		}
		for _, e := range cttStatus(t, conn).Endpoints {
			if e.InFlight != 0 {
				t.Errorf("endpoint %s has %d calls in flight when the loop has ended, want 0", e.Address, e.InFlight)
			}
		}
		synctest.Wait()
		for _, bk := range []*ftBackend{b, c} {
			e := bk.ended()
			if len(e) != 1 || !errors.Is(e[0].err, context.Canceled) || !e[0].at.Equal(start) {
				t.Errorf("%s's handler ended with %+v, want one cancelled at once", bk.name, e)
			}
		}
	})
}

// A fan-out started before the resolver's first answer waits for it, then calls every
// endpoint of that answer.
func TestFTWaitsForResolver(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a, b := ftNewBackend(t, "a"), ftNewBackend(t, "b")
		release := make(chan struct{})
		r := &cttResolver{answer: func(ctx context.Context, n int, _ *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
			if n > 0 {
				return cttBlockResolve(ctx)
			}
			select {
			case <-release:
				return ftEndpoints(a, b), &resolve.Version{Opaque: "1"}, nil
			case <-ctx.Done():
				return nil, nil, ctx.Err()
			}
		}}
		conn := cttConnect(t, r, call.ClientOptions{})
		got := make(chan ftReply, 4)
		start := time.Now()
		go func() {
			defer close(got)
			for r := range ftFan(t, conn).CallAll(cbCtx(t, time.Minute), cbKey("Echo"), []byte("x"), call.CallOptions{}) {
				got <- ftReply{r, time.Since(start)}
			}
		}()
		time.Sleep(5 * time.Second)
		synctest.Wait()
		select {
		case r := <-got:
			t.Fatalf("a reply before the resolver answered: %+v", r)
		default:
		}
		close(release)
		var replies []ftReply
		for r := range got {
			replies = append(replies, r)
		}
		by := ftByAddr(t, replies)
		if len(replies) != 2 {
			t.Fatalf("got %d replies, want 2: %+v", len(replies), replies)
		}
		for _, bk := range []*ftBackend{a, b} {
			if r := by[bk.addr()]; r.Err != nil || string(r.Result) != bk.name+":x" || r.after != 5*time.Second {
				t.Errorf("reply from %s: %q, %v after %v; want %q after 5s", bk.name, r.Result, r.Err, r.after, bk.name+":x")
			}
		}
	})
}

// A fan-out started while the resolver fails, before its first answer, yields one error at
// once, which says the call never ran.
func TestFTResolverFailed(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		r := &cttResolver{answer: func(context.Context, int, *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
			return nil, nil, errCTTResolver
		}}
		conn := cttConnect(t, r, call.ClientOptions{})
		synctest.Wait()
		replies, took := ftCollect(t, cbCtx(t, time.Minute), conn, "Echo", nil, call.CallOptions{})
		if len(replies) != 1 || took != 0 {
			t.Fatalf("got %+v after %v, want one error at once", replies, took)
		}
		cbWantErr(t, "fan-out while the resolver fails", replies[0].Err, call.ErrUnreachable, true)
		if !errors.Is(replies[0].Err, errCTTResolver) {
			t.Errorf("error %v, want one wrapping the resolver's", replies[0].Err)
		}
	})
}

// WaitForReady makes a fan-out wait for an endpoint that is down, up to the deadline, whether
// it comes from the CallOptions or, as for every call of a Connection, from a context made by
// WithCallOptions (generated fan-out stubs have no other way to set it).
func TestFTWaitForReady(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  bool // WaitForReady from WithCallOptions rather than the CallOptions
	}{
		{"CallOptions", false},
		{"WithCallOptions", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.ctx {
			}
			cbBubble(t, func(t *testing.T) {
				a := ftNewBackend(t, "a")
				down := cttNewEndpoint("ctt://down", nil, cttFail)
				conn := cttConnect(t, resolve.Constant(a.ep(), down), call.ClientOptions{})
				synctest.Wait()
				ctx := cbCtx(t, 2*time.Second)
				opts := call.CallOptions{WaitForReady: true}
				if tc.ctx {
					ctx, opts = call.WithCallOptions(ctx, opts), call.CallOptions{}
				}
				replies, took := ftCollect(t, ctx, conn, "Echo", nil, opts)
				by := ftByAddr(t, replies)
				if len(replies) != 2 || took != 2*time.Second {
					t.Fatalf("got %+v after %v, want 2 replies, the last at the 2s deadline", replies, took)
				}
				cbWantErr(t, "reply from the endpoint that is down", by["ctt://down"].Err, context.DeadlineExceeded, true)
				if r := by[a.addr()]; r.Err != nil || r.after != 0 {
					t.Errorf("reply from a: %q, %v after %v; want it at once", r.Result, r.Err, r.after)
				}
			})
		})
	}
}

// With an empty set, a fan-out yields nothing, at once.
func TestFTEmptySet(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		conn := cttConnect(t, resolve.Constant(), call.ClientOptions{})
		replies, took := ftCollect(t, cbCtx(t, time.Minute), conn, "Echo", nil, call.CallOptions{})
		if len(replies) != 0 || took != 0 {
			t.Errorf("got %+v after %v, want no reply at once", replies, took)
		}
	})
}

// Endpoints the pool keeps no connection to (PoolOptions.Size smaller than the set) are
// connected and called too.
func TestFTIdleMembers(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := []*ftBackend{ftNewBackend(t, "a"), ftNewBackend(t, "b"), ftNewBackend(t, "c")}
		conn := cttConnect(t, resolve.Constant(ftEndpoints(bs...)...), call.ClientOptions{Pool: call.PoolOptions{Size: 1}})
		synctest.Wait()
		idle := 0
		for _, e := range cttStatus(t, conn).Endpoints {
			if e.State == call.EndpointIdle {
				idle++
			}
		}
		if idle != 2 {
			t.Fatalf("%d idle endpoints before the fan-out, want 2", idle)
		}
		replies, _ := ftCollect(t, cbCtx(t, time.Minute), conn, "Echo", []byte("x"), call.CallOptions{})
		by := ftByAddr(t, replies)
		if len(replies) != 3 {
			t.Fatalf("got %d replies, want 3: %+v", len(replies), replies)
		}
		for _, bk := range bs {
			if r := by[bk.addr()]; r.Err != nil || string(r.Result) != bk.name+":x" {
				t.Errorf("reply from %s: %q, %v; want %q", bk.name, r.Result, r.Err, bk.name+":x")
			}
		}
	})
}

// The caller owns every result: changing one changes neither the others nor, after the loop,
// does changing the arguments.
func TestFTResultsOwned(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := []*ftBackend{ftNewBackend(t, "a"), ftNewBackend(t, "b"), ftNewBackend(t, "c")}
		conn := cttConnect(t, resolve.Constant(ftEndpoints(bs...)...), call.ClientOptions{})
		args := []byte("payload")
		replies, _ := ftCollect(t, cbCtx(t, time.Minute), conn, "Args", args, call.CallOptions{})
		if len(replies) != 3 {
			t.Fatalf("got %d replies, want 3: %+v", len(replies), replies)
		}
		copy(replies[0].Result, "XXXXXXX")
		copy(args, "YYYYYYY")
		for _, r := range replies[1:] {
			if r.Err != nil || string(r.Result) != "payload" {
				t.Errorf("reply from %s after changing another reply and the arguments: %q, %v; want \"payload\"", r.Endpoint, r.Result, r.Err)
			}
		}
	})
}

// A fan-out on a closed Connection yields one error, which says the call never ran.
func TestFTClosed(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a := ftNewBackend(t, "a")
		conn := cttConnect(t, resolve.Constant(a.ep()), call.ClientOptions{})
		conn.Close()
		replies, took := ftCollect(t, cbCtx(t, time.Minute), conn, "Echo", nil, call.CallOptions{})
		if len(replies) != 1 || took != 0 {
			t.Fatalf("got %+v after %v, want one error at once", replies, took)
		}
		cbWantErr(t, "fan-out on a closed Connection", replies[0].Err, call.ErrUnreachable, true)
		if !errors.Is(replies[0].Err, call.ErrClosed) {
			t.Errorf("error %v, want one wrapping ErrClosed", replies[0].Err)
		}
		if n := a.runs.Load(); n != 0 {
			t.Errorf("the backend ran %d calls, want 0", n)
		}
	})
}
