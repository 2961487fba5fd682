package call_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

var benchSizes = []int{16, 1 << 10, 64 << 10, 1 << 20}

// benchServer serves an echo handler on a fresh listener of the given network and returns a
// connected client.
func benchServer(b *testing.B, network string) *call.Conn {
	b.Helper()
	c, err := call.Dial(context.Background(), benchListen(b, network), call.ClientOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(c.Close)
	return c
}

// benchListen serves an echo handler on a fresh listener of the given network until the
// benchmark ends and returns its endpoint.
func benchListen(b *testing.B, network string) endpoint.Endpoint {
	b.Helper()
	var (
		l   net.Listener
		ep  endpoint.Endpoint
		err error
	)
	switch network {
	case "tcp":
		l, err = net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			ep = endpoint.TCP(l.Addr().String())
		}
	case "unix":
		path := filepath.Join(b.TempDir(), "s")
		l, err = net.Listen("unix", path)
		ep = endpoint.Unix(path)
	}
	if err != nil {
		b.Fatal(err)
	}
	var hm call.HandlerMap
	// The reply is the argument slice itself: the server writes the reply before it
	// releases the arguments.
	hm.Set("bench", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{})
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	return ep
}

// BenchmarkConnectEcho compares a 16 B echo through one Conn from Dial with the same echo
// through a Connection from Connect (one endpoint, round-robin), sequential and with 64
// callers: the difference is the cost of picking a member.
func BenchmarkConnectEcho(b *testing.B) {
	clients := []struct {
		name string
		make func(b *testing.B, ep endpoint.Endpoint) call.Connection
	}{
		{"dial", func(b *testing.B, ep endpoint.Endpoint) call.Connection {
			c, err := call.Dial(context.Background(), ep, call.ClientOptions{})
			if err != nil {
				b.Fatal(err)
			}
			return c
		}},
		{"connect", func(b *testing.B, ep endpoint.Endpoint) call.Connection {
			c, err := call.Connect(context.Background(), resolve.Constant(ep), call.ClientOptions{})
			if err != nil {
				b.Fatal(err)
			}
			return c
		}},
	}
	for _, mode := range []string{"seq", "par64"} {
		for _, cl := range clients {
			b.Run(fmt.Sprintf("unix/%s/%s", mode, cl.name), func(b *testing.B) {
				c := cl.make(b, benchListen(b, "unix"))
				defer c.Close()
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				args := make([]byte, 16)
				if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil { // connected
					b.Fatal(err)
				}
				b.ReportAllocs()
				if mode == "seq" {
					for b.Loop() {
						if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
							b.Fatal(err)
						}
					}
					return
				}
				b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
				b.RunParallel(func(pb *testing.PB) {
					args := make([]byte, 16)
					for pb.Next() {
						if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

var echoKey = call.MakeMethodKey("bench", "Echo")

// BenchmarkEcho measures one caller making calls back to back.
func BenchmarkEcho(b *testing.B) {
	for _, network := range []string{"tcp", "unix"} {
		for _, size := range benchSizes {
			b.Run(fmt.Sprintf("%s/%s", network, sizeName(size)), func(b *testing.B) {
				c := benchServer(b, network)
				args := make([]byte, size)
				ctx := context.Background()
				b.SetBytes(int64(2 * size))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkEchoDeadline is BenchmarkEcho/16B with a deadline, as real callers have: the
// deadline travels with the call and bounds the caller's writes. Each call has its own context
// (per-call), or all share one (shared).
func BenchmarkEchoDeadline(b *testing.B) {
	for _, network := range []string{"tcp", "unix"} {
		for _, shared := range []bool{false, true} {
			name := network + "/per-call"
			if shared {
				name = network + "/shared"
			}
			b.Run(name, func(b *testing.B) {
				c := benchServer(b, network)
				args := make([]byte, 16)
				sctx, scancel := context.WithTimeout(context.Background(), time.Hour)
				defer scancel()
				b.ReportAllocs()
				for b.Loop() {
					ctx, cancel := sctx, context.CancelFunc(func() {})
					if !shared {
						ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
					}
					if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
						b.Fatal(err)
					}
					cancel()
				}
			})
		}
	}
}

// BenchmarkEchoParallel measures 64 callers sharing one connection.
func BenchmarkEchoParallel(b *testing.B) {
	for _, network := range []string{"tcp", "unix"} {
		for _, size := range benchSizes {
			b.Run(fmt.Sprintf("%s/%s", network, sizeName(size)), func(b *testing.B) {
				c := benchServer(b, network)
				ctx := context.Background()
				b.SetBytes(int64(2 * size))
				b.ReportAllocs()
				b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
				b.RunParallel(func(pb *testing.PB) {
					args := make([]byte, size)
					for pb.Next() {
						if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10:
		return fmt.Sprintf("%dKiB", n>>10)
	default:
		return fmt.Sprintf("%dB", n)
	}
}

// BenchmarkIdleConnMemory reports the heap and goroutine stacks held per idle connection pair
// (client and server side together, plaintext TCP, after one call on each).
func BenchmarkIdleConnMemory(b *testing.B) {
	const pairs = 200
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var hm call.HandlerMap
	hm.Set("bench", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{DrainTimeout: -1})
	}()
	defer func() { cancel(); <-served }()
	ep := endpoint.TCP(l.Addr().String())
	args := make([]byte, 16)
	for b.Loop() {
		before := memInUse()
		conns := make([]*call.Conn, 0, pairs)
		for range pairs {
			c, err := call.Dial(ctx, ep, call.ClientOptions{})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Call(ctx, echoKey, args, call.CallOptions{}); err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		after := memInUse()
		b.ReportMetric(float64(after-before)/pairs, "B/pair")
		for _, c := range conns {
			c.Close()
		}
	}
}

// memInUse returns heap and stack bytes in use after a garbage collection.
func memInUse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}
