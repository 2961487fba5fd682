package call

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// The methods of the tests: Echo returns its argument; Hold waits until release is closed.
var (
	roEchoKey = MakeMethodKey("readown", "Echo")
	roHoldKey = MakeMethodKey("readown", "Hold")
)

// roSetup serves the readown methods on every transport and returns a client of each.
func roSetup(t *testing.T, tr testkit.Transport, release chan struct{}) (*Conn, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	var hm HandlerMap
	hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	hm.Set("readown", "Hold", func(ctx context.Context, args []byte) ([]byte, error) {
		<-release // not ctx: no reply may come before the client gives up
		return args, nil
	})
	l, ep := tr.Listen(t)
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	quiet := slog.New(slog.DiscardHandler)
	go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
	t.Cleanup(func() {
		stop()
		<-served
	})
	c, err := Dial(ctx, ep, ClientOptions{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, ctx
}

// roCallerHolds waits until some caller holds the read role.
func roCallerHolds(c *Conn) bool {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		c.roleMu.Lock()
		held := c.holder != nil
		c.roleMu.Unlock()
		if held {
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// Sequential calls read their own replies; a caller that waits for its reply this way still
// returns when its context is cancelled or its deadline passes, and the connection stays
// usable: the background reader takes the role back with the read deadline undone.
func TestReadOwnCancelAndDeadline(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			c, ctx := roSetup(t, tr, release)
			for i := range 50 {
				msg := []byte(fmt.Sprint("m", i))
				got, err := c.Call(ctx, roEchoKey, msg, CallOptions{})
				if err != nil || string(got) != string(msg) {
					t.Fatalf("call %d: %q, %v", i, got, err)
				}
			}
			c.roleMu.Lock()
			takes := c.roleTakes
			c.roleMu.Unlock()
			if takes == 0 {
				t.Errorf("50 sequential calls: no caller read its own reply")
			}

			// Cancelled while it waits in its own read.
			cctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() {
				_, err := c.Call(cctx, roHoldKey, []byte("x"), CallOptions{})
				done <- err
			}()
			if !roCallerHolds(c) {
				t.Log("the held call did not take the read role; its cancellation is still checked")
			}
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("cancelled call: %v, want context.Canceled", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a call cancelled while reading its own reply did not return")
			}

			// A deadline passes while it waits in its own read.
			start := time.Now()
			dctx, dcancel := context.WithTimeout(ctx, 100*time.Millisecond)
			_, err := c.Call(dctx, roHoldKey, []byte("y"), CallOptions{})
			dcancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("call past its deadline: %v, want context.DeadlineExceeded", err)
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("call with a 100ms deadline returned after %v", took)
			}

			// The connection still works, with no deadline left on it: calls after an idle
			// period longer than the grace, when the background reader reads, succeed too.
			for i := range 20 {
				if i == 10 {
					time.Sleep(5 * graceLimit)
				}
				got, err := c.Call(ctx, roEchoKey, []byte("after"), CallOptions{})
				if err != nil || string(got) != "after" {
					t.Fatalf("call %d after the interrupted ones: %q, %v", i, got, err)
				}
			}
			if _, err := c.Ping(ctx); err != nil {
				t.Errorf("ping after the interrupted calls: %v", err)
			}
		})
	}
}

// A connection whose server goes away while its role is free is seen closed: the background
// reader takes the role back and reads the end.
func TestReadOwnIdleEndSeen(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var hm HandlerMap
			hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
			l, ep := tr.Listen(t)
			sctx, stop := context.WithCancel(ctx)
			served := make(chan error, 1)
			quiet := slog.New(slog.DiscardHandler)
			go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
			c, err := Dial(ctx, ep, ClientOptions{Logger: quiet})
			if err != nil {
				stop()
				<-served
				t.Fatal(err)
			}
			defer c.Close()
			for range 5 {
				if _, err := c.Call(ctx, roEchoKey, []byte("x"), CallOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			stop()
			<-served
			deadline := time.Now().Add(5 * time.Second)
			for c.Err() == nil && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if c.Err() == nil {
				t.Fatal("the server closed, but the idle connection was not seen closed within 5s")
			}
		})
	}
}
