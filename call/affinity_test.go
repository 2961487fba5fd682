package call_test

// Tests of selection by server affinity (HandlerMap.SetAffinity, CallOptions.Affinity with
// SelectionOptions) and of WithCallOptions, through which callers of generated stubs set
// per-call options. The affinity tests check which endpoint a call goes to under each
// selection option, when (exactly, on the fake clock of a testing/synctest bubble over
// in-memory pipes), and what it costs: one query per candidate, none for other calls.
// Identifiers of this file start with "at"; its tests with TestAT and TestWCO.

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// atBackend is a server named name in the bubble. Its "Name" method answers the name; "Flaky"
// fails (the handler could not run, so the call may have run) while failFirst is positive,
// decrementing it, then answers the name; "Work" takes a second on its first call (unless
// cancelled) and answers at once afterwards. Its affinity function for "Name", when set with
// score, counts its queries and records their arguments.
type atBackend struct {
	name      string
	hm        *call.HandlerMap
	srv       *cttServer
	runs      atomic.Int64 // handlers run, all methods
	queries   atomic.Int64 // affinity function runs
	failFirst atomic.Int64
	works     atomic.Int64 // "Work" calls started

	mu sync.Mutex
	// guarded by mu
	args     []string // the arguments affinity queries saw
	queryErr []error  // per affinity query that waited: its context's error when it ended, nil if it answered
	workErr  []error  // the context errors of "Work" calls that waited
}

// atNewBackend serves a backend named name; cleanup stops it.
func atNewBackend(t *testing.T, name string) *atBackend {
	t.Helper()
	b := &atBackend{name: name, hm: &call.HandlerMap{}}
	b.hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) {
		b.runs.Add(1)
		return []byte(name), nil
	})
	b.hm.Set(cbComponent, "Flaky", func(context.Context, []byte) ([]byte, error) {
		b.runs.Add(1)
		if b.failFirst.Add(-1) >= 0 {
			return nil, errors.New("at: " + name + " is flaky")
		}
		return []byte(name), nil
	})
	b.hm.Set(cbComponent, "Work", func(ctx context.Context, _ []byte) ([]byte, error) {
		b.runs.Add(1)
		if b.works.Add(1) == 1 {
			timer := time.NewTimer(time.Second)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				b.mu.Lock()
				b.workErr = append(b.workErr, ctx.Err())
				b.mu.Unlock()
				return nil, ctx.Err()
			}
		}
		return []byte(name), nil
	})
	b.srv = cttServe(t, name, b.hm, call.ServerOptions{InlineHandlerDuration: -1})
	return b
}

func (b *atBackend) ep() endpoint.Endpoint { return b.srv.pl }
func (b *atBackend) addr() string          { return b.srv.pl.Address() }

// score sets the affinity function of method "Name": it answers s after delay (at once if
// zero) unless its context ends first.
func (b *atBackend) score(s float32, delay time.Duration) {
	b.scoreBy("Name", func([]byte) float32 { return s }, delay)
}

// scoreBy sets the affinity function of method to f(args) after delay.
func (b *atBackend) scoreBy(method string, f func(args []byte) float32, delay time.Duration) {
	b.hm.SetAffinity(cbComponent, method, func(ctx context.Context, args []byte) float32 {
		b.queries.Add(1)
		b.mu.Lock()
		b.args = append(b.args, string(args))
		b.mu.Unlock()
		if delay > 0 {
			timer := time.NewTimer(delay)
			defer timer.Stop()
			var err error
			select {
			case <-timer.C:
			case <-ctx.Done():
				err = ctx.Err()
			}
			b.mu.Lock()
			b.queryErr = append(b.queryErr, err)
			b.mu.Unlock()
			if err != nil {
				return 0
			}
		}
		return f(args)
	})
}

func (b *atBackend) queryErrs() []error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.queryErr)
}

func (b *atBackend) queryArgs() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.args)
}

// atBackends serves one backend per name.
func atBackends(t *testing.T, names ...string) []*atBackend {
	t.Helper()
	var bs []*atBackend
	for _, n := range names {
		bs = append(bs, atNewBackend(t, n))
	}
	return bs
}

