package call_test

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// rtBenchServe serves "Name" on a Unix socket; every nth reply (if n > 0) is delayed by
// delay, or until the call is cancelled. Cleanup stops the server hard and joins it.
func rtBenchServe(b *testing.B, name string, n int64, delay time.Duration) endpoint.Endpoint {
	b.Helper()
	path := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	var calls atomic.Int64
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(ctx context.Context, _ []byte) ([]byte, error) {
		if n > 0 && calls.Add(1)%n == 0 {
			t := time.NewTimer(delay)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return []byte(name), nil
	})
	cbServe(b, l, &hm, call.ServerOptions{})
	return endpoint.Unix(path)
}

// BenchmarkHedgeP99 measures the latency of idempotent calls from 8 concurrent callers
// through a Connection to two backends over Unix sockets, one of which delays one reply in
// ten by 20ms: without hedging, and with a hedge after 2ms. It reports the median and the
// 99th percentile (p50-ns, p99-ns): hedging cuts the p99 from the 20ms stall to a few
// milliseconds. Run it with -benchtime=2000x or more: the p99 needs enough calls.
func BenchmarkHedgeP99(b *testing.B) {
	const callers = 8
	steady := rtBenchServe(b, "steady", 0, 0)
	stalling := rtBenchServe(b, "stalling", 10, 20*time.Millisecond)
	for _, bc := range []struct {
		name  string
		hedge call.HedgePolicy
	}{
		{"hedge=off", call.HedgePolicy{}},
		{"hedge=2ms", call.HedgePolicy{Delay: 2 * time.Millisecond}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			conn, err := call.Connect(ctx, resolve.Constant(steady, stalling), call.ClientOptions{Logger: cbQuiet, Hedge: bc.hedge})
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			ctWaitStatus(b, conn, "two ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 2 })
			opts := call.CallOptions{Idempotent: true}
			key := cbKey("Name")
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			var failed atomic.Pointer[error]
			var wg sync.WaitGroup
			b.ReportAllocs()
			b.ResetTimer()
			for range callers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						start := time.Now()
						if _, err := conn.Call(ctx, key, nil, opts); err != nil {
							failed.CompareAndSwap(nil, &err)
							return
						}
						lat[i] = time.Since(start)
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			if err := failed.Load(); err != nil {
				b.Fatalf("call: %v", *err)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[(len(lat)-1)*50/100]), "p50-ns")
			b.ReportMetric(float64(lat[(len(lat)-1)*99/100]), "p99-ns")
		})
	}
}
