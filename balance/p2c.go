package balance

import (
	"math"
	"math/rand/v2"
)

// LeastLoaded returns a power-of-two-choices balancer: for each call it samples two distinct
// ready members uniformly at random and returns the less loaded of the two.
//
// A member's load is float64(m.InFlight()) + m.Load(): the calls this client has in progress on
// it plus the load its server last reported. A reported load below zero counts as zero, and a
// NaN counts as infinite, so a server cannot attract calls by reporting nonsense. The member
// with the lower load wins; on a tie either may win with equal probability. A member more
// loaded than every other ready member is therefore never picked while another is ready.
// With one ready member Pick returns it; with none it returns [ErrNoMember]. LeastLoaded
// ignores shard keys.
//
// Pick is safe for concurrent use, never blocks and does not allocate: it costs one call to
// the runtime's per-thread random source and reads the loads of two members. It keeps no
// state, so one LeastLoaded may serve any number of clients.
func LeastLoaded() Balancer { return leastLoaded{} }

type leastLoaded struct{}

var _ Balancer = leastLoaded{}

func (leastLoaded) Pick(info PickInfo) (Member, error) { return pickLeastLoaded(info.Ready) }

// pickLeastLoaded returns the less loaded of two distinct members of ready chosen at random.
func pickLeastLoaded(ready []Member) (Member, error) {
	n := len(ready)
	switch n {
	case 0:
		return nil, ErrNoMember
	case 1:
		if ready[0] == nil {
			return nil, ErrNoMember
		}
		return ready[0], nil
	}
	// One 64-bit draw gives both samples: i uniform over [0, n) from the high half, j uniform
	// over the other n-1 members from the low half. The bias of the multiply-shift reduction
	// is below n/2^32.
	r := rand.Uint64()
	i := int((r >> 32) * uint64(n) >> 32)
	j := int((r & math.MaxUint32) * uint64(n-1) >> 32)
	if j >= i {
		j++
	}
	a, b := ready[i], ready[j]
	// (i, j) is a uniformly random ordered pair, so keeping a on a tie picks either member
	// of the pair with probability one half.
	if a == nil || cost(b) < cost(a) {
		a = b
	}
	if a == nil {
		return nil, ErrNoMember
	}
	return a, nil
}

// cost is the load LeastLoaded compares: in-flight calls plus the reported load, with a
// negative reported load counted as 0 and NaN (and a nil member) as +Inf.
func cost(m Member) float64 {
	if m == nil {
		return math.Inf(1)
	}
	l := m.Load()
	switch {
	case l != l: // NaN
		return math.Inf(1)
	case l < 0:
		l = 0
	}
	return float64(m.InFlight()) + l
}