// atConnect connects to bs with opts and waits until every endpoint is ready.
func atConnect(t *testing.T, opts call.ClientOptions, bs ...*atBackend) call.Connection {
	t.Helper()
	var eps []endpoint.Endpoint
	for _, b := range bs {
		eps = append(eps, b.ep())
	}
	conn := cttConnect(t, resolve.Constant(eps...), opts)
	synctest.Wait()
	for _, b := range bs {
		cttWantState(t, conn, b.addr(), call.EndpointReady)
	}
	return conn
}

// atCall makes a "Name" call (with a deadline of a minute) selecting by sel, and returns the
// name of the backend that answered, the call's error and the fake time it took.
func atCall(conn call.Connection, sel call.SelectionOptions, args []byte) (string, time.Duration, error) {
	out, took, err := cttCall(conn, "Name", args, call.CallOptions{Affinity: &sel})
	return string(out), took, err
}

// atRuns returns how many handlers each backend ran.
func atRuns(bs ...*atBackend) []int64 {
	var out []int64
	for _, b := range bs {
		out = append(out, b.runs.Load())
	}
	return out
}

// atQueries returns how many affinity queries each backend answered.
func atQueries(bs ...*atBackend) []int64 {
	var out []int64
	for _, b := range bs {
		out = append(out, b.queries.Load())
	}
	return out
}

// atWantCall makes a call selecting by sel that must be answered by want after exactly took.
func atWantCall(t *testing.T, what string, conn call.Connection, sel call.SelectionOptions, want string, took time.Duration) {
	t.Helper()
	got, d, err := atCall(conn, sel, nil)
	if err != nil || got != want {
		t.Errorf("%s: answered by %q, %v; want %q", what, got, err, want)
	}
	if d != took {
		t.Errorf("%s: took %v, want exactly %v", what, d, took)
	}
}

// atWantNone makes a call selecting by sel that must fail with ErrUnreachable, never ran,
// after exactly took, without running any handler.
func atWantNone(t *testing.T, what string, conn call.Connection, sel call.SelectionOptions, took time.Duration, bs ...*atBackend) {
	t.Helper()
	before := atRuns(bs...)
	got, d, err := atCall(conn, sel, nil)
	if err == nil {
		t.Errorf("%s: answered by %q, want ErrUnreachable", what, got)
		return
	}
	cbWantErr(t, what, err, call.ErrUnreachable, true)
	if d != took {
		t.Errorf("%s: failed after %v, want exactly %v", what, d, took)
	}
	if after := atRuns(bs...); !slices.Equal(before, after) {
		t.Errorf("%s: handlers ran (%v before, %v after), want none", what, before, after)
	}
}

// --- 1. Affinity selection -----------------------------------------------------------------------

// The call goes to the endpoint with the highest score, every time, and runs only there.
func TestATHighestScore(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.3, 0)
		bs[1].score(0.9, 0)
		bs[2].score(0.5, 0)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		for i := range 5 {
			atWantCall(t, "call "+string(rune('1'+i)), conn, call.SelectionOptions{}, "b", 0)
		}
		if got, want := atRuns(bs...), []int64{0, 5, 0}; !slices.Equal(got, want) {
			t.Errorf("handlers run %v, want %v", got, want)
		}
	})
}

// MinAffinity excludes the endpoints that score less (an equal score qualifies); when every
// endpoint scores less the call fails with ErrUnreachable and never runs.
func TestATMinAffinity(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.3, 0)
		bs[1].score(0.6, time.Second) // the best, and slow
		bs[2].score(0.45, 0)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		// Accepting the first that qualifies: a and c answer first but do not.
		atWantCall(t, "minimum 0.5, first available", conn, call.SelectionOptions{MinAffinity: 0.5, AcceptFirstAvailable: true}, "b", time.Second)
		atWantCall(t, "minimum 0.6, equal to the best", conn, call.SelectionOptions{MinAffinity: 0.6}, "b", time.Second)
		atWantCall(t, "minimum 0.4, first available", conn, call.SelectionOptions{MinAffinity: 0.4, AcceptFirstAvailable: true}, "c", 0)
		atWantNone(t, "minimum 0.95", conn, call.SelectionOptions{MinAffinity: 0.95}, time.Second, bs...)
	})
}

