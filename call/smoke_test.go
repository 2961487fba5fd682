package call_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
)

func TestSmokeEcho(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			l, ep := tr.Listen(t)
			var hm call.HandlerMap
			hm.Set("echo", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
				return bytes.Clone(args), nil
			})
			sctx, stop := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { done <- call.Serve(sctx, call.NetListener(l, &hm), call.ServerOptions{}) }()
			c, err := call.Dial(ctx, ep, call.ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			key := call.MakeMethodKey("echo", "Echo")
			var wg sync.WaitGroup
			for i := range 50 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					in := bytes.Repeat([]byte{byte(i)}, i*5000)
					out, err := c.Call(ctx, key, in, call.CallOptions{})
					if err != nil {
						t.Error(err)
						return
					}
					if !bytes.Equal(in, out) {
						t.Errorf("call %d: got %d bytes, want %d", i, len(out), len(in))
					}
				}()
			}
			wg.Wait()
			c.Close()
			stop()
			if err := <-done; err == nil {
				t.Error("Serve returned nil")
			}
		})
	}
}
