package resolve_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// testCtx returns a context that ends with the test, with a deadline so that no test can hang.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eps returns n distinct TCP endpoints whose addresses start with prefix.
func eps(prefix string, n int) []endpoint.Endpoint {
	out := make([]endpoint.Endpoint, n)
	for i := range out {
		out[i] = endpoint.TCP(prefix + ":" + strconv.Itoa(i))
	}
	return out
}

// addrs returns the addresses of set, in order.
func addrs(set []endpoint.Endpoint) []string {
	out := make([]string, len(set))
	for i, ep := range set {
		out[i] = ep.Address()
	}
	return out
}

func wantSet(t *testing.T, what string, got, want []endpoint.Endpoint) {
	t.Helper()
	if g, w := addrs(got), addrs(want); !slices.Equal(g, w) {
		t.Fatalf("%s: set %q, want %q", what, g, w)
	}
}

// resolveAtOnce calls r.Resolve inside a synctest bubble and fails the test unless it returns
// without error before the bubble's clock moves (that is, without blocking durably).
func resolveAtOnce(t *testing.T, r resolve.Resolver, v *resolve.Version) ([]endpoint.Endpoint, *resolve.Version) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
	defer cancel()
	start := time.Now()
	set, nv, err := r.Resolve(ctx, v)
	if err != nil {
		t.Fatalf("Resolve(%v): %v after %v, want an answer at once", v, err, time.Since(start))
	}
	if d := time.Since(start); d != 0 {
		t.Fatalf("Resolve(%v) took %v of bubble time, want an answer at once", v, d)
	}
	return set, nv
}

type result struct {
	set []endpoint.Endpoint
	v   *resolve.Version
	err error
}

// goResolve starts r.Resolve(ctx, v) in a goroutine and returns the channel its result arrives on.
func goResolve(ctx context.Context, r resolve.Resolver, v *resolve.Version) <-chan result {
	ch := make(chan result, 1)
	go func() {
		set, nv, err := r.Resolve(ctx, v)
		ch <- result{set, nv, err}
	}()
	return ch
}

func TestConstantIsConstant(t *testing.T) {
	want := eps("c", 3)
	r := resolve.Constant(want...)
	if !r.IsConstant() {
		t.Fatal("Constant(...).IsConstant() = false, want true")
	}
	set, v, err := r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatalf("Resolve(nil): %v", err)
	}
	if v != nil {
		t.Fatalf("Resolve(nil) version = %+v, want nil for a constant resolver", *v)
	}
	wantSet(t, "Resolve(nil)", set, want)

	// Any version (a constant resolver never issues one, but a caller may pass one) gets the
	// same answer, at once.
	synctest.Test(t, func(t *testing.T) {
		set, v := resolveAtOnce(t, r, &resolve.Version{Opaque: "x"})
		if v != nil {
			t.Fatalf("Resolve(x) version = %+v, want nil", *v)
		}
		wantSet(t, "Resolve(x)", set, want)
	})
}

func TestConstantEmpty(t *testing.T) {
	r := resolve.Constant()
	if !r.IsConstant() {
		t.Fatal("Constant().IsConstant() = false, want true")
	}
	set, v, err := r.Resolve(testCtx(t), nil)
	if err != nil || v != nil || len(set) != 0 {
		t.Fatalf("Constant().Resolve(nil) = %q, %v, %v; want an empty set, nil version, nil error", addrs(set), v, err)
	}
}

func TestConstantReturnsCopy(t *testing.T) {
	in := eps("c", 3)
	want := slices.Clone(in)
	r := resolve.Constant(in...)

	// Mutating the input after Constant does not change the set.
	in[0] = endpoint.TCP("mutated-input:1")
	set1, _, err := r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after mutating the input", set1, want)

	// Mutating an answer does not change later answers.
	set1[1] = endpoint.TCP("mutated-answer:1")
	set2, _, err := r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after mutating an answer", set2, want)

	// Appending to an answer within its capacity does not show up either.
	_ = append(set2[:1], endpoint.TCP("appended:1"))
	set3, _, err := r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after appending to an answer", set3, want)
	if &set2[0] == &set3[0] {
		t.Fatal("two answers share their backing array; the caller must own the returned slice")
	}
}

