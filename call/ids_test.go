package call

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestRequestIDsExhausted: a connection whose request ids near the end of their space stops
// taking calls (never wrapping): the last ids are used, then calls fail as unreachable and
// never ran, and the connection reports itself draining so that a pool opens a new one.
func TestRequestIDsExhausted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, srv := net.Pipe()
	var hm HandlerMap
	var lastID uint64
	hm.Set("ids", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
		return args, nil
	})
	served := make(chan struct{})
	go func() {
		defer close(served)
		ServeOn(ctx, srv, &hm, ServerOptions{})
	}()
	c, err := NewConn(ctx, cli, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { c.Close(); <-served }()

	c.callsMu.Lock()
	c.nextID = maxRequestID - 2
	c.callsMu.Unlock()
	key := MakeMethodKey("ids", "Echo")
	for i := range 2 {
		if out, err := c.Call(ctx, key, []byte("x"), CallOptions{}); err != nil || string(out) != "x" {
			t.Fatalf("call %d near the end of the id space: %q, %v", i, out, err)
		}
	}
	c.callsMu.Lock()
	lastID = c.nextID - 1
	c.callsMu.Unlock()
	if lastID != maxRequestID-1 {
		t.Errorf("last id used = %#x, want %#x", lastID, uint64(maxRequestID-1))
	}
	_, err = c.Call(ctx, key, []byte("x"), CallOptions{})
	if !errors.Is(err, ErrUnreachable) || !NeverRan(err) {
		t.Errorf("call after the id space ran out: %v; want ErrUnreachable, never ran", err)
	}
	if !c.Draining() {
		t.Error("Draining() = false after the id space ran out, want true")
	}
	if n := c.InFlight(); n != 0 {
		t.Errorf("InFlight() = %d, want 0", n)
	}
}