// Scores of 0, below 0 and NaN never qualify, whatever MinAffinity says; any positive score
// does.
func TestATZeroAndNaNNeverQualify(t *testing.T) {
	for _, tc := range []struct {
		name string
		min  float32
	}{
		{"default minimum", 0},
		{"negative minimum", -5},
		{"NaN minimum", float32(math.NaN())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				bs := atBackends(t, "a", "b", "c", "d")
				bs[0].score(0, 0)
				bs[1].score(float32(math.NaN()), 0)
				bs[2].score(-1, 0)
				bs[3].score(float32(math.Inf(-1)), 0)
				conn := atConnect(t, call.ClientOptions{}, bs...)
				atWantNone(t, "0, NaN, -1 and -Inf", conn, call.SelectionOptions{MinAffinity: tc.min}, 0, bs...)
				bs[3].score(0.01, 0)
				atWantCall(t, "0, NaN, -1 and 0.01", conn, call.SelectionOptions{MinAffinity: tc.min}, "d", 0)
			})
		})
	}
}

// AcceptFirstAvailable takes the first answer that qualifies, without waiting for the better
// ones, whose queries are cancelled; without it the call waits for the best.
func TestATAcceptFirstAvailable(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.9, time.Second)
		bs[1].score(0.2, 0)
		bs[2].score(0.5, 500*time.Millisecond)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		atWantCall(t, "first available", conn, call.SelectionOptions{AcceptFirstAvailable: true}, "b", 0)
		// The slower queries were cancelled (or never sent): none answers later.
		time.Sleep(2 * time.Second)
		synctest.Wait()
		for _, b := range []*atBackend{bs[0], bs[2]} {
			if errs := b.queryErrs(); len(errs) > 1 || len(errs) == 1 && errs[0] == nil {
				t.Errorf("the slower query of %s ended with %v, want it cancelled or never sent", b.name, errs)
			}
		}
		atWantCall(t, "best", conn, call.SelectionOptions{}, "a", time.Second)
	})
}

// AffinityTimeout takes the best answer so far when it expires, and fails the call (never
// ran) if none qualified by then.
func TestATAffinityTimeout(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.9, 2*time.Second)
		bs[1].score(0.3, 0)
		bs[2].score(0.5, 500*time.Millisecond)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		atWantCall(t, "timeout 1s", conn, call.SelectionOptions{AffinityTimeout: time.Second}, "c", time.Second)
		atWantCall(t, "timeout 3s", conn, call.SelectionOptions{AffinityTimeout: 3 * time.Second}, "a", 2*time.Second)
		bs[1].score(0.3, 2*time.Second)
		bs[2].score(0.5, 2*time.Second)
		atWantNone(t, "timeout 1s, every answer later", conn, call.SelectionOptions{AffinityTimeout: time.Second}, time.Second, bs...)
	})
}

// ShortCircuitTimeout stops waiting for better answers that long after the first answer that
// qualifies, and costs nothing when every answer arrives sooner.
func TestATShortCircuitTimeout(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.3, 100*time.Millisecond)
		bs[1].score(0.5, 300*time.Millisecond)
		bs[2].score(0.9, 2*time.Second)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		atWantCall(t, "short circuit 500ms", conn, call.SelectionOptions{ShortCircuitTimeout: 500 * time.Millisecond}, "b", 600*time.Millisecond)
		atWantCall(t, "short circuit 5s", conn, call.SelectionOptions{ShortCircuitTimeout: 5 * time.Second}, "c", 2*time.Second)
		// The first answer does not qualify: the timer starts with b's.
		atWantCall(t, "short circuit 1800ms, minimum 0.4", conn,
			call.SelectionOptions{ShortCircuitTimeout: 1800 * time.Millisecond, MinAffinity: 0.4}, "c", 2*time.Second)
	})
}