func TestConstantDoneContext(t *testing.T) {
	r := resolve.Constant(eps("c", 2)...)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	set, v, err := r.Resolve(ctx, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Resolve(cancelled ctx) error = %v, want context.Canceled", err)
	}
	if set != nil || v != nil {
		t.Fatalf("Resolve(cancelled ctx) = %q, %v; want nil set and version with an error", addrs(set), v)
	}

	dctx, dcancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer dcancel()
	if _, _, err := r.Resolve(dctx, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Resolve(expired ctx) error = %v, want context.DeadlineExceeded", err)
	}

	// The resolver still answers with a live context.
	set, _, err = r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after a done ctx", set, eps("c", 2))
}

func TestManualIsNotConstant(t *testing.T) {
	var r resolve.Resolver = resolve.NewManual(eps("m", 1)...)
	if r.IsConstant() {
		t.Fatal("NewManual(...).IsConstant() = true, want false")
	}
}

func TestManualResolveNilAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		want := eps("m", 2)
		m := resolve.NewManual(want...)
		set, v := resolveAtOnce(t, m, nil)
		if v == nil {
			t.Fatal("Resolve(nil) returned a nil version; a Manual resolver must version its sets")
		}
		wantSet(t, "Resolve(nil)", set, want)

		// Without an Update, asking again with nil gives the same version.
		set2, v2 := resolveAtOnce(t, m, nil)
		wantSet(t, "second Resolve(nil)", set2, want)
		if *v2 != *v {
			t.Fatalf("second Resolve(nil) version = %q, want %q (no Update in between)", v2.Opaque, v.Opaque)
		}
	})
}

func TestManualResolveEmptyInitialSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual()
		set, v := resolveAtOnce(t, m, nil)
		if len(set) != 0 || v == nil {
			t.Fatalf("NewManual().Resolve(nil) = %q, %v; want an empty set and a version", addrs(set), v)
		}
		// The empty first set is a version like any other: asking with it blocks until Update.
		ch := goResolve(t.Context(), m, v)
		synctest.Wait()
		select {
		case r := <-ch:
			t.Fatalf("Resolve(current version) returned %q, %v, %v before any Update", addrs(r.set), r.v, r.err)
		default:
		}
		m.Update(eps("n", 1)...)
		r := <-ch
		if r.err != nil {
			t.Fatal(r.err)
		}
		wantSet(t, "after Update", r.set, eps("n", 1))
	})
}

func TestManualResolveBlocksUntilUpdate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 2)...)
		_, v1 := resolveAtOnce(t, m, nil)

		ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
		defer cancel()
		start := time.Now()
		ch := goResolve(ctx, m, v1)

		// Durably blocked: every goroutine in the bubble is waiting, and still no answer.
		synctest.Wait()
		select {
		case r := <-ch:
			t.Fatalf("Resolve(current version) returned %q, %v, %v without an Update", addrs(r.set), r.v, r.err)
		default:
		}

		time.Sleep(time.Minute) // Let the fake clock run: still blocked without an Update.
		synctest.Wait()
		select {
		case r := <-ch:
			t.Fatalf("Resolve(current version) returned %q, %v, %v after a minute without an Update", addrs(r.set), r.v, r.err)
		default:
		}

		want := eps("b", 3)
		m.Update(want...)
		synctest.Wait()
		var r result
		select {
		case r = <-ch:
		default:
			t.Fatal("Resolve(current version) still blocked after Update")
		}
		if r.err != nil {
			t.Fatalf("Resolve after Update: %v", r.err)
		}
		wantSet(t, "Resolve after Update", r.set, want)
		if r.v == nil || *r.v == *v1 {
			t.Fatalf("Resolve after Update returned version %v, want one newer than %q", r.v, v1.Opaque)
		}
		if d := time.Since(start); d != time.Minute {
			t.Fatalf("Resolve returned after %v, want right after the Update (1m)", d)
		}

		// The new version is the current one: Resolve(nil) reports it, and asking with it blocks.
		_, vnil := resolveAtOnce(t, m, nil)
		if *vnil != *r.v {
			t.Fatalf("Resolve(nil) version = %q, want the version just returned (%q)", vnil.Opaque, r.v.Opaque)
		}
		ch2 := goResolve(ctx, m, r.v)
		synctest.Wait()
		select {
		case r2 := <-ch2:
			t.Fatalf("Resolve(new current version) returned %q, %v, %v without a second Update", addrs(r2.set), r2.v, r2.err)
		default:
		}
		m.Update(eps("c", 1)...)
		r2 := <-ch2
		if r2.err != nil {
			t.Fatal(r2.err)
		}
		wantSet(t, "Resolve after second Update", r2.set, eps("c", 1))
		if *r2.v == *r.v || *r2.v == *v1 {
			t.Fatalf("versions %q, %q, %q: want three distinct versions", v1.Opaque, r.v.Opaque, r2.v.Opaque)
		}
	})
}

