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

func newRing(t testing.TB, vnodes int) balance.Balancer {
	t.Helper()
	b, err := balance.ConsistentHash(balance.ConsistentHashOptions{VirtualNodes: vnodes})
	if err != nil {
		t.Fatalf("ConsistentHash(VirtualNodes: %d): %v", vnodes, err)
	}
	return b
}

// owners returns the address of the member each key in [0, keys) goes to.
func owners(t *testing.T, b balance.Balancer, pi balance.PickInfo, keys int) []string {
	t.Helper()
	out := make([]string, keys)
	pi.Sharded = true
	for k := range keys {
		pi.ShardKey = uint64(k)
		m := pick(t, b, pi)
		if indexOf(pi.Ready, m) < 0 {
			t.Fatalf("key %d: picked %s, which is not in Ready", k, name(m))
		}
		out[k] = name(m)
	}
	return out
}

// without returns fs minus fs[i], in a new slice.
func without(fs []*fake, i int) []*fake {
	out := append([]*fake(nil), fs[:i]...)
	return append(out, fs[i+1:]...)
}

func TestConsistentHashOptions(t *testing.T) {
	for _, v := range []int{-1, math.MinInt, balance.MaxVirtualNodes + 1, math.MaxInt} {
		b, err := balance.ConsistentHash(balance.ConsistentHashOptions{VirtualNodes: v})
		if !errors.Is(err, balance.ErrBadOptions) || b != nil {
			t.Errorf("VirtualNodes %d: ConsistentHash = %v, %v; want nil, ErrBadOptions", v, b, err)
		}
	}
	fs := newFakes(3)
	for _, v := range []int{0, 1, 2, balance.DefaultVirtualNodes, balance.MaxVirtualNodes} {
		b := newRing(t, v)
		owners(t, b, infoOf(fs), 50)
	}
}

func TestConsistentHashDefaultIsDefaultVirtualNodes(t *testing.T) {
	fs := newFakes(7)
	got := owners(t, newRing(t, 0), infoOf(fs), 3000)
	want := owners(t, newRing(t, balance.DefaultVirtualNodes), infoOf(fs), 3000)
	other := owners(t, newRing(t, balance.DefaultVirtualNodes/2), infoOf(fs), 3000)
	differ := 0
	for k := range got {
		if got[k] != want[k] {
			t.Fatalf("key %d: zero options send it to %s, VirtualNodes %d to %s", k, got[k], balance.DefaultVirtualNodes, want[k])
		}
		if got[k] != other[k] {
			differ++
		}
	}
	if differ == 0 {
		t.Fatalf("VirtualNodes %d gives the same owners as %d: the option has no effect", balance.DefaultVirtualNodes/2, balance.DefaultVirtualNodes)
	}
}

func TestConsistentHashStable(t *testing.T) {
	const keys = 5000
	fs := newFakes(10)
	b := newRing(t, 0)
	first := owners(t, b, infoOf(fs), keys)

	check := func(what string, got []string) {
		t.Helper()
		for k := range got {
			if got[k] != first[k] {
				t.Fatalf("%s: key %d went to %s, before to %s", what, k, got[k], first[k])
			}
		}
	}
	// The same PickInfo again (cached), new slices with the same members, and other members
	// with the same addresses in a new balancer all agree.
	pi := infoOf(fs)
	check("same slices", owners(t, b, pi, keys))
	check("same slices, again", owners(t, b, pi, keys))
	check("new slices", owners(t, b, infoOf(fs), keys))
	check("other members, same addresses, new balancer", owners(t, newRing(t, 0), infoOf(newFakes(10)), keys))

	// Alternating between two sets rebuilds the ring each time and never mixes them up.
	small := infoOf(fs[:5])
	wantSmall := owners(t, newRing(t, 0), small, keys)
	for round := range 3 {
		check(fmt.Sprintf("round %d, whole set", round), owners(t, b, infoOf(fs), keys))
		got := owners(t, b, small, keys)
		for k := range got {
			if got[k] != wantSmall[k] {
				t.Fatalf("round %d, half the set: key %d went to %s, want %s", round, k, got[k], wantSmall[k])
			}
		}
	}
}

func TestConsistentHashAddMovesFewKeys(t *testing.T) {
	for _, vnodes := range []int{0, 40} {
		t.Run(fmt.Sprint(vnodes), func(t *testing.T) {
			const keys = 10000
			fs := newFakes(11)
			b := newRing(t, vnodes)
			before := owners(t, b, infoOf(fs[:10]), keys)
			after := owners(t, b, infoOf(fs), keys)
			added := name(fs[10])
			moved := 0
			for k := range keys {
				if before[k] == after[k] {
					continue
				}
				moved++
				if after[k] != added {
					t.Fatalf("key %d moved from %s to %s, not to the added member %s", k, before[k], after[k], added)
				}
			}
			// About 1/11 of the keys go to the new member.
			if f := float64(moved) / keys; f < 0.05 || f > 0.15 {
				t.Fatalf("adding an 11th member moved %.3f of the keys, want about 1/11", f)
			}
		})
	}
}