// A server without an affinity function for the method scores 1.
func TestATNoFunctionScoresOne(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b")
		bs[1].score(0.9, 0)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		atWantCall(t, "1 against 0.9", conn, call.SelectionOptions{}, "a", 0)
		atWantNone(t, "1 against 0.9, minimum 1.5", conn, call.SelectionOptions{MinAffinity: 1.5}, 0, bs...)
		bs[1].score(1.5, 0)
		atWantCall(t, "1 against 1.5", conn, call.SelectionOptions{}, "b", 0)
	})
}

// A server without a handler for the method scores 0, even with an affinity function for it.
func TestATUnknownMethodScoresZero(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].scoreBy("Rare", func([]byte) float32 { return 100 }, 0)
		bs[1].hm.Set(cbComponent, "Rare", func(context.Context, []byte) ([]byte, error) { return []byte("b"), nil })
		conn := atConnect(t, call.ClientOptions{}, bs...)
		out, took, err := cttCall(conn, "Rare", nil, call.CallOptions{Affinity: &call.SelectionOptions{}})
		if err != nil || string(out) != "b" || took != 0 {
			t.Errorf("call of a method only b has: %q, %v after %v; want \"b\" at once", out, err, took)
		}
		_, _, err = cttCall(conn, "Missing", nil, call.CallOptions{Affinity: &call.SelectionOptions{}})
		cbWantErr(t, "call of a method nobody has", err, call.ErrUnreachable, true)
	})
}

// The affinity function sees the call's arguments.
func TestATSeesArgs(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		for _, b := range bs {
			b.scoreBy("Name", func(args []byte) float32 {
				if string(args) == b.name {
					return 1
				}
				return 0.1
			}, 0)
		}
		conn := atConnect(t, call.ClientOptions{}, bs...)
		for _, want := range []string{"c", "a", "b"} {
			got, _, err := atCall(conn, call.SelectionOptions{}, []byte(want))
			if err != nil || got != want {
				t.Errorf("call with arguments %q: answered by %q, %v; want %q", want, got, err, want)
			}
		}
		for _, b := range bs {
			if got, want := b.queryArgs(), []string{"c", "a", "b"}; !slices.Equal(got, want) {
				t.Errorf("%s's affinity function saw %q, want %q", b.name, got, want)
			}
		}
	})
}

// Selection costs one query per candidate, sent to all of them at once: one extra round trip
// before the call. Calls without SelectionOptions send no query.
func TestATCost(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		var eps []endpoint.Endpoint
		relays := make([]*cpEndpoint, len(bs))
		for i, b := range bs {
			b.score(float32(i+1), 0)
			relays[i] = cpNewEndpoint(t, b.ep())
			eps = append(eps, relays[i])
		}
		conn := cttConnect(t, resolve.Constant(eps...), call.ClientOptions{Pool: call.PoolOptions{HealthCheckInterval: -1}})
		synctest.Wait()

		for range 10 {
			atWantCall(t, "call by affinity", conn, call.SelectionOptions{}, "c", 0)
		}
		if got, want := atQueries(bs...), []int64{10, 10, 10}; !slices.Equal(got, want) {
			t.Errorf("affinity queries %v after 10 calls, want %v", got, want)
		}
		if got, want := atRuns(bs...), []int64{0, 0, 10}; !slices.Equal(got, want) {
			t.Errorf("handlers run %v after 10 calls, want %v", got, want)
		}

		for range 10 {
			if _, _, err := cttCall(conn, "Name", nil, call.CallOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if got, want := atQueries(bs...), []int64{10, 10, 10}; !slices.Equal(got, want) {
			t.Errorf("affinity queries %v after 10 more calls without SelectionOptions, want still %v", got, want)
		}

		// 10ms each way: a plain call is one round trip, a call by affinity two.
		for _, r := range relays {
			r.setLatency(10 * time.Millisecond)
		}
		_, took, err := cttCall(conn, "Name", nil, call.CallOptions{Balancer: crTo(bs[2].addr())})
		if err != nil || took != 20*time.Millisecond {
			t.Errorf("plain call: %v after %v, want a reply after 20ms", err, took)
		}
		atWantCall(t, "call by affinity over 10ms links", conn, call.SelectionOptions{}, "c", 40*time.Millisecond)
	})
}

