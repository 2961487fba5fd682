package call_test

// Tests of mirroring (call.Mirror, MirrorOptions, Mirrored and ClientOptions.Mirror): the caller
// always gets the primary's outcome and never waits for the mirror, the mirror's queue is
// bounded and its drops counted, calls are sampled and filtered, mirrored calls keep the
// caller's context values but not its cancellation, comparisons are counted, and Close ends
// everything. Tests run in testing/synctest bubbles over in-memory pipes, so "never waits" is
// checked exactly on the bubble's fake clock; BenchmarkMirrorOverhead shows the same over Unix
// sockets. Identifiers of this file start with "mt".

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// mtSeen is one call a mtBackend ran.
type mtSeen struct {
	method   string
	args     []byte
	md       call.Metadata
	deadline time.Duration // the time left before the handler's deadline when it started; 0 if none
	start    time.Time
	end      time.Time // zero while it runs
	err      error     // the handler context's error when it returned
}

// mtBackend is a server on an in-memory pipe and the Conn that reaches it. Its "Name" method
// answers the backend's name, a colon and the arguments, or fails with an error naming the
// backend while failing is set; "Same" answers its arguments after hold (or fails when its
// context ends first). It records every call it runs.
type mtBackend struct {
	name    string
	conn    *call.Conn
	failing atomic.Bool

	mu sync.Mutex
	// guarded by mu
	hold time.Duration
	seen []mtSeen
}

// mtNewBackend serves a backend named name; cleanup closes its Conn and stops the server.
func mtNewBackend(t *testing.T, name string) *mtBackend {
	t.Helper()
	b := &mtBackend{name: name}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(ctx context.Context, args []byte) ([]byte, error) {
		i := b.enter(ctx, "Name", args)
		if b.failing.Load() {
			b.leave(i, ctx.Err())
			return nil, errors.New("mt: " + name + " failed")
		}
		b.leave(i, ctx.Err())
		return []byte(name + ":" + string(args)), nil
	})
	hm.Set(cbComponent, "Same", func(ctx context.Context, args []byte) ([]byte, error) {
		i := b.enter(ctx, "Same", args)
		b.mu.Lock()
		hold := b.hold
		b.mu.Unlock()
		if hold > 0 {
			timer := time.NewTimer(hold)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				b.leave(i, ctx.Err())
				return nil, ctx.Err()
			}
		}
		b.leave(i, ctx.Err())
		return bytes.Clone(args), nil
	})
	b.conn, _ = cbPipe(t, &hm, call.ServerOptions{InlineHandlerDuration: -1}, call.ClientOptions{})
	return b
}

func (b *mtBackend) setHold(d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hold = d
}

// enter records the start of a call and returns its index.
func (b *mtBackend) enter(ctx context.Context, method string, args []byte) int {
	s := mtSeen{method: method, args: bytes.Clone(args), md: maps.Clone(call.IncomingMetadata(ctx)), start: time.Now()}
	if dl, ok := ctx.Deadline(); ok {
		s.deadline = time.Until(dl)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seen = append(b.seen, s)
	return len(b.seen) - 1
}

// leave records the end of call i.
func (b *mtBackend) leave(i int, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seen[i].end, b.seen[i].err = time.Now(), err
}

// calls returns the calls the backend ran or is running.
func (b *mtBackend) calls() []mtSeen {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.seen)
}

// mtArgs returns the arguments of calls.
func mtArgs(calls []mtSeen) []string {
	var out []string
	for _, c := range calls {
		out = append(out, string(c.args))
	}
	return out
}

// mtFake is an in-memory Connection that answers "ok" at once and counts its calls by method.
type mtFake struct {
	mu sync.Mutex
	// guarded by mu
	calls  map[call.MethodKey]int
	closed bool
}

func mtNewFake() *mtFake { return &mtFake{calls: map[call.MethodKey]int{}} }

func (f *mtFake) Call(_ context.Context, key call.MethodKey, _ []byte, _ call.CallOptions) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[key]++
	return []byte("ok"), nil
}

func (f *mtFake) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
}

func (f *mtFake) count(key call.MethodKey) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[key]
}

func (f *mtFake) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

// mtMirror returns Mirror(primary, mirror, opts), closed by cleanup.
func mtMirror(t *testing.T, primary, mirror call.Connection, opts call.MirrorOptions) *call.Mirrored {
	t.Helper()
	m := call.Mirror(primary, mirror, opts)
	t.Cleanup(m.Close)
	return m
}

