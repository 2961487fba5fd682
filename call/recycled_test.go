package call_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
)

// Handlers registered with SetRecycled have the memory of their replies reused once written.
// Concurrent calls of sizes across the buffer classes (and replies sent in many frames) each
// get their own reply intact: a buffer is not reused before its reply is written, and a reply
// that shares memory with its handler's args (all of them, or a part) is not reused twice.
func TestRecycledReplies(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			var hm call.HandlerMap
			// Build: the args reversed, in a buffer from ReplyBuffer (grown past it sometimes).
			hm.SetRecycled(cbComponent, "Build", 0, func(_ context.Context, args []byte) ([]byte, error) {
				out := call.ReplyBuffer(len(args) / 2)
				for i := len(args) - 1; i >= 0; i-- {
					out = append(out, args[i])
				}
				return out, nil
			})
			hm.SetRecycled(cbComponent, "Same", 0, func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
			hm.SetRecycled(cbComponent, "Tail", 0, func(_ context.Context, args []byte) ([]byte, error) { return args[1:], nil })
			l, ep := tr.Listen(t)
			cbServe(t, l, &hm, call.ServerOptions{})
			c := cbDial(t, ep, call.ClientOptions{})
			sizes := []int{1, 100, 511, 512, 513, 4 << 10, 5000, 64 << 10, 70 << 10, 256 << 10, 300 << 10}
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 8 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 1))
					for i := range 30 {
						n := sizes[rng.IntN(len(sizes))]
						args := make([]byte, n)
						for j := range args {
							args[j] = byte(rng.Uint32())
						}
						method := []string{"Build", "Same", "Tail"}[i%3]
						want := bytes.Clone(args)
						switch method {
						case "Build":
							for a, b := 0, len(want)-1; a < b; a, b = a+1, b-1 {
								want[a], want[b] = want[b], want[a]
							}
						case "Tail":
							want = want[1:]
						}
						got, err := c.Call(ctx, cbKey(method), args, call.CallOptions{})
						if err != nil || !bytes.Equal(got, want) {
							errs <- fmt.Errorf("goroutine %d, call %d: %s of %d bytes: %d bytes back, error %v; not the reply sent", g, i, method, n, len(got), err)
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