// A context from WithCallOptions with Affinity makes a plain call select by affinity.
func TestATContextOptions(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		bs[0].score(0.5, 0)
		bs[1].score(0.9, 0)
		bs[2].score(0.1, 0)
		conn := atConnect(t, call.ClientOptions{}, bs...)
		ctx := call.WithCallOptions(cbCtx(t, time.Minute), call.CallOptions{Affinity: &call.SelectionOptions{}})
		for range 3 {
			out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
			if err != nil || string(out) != "b" {
				t.Errorf("call: %q, %v; want \"b\"", out, err)
			}
		}
		if got, want := atQueries(bs...), []int64{3, 3, 3}; !slices.Equal(got, want) {
			t.Errorf("affinity queries %v, want %v", got, want)
		}
	})
}

// An affinity query whose arguments are shorter than a method key gets an error, and the
// server keeps serving; a well-formed one gets the score as a little-endian float32.
func TestATGarbageQuery(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := &atBackend{name: "a", hm: &call.HandlerMap{}}
		b.hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) { return []byte("a"), nil })
		b.scoreBy("Name", func(args []byte) float32 { return float32(len(args)) / 4 }, 0)
		conn, _ := cbPipe(t, b.hm, call.ServerOptions{}, call.ClientOptions{})
		query := call.MakeMethodKey("weft.call", "Affinity")
		ctx := cbCtx(t, time.Minute)
		for _, n := range []int{0, 1, 15} {
			out, err := conn.Call(ctx, query, make([]byte, n), call.CallOptions{})
			if !errors.Is(err, call.ErrRemote) {
				t.Errorf("query of %d bytes: %q, %v; want ErrRemote", n, out, err)
			}
		}
		score := func(what string, args []byte) float32 {
			t.Helper()
			out, err := conn.Call(ctx, query, args, call.CallOptions{})
			if err != nil || len(out) != 4 {
				t.Fatalf("%s: %q, %v; want a 4-byte score", what, out, err)
			}
			return math.Float32frombits(binary.LittleEndian.Uint32(out))
		}
		unknown := call.MakeMethodKey(cbComponent, "Missing")
		if got := score("query for an unknown method", unknown[:]); got != 0 {
			t.Errorf("query for an unknown method: score %v, want 0", got)
		}
		name := cbKey("Name")
		if got := score("query for Name with 3 bytes", append(name[:], "xyz"...)); got != 0.75 {
			t.Errorf("query for Name with 3 bytes of arguments: score %v, want 0.75", got)
		}
		if got := b.queryArgs(); !slices.Equal(got, []string{"xyz"}) {
			t.Errorf("the affinity function saw %q, want [\"xyz\"]", got)
		}
		if out, err := conn.Call(ctx, name, nil, call.CallOptions{}); err != nil || string(out) != "a" {
			t.Errorf("call after the bad queries: %q, %v; want \"a\"", out, err)
		}
	})
}

// When the endpoint a selection chose leaves the resolved set before the call is sent, the
// call fails at once as never run (or goes elsewhere); it does not wait for its deadline.
func TestATChosenEndpointLeaves(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b")
		bs[0].score(0.9, 0)
		bs[1].score(0.5, time.Second)
		r := resolve.NewManual(bs[0].ep(), bs[1].ep())
		conn := cttConnect(t, r, call.ClientOptions{})
		synctest.Wait()
		res := cbGo(cbCtx(t, time.Minute), conn, cbKey("Name"), nil, call.CallOptions{Affinity: &call.SelectionOptions{}})
		start := time.Now()
		time.Sleep(500 * time.Millisecond)
		r.Update(bs[1].ep()) // a has answered; b has not
		got := cbAwait(t, "call", res, time.Hour)
		// The choice, a, left the set: the call selects again among what remains (b answers
		// its affinity query a second later), or fails as never run when the first selection
		// ends; it never waits for its deadline.
		took := got.at.Sub(start)
		if got.err != nil {
			cbWantErr(t, "call to an endpoint that left", got.err, call.ErrUnreachable, true)
			if took != time.Second {
				t.Errorf("call failed after %v; want when the selection ended (1s)", took)
			}
		} else if string(got.out) != "b" || took != 2*time.Second {
			t.Errorf("call answered by %q after %v, want \"b\" after the second selection (2s)", got.out, took)
		}
	})
}

