package balance_test

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/endpoint"
)

// member is a fake balance.Member with a fixed endpoint and readiness.
type member struct {
	ep    endpoint.Endpoint
	ready bool
}

func (m *member) Endpoint() endpoint.Endpoint { return m.ep }
func (m *member) Ready() bool                 { return m.ready }
func (m *member) InFlight() int               { return 0 }
func (m *member) Load() float64               { return 0 }

var _ balance.Member = (*member)(nil)

// members returns n members ordered by address, all ready.
func members(n int) []balance.Member {
	out := make([]balance.Member, n)
	for i := range out {
		out[i] = &member{ep: endpoint.TCP(fmt.Sprintf("10.0.0.%d:1", i+10)), ready: true}
	}
	return out
}

// info returns the PickInfo for all with only the members at readyIdx ready.
func info(all []balance.Member, readyIdx ...int) balance.PickInfo {
	pi := balance.PickInfo{Members: all}
	for i, m := range all {
		m.(*member).ready = false
		for _, r := range readyIdx {
			if r == i {
				m.(*member).ready = true
				pi.Ready = append(pi.Ready, m)
			}
		}
	}
	return pi
}

func name(m balance.Member) string {
	if m == nil {
		return "<nil>"
	}
	return m.Endpoint().Address()
}

func indexOf(all []balance.Member, m balance.Member) int {
	for i, x := range all {
		if x == m {
			return i
		}
	}
	return -1
}

func pick(t *testing.T, b balance.Balancer, pi balance.PickInfo) balance.Member {
	t.Helper()
	m, err := b.Pick(pi)
	if err != nil {
		t.Fatalf("Pick: %v", err)
	}
	if m == nil {
		t.Fatal("Pick returned a nil member and no error")
	}
	return m
}

func TestRoundRobinCyclesEvenly(t *testing.T) {
	for _, k := range []int{1, 2, 3, 5} {
		t.Run(fmt.Sprint(k), func(t *testing.T) {
			b := balance.RoundRobin()
			all := members(k)
			pi := info(all, func() []int {
				var idx []int
				for i := range k {
					idx = append(idx, i)
				}
				return idx
			}()...)
			const rounds = 50
			counts := map[balance.Member]int{}
			window := map[balance.Member]bool{}
			for i := range rounds * k {
				m := pick(t, b, pi)
				if indexOf(all, m) < 0 {
					t.Fatalf("pick %d: %s is not a member", i, name(m))
				}
				counts[m]++
				// Every k consecutive picks visit each member once.
				if window[m] {
					t.Fatalf("pick %d: %s picked twice within one cycle of %d", i, name(m), k)
				}
				window[m] = true
				if len(window) == k {
					clear(window)
				}
			}
			for _, m := range all {
				if counts[m] != rounds {
					t.Errorf("%s picked %d times in %d picks over %d members, want exactly %d", name(m), counts[m], rounds*k, k, rounds)
				}
			}
		})
	}
}

func TestRoundRobinOnlyReady(t *testing.T) {
	b := balance.RoundRobin()
	all := members(6)
	pi := info(all, 1, 3, 4)
	counts := map[balance.Member]int{}
	const n = 300
	for i := range n {
		m := pick(t, b, pi)
		if !m.Ready() || indexOf(pi.Ready, m) < 0 {
			t.Fatalf("pick %d: %s is not in Ready", i, name(m))
		}
		counts[m]++
	}
	for _, m := range pi.Ready {
		if counts[m] != n/len(pi.Ready) {
			t.Errorf("%s picked %d times, want %d", name(m), counts[m], n/len(pi.Ready))
		}
	}

	// Readiness changing between picks: every pick comes from the Ready of its own call.
	sets := [][]int{{0}, {2, 5}, {0, 1, 2, 3, 4, 5}, {4}, {1, 5}, {3, 2}}
	for i := range 120 {
		pi := info(all, sets[i%len(sets)]...)
		m := pick(t, b, pi)
		if indexOf(pi.Ready, m) < 0 {
			t.Fatalf("pick %d with Ready %v: %s is not in Ready", i, sets[i%len(sets)], name(m))
		}
	}
}

func TestRoundRobinNoReady(t *testing.T) {
	b := balance.RoundRobin()
	for _, tc := range []struct {
		name string
		pi   balance.PickInfo
	}{
		{"empty", balance.PickInfo{}},
		{"none ready", info(members(3))},
		{"none ready, sharded", func() balance.PickInfo { pi := info(members(3)); pi.Sharded = true; return pi }()},
	} {
		m, err := b.Pick(tc.pi)
		if !errors.Is(err, balance.ErrNoMember) {
			t.Errorf("%s: Pick = %s, %v; want ErrNoMember", tc.name, name(m), err)
		}
		if m != nil {
			t.Errorf("%s: Pick returned member %s with its error", tc.name, name(m))
		}
	}
	// Still works once a member is ready again.
	all := members(3)
	if m := pick(t, b, info(all, 2)); m != all[2] {
		t.Fatalf("Pick = %s, want the only ready member %s", name(m), name(all[2]))
	}
}