func TestManualUpdateWakesAllBlockedResolves(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 1)...)
		_, v1 := resolveAtOnce(t, m, nil)
		const n = 8
		chs := make([]<-chan result, n)
		for i := range chs {
			chs[i] = goResolve(t.Context(), m, v1)
		}
		synctest.Wait()
		want := eps("b", 2)
		m.Update(want...)
		synctest.Wait()
		for i, ch := range chs {
			select {
			case r := <-ch:
				if r.err != nil {
					t.Fatalf("Resolve %d: %v", i, r.err)
				}
				wantSet(t, fmt.Sprintf("Resolve %d", i), r.set, want)
			default:
				t.Fatalf("Resolve %d still blocked after Update", i)
			}
		}
	})
}

func TestManualResolveStaleVersionAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 1)...)
		_, v1 := resolveAtOnce(t, m, nil)
		m.Update(eps("b", 2)...)
		_, v2 := resolveAtOnce(t, m, nil)
		want := eps("c", 3)
		m.Update(want...)
		_, v3 := resolveAtOnce(t, m, nil)
		if *v1 == *v2 || *v2 == *v3 || *v1 == *v3 {
			t.Fatalf("versions %q, %q, %q after two Updates: want three distinct versions", v1.Opaque, v2.Opaque, v3.Opaque)
		}

		for _, stale := range []*resolve.Version{v1, v2} {
			set, v := resolveAtOnce(t, m, stale)
			wantSet(t, "Resolve(stale "+stale.Opaque+")", set, want)
			if *v != *v3 {
				t.Fatalf("Resolve(stale %q) version = %q, want the current %q", stale.Opaque, v.Opaque, v3.Opaque)
			}
		}
	})
}

func TestManualResolveForeignVersionAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		want := eps("a", 2)
		m := resolve.NewManual(want...)
		_, cur := resolveAtOnce(t, m, nil)
		for _, opaque := range []string{"", "foreign", "0", "-1", "18446744073709551615", "1.0", " 1"} {
			if opaque == cur.Opaque {
				continue
			}
			set, v := resolveAtOnce(t, m, &resolve.Version{Opaque: opaque})
			wantSet(t, fmt.Sprintf("Resolve(%q)", opaque), set, want)
			if *v != *cur {
				t.Fatalf("Resolve(%q) version = %q, want the current %q", opaque, v.Opaque, cur.Opaque)
			}
		}
	})
}

func TestManualResolveBlockedCtxCancelled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 1)...)
		_, v1 := resolveAtOnce(t, m, nil)

		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		ch := goResolve(ctx, m, v1)
		synctest.Wait()
		select {
		case r := <-ch:
			t.Fatalf("Resolve returned %q, %v, %v before cancel", addrs(r.set), r.v, r.err)
		default:
		}
		cancel()
		synctest.Wait()
		var r result
		select {
		case r = <-ch:
		default:
			t.Fatal("blocked Resolve did not return after its ctx was cancelled")
		}
		if !errors.Is(r.err, context.Canceled) {
			t.Fatalf("Resolve error = %v, want context.Canceled", r.err)
		}
		if r.set != nil || r.v != nil {
			t.Fatalf("Resolve with an error returned %q, %v; want nil set and version", addrs(r.set), r.v)
		}

		// The resolver is unharmed: a later Update reaches a new Resolve.
		ch2 := goResolve(t.Context(), m, v1)
		synctest.Wait()
		m.Update(eps("b", 1)...)
		r2 := <-ch2
		if r2.err != nil {
			t.Fatal(r2.err)
		}
		wantSet(t, "after a cancelled Resolve", r2.set, eps("b", 1))
	})
}

func TestManualResolveBlockedCtxDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 1)...)
		_, v1 := resolveAtOnce(t, m, nil)

		const timeout = 3 * time.Second
		ctx, cancel := context.WithTimeout(t.Context(), timeout)
		defer cancel()
		start := time.Now()
		_, v, err := m.Resolve(ctx, v1)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Resolve error = %v, want context.DeadlineExceeded", err)
		}
		if v != nil {
			t.Fatalf("Resolve with an error returned version %q", v.Opaque)
		}
		if d := time.Since(start); d != timeout {
			t.Fatalf("Resolve returned after %v, want exactly at the deadline (%v)", d, timeout)
		}
	})
}