// Selection by affinity fails fast as plain calls do: when every endpoint has failed, and
// when the resolver failed before its first answer; with WaitForReady it waits instead.
func TestATFailFast(t *testing.T) {
	t.Run("every endpoint failed", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			conn := cttConnect(t, resolve.Constant(cttNewEndpoint("ctt://down", nil, cttFail)), call.ClientOptions{})
			synctest.Wait()
			for _, sel := range []*call.SelectionOptions{nil, {}} {
				_, took, err := cttCall(conn, "Name", nil, call.CallOptions{Affinity: sel})
				cbWantErr(t, "call", err, call.ErrUnreachable, true)
				if took != 0 {
					t.Errorf("call (selection %v) failed after %v, want at once", sel, took)
				}
			}
		})
	})
	t.Run("resolver failed", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			r := &cttResolver{answer: func(context.Context, int, *resolve.Version) ([]endpoint.Endpoint, *resolve.Version, error) {
				return nil, nil, errCTTResolver
			}}
			conn := cttConnect(t, r, call.ClientOptions{})
			synctest.Wait()
			for _, sel := range []*call.SelectionOptions{nil, {}} {
				_, took, err := cttCall(conn, "Name", nil, call.CallOptions{Affinity: sel})
				if err == nil || took != 0 {
					t.Errorf("call (selection %v): %v after %v, want ErrUnreachable at once", sel, err, took)
					continue
				}
				cbWantErr(t, "call", err, call.ErrUnreachable, true)
			}
		})
	})
	t.Run("WaitForReady", func(t *testing.T) {
		cbBubble(t, func(t *testing.T) {
			b := atNewBackend(t, "a")
			ep := cttNewEndpoint("", b.ep(), cttFail)
			conn := cttConnect(t, resolve.Constant(ep), call.ClientOptions{})
			synctest.Wait()
			for _, sel := range []*call.SelectionOptions{nil, {}} {
				cttWantState(t, conn, ep.Address(), call.EndpointFailed)
				res := cbGo(cbCtx(t, 10*time.Minute), conn, cbKey("Name"), nil, call.CallOptions{Affinity: sel, WaitForReady: true})
				time.Sleep(5 * time.Second)
				ep.setMode(cttPass)
				got := cbAwait(t, "call", res, time.Hour)
				if got.err != nil || string(got.out) != "a" {
					t.Errorf("call (selection %v) waiting for the endpoint: %q, %v; want \"a\" once it connects", sel, got.out, got.err)
				}
				// The endpoint fails again for the next round.
				ep.setMode(cttFail)
				b.srv.kill()
				// A connection whose last reply its caller read itself is read again (and
				// its end seen) within two milliseconds.
				time.Sleep(10 * time.Millisecond)
				synctest.Wait()
			}
		})
	})
}

// --- 2. WithCallOptions --------------------------------------------------------------------------

// atRetry retries after 100ms, then 200ms, without jitter.
var atRetry = &call.RetryPolicy{MaxAttempts: 3, Backoff: call.Backoff{Base: 100 * time.Millisecond, Factor: 2, Jitter: -1}}