func TestRoundRobinIgnoresShardKey(t *testing.T) {
	b := balance.RoundRobin()
	all := members(4)
	pi := info(all, 1, 2, 3) // Members[0], the owner of key 0 and key 4, is down.
	counts := map[balance.Member]int{}
	const n = 300
	for i := range n {
		pi.Sharded = true
		// Keys 0 and 12: both owned by Members[0], and both 0 modulo the 3 ready members.
		pi.ShardKey = uint64(12 * (i % 2))
		m := pick(t, b, pi)
		if indexOf(pi.Ready, m) < 0 {
			t.Fatalf("pick %d with shard key %d: %s is not in Ready", i, pi.ShardKey, name(m))
		}
		counts[m]++
	}
	for _, m := range pi.Ready {
		if counts[m] != n/len(pi.Ready) {
			t.Errorf("%s picked %d times with shard keys set, want %d (round-robin ignores keys)", name(m), counts[m], n/len(pi.Ready))
		}
	}
}

func TestRoundRobinConcurrent(t *testing.T) {
	b := balance.RoundRobin()
	all := members(5)
	pi := info(all, 0, 1, 2, 3, 4)
	const (
		goroutines = 16
		per        = 500
	)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		counts = map[balance.Member]int{}
		errs   = make(chan error, goroutines)
	)
	for range goroutines {
		wg.Go(func() {
			local := map[balance.Member]int{}
			for range per {
				m, err := b.Pick(pi)
				if err != nil {
					errs <- err
					return
				}
				if indexOf(pi.Ready, m) < 0 {
					errs <- fmt.Errorf("picked %s, not in Ready", name(m))
					return
				}
				local[m]++
			}
			mu.Lock()
			defer mu.Unlock()
			for m, c := range local {
				counts[m] += c
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := 0
	for _, m := range all {
		if counts[m] == 0 {
			t.Errorf("%s never picked in %d concurrent picks", name(m), goroutines*per)
		}
		total += counts[m]
	}
	if total != goroutines*per {
		t.Fatalf("%d picks counted, want %d", total, goroutines*per)
	}

	// Serialized again after the concurrent burst, the cycle is still even.
	serial := map[balance.Member]int{}
	for range 100 * len(all) {
		serial[pick(t, b, pi)]++
	}
	for _, m := range all {
		if serial[m] != 100 {
			t.Errorf("after concurrent use, %s picked %d of %d serialized picks, want 100", name(m), serial[m], 100*len(all))
		}
	}
}

func TestShardedPicksOwnerByKey(t *testing.T) {
	b := balance.Sharded()
	for _, n := range []int{1, 2, 3, 7} {
		all := members(n)
		for _, readyIdx := range [][]int{nil, {0}, {n - 1}} {
			pi := info(all, readyIdx...)
			pi.Sharded = true
			for key := range uint64(3*n + 1) {
				pi.ShardKey = key
				m := pick(t, b, pi)
				if want := all[key%uint64(n)]; m != want {
					t.Fatalf("n=%d ready=%v key=%d: picked %s, want Members[%d] = %s", n, readyIdx, key, name(m), key%uint64(n), name(want))
				}
			}
		}
	}
}

func TestShardedKeyZero(t *testing.T) {
	b := balance.Sharded()
	all := members(3)
	pi := info(all, 1, 2) // Members[0] is down: key 0 still maps to it.
	pi.Sharded, pi.ShardKey = true, 0
	for range 50 {
		if m := pick(t, b, pi); m != all[0] {
			t.Fatalf("key 0: picked %s, want Members[0] = %s even though it is not ready", name(m), name(all[0]))
		}
	}
	pi = info(all, 0, 1, 2)
	pi.Sharded, pi.ShardKey = true, 0
	if m := pick(t, b, pi); m != all[0] {
		t.Fatalf("key 0, all ready: picked %s, want Members[0] = %s", name(m), name(all[0]))
	}
}

func TestShardedLargeKeys(t *testing.T) {
	b := balance.Sharded()
	all := members(7)
	pi := info(all, 0, 1, 2, 3, 4, 5, 6)
	pi.Sharded = true
	for _, key := range []uint64{math.MaxUint64, math.MaxUint64 - 1, 1 << 63, math.MaxInt64, 1<<32 + 3} {
		pi.ShardKey = key
		if m, want := pick(t, b, pi), all[key%7]; m != want {
			t.Fatalf("key %d: picked %s, want Members[%d] = %s", key, name(m), key%7, name(want))
		}
	}
}

func TestShardedStableAcrossReadiness(t *testing.T) {
	b := balance.Sharded()
	all := members(5)
	readies := [][]int{{0, 1, 2, 3, 4}, {1, 2, 3, 4}, {0}, {}, {2, 4}, {0, 1, 2, 3}, {3}}
	owner := map[uint64]balance.Member{}
	for _, r := range readies {
		pi := info(all, r...)
		pi.Sharded = true
		for key := range uint64(40) {
			pi.ShardKey = key
			m := pick(t, b, pi)
			if prev, ok := owner[key]; ok && prev != m {
				t.Fatalf("key %d moved from %s to %s when Ready became %v", key, name(prev), name(m), r)
			}
			owner[key] = m
		}
	}
}

func TestShardedWithoutKey(t *testing.T) {
	b := balance.Sharded()
	all := members(5)
	pi := info(all, 1, 3, 4)
	pi.ShardKey = 0 // Not a key: Sharded is false. Members[0] (down) must never be picked.
	counts := map[balance.Member]int{}
	const n = 1500
	for i := range n {
		m := pick(t, b, pi)
		if indexOf(pi.Ready, m) < 0 {
			t.Fatalf("pick %d without a key: %s is not in Ready", i, name(m))
		}
		counts[m]++
	}
	// Random among the ready: with 1500 picks over 3 members, missing one has probability
	// about 3·(2/3)^1500, which is zero for any practical purpose.
	for _, m := range pi.Ready {
		if counts[m] == 0 {
			t.Errorf("%s (ready) never picked in %d unkeyed picks", name(m), n)
		}
	}
}

func TestShardedNoMember(t *testing.T) {
	b := balance.Sharded()
	for _, tc := range []struct {
		name string
		pi   balance.PickInfo
	}{
		{"no key, empty", balance.PickInfo{}},
		{"no key, none ready", info(members(3))},
		{"key, empty set", balance.PickInfo{Sharded: true, ShardKey: 5}},
		{"key 0, empty set", balance.PickInfo{Sharded: true}},
	} {
		m, err := b.Pick(tc.pi)
		if !errors.Is(err, balance.ErrNoMember) {
			t.Errorf("%s: Pick = %s, %v; want ErrNoMember", tc.name, name(m), err)
		}
		if m != nil {
			t.Errorf("%s: Pick returned member %s with its error", tc.name, name(m))
		}
	}
}

func TestShardedConcurrent(t *testing.T) {
	b := balance.Sharded()
	all := members(4)
	pi := info(all, 0, 2)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			for i := range 300 {
				p := pi
				if g%2 == 0 {
					p.Sharded, p.ShardKey = true, uint64(i)
				}
				m, err := b.Pick(p)
				if err != nil {
					errs <- err
					return
				}
				if p.Sharded && m != all[p.ShardKey%4] {
					errs <- fmt.Errorf("key %d: picked %s, want %s", p.ShardKey, name(m), name(all[p.ShardKey%4]))
					return
				}
				if !p.Sharded && indexOf(pi.Ready, m) < 0 {
					errs <- fmt.Errorf("unkeyed: picked %s, not in Ready", name(m))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestFuncPassesPickInfo(t *testing.T) {
	all := members(4)
	pi := info(all, 1, 3)
	pi.ShardKey, pi.Sharded = 42, true

	var got balance.PickInfo
	calls := 0
	b := balance.Func(func(info balance.PickInfo) (balance.Member, error) {
		calls++
		got = info
		return info.Members[2], nil
	})
	m, err := b.Pick(pi)
	if err != nil {
		t.Fatalf("Pick: %v", err)
	}
	if calls != 1 {
		t.Fatalf("pick function called %d times, want 1", calls)
	}
	if m != all[2] {
		t.Fatalf("Pick = %s, want the function's answer %s", name(m), name(all[2]))
	}
	if got.ShardKey != 42 || !got.Sharded {
		t.Fatalf("function saw ShardKey=%d Sharded=%v, want 42 true", got.ShardKey, got.Sharded)
	}
	if len(got.Members) != len(pi.Members) || &got.Members[0] != &pi.Members[0] {
		t.Fatal("function did not see the caller's Members slice")
	}
	if len(got.Ready) != len(pi.Ready) || &got.Ready[0] != &pi.Ready[0] {
		t.Fatal("function did not see the caller's Ready slice")
	}

	// Errors pass through unchanged, even custom ones.
	errCustom := errors.New("custom")
	b = balance.Func(func(balance.PickInfo) (balance.Member, error) { return nil, errCustom })
	if m, err := b.Pick(pi); err != errCustom || m != nil {
		t.Fatalf("Pick = %s, %v; want nil, the function's error", name(m), err)
	}
	b = balance.Func(func(balance.PickInfo) (balance.Member, error) { return nil, balance.ErrNoMember })
	if _, err := b.Pick(balance.PickInfo{}); !errors.Is(err, balance.ErrNoMember) {
		t.Fatalf("Pick error = %v, want ErrNoMember", err)
	}
}
