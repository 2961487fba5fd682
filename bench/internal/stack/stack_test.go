package stack_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
	"github.com/weftrpc/weft/internal/testkit"
)

func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }

// start serves st on a fresh listener of network and returns a client; both are closed when
// the test ends.
func start(t *testing.T, st stack.Stack, network string, cfg stack.Config) stack.Client {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := st.Serve(l, cfg)
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := st.Dial(ctx, network, l.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// pattern returns n bytes that differ with seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

// TestEcho checks that every stack echoes payloads of every size over TCP and Unix sockets,
// that the reply is not the argument itself, and that a reply stays intact after later calls
// (the caller owns it: no stack may hand back a buffer it reuses).
func TestEcho(t *testing.T) {
	for _, st := range stack.All() {
		for _, network := range []string{"tcp", "unix"} {
			t.Run(st.Name()+"/"+network, func(t *testing.T) {
				c := start(t, st, network, stack.Config{})
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				var kept [][]byte
				for i, size := range []int{0, 1, 16, 1 << 10, 5000, 64 << 10, 1 << 20} {
					payload := pattern(size, byte(i))
					got, err := c.Call(ctx, payload)
					if err != nil {
						t.Fatalf("call of %d bytes: %v", size, err)
					}
					if !bytes.Equal(got, payload) {
						t.Fatalf("call of %d bytes: got %d bytes back, not the payload", size, len(got))
					}
					if size > 0 && &got[0] == &payload[0] {
						t.Fatalf("call of %d bytes returned its argument", size)
					}
					kept = append(kept, got)
				}
				for i, size := range []int{0, 1, 16, 1 << 10, 5000, 64 << 10, 1 << 20} {
					if want := pattern(size, byte(i)); !bytes.Equal(kept[i], want) {
						t.Errorf("reply of %d bytes changed after later calls", size)
					}
				}
			})
		}
	}
}

// TestConcurrentCallers checks that concurrent callers of one client each get their own reply.
func TestConcurrentCallers(t *testing.T) {
	for _, st := range stack.All() {
		t.Run(st.Name(), func(t *testing.T) {
			c := start(t, st, "tcp", stack.Config{})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 16 {
				wg.Go(func() {
					for i := range 20 {
						payload := pattern(100+g*10+i, byte(g))
						got, err := c.Call(ctx, payload)
						if err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(got, payload) {
							errs <- fmt.Errorf("caller %d call %d: got another reply", g, i)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// TestRaisedLimit checks that a 6 MiB message crosses every stack with Config.MaxMessageSize
// raised.
func TestRaisedLimit(t *testing.T) {
	for _, st := range stack.All() {
		t.Run(st.Name(), func(t *testing.T) {
			c := start(t, st, "tcp", stack.Config{MaxMessageSize: 32 << 20})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			payload := pattern(6<<20, 3) // over the 4 MiB default of weft, grpc-go and drpc
			got, err := c.Call(ctx, payload)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("got %d bytes back, not the payload", len(got))
			}
		})
	}
}

// TestDoneContext checks that a call whose context is already done fails with the context's
// error and that a closed client fails calls instead of hanging.
func TestDoneContext(t *testing.T) {
	for _, st := range stack.All() {
		t.Run(st.Name(), func(t *testing.T) {
			c := start(t, st, "tcp", stack.Config{})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			done, cancelDone := context.WithCancel(ctx)
			cancelDone()
			if _, err := c.Call(done, []byte("x")); err == nil {
				t.Error("call with a cancelled context succeeded")
			} else if st.Name() != "grpc-go" && st.Name() != "drpc" && st.Name() != "drpc-pool" && !errors.Is(err, context.Canceled) {
				t.Errorf("call with a cancelled context: got %v, want an error matching context.Canceled", err)
			}
			c.Close()
			if _, err := c.Call(ctx, []byte("x")); err == nil {
				t.Error("call on a closed client succeeded")
			}
		})
	}
}

// TestNames checks that the stacks have distinct names that ByName finds.
func TestNames(t *testing.T) {
	seen := map[string]bool{}
	for _, st := range stack.All() {
		if seen[st.Name()] {
			t.Errorf("two stacks are named %q", st.Name())
		}
		seen[st.Name()] = true
		if got, ok := stack.ByName(st.Name()); !ok || got.Name() != st.Name() {
			t.Errorf("ByName(%q) = %v, %t", st.Name(), got, ok)
		}
	}
	if _, ok := stack.ByName("nope"); ok {
		t.Error(`ByName("nope") found a stack`)
	}
	if len(seen) != 7 {
		t.Errorf("got %d stacks, want 7", len(seen))
	}
}