// A plain call with a context from WithCallOptions retries as the options say; explicit
// options win over the context's.
func TestWCORetry(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  *call.CallOptions // the context's options, if any
		opts call.CallOptions
		runs int64
		took time.Duration // if the call succeeds
	}{
		{"no options", nil, call.CallOptions{}, 1, 0},
		{"context: idempotent, retry", &call.CallOptions{Idempotent: true, Retry: atRetry}, call.CallOptions{}, 3, 300 * time.Millisecond},
		{"context: retry, not idempotent", &call.CallOptions{Retry: atRetry}, call.CallOptions{}, 1, 0},
		{"context: retry; explicit: idempotent", &call.CallOptions{Retry: atRetry}, call.CallOptions{Idempotent: true}, 3, 300 * time.Millisecond},
		{"explicit retry wins", &call.CallOptions{Idempotent: true, Retry: atRetry}, call.CallOptions{Retry: &call.RetryPolicy{MaxAttempts: 1}}, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				b := atNewBackend(t, "a")
				b.failFirst.Store(2)
				conn := atConnect(t, call.ClientOptions{}, b)
				ctx := cbCtx(t, time.Minute)
				if tc.ctx != nil {
					ctx = call.WithCallOptions(ctx, *tc.ctx)
				}
				start := time.Now()
				out, err := conn.Call(ctx, cbKey("Flaky"), nil, tc.opts)
				took := time.Since(start)
				if n := b.runs.Load(); n != tc.runs {
					t.Errorf("%d attempts ran, want %d", n, tc.runs)
				}
				if tc.runs == 3 {
					if err != nil || string(out) != "a" || took != tc.took {
						t.Errorf("call: %q, %v after %v; want \"a\" after %v", out, err, took, tc.took)
					}
				} else {
					cbWantErr(t, "call", err, call.ErrRemote, false)
				}
			})
		})
	}
}

// A plain idempotent call with a context from WithCallOptions with a hedge policy is hedged;
// an explicit hedge policy wins over the context's.
func TestWCOHedge(t *testing.T) {
	hedge := &call.HedgePolicy{Delay: 50 * time.Millisecond}
	for _, tc := range []struct {
		name string
		ctx  *call.CallOptions
		opts call.CallOptions
		took time.Duration
	}{
		{"no options", nil, call.CallOptions{Idempotent: true}, time.Second},
		{"context: idempotent, hedge", &call.CallOptions{Idempotent: true, Hedge: hedge}, call.CallOptions{}, 50 * time.Millisecond},
		{"context: hedge, not idempotent", &call.CallOptions{Hedge: hedge}, call.CallOptions{}, time.Second},
		{"explicit hedge wins", &call.CallOptions{Idempotent: true, Hedge: hedge}, call.CallOptions{Hedge: &call.HedgePolicy{}}, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				b := atNewBackend(t, "a") // its first "Work" call takes a second, the next ones no time
				conn := atConnect(t, call.ClientOptions{}, b)
				ctx := cbCtx(t, time.Minute)
				if tc.ctx != nil {
					ctx = call.WithCallOptions(ctx, *tc.ctx)
				}
				start := time.Now()
				out, err := conn.Call(ctx, cbKey("Work"), nil, tc.opts)
				if took := time.Since(start); err != nil || string(out) != "a" || took != tc.took {
					t.Errorf("call: %q, %v after %v; want \"a\" after %v", out, err, took, tc.took)
				}
				synctest.Wait()
				hedged := tc.took < time.Second
				attempts := int64(1)
				if hedged {
					attempts = 2
				}
				if n := b.works.Load(); n != attempts {
					t.Errorf("%d attempts, want %d", n, attempts)
				}
				b.mu.Lock()
				cancelled := len(b.workErr)
				b.mu.Unlock()
				if hedged && cancelled != 1 {
					t.Errorf("the slow attempt was not cancelled when the hedge won")
				}
			})
		})
	}
}

// atShard is a balancer that sends a sharded call to the member at index ShardKey (by
// address) and an unsharded one to the first, recording what it was asked.
type atShard struct {
	mu sync.Mutex
	// guarded by mu
	picks []string // "key" or "-" per pick
}

func (s *atShard) Pick(info balance.PickInfo) (balance.Member, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(info.Members) == 0 {
		return nil, balance.ErrNoMember
	}
	if !info.Sharded {
		s.picks = append(s.picks, "-")
		return info.Members[0], nil
	}
	s.picks = append(s.picks, string(rune('0'+info.ShardKey)))
	return info.Members[int(info.ShardKey)%len(info.Members)], nil
}

