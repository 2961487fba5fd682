package main

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
)

// benchRunner returns a runner for benchmarks over TCP loopback.
func benchRunner() *runner { return &runner{network: "tcp"} }

// benchPair starts a server of st and a client of it until the benchmark ends.
func benchPair(b *testing.B, st stack.Stack, cfg stack.Config) *pair {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := benchRunner().startPair(ctx, st, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.close)
	return p
}

// BenchmarkEcho measures one caller making calls back to back, for every stack and size.
func BenchmarkEcho(b *testing.B) {
	for _, st := range stack.All() {
		for _, size := range seqSizes {
			b.Run(fmt.Sprintf("stack=%s/size=%s", st.Name(), sizeName(size)), func(b *testing.B) {
				p := benchPair(b, st, stack.Config{})
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				defer cancel()
				payload := make([]byte, size)
				if err := echoOnce(ctx, p.cli, payload); err != nil { // connected
					b.Fatal(err)
				}
				b.SetBytes(int64(2 * size))
				b.ReportAllocs()
				for b.Loop() {
					if err := echoOnce(ctx, p.cli, payload); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkParallel measures 64 callers sharing one client, for every stack and the small
// sizes. cpu-ns/op is the CPU time of the whole process (client and server) per call.
func BenchmarkParallel(b *testing.B) {
	for _, st := range stack.All() {
		for _, size := range throughputSizes {
			b.Run(fmt.Sprintf("stack=%s/size=%s", st.Name(), sizeName(size)), func(b *testing.B) {
				p := benchPair(b, st, stack.Config{})
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				defer cancel()
				if err := echoOnce(ctx, p.cli, make([]byte, size)); err != nil {
					b.Fatal(err)
				}
				b.SetBytes(int64(2 * size))
				b.ReportAllocs()
				b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
				cpu0, cpuKnown := cpuTime()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					payload := make([]byte, size)
					for pb.Next() {
						if err := echoOnce(ctx, p.cli, payload); err != nil {
							b.Error(err)
							return
						}
					}
				})
				b.StopTimer()
				if cpu1, _ := cpuTime(); cpuKnown {
					b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
				}
			})
		}
	}
}

// BenchmarkIdleConn reports the heap and goroutine stacks per idle connection pair (client
// and server side together, after one call each) for every stack.
func BenchmarkIdleConn(b *testing.B) {
	for _, st := range stack.All() {
		b.Run("stack="+st.Name(), func(b *testing.B) {
			r := &runner{network: "tcp", p: Params{IdlePairs: 20, Rounds: 1}, res: &Results{}}
			r.defineMeasures()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for b.Loop() {
				if err := r.idleMemory(ctx, st); err != nil {
					b.Fatal(err)
				}
			}
			m := r.res.measure("idle/bytes")
			b.ReportMetric(median(m.Values[st.Name()].Rounds), "B/pair")
		})
	}
}

// BenchmarkStubs compares a weft call through the generated stubs of internal/echo with raw
// Connection.Call, at 1 KiB.
func BenchmarkStubs(b *testing.B) {
	for _, row := range stubRows {
		b.Run("call="+row, func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			s, err := benchRunner().startStubServer(ctx)
			if err != nil {
				b.Fatal(err)
			}
			defer s.close()
			do := s.stubCall(ctx, row, 1<<10)
			if err := do(); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := do(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
