package balance_test

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/endpoint"
)

// fake is a balance.Member whose readiness and loads a test sets, safely for concurrent use.
type fake struct {
	ep       endpoint.Endpoint
	ready    atomic.Bool
	inFlight atomic.Int64
	load     atomic.Uint64 // math.Float64bits of the reported load
}

var _ balance.Member = (*fake)(nil)

func (f *fake) Endpoint() endpoint.Endpoint { return f.ep }
func (f *fake) Ready() bool                 { return f.ready.Load() }
func (f *fake) InFlight() int               { return int(f.inFlight.Load()) }
func (f *fake) Load() float64               { return math.Float64frombits(f.load.Load()) }

func (f *fake) setLoad(l float64) { f.load.Store(math.Float64bits(l)) }

// newFake returns a ready fake with a TCP endpoint for host:7000.
func newFake(host string) *fake {
	f := &fake{ep: endpoint.TCP(host + ":7000")}
	f.ready.Store(true)
	return f
}

// newFakes returns n ready fakes, ordered by address.
func newFakes(n int) []*fake {
	out := make([]*fake, n)
	for i := range out {
		out[i] = newFake(fmt.Sprintf("node-%03d.test", i))
	}
	return out
}

// infoOf returns a PickInfo over fs with the fakes ready now in Ready. Each call makes new
// slices, as a client does whenever its set or a state changes.
func infoOf(fs []*fake) balance.PickInfo {
	var pi balance.PickInfo
	pi.Members = make([]balance.Member, 0, len(fs))
	for _, f := range fs {
		pi.Members = append(pi.Members, f)
		if f.Ready() {
			pi.Ready = append(pi.Ready, f)
		}
	}
	return pi
}

// countPicks picks n times from pi and counts the members picked.
func countPicks(t *testing.T, b balance.Balancer, pi balance.PickInfo, n int) map[balance.Member]int {
	t.Helper()
	counts := map[balance.Member]int{}
	for i := range n {
		m := pick(t, b, pi)
		if indexOf(pi.Ready, m) < 0 {
			t.Fatalf("pick %d: %s is not in Ready", i, name(m))
		}
		counts[m]++
	}
	return counts
}

func TestLeastLoadedNeverPicksTheBusiest(t *testing.T) {
	b := balance.LeastLoaded()
	fs := newFakes(5)
	fs[2].inFlight.Store(100)
	pi := infoOf(fs)
	const n = 10000
	counts := countPicks(t, b, pi, n)
	// Two distinct samples always include a member less loaded than fs[2].
	if c := counts[fs[2]]; c != 0 {
		t.Errorf("member with 100 calls in flight picked %d of %d times, want 0", c, n)
	}
	// The others share the picks evenly: each 1/4, with a standard deviation of 0.4 %.
	for i, f := range fs {
		if i == 2 {
			continue
		}
		if got := float64(counts[f]) / n; got < 0.2 || got > 0.3 {
			t.Errorf("idle member %d picked %.3f of the time, want about 0.25", i, got)
		}
	}
}

func TestLeastLoadedOrdersByLoad(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(f *fake, v int)
	}{
		{"in flight", func(f *fake, v int) { f.inFlight.Store(int64(v)) }},
		{"reported load", func(f *fake, v int) { f.setLoad(float64(v)) }},
		{"both", func(f *fake, v int) { f.inFlight.Store(int64(v / 5)); f.setLoad(float64(v - v/5)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := balance.LeastLoaded()
			fs := newFakes(3)
			for i, v := range []int{0, 5, 10} {
				tc.set(fs[i], v)
			}
			const n = 9000
			counts := countPicks(t, b, infoOf(fs), n)
			// Of the three equally likely pairs, fs[0] wins two, fs[1] one, fs[2] none.
			c0, c1, c2 := counts[fs[0]], counts[fs[1]], counts[fs[2]]
			if !(c0 > c1 && c1 > c2) {
				t.Fatalf("counts for loads 0, 5, 10 = %d, %d, %d; want strictly decreasing", c0, c1, c2)
			}
			if c2 != 0 {
				t.Errorf("most loaded member picked %d times, want 0", c2)
			}
			if got := float64(c0) / n; got < 0.6 || got > 0.73 {
				t.Errorf("least loaded member picked %.3f of the time, want about 2/3", got)
			}
		})
	}
}