func TestConsistentHashRemoveMovesOnlyItsKeys(t *testing.T) {
	const keys = 10000
	fs := newFakes(10)
	b := newRing(t, 0)
	before := owners(t, b, infoOf(fs), keys)
	for _, i := range []int{0, 3, 9} {
		removed := name(fs[i])
		after := owners(t, b, infoOf(without(fs, i)), keys)
		moved := 0
		for k := range keys {
			switch {
			case before[k] == removed:
				moved++
				if after[k] == removed {
					t.Fatalf("key %d still goes to removed member %s", k, removed)
				}
			case after[k] != before[k]:
				t.Fatalf("removing %s moved key %d from %s to %s", removed, k, before[k], after[k])
			}
		}
		if f := float64(moved) / keys; f < 0.05 || f > 0.15 {
			t.Fatalf("removing %s moved %.3f of the keys, want about 1/10", removed, f)
		}
	}
}

func TestConsistentHashSpread(t *testing.T) {
	const (
		n    = 10
		keys = 100000
	)
	fs := newFakes(n)
	counts := map[string]int{}
	for _, o := range owners(t, newRing(t, 0), infoOf(fs), keys) {
		counts[o]++
	}
	for _, f := range fs {
		share := float64(counts[name(f)]) / keys
		if share < 0.7/n || share > 1.3/n {
			t.Errorf("%s owns %.4f of the keys, want within 30%% of %.2f", name(f), share, 1.0/n)
		}
	}
}

func TestConsistentHashDownOwnerGoesToSuccessor(t *testing.T) {
	const keys = 5000
	fs := newFakes(10)
	b := newRing(t, 0)
	healthy := owners(t, b, infoOf(fs), keys)

	for _, down := range [][]int{{4}, {0, 9}, {1, 2, 3, 5, 6, 7, 8}} {
		t.Run(fmt.Sprint(down), func(t *testing.T) {
			var rest []*fake
			for _, i := range down {
				fs[i].ready.Store(false)
			}
			for _, f := range fs {
				if f.Ready() {
					rest = append(rest, f)
				}
			}
			got := owners(t, b, infoOf(fs), keys)
			// Where the keys go is where they would go if the down members were removed.
			want := owners(t, newRing(t, 0), infoOf(rest), keys)
			successors := map[string]bool{}
			for k := range keys {
				if got[k] != want[k] {
					t.Fatalf("key %d (owner %s) went to %s, want %s", k, healthy[k], got[k], want[k])
				}
				if got[k] != healthy[k] {
					successors[got[k]] = true
					if fs[indexOfName(fs, healthy[k])].Ready() {
						t.Fatalf("key %d moved from its ready owner %s to %s", k, healthy[k], got[k])
					}
				}
			}
			// A down member's keys spread over several successors, not just one.
			if len(rest) > 1 && len(successors) < 2 {
				t.Errorf("keys of down members went to %d members, want several", len(successors))
			}

			// Healed: every key comes back.
			for _, i := range down {
				fs[i].ready.Store(true)
			}
			back := owners(t, b, infoOf(fs), keys)
			for k := range keys {
				if back[k] != healthy[k] {
					t.Fatalf("after healing, key %d goes to %s, want its owner %s", k, back[k], healthy[k])
				}
			}
		})
	}
}

func indexOfName(fs []*fake, addr string) int {
	for i, f := range fs {
		if name(f) == addr {
			return i
		}
	}
	return -1
}

func TestConsistentHashNoMember(t *testing.T) {
	b := newRing(t, 0)
	fs := newFakes(4)
	for _, f := range fs {
		f.ready.Store(false)
	}
	for _, tc := range []struct {
		name string
		pi   balance.PickInfo
	}{
		{"empty, key", balance.PickInfo{Sharded: true, ShardKey: 3}},
		{"empty, key 0", balance.PickInfo{Sharded: true}},
		{"empty, no key", balance.PickInfo{}},
		{"all down, key", func() balance.PickInfo { pi := infoOf(fs); pi.Sharded, pi.ShardKey = true, 12; return pi }()},
		{"all down, no key", infoOf(fs)},
		{"one member, down", func() balance.PickInfo { pi := infoOf(fs[:1]); pi.Sharded = true; return pi }()},
	} {
		m, err := b.Pick(tc.pi)
		if !errors.Is(err, balance.ErrNoMember) || m != nil {
			t.Errorf("%s: Pick = %s, %v; want <nil>, ErrNoMember", tc.name, name(m), err)
		}
	}

	// One member, ready: it owns every key.
	fs[2].ready.Store(true)
	for k, o := range owners(t, b, infoOf(fs[2:3]), 500) {
		if o != name(fs[2]) {
			t.Fatalf("key %d went to %s, want the only member %s", k, o, name(fs[2]))
		}
	}
	// One of four ready: it takes every key.
	for k, o := range owners(t, b, infoOf(fs), 500) {
		if o != name(fs[2]) {
			t.Fatalf("key %d went to %s, want the only ready member %s", k, o, name(fs[2]))
		}
	}
}