// mtWantStats checks the counters of m.
func mtWantStats(t *testing.T, what string, m *call.Mirrored, want call.MirrorStats) {
	t.Helper()
	if got := m.Stats(); got != want {
		t.Errorf("%s: Stats() = %+v, want %+v", what, got, want)
	}
}

// The caller gets the primary's reply and error, whatever the mirror answers; the mirror runs
// every call too, and its failures are counted.
func TestMTPrimaryOutcome(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{})
		ctx := cbCtx(t, time.Minute)

		out, err := mc.Call(ctx, cbKey("Name"), []byte("x"), call.CallOptions{})
		if err != nil || string(out) != "primary:x" {
			t.Errorf("both succeed: got %q, %v; want %q", out, err, "primary:x")
		}
		synctest.Wait() // mirrored

		p.failing.Store(true)
		out, err = mc.Call(ctx, cbKey("Name"), []byte("y"), call.CallOptions{})
		cbWantErr(t, "the primary fails", err, call.ErrRemote, false)
		if out != nil || err == nil || !strings.Contains(err.Error(), "primary failed") || strings.Contains(err.Error(), "mirror") {
			t.Errorf("the primary fails: got %q, %v; want no reply and the primary's error", out, err)
		}
		p.failing.Store(false)
		synctest.Wait()

		m.failing.Store(true)
		out, err = mc.Call(ctx, cbKey("Name"), []byte("z"), call.CallOptions{})
		if err != nil || string(out) != "primary:z" {
			t.Errorf("the mirror fails: got %q, %v; want %q", out, err, "primary:z")
		}
		synctest.Wait()

		if got, want := mtArgs(m.calls()), []string{"x", "y", "z"}; !slices.Equal(got, want) {
			t.Errorf("the mirror ran %q, want %q", got, want)
		}
		mtWantStats(t, "after 3 calls", mc, call.MirrorStats{Mirrored: 3, Failed: 1})
	})
}

// A Mirrored Connection whose primary cannot fan out yields one error from CallAll.
func TestMTFanOutUnsupported(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewFake(), mtNewFake()
		mc := mtMirror(t, p, m, call.MirrorOptions{})
		var replies []call.Reply
		for r := range mc.CallAll(cbCtx(t, time.Minute), cbKey("Name"), nil, call.CallOptions{}) {
			replies = append(replies, r)
		}
		if len(replies) != 1 {
			t.Fatalf("got %+v, want one error", replies)
		}
		cbWantErr(t, "fan-out through a primary that cannot", replies[0].Err, call.ErrUnreachable, true)
		if p.total() != 0 || m.total() != 0 {
			t.Errorf("calls reached the primary (%d) or the mirror (%d), want none", p.total(), m.total())
		}
	})
}

// With a mirror that takes an hour, every call returns at the primary's own speed (exactly, in
// fake time); the workers take the first calls, the queue the next ones, and the rest are
// dropped and counted without the caller waiting.
func TestMTSlowMirror(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		p.setHold(10 * time.Millisecond)
		m.setHold(time.Hour)
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Workers: 2, Queue: 3, Timeout: 2 * time.Hour})
		ctx := cbCtx(t, 24*time.Hour)
		const calls = 20
		for i := range calls {
			args := fmt.Appendf(nil, "%d", i)
			start := time.Now()
			out, err := mc.Call(ctx, cbKey("Same"), args, call.CallOptions{})
			if err != nil || !bytes.Equal(out, args) {
				t.Fatalf("call %d: got %q, %v; want %q", i, out, err, args)
			}
			if took := time.Since(start); took != 10*time.Millisecond {
				t.Errorf("call %d took %v of fake time, want the primary's 10ms", i, took)
			}
			synctest.Wait() // the workers take what they can
		}
		mtWantStats(t, "after 20 calls", mc, call.MirrorStats{Mirrored: 2 + 3, Dropped: calls - 5})
		if got, want := mtArgs(m.calls()), []string{"0", "1"}; !slices.Equal(got, want) {
			t.Errorf("the mirror is running %q, want %q (one call per worker)", got, want)
		}
	})
}