func TestManualUpdateEmptySet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := resolve.NewManual(eps("a", 2)...)
		_, v1 := resolveAtOnce(t, m, nil)
		ch := goResolve(t.Context(), m, v1)
		synctest.Wait()
		m.Update()
		synctest.Wait()
		var r result
		select {
		case r = <-ch:
		default:
			t.Fatal("Resolve still blocked after Update()")
		}
		if r.err != nil {
			t.Fatalf("Resolve after Update(): %v; an empty set is a valid answer", r.err)
		}
		if len(r.set) != 0 {
			t.Fatalf("Resolve after Update() = %q, want an empty set", addrs(r.set))
		}
		if r.v == nil || *r.v == *v1 {
			t.Fatalf("Resolve after Update() version = %v, want a new version", r.v)
		}
		if got := m.Endpoints(); len(got) != 0 {
			t.Fatalf("Endpoints after Update() = %q, want empty", addrs(got))
		}

		// From the empty set, an Update back to a non-empty set wakes a Resolve again.
		ch = goResolve(t.Context(), m, r.v)
		synctest.Wait()
		m.Update(eps("b", 1)...)
		r2 := <-ch
		if r2.err != nil {
			t.Fatal(r2.err)
		}
		wantSet(t, "after leaving the empty set", r2.set, eps("b", 1))
	})
}

func TestManualEveryUpdateIsANewVersion(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		same := eps("a", 2)
		m := resolve.NewManual(same...)
		_, v := resolveAtOnce(t, m, nil)
		seen := map[resolve.Version]bool{*v: true}
		for i := range 5 {
			ch := goResolve(t.Context(), m, v)
			synctest.Wait()
			m.Update(same...) // The same set: still a new version.
			r := <-ch
			if r.err != nil {
				t.Fatal(r.err)
			}
			if seen[*r.v] {
				t.Fatalf("Update %d of an identical set gave version %q, already seen", i, r.v.Opaque)
			}
			seen[*r.v] = true
			wantSet(t, "identical Update", r.set, same)
			v = r.v
		}
	})
}

func TestManualEndpointsReturnsCopy(t *testing.T) {
	in := eps("a", 3)
	want := slices.Clone(in)
	m := resolve.NewManual(in...)
	in[0] = endpoint.TCP("mutated-input:1")
	wantSet(t, "Endpoints after mutating NewManual's input", m.Endpoints(), want)

	got := m.Endpoints()
	got[1] = endpoint.TCP("mutated-endpoints:1")
	wantSet(t, "Endpoints after mutating an earlier Endpoints", m.Endpoints(), want)

	set, _, err := m.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	set[2] = endpoint.TCP("mutated-resolve:1")
	wantSet(t, "Endpoints after mutating a Resolve answer", m.Endpoints(), want)
	set2, _, err := m.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "Resolve after mutating a Resolve answer", set2, want)

	in2 := eps("b", 2)
	want2 := slices.Clone(in2)
	m.Update(in2...)
	in2[0] = endpoint.TCP("mutated-update:1")
	wantSet(t, "Endpoints after mutating Update's input", m.Endpoints(), want2)
	set3, _, err := m.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "Resolve after mutating Update's input", set3, want2)
	if e1, e2 := m.Endpoints(), m.Endpoints(); &e1[0] == &e2[0] {
		t.Fatal("two Endpoints results share their backing array")
	}
}