func TestLeastLoadedRule(t *testing.T) {
	for _, tc := range []struct {
		name           string
		aIn, bIn       int64
		aLoad, bLoad   float64
		wantA, wantTie bool
	}{
		{name: "sum decides", aIn: 1, aLoad: 0.5, bIn: 0, bLoad: 2, wantA: true},
		{name: "in flight counts", aIn: 3, bIn: 0, bLoad: 2.5},
		{name: "negative load counts as zero", aIn: 1, aLoad: -100, bIn: 0, bLoad: 0.5},
		{name: "NaN load counts as infinite", aIn: 0, aLoad: math.NaN(), bIn: 50, bLoad: 7},
		{name: "infinite load", aIn: 0, aLoad: math.Inf(1), bIn: 1000},
		{name: "tie", aIn: 2, aLoad: 1, bIn: 1, bLoad: 2, wantTie: true},
		{name: "idle tie", wantTie: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := balance.LeastLoaded()
			fs := newFakes(2)
			fs[0].inFlight.Store(tc.aIn)
			fs[0].setLoad(tc.aLoad)
			fs[1].inFlight.Store(tc.bIn)
			fs[1].setLoad(tc.bLoad)
			const n = 4000
			counts := countPicks(t, b, infoOf(fs), n)
			a := float64(counts[fs[0]]) / n
			switch {
			case tc.wantTie:
				// Either wins half the time; the standard deviation is 0.8 %.
				if a < 0.4 || a > 0.6 {
					t.Errorf("on a tie the first member won %.3f of the picks, want about 0.5", a)
				}
			case tc.wantA && a != 1:
				t.Errorf("first member won %.3f of the picks, want all", a)
			case !tc.wantA && a != 0:
				t.Errorf("first member won %.3f of the picks, want none", a)
			}
		})
	}
}

func TestLeastLoadedOnlyReady(t *testing.T) {
	b := balance.LeastLoaded()
	fs := newFakes(6)
	for _, i := range []int{0, 2, 5} {
		fs[i].ready.Store(false)
	}
	pi := infoOf(fs)
	counts := countPicks(t, b, pi, 3000)
	for _, i := range []int{1, 3, 4} {
		if counts[fs[i]] == 0 {
			t.Errorf("ready member %d never picked", i)
		}
	}

	// A down member is not picked even when it is idle and every ready member is busy.
	for _, i := range []int{1, 3, 4} {
		fs[i].inFlight.Store(50)
	}
	countPicks(t, b, pi, 500)
}

func TestLeastLoadedOneOrNone(t *testing.T) {
	b := balance.LeastLoaded()
	fs := newFakes(3)
	for _, f := range fs {
		f.ready.Store(false)
	}
	for _, tc := range []struct {
		name string
		pi   balance.PickInfo
	}{
		{"empty", balance.PickInfo{}},
		{"none ready", infoOf(fs)},
		{"none ready, sharded", func() balance.PickInfo { pi := infoOf(fs); pi.Sharded = true; return pi }()},
	} {
		m, err := b.Pick(tc.pi)
		if !errors.Is(err, balance.ErrNoMember) || m != nil {
			t.Errorf("%s: Pick = %s, %v; want <nil>, ErrNoMember", tc.name, name(m), err)
		}
	}

	fs[1].ready.Store(true)
	fs[1].inFlight.Store(1000)
	pi := infoOf(fs)
	for range 20 {
		if m := pick(t, b, pi); m != fs[1] {
			t.Fatalf("Pick = %s, want the only ready member %s however busy", name(m), name(fs[1]))
		}
	}
}

func TestLeastLoadedIgnoresShardKey(t *testing.T) {
	b := balance.LeastLoaded()
	fs := newFakes(2)
	fs[0].inFlight.Store(1)
	pi := infoOf(fs)
	pi.Sharded = true
	for key := range uint64(200) {
		pi.ShardKey = key
		if m := pick(t, b, pi); m != fs[1] {
			t.Fatalf("key %d: Pick = %s, want the less loaded %s", key, name(m), name(fs[1]))
		}
	}
}

func TestLeastLoadedConcurrent(t *testing.T) {
	b := balance.LeastLoaded()
	fs := newFakes(8)
	fs[7].inFlight.Store(1 << 20) // Always the busiest: never picked.
	fs[6].ready.Store(false)
	pi := infoOf(fs)

	const (
		goroutines = 16
		per        = 2000
	)
	var (
		wg    sync.WaitGroup
		stop  = make(chan struct{})
		errs  = make(chan error, goroutines)
		total atomic.Int64
	)
	// Loads change while picks run, as replies arrive in a client.
	var mutator sync.WaitGroup
	mutator.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f := fs[i%6]
			f.inFlight.Store(int64(i % 11))
			f.setLoad(float64(i % 7))
		}
	})
	for range goroutines {
		wg.Go(func() {
			for range per {
				m, err := b.Pick(pi)
				if err != nil {
					errs <- err
					return
				}
				if indexOf(pi.Ready, m) < 0 || m == balance.Member(fs[7]) {
					errs <- fmt.Errorf("picked %s, which is not ready or is the busiest", name(m))
					return
				}
				total.Add(1)
			}
		})
	}
	wg.Wait()
	close(stop)
	mutator.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := total.Load(); got != goroutines*per {
		t.Fatalf("%d successful picks, want %d", got, goroutines*per)
	}
}