// A mirrored call is bounded by MirrorOptions.Timeout, 5s by default, whatever the caller's
// deadline was; one that times out counts as failed.
func TestMTTimeout(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		want    time.Duration
	}{
		{"default", 0, 5 * time.Second},
		{"negative means default", -time.Second, 5 * time.Second},
		{"2s", 2 * time.Second, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
				m.setHold(time.Hour)
				mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Timeout: tc.timeout})
				if _, err := mc.Call(cbCtx(t, time.Minute), cbKey("Same"), []byte("a"), call.CallOptions{}); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Hour)
				synctest.Wait()
				calls := m.calls()
				if len(calls) != 1 {
					t.Fatalf("the mirror ran %d calls, want 1", len(calls))
				}
				if c := calls[0]; c.deadline != tc.want || c.end.Sub(c.start) != tc.want || c.err == nil {
					t.Errorf("mirrored call: deadline %v, ended after %v with %v; want a deadline of %v and the end then, with an error",
						c.deadline, c.end.Sub(c.start), c.err, tc.want)
				}
				mtWantStats(t, "after the timeout", mc, call.MirrorStats{Mirrored: 1, Failed: 1})
			})
		})
	}
}

// Fraction samples the calls: a quarter of 4000 calls is about 1000, zero means all of them,
// a negative value none.
func TestMTFraction(t *testing.T) {
	const calls = 4000
	for _, tc := range []struct {
		name     string
		fraction float64
		lo, hi   int
	}{
		// 1000 ± 5.5 standard deviations (27.4 each).
		{"a quarter", 0.25, 850, 1150},
		{"zero means every call", 0, calls, calls},
		{"one", 1, calls, calls},
		{"negative means none", -0.5, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				p, m := mtNewFake(), mtNewFake()
				mc := mtMirror(t, p, m, call.MirrorOptions{Fraction: tc.fraction, Queue: calls})
				ctx := cbCtx(t, time.Minute)
				for i := range calls {
					if _, err := mc.Call(ctx, cbKey("Name"), nil, call.CallOptions{}); err != nil {
						t.Fatalf("call %d: %v", i, err)
					}
				}
				synctest.Wait()
				got := m.total()
				if got < tc.lo || got > tc.hi {
					t.Errorf("the mirror got %d of %d calls, want %d..%d", got, calls, tc.lo, tc.hi)
				}
				if n := p.total(); n != calls {
					t.Errorf("the primary got %d calls, want %d", n, calls)
				}
				mtWantStats(t, "after the calls", mc, call.MirrorStats{Mirrored: uint64(got)})
			})
		})
	}
}

// MirrorMethods selects the mirrored calls by method; without keys it selects none.
func TestMTFilter(t *testing.T) {
	keys := []call.MethodKey{cbKey("A"), cbKey("B"), cbKey("C"), cbKey("D")}
	for _, tc := range []struct {
		name     string
		filter   []call.MethodKey
		mirrored []call.MethodKey
	}{
		{"A and C", []call.MethodKey{cbKey("A"), cbKey("C")}, []call.MethodKey{cbKey("A"), cbKey("C")}},
		{"none", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cbBubble(t, func(t *testing.T) {
				p, m := mtNewFake(), mtNewFake()
				mc := mtMirror(t, p, m, call.MirrorOptions{Filter: call.MirrorMethods(tc.filter...)})
				ctx := cbCtx(t, time.Minute)
				for range 10 {
					for _, k := range keys {
						if _, err := mc.Call(ctx, k, nil, call.CallOptions{}); err != nil {
							t.Fatal(err)
						}
					}
				}
				synctest.Wait()
				for i, k := range keys {
					want := 0
					if slices.Contains(tc.mirrored, k) {
						want = 10
					}
					if got := m.count(k); got != want {
						t.Errorf("method %c: mirrored %d calls, want %d", 'A'+i, got, want)
					}
					if got := p.count(k); got != 10 {
						t.Errorf("method %c: the primary got %d calls, want 10", 'A'+i, got)
					}
				}
			})
		})
	}
}

// A mirrored call carries the caller's metadata but neither its deadline nor its cancellation:
// cancelling the caller's context right after Call returns does not stop it, and it runs for
// longer than the caller's deadline.
func TestMTContextValuesNotCancellation(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		m.setHold(3 * time.Second)
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Timeout: 10 * time.Second})
		ctx := call.WithMetadata(context.Background(), call.Metadata{"tenant": "t1"})
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		out, err := mc.Call(ctx, cbKey("Same"), []byte("a"), call.CallOptions{})
		cancel()
		if err != nil || string(out) != "a" {
			t.Fatalf("call: got %q, %v; want %q", out, err, "a")
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		calls := m.calls()
		if len(calls) != 1 {
			t.Fatalf("the mirror ran %d calls, want 1", len(calls))
		}
		c := calls[0]
		if c.md["tenant"] != "t1" {
			t.Errorf("the mirrored call carried metadata %v, want tenant=t1", c.md)
		}
		if c.deadline != 10*time.Second {
			t.Errorf("the mirrored call's deadline was %v away, want MirrorOptions.Timeout (10s), not the caller's", c.deadline)
		}
		if c.err != nil || c.end.Sub(c.start) != 3*time.Second {
			t.Errorf("the mirrored call ended after %v with %v, want it to run its 3s undisturbed", c.end.Sub(c.start), c.err)
		}
		mtWantStats(t, "after the call", mc, call.MirrorStats{Mirrored: 1})
	})
}