// TestManualConcurrentOrderedUpdates runs many resolvers against updaters whose Updates are
// ordered (the n-th Update sets the first n endpoints of a list), so every resolver must see
// strictly growing prefixes and end at the final set.
func TestManualConcurrentOrderedUpdates(t *testing.T) {
	const (
		updaters  = 4
		resolvers = 8
		readers   = 4
		updates   = 400
	)
	all := eps("h", updates)
	m := resolve.NewManual()
	ctx := testCtx(t)

	var (
		wg   sync.WaitGroup
		errs = make(chan error, updaters+resolvers+readers)
	)
	// isPrefix reports whether set is the first len(set) endpoints of all.
	isPrefix := func(set []endpoint.Endpoint) bool {
		return len(set) <= len(all) && slices.Equal(addrs(set), addrs(all[:len(set)]))
	}

	for range resolvers {
		wg.Go(func() {
			var v *resolve.Version
			last := -1
			for last != updates {
				set, nv, err := m.Resolve(ctx, v)
				if err != nil {
					errs <- fmt.Errorf("resolver: Resolve after seeing %d endpoints: %w", last, err)
					return
				}
				if !isPrefix(set) {
					errs <- fmt.Errorf("resolver: set %q is not one the updaters published", addrs(set))
					return
				}
				if v != nil && *nv == *v {
					errs <- fmt.Errorf("resolver: Resolve(%q) returned the same version", v.Opaque)
					return
				}
				if len(set) <= last {
					errs <- fmt.Errorf("resolver: saw %d endpoints after %d; sets must only move forward", len(set), last)
					return
				}
				last, v = len(set), nv
			}
		})
	}
	done := make(chan struct{})
	for range readers {
		wg.Go(func() {
			last := 0
			for {
				select {
				case <-done:
					return
				default:
				}
				set := m.Endpoints()
				if !isPrefix(set) || len(set) < last {
					errs <- fmt.Errorf("reader: Endpoints = %d endpoints after %d (prefix %v)", len(set), last, isPrefix(set))
					return
				}
				last = len(set)
			}
		})
	}
	var (
		mu   sync.Mutex // Orders the updaters' Updates, not their Resolves.
		next = 1
	)
	var uwg sync.WaitGroup
	for range updaters {
		uwg.Go(func() {
			for {
				mu.Lock()
				if next > updates {
					mu.Unlock()
					return
				}
				m.Update(all[:next]...)
				next++
				mu.Unlock()
			}
		})
	}
	uwg.Wait()
	close(done)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	wantSet(t, "final Endpoints", m.Endpoints(), all)
}

// TestManualConcurrentUnorderedUpdates runs updaters that race with each other and with many
// resolvers. Every version must stand for one set, each resolver must see each updater's sets
// in that updater's order, and every resolver must end at the final set.
func TestManualConcurrentUnorderedUpdates(t *testing.T) {
	const (
		updaters  = 4
		resolvers = 8
		perUpdate = 200
	)
	m := resolve.NewManual()
	ctx := testCtx(t)
	final := endpoint.TCP("final:1")
	// set(u, i) is updater u's i-th set: one endpoint whose address names u and i.
	set := func(u, i int) endpoint.Endpoint { return endpoint.TCP(fmt.Sprintf("u%d:%d", u, i)) }

	type seen map[resolve.Version]string
	results := make([]seen, resolvers)
	errs := make(chan error, resolvers)
	var wg sync.WaitGroup
	for r := range resolvers {
		results[r] = seen{}
		wg.Go(func() {
			var v *resolve.Version
			lastOf := make([]int, updaters) // Last index seen from each updater.
			for i := range lastOf {
				lastOf[i] = -1
			}
			for {
				got, nv, err := m.Resolve(ctx, v)
				if err != nil {
					errs <- fmt.Errorf("resolver %d: %w", r, err)
					return
				}
				if v != nil && *nv == *v {
					errs <- fmt.Errorf("resolver %d: Resolve(%q) returned the same version", r, v.Opaque)
					return
				}
				v = nv
				if len(got) == 0 {
					results[r][*nv] = ""
					continue
				}
				if len(got) != 1 {
					errs <- fmt.Errorf("resolver %d: set %q is not one an updater published", r, addrs(got))
					return
				}
				a := got[0].Address()
				results[r][*nv] = a
				if a == final.Address() {
					return
				}
				var u, i int
				if _, err := fmt.Sscanf(a, "tcp://u%d:%d", &u, &i); err != nil || u < 0 || u >= updaters {
					errs <- fmt.Errorf("resolver %d: address %q is not one an updater published", r, a)
					return
				}
				if i <= lastOf[u] {
					errs <- fmt.Errorf("resolver %d: saw updater %d's set %d after its set %d", r, u, i, lastOf[u])
					return
				}
				lastOf[u] = i
			}
		})
	}
	var uwg sync.WaitGroup
	for u := range updaters {
		uwg.Go(func() {
			for i := range perUpdate {
				m.Update(set(u, i))
				if i%16 == 0 {
					_ = m.Endpoints()
				}
			}
		})
	}
	uwg.Wait()
	m.Update(final)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// One version, one set, across all resolvers.
	byVersion := map[resolve.Version]string{}
	for r, s := range results {
		for v, a := range s {
			if prev, ok := byVersion[v]; ok && prev != a {
				t.Errorf("resolver %d: version %q is set %q, another resolver saw it as %q", r, v.Opaque, a, prev)
			}
			byVersion[v] = a
		}
	}
	set1, _, err := m.Resolve(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "final Resolve(nil)", set1, []endpoint.Endpoint{final})
}
