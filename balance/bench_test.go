package balance_test

import (
	"fmt"
	"testing"

	"github.com/weftrpc/weft/balance"
)

// BenchmarkPick compares the cost of one pick across the balancers, with every member ready.
func BenchmarkPick(b *testing.B) {
	for _, bc := range []struct {
		name    string
		bal     func(b *testing.B) balance.Balancer
		sharded bool
	}{
		{"RoundRobin", func(*testing.B) balance.Balancer { return balance.RoundRobin() }, false},
		{"Sharded", func(*testing.B) balance.Balancer { return balance.Sharded() }, true},
		{"LeastLoaded", func(*testing.B) balance.Balancer { return balance.LeastLoaded() }, false},
		{"ConsistentHash", func(b *testing.B) balance.Balancer { return newRing(b, 0) }, true},
		{"ConsistentHash/no key", func(b *testing.B) balance.Balancer { return newRing(b, 0) }, false},
	} {
		for _, n := range []int{3, 100} {
			b.Run(fmt.Sprintf("%s/members=%d", bc.name, n), func(b *testing.B) {
				bal := bc.bal(b)
				fs := newFakes(n)
				for i, f := range fs {
					f.inFlight.Store(int64(i % 5))
				}
				pi := infoOf(fs)
				pi.Sharded = bc.sharded
				if _, err := bal.Pick(pi); err != nil { // Build what the balancer caches.
					b.Fatal(err)
				}
				b.ReportAllocs()
				var key uint64
				for b.Loop() {
					key++
					pi.ShardKey = key
					if _, err := bal.Pick(pi); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkPickParallel measures picks from many goroutines sharing one balancer.
func BenchmarkPickParallel(b *testing.B) {
	for _, bc := range []struct {
		name    string
		bal     balance.Balancer
		sharded bool
	}{
		{"RoundRobin", balance.RoundRobin(), false},
		{"LeastLoaded", balance.LeastLoaded(), false},
		{"ConsistentHash", newRing(b, 0), true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			pi := infoOf(newFakes(10))
			pi.Sharded = bc.sharded
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				p := pi
				for pb.Next() {
					p.ShardKey++
					if _, err := bc.bal.Pick(p); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