func (s *atShard) taken() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.picks
	s.picks = nil
	return p
}

// The shard key and the balancer of a context from WithCallOptions apply to plain calls;
// explicit ones win; WithShardKey and WithCallOptions combine, nested either way.
func TestWCOShardKeyAndBalancer(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := atBackends(t, "a", "b", "c")
		shard := &atShard{}
		conn := atConnect(t, call.ClientOptions{Balancer: shard}, bs...)
		base := cbCtx(t, time.Minute)
		check := func(what string, ctx context.Context, method string, opts call.CallOptions, want string, picks ...string) {
			t.Helper()
			shard.taken()
			out, err := conn.Call(ctx, cbKey(method), nil, opts)
			if err != nil || string(out) != want {
				t.Errorf("%s: %q, %v; want %q", what, out, err, want)
			}
			if got := shard.taken(); !slices.Equal(got, picks) {
				t.Errorf("%s: the balancer was asked for shard keys %q, want %q", what, got, picks)
			}
		}
		check("no options", base, "Name", call.CallOptions{}, "a", "-")
		check("context shard key 1", call.WithCallOptions(base, call.CallOptions{Sharded: true, ShardKey: 1}), "Name", call.CallOptions{}, "b", "1")
		check("context shard key 0", call.WithCallOptions(base, call.CallOptions{Sharded: true, ShardKey: 0}), "Name", call.CallOptions{ShardKey: 2}, "a", "0")
		check("explicit shard key wins", call.WithCallOptions(base, call.CallOptions{Sharded: true, ShardKey: 1}), "Name",
			call.CallOptions{Sharded: true, ShardKey: 2}, "c", "2")

		other := &atShard{}
		check("explicit balancer wins", call.WithCallOptions(base, call.CallOptions{Balancer: crTo(bs[2].addr())}), "Name",
			call.CallOptions{Balancer: other}, "a")
		if got := other.taken(); !slices.Equal(got, []string{"-"}) {
			t.Errorf("the explicit balancer was asked %q, want one unsharded pick", got)
		}
		check("context balancer", call.WithCallOptions(base, call.CallOptions{Balancer: crTo(bs[2].addr())}), "Name", call.CallOptions{}, "c")

		// Retries from WithCallOptions, the shard key from WithShardKey: every attempt goes to
		// the shard's owner.
		nested := map[string]context.Context{
			"WithShardKey outside": call.WithShardKey(call.WithCallOptions(base, call.CallOptions{Idempotent: true, Retry: atRetry}), 1),
			"WithShardKey inside":  call.WithCallOptions(call.WithShardKey(base, 1), call.CallOptions{Idempotent: true, Retry: atRetry}),
		}
		for what, ctx := range nested {
			bs[1].failFirst.Store(2)
			before := atRuns(bs...)
			check(what, ctx, "Flaky", call.CallOptions{}, "b", "1", "1", "1")
			after := atRuns(bs...)
			if got := []int64{after[0] - before[0], after[1] - before[1], after[2] - before[2]}; !slices.Equal(got, []int64{0, 3, 0}) {
				t.Errorf("%s: attempts per backend %v, want [0 3 0]", what, got)
			}
		}
	})
}

// Options set with WithCallOptions are per-call settings: like outgoing metadata and the
// shard key, they do not carry through LocalContext into the callee's own calls, as they
// would not across a connection.
func TestWCONotThroughLocalContext(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		b := atNewBackend(t, "a")
		b.failFirst.Store(2)
		conn := atConnect(t, call.ClientOptions{}, b)
		caller := call.WithCallOptions(cbCtx(t, time.Minute), call.CallOptions{Idempotent: true, Retry: atRetry})
		callee := call.LocalContext(caller)
		_, err := conn.Call(callee, cbKey("Flaky"), nil, call.CallOptions{})
		if n := b.runs.Load(); n != 1 {
			t.Errorf("the callee's call made %d attempts (%v), want 1: its caller's options applied to it", n, err)
		}
	})
}