func TestConsistentHashKeyIgnoresLoad(t *testing.T) {
	b := newRing(t, 0)
	fs := newFakes(5)
	pi := infoOf(fs)
	for _, key := range []uint64{0, 1, math.MaxUint64, 1 << 63} {
		pi.Sharded, pi.ShardKey = true, key
		owner := pick(t, b, pi).(*fake)
		owner.inFlight.Store(1000) // A load-aware pick would avoid it.
		for range 50 {
			if m := pick(t, b, pi); m != balance.Member(owner) {
				t.Fatalf("key %d went to %s, want its busy owner %s", key, name(m), name(owner))
			}
		}
		owner.inFlight.Store(0)
	}
}

func TestConsistentHashWithoutKey(t *testing.T) {
	b := newRing(t, 0)
	fs := newFakes(6)
	fs[0].ready.Store(false)
	fs[3].inFlight.Store(100)
	pi := infoOf(fs)
	pi.ShardKey = 7 // Not a key: Sharded is false.
	counts := countPicks(t, b, pi, 3000)
	if counts[fs[3]] != 0 {
		t.Errorf("the busiest member was picked %d times without a key, want 0", counts[fs[3]])
	}
	for _, i := range []int{1, 2, 4, 5} {
		if counts[fs[i]] == 0 {
			t.Errorf("idle ready member %d never picked without a key", i)
		}
	}
}

func TestConsistentHashBadMembers(t *testing.T) {
	b := newRing(t, 0)
	fs := newFakes(3)
	dup := newFake("node-001.test")
	noEndpoint := &fake{}
	noEndpoint.ready.Store(true)
	stranger := newFake("stranger.test")
	pi := balance.PickInfo{
		Members: []balance.Member{nil, fs[0], fs[1], dup, noEndpoint, fs[2]},
		Ready:   []balance.Member{nil, fs[0], dup, noEndpoint, stranger, fs[2]},
		Sharded: true,
	}
	allowed := map[balance.Member]bool{fs[0]: true, fs[1]: true, fs[2]: true}
	for k := range uint64(2000) {
		pi.ShardKey = k
		m, err := b.Pick(pi)
		if err != nil {
			t.Fatalf("key %d: %v", k, err)
		}
		if !allowed[m] {
			t.Fatalf("key %d went to %s, which has no usable address of its own", k, name(m))
		}
	}

	// Only unusable members: no member to pick.
	pi = balance.PickInfo{Members: []balance.Member{nil, noEndpoint}, Ready: []balance.Member{noEndpoint}, Sharded: true}
	if m, err := b.Pick(pi); !errors.Is(err, balance.ErrNoMember) || m != nil {
		t.Fatalf("only unusable members: Pick = %s, %v; want <nil>, ErrNoMember", name(m), err)
	}
	// Ready holds only a member that is not in Members.
	pi = balance.PickInfo{Members: []balance.Member{fs[0]}, Ready: []balance.Member{stranger}, Sharded: true}
	if m, err := b.Pick(pi); !errors.Is(err, balance.ErrNoMember) || m != nil {
		t.Fatalf("Ready outside Members: Pick = %s, %v; want <nil>, ErrNoMember", name(m), err)
	}
}

func TestConsistentHashConcurrent(t *testing.T) {
	const keys = 300
	fs := newFakes(12)
	// Three views a client might publish in turn: all ready, one down, a member added.
	infos := []balance.PickInfo{infoOf(fs[:11])}
	fs[5].ready.Store(false)
	infos = append(infos, infoOf(fs[:11]))
	fs[5].ready.Store(true)
	infos = append(infos, infoOf(fs))
	want := make([][]string, len(infos))
	for i, pi := range infos {
		want[i] = owners(t, newRing(t, 0), pi, keys)
	}

	b := newRing(t, 0)
	const goroutines = 12
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range 3 * keys {
				// Each goroutine moves to another view every 50 picks, so views are
				// built again and again while other goroutines pick.
				v := (g + i/50) % len(infos)
				pi := infos[v]
				k := (i * 7) % keys
				pi.Sharded, pi.ShardKey = true, uint64(k)
				m, err := b.Pick(pi)
				if err != nil {
					errs <- err
					return
				}
				if name(m) != want[v][k] {
					errs <- fmt.Errorf("view %d, key %d: picked %s, want %s", v, k, name(m), want[v][k])
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

// Members with addresses of other forms (Unix sockets) hash like any other.
func TestConsistentHashUnixEndpoints(t *testing.T) {
	b := newRing(t, 0)
	ms := []balance.Member{
		&member{ep: endpoint.Unix("/run/weft/a.sock"), ready: true},
		&member{ep: endpoint.Unix("/run/weft/b.sock"), ready: true},
	}
	pi := balance.PickInfo{Members: ms, Ready: ms}
	counts := map[string]int{}
	for _, o := range owners(t, b, pi, 2000) {
		counts[o]++
	}
	if len(counts) != 2 {
		t.Fatalf("2000 keys went to %d members, want both: %v", len(counts), counts)
	}
}
