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

// Sequential calls whose context cannot end read their own replies; calls with a context that
// can end leave the reading to the reader, so cancellation and deadlines work as before and the
// role is handed back; the connection stays usable throughout.
func TestReadOwnMixedContexts(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			c, ctx := roSetup(t, tr, release)
			bg := context.Background() // bounded by the server's and the test's deadlines
			echo := func(ctx context.Context, i int) {
				t.Helper()
				msg := []byte(fmt.Sprint("m", i))
				got, err := c.Call(ctx, roEchoKey, msg, CallOptions{})
				if err != nil || string(got) != string(msg) {
					t.Fatalf("call %d: %q, %v", i, got, err)
				}
			}
			for i := range 50 {
				echo(bg, i)
			}
			c.roleMu.Lock()
			takes := c.roleTakes
			c.roleMu.Unlock()
			if takes == 0 {
				t.Errorf("50 sequential calls with a context that cannot end: no caller read its own reply")
			}

			// A call with a cancellable context is cancelled while the reader reads.
			cctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() {
				_, err := c.Call(cctx, roHoldKey, []byte("x"), CallOptions{})
				done <- err
			}()
			time.Sleep(10 * time.Millisecond)
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("cancelled call: %v, want context.Canceled", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a cancelled call did not return")
			}

			// Deadline calls and own-read calls alternate, with idle gaps longer than the grace.
			for i := range 20 {
				if i%5 == 4 {
					time.Sleep(5 * graceLimit)
				}
				if i%2 == 0 {
					echo(bg, i)
				} else {
					echo(ctx, i)
				}
			}
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
			echo(bg, 100)
			if _, err := c.Ping(ctx); err != nil {
				t.Errorf("ping after the calls: %v", err)
			}
			echo(bg, 101)
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
			for range 5 { // read by their callers: the role is left free after the last
				if _, err := c.Call(context.Background(), roEchoKey, []byte("x"), CallOptions{}); err != nil {
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