// The mirror receives the arguments as they were during Call, even when the caller reuses
// its buffer before the mirrored call is sent.
func TestMTArgsCopied(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		m.setHold(time.Second)
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Workers: 1})
		ctx := cbCtx(t, time.Minute)
		if _, err := mc.Call(ctx, cbKey("Same"), []byte("first"), call.CallOptions{}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait() // the only worker is busy for a second
		buf := []byte("second")
		if _, err := mc.Call(ctx, cbKey("Same"), buf, call.CallOptions{}); err != nil {
			t.Fatal(err)
		}
		copy(buf, "XXXXXX")
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if got, want := mtArgs(m.calls()), []string{"first", "second"}; !slices.Equal(got, want) {
			t.Errorf("the mirror received %q, want %q", got, want)
		}
	})
}

// mtOutcome is what a Compare function saw.
type mtOutcome struct {
	key                   call.MethodKey
	primary, mirror       string
	primaryErr, mirrorErr error
}

// Compare sees the primary's and the mirror's outcomes of every mirrored call, the primary's
// reply as the caller received it even if the caller changed it since, and its false answers
// are counted as mismatches.
func TestMTCompare(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		m.setHold(time.Second)
		var mu sync.Mutex
		var seen []mtOutcome
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{
			Compare: func(key call.MethodKey, primary, mirror []byte, primaryErr, mirrorErr error) bool {
				mu.Lock()
				defer mu.Unlock()
				seen = append(seen, mtOutcome{key, string(primary), string(mirror), primaryErr, mirrorErr})
				return bytes.Equal(primary, mirror) && (primaryErr == nil) == (mirrorErr == nil)
			},
		})
		ctx := cbCtx(t, time.Minute)

		// The same reply; the caller overwrites it before the mirror answers.
		out, err := mc.Call(ctx, cbKey("Same"), []byte("same"), call.CallOptions{})
		if err != nil {
			t.Fatal(err)
		}
		copy(out, "XXXX")
		time.Sleep(2 * time.Second)
		synctest.Wait()
		// Different replies.
		if _, err := mc.Call(ctx, cbKey("Name"), []byte("n"), call.CallOptions{}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		// The primary fails and the mirror does not.
		p.failing.Store(true)
		if _, err := mc.Call(ctx, cbKey("Name"), []byte("f"), call.CallOptions{}); !errors.Is(err, call.ErrRemote) {
			t.Fatalf("failing call: %v, want ErrRemote", err)
		}
		synctest.Wait()

		mu.Lock()
		defer mu.Unlock()
		if len(seen) != 3 {
			t.Fatalf("Compare was called %d times, want 3: %+v", len(seen), seen)
		}
		if o := seen[0]; o.key != cbKey("Same") || o.primary != "same" || o.mirror != "same" || o.primaryErr != nil || o.mirrorErr != nil {
			t.Errorf("first comparison %+v, want \"same\" on both sides without errors", o)
		}
		if o := seen[1]; o.key != cbKey("Name") || o.primary != "primary:n" || o.mirror != "mirror:n" || o.primaryErr != nil || o.mirrorErr != nil {
			t.Errorf("second comparison %+v, want primary:n and mirror:n", o)
		}
		if o := seen[2]; o.primary != "" || !errors.Is(o.primaryErr, call.ErrRemote) || o.mirror != "mirror:f" || o.mirrorErr != nil {
			t.Errorf("third comparison %+v, want the primary's ErrRemote and mirror:f", o)
		}
		mtWantStats(t, "after 3 compared calls", mc, call.MirrorStats{Mirrored: 3, Compared: 3, Mismatches: 2})
	})
}

