//go:build !race

package balance_test

import (
	"testing"

	"github.com/weftrpc/weft/balance"
)

func TestPickDoesNotAllocate(t *testing.T) {
	fs := newFakes(10)
	fs[4].ready.Store(false) // Keys of a down owner walk on to its successor.
	all := infoOf(fs)
	for _, tc := range []struct {
		name    string
		b       balance.Balancer
		sharded bool
	}{
		{"RoundRobin", balance.RoundRobin(), false},
		{"Sharded/key", balance.Sharded(), true},
		{"Sharded/no key", balance.Sharded(), false},
		{"LeastLoaded", balance.LeastLoaded(), false},
		{"ConsistentHash/key", newRing(t, 0), true},
		{"ConsistentHash/no key", newRing(t, 0), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pi := all
			pi.Sharded = tc.sharded
			// The first pick may build what the balancer caches; later ones must not allocate.
			if _, err := tc.b.Pick(pi); err != nil {
				t.Fatalf("Pick: %v", err)
			}
			var key uint64
			var failed error
			allocs := testing.AllocsPerRun(2000, func() {
				key++
				pi.ShardKey = key
				if _, err := tc.b.Pick(pi); err != nil {
					failed = err
				}
			})
			if failed != nil {
				t.Fatalf("Pick: %v", failed)
			}
			if allocs != 0 {
				t.Fatalf("%v allocations per Pick, want 0", allocs)
			}
		})
	}
}