// Close cancels the mirrored call in progress and waits for its worker (its comparison
// included), and closes both Connections. It can be called again.
func TestMTClose(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		m.setHold(time.Hour)
		var mu sync.Mutex
		var mirrorErrs []error
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Workers: 1, Timeout: 2 * time.Hour,
			Compare: func(_ call.MethodKey, _, _ []byte, _, mirrorErr error) bool {
				time.Sleep(time.Second) // a slow comparison: Close waits for it too
				mu.Lock()
				defer mu.Unlock()
				mirrorErrs = append(mirrorErrs, mirrorErr)
				return true
			}})
		ctx := cbCtx(t, 24*time.Hour)
		if _, err := mc.Call(ctx, cbKey("Same"), []byte("running"), call.CallOptions{}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if st := mc.Status(); st.Closed {
			t.Errorf("Status().Closed before Close")
		}
		time.Sleep(time.Minute)
		closedAt := time.Now()
		mc.Close()
		if took := time.Since(closedAt); took != time.Second {
			t.Errorf("Close returned after %v, want 1s: after the worker's comparison", took)
		}

		mu.Lock()
		if len(mirrorErrs) != 1 || !errors.Is(mirrorErrs[0], context.Canceled) {
			t.Errorf("when Close returned, the mirrored calls compared ended with %v, want one cancelled call", mirrorErrs)
		}
		mu.Unlock()
		synctest.Wait()
		calls := m.calls()
		if got, want := mtArgs(calls), []string{"running"}; !slices.Equal(got, want) {
			t.Errorf("the mirror ran %q, want %q", got, want)
		} else if c := calls[0]; !c.end.Equal(closedAt) || c.err == nil {
			t.Errorf("the running mirrored call ended %v after Close with %v, want at Close, cancelled", c.end.Sub(closedAt), c.err)
		}
		mtWantStats(t, "after Close", mc, call.MirrorStats{Mirrored: 1, Failed: 1, Compared: 1})
		for _, c := range []*call.Conn{p.conn, m.conn} {
			select {
			case <-c.Done():
			default:
				t.Errorf("Conn to %s is still open after Close", c.Addr())
			}
		}
		if st := mc.Status(); !st.Closed {
			t.Errorf("Status().Closed is false after Close")
		}
		_, err := mc.Call(ctx, cbKey("Same"), []byte("late"), call.CallOptions{})
		cbWantErr(t, "call after Close", err, call.ErrUnreachable, true)
		mc.Close()
	})
}

// Close drops the calls still queued: the mirror never receives them.
func TestMTCloseDropsQueued(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewBackend(t, "primary"), mtNewBackend(t, "mirror")
		m.setHold(time.Hour)
		const workers = 8
		mc := mtMirror(t, p.conn, m.conn, call.MirrorOptions{Workers: workers, Queue: 32, Timeout: 2 * time.Hour})
		ctx := cbCtx(t, 24*time.Hour)
		for i := range workers + 32 {
			if _, err := mc.Call(ctx, cbKey("Same"), fmt.Appendf(nil, "%d", i), call.CallOptions{}); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
		}
		mc.Close()
		synctest.Wait()
		if n := len(m.calls()); n != workers {
			t.Errorf("the mirror received %d calls, want the %d that were running at Close", n, workers)
		}
		// Only the running calls were attempted (and failed, cancelled).
		mtWantStats(t, "after Close", mc, call.MirrorStats{Mirrored: workers + 32, Failed: workers})
	})
}

// Calls made after Close are not queued for the mirror (there is nobody to send them) and
// not counted as mirrored.
func TestMTCallAfterCloseNotMirrored(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		p, m := mtNewFake(), mtNewFake()
		mc := mtMirror(t, p, m, call.MirrorOptions{})
		mc.Close()
		ctx := cbCtx(t, time.Minute)
		for range 50 {
			mc.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
		}
		mtWantStats(t, "50 calls after Close", mc, call.MirrorStats{})
		if n := m.total(); n != 0 {
			t.Errorf("the mirror got %d calls after Close, want 0", n)
		}
	})
}

// Connect with ClientOptions.Mirror returns a Mirrored Connection that mirrors calls, still
// implements Inspectable (the primary's status) and FanOut (the primary's endpoints, nothing
// mirrored), and closes the mirror when it is closed.
func TestMTConnect(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		canary := ftNewBackend(t, "canary")
		mirror := cttConnect(t, resolve.Constant(canary.ep()), call.ClientOptions{})
		a, b := ftNewBackend(t, "a"), ftNewBackend(t, "b")
		conn := cttConnect(t, resolve.Constant(a.ep(), b.ep()), call.ClientOptions{
			Name:   "mirrored",
			Mirror: call.MirrorTo{Conn: mirror, Options: call.MirrorOptions{Filter: call.MirrorMethods(cbKey("Echo"))}},
		})
		mc, ok := conn.(*call.Mirrored)
		if !ok {
			t.Fatalf("Connect with a Mirror returned a %T, want *call.Mirrored", conn)
		}
		ctx := cbCtx(t, time.Minute)
		out, err := conn.Call(ctx, cbKey("Echo"), []byte("x"), call.CallOptions{})
		if err != nil || (string(out) != "a:x" && string(out) != "b:x") {
			t.Fatalf("call: got %q, %v; want a:x or b:x", out, err)
		}

		in, ok := conn.(call.Inspectable)
		if !ok {
			t.Fatalf("%T does not implement call.Inspectable", conn)
		}
		st := in.Status()
		if st.Name != "mirrored" || !st.Resolved || len(st.Endpoints) != 2 {
			t.Errorf("Status() = %+v, want the primary's: name \"mirrored\", resolved, 2 endpoints", st)
		}

		fan, ok := conn.(call.FanOut)
		if !ok {
			t.Fatalf("%T does not implement call.FanOut", conn)
		}
		var got []string
		for r := range fan.CallAll(ctx, cbKey("Echo"), []byte("all"), call.CallOptions{}) {
			if r.Err != nil {
				t.Errorf("fan-out to %s: %v", r.Endpoint, r.Err)
			}
			got = append(got, string(r.Result))
		}
		slices.Sort(got)
		if want := []string{"a:all", "b:all"}; !slices.Equal(got, want) {
			t.Errorf("fan-out replies %q, want %q", got, want)
		}
		synctest.Wait()
		if n := canary.runs.Load(); n != 1 {
			t.Errorf("the mirror ran %d calls, want 1 (fan-out calls are not mirrored)", n)
		}
		mtWantStats(t, "after one call and a fan-out", mc, call.MirrorStats{Mirrored: 1})

		conn.Close()
		if st := in.Status(); !st.Closed {
			t.Errorf("Status().Closed is false after Close")
		}
		if st := cttStatus(t, mirror); !st.Closed {
			t.Errorf("the mirror Connection is still open after the mirrored one closed")
		}
	})
}

// BenchmarkMirrorOverhead compares a 1 KiB call through a Conn over a Unix socket with the same
// call through Mirror to a mirror that takes 1ms per call: mirroring must not add latency to
// the primary path (the mirror's queue fills and the rest is dropped).
func BenchmarkMirrorOverhead(b *testing.B) {
	for _, mode := range []string{"direct", "mirrored"} {
		b.Run(mode, func(b *testing.B) {
			primary := mtBenchConn(b, mtBenchListen(b, 0))
			var conn call.Connection = primary
			var mc *call.Mirrored
			if mode == "mirrored" {
				mc = call.Mirror(primary, mtBenchConn(b, mtBenchListen(b, time.Millisecond)), call.MirrorOptions{})
				defer mc.Close()
				conn = mc
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			args := make([]byte, 1<<10)
			if _, err := conn.Call(ctx, mtEchoKey, args, call.CallOptions{}); err != nil { // connected
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := conn.Call(ctx, mtEchoKey, args, call.CallOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			if mc != nil {
				st := mc.Stats()
				b.ReportMetric(float64(st.Mirrored)/float64(st.Mirrored+st.Dropped), "mirrored/call")
			}
		})
	}
}

// mtEchoKey is the key of the benchmark's echo method.
var mtEchoKey = call.MakeMethodKey("bench", "Echo")

// mtBenchListen serves a 1 KiB "bench"/"Echo" handler that takes delay (really) on a Unix
// socket until the benchmark ends, and returns its endpoint.
func mtBenchListen(b *testing.B, delay time.Duration) endpoint.Endpoint {
	b.Helper()
	path := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	var hm call.HandlerMap
	hm.Set("bench", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
		if delay > 0 {
			timer := time.NewTimer(delay)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return args, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{Logger: cbQuiet, DrainTimeout: -1})
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	return endpoint.Unix(path)
}

// mtBenchConn dials ep; cleanup closes the Conn.
func mtBenchConn(b *testing.B, ep endpoint.Endpoint) *call.Conn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := call.Dial(ctx, ep, call.ClientOptions{Logger: cbQuiet})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(c.Close)
	return c
}
