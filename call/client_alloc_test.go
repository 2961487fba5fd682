//go:build !race

// The race detector makes sync.Pool drop entries on purpose, so allocation budgets are checked
// only without it.

package call_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// A 1 KiB call over TCP whose handler returns a preallocated reply: allocations of the client and
// the server together, per call, through one Conn from Dial and through a Connection from
// Connect. The goal, and the budget, is 3 (today: the reply the caller owns and the server's
// call state). A reply built per call by a handler set with SetRecycled costs nothing more.
func TestCBEchoAllocations(t *testing.T) {
	const budget = 3
	reply := bytes.Repeat([]byte{'r'}, 1<<10)
	var hm call.HandlerMap
	hm.Set(cbComponent, "Fixed", func(context.Context, []byte) ([]byte, error) { return reply, nil })
	// Built: a reply built per call in a buffer the server reuses, as generated stubs do.
	hm.SetRecycled(cbComponent, "Built", 0, func(_ context.Context, args []byte) ([]byte, error) {
		return append(call.ReplyBuffer(len(reply)), reply...), nil
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cbServe(t, l, &hm, call.ServerOptions{})
	ep := endpoint.TCP(l.Addr().String())
	ctx := cbCtx(t, time.Minute)
	connected, err := call.Connect(ctx, resolve.Constant(ep), call.ClientOptions{Logger: cbQuiet})
	if err != nil {
		t.Fatal(err)
	}
	defer connected.Close()
	var fixed float64 // allocations per call with a preallocated reply
	for _, c := range []struct {
		name   string
		conn   call.Connection
		method string
	}{
		{"Dial", cbDial(t, ep, call.ClientOptions{}), "Fixed"},
		{"Connect", connected, "Fixed"},
		{"Dial, a recycled reply", cbDial(t, ep, call.ClientOptions{}), "Built"},
	} {
		args := bytes.Repeat([]byte{'a'}, 1<<10)
		key := cbKey(c.method)
		do := func() {
			out, err := c.conn.Call(ctx, key, args, call.CallOptions{})
			if err != nil || len(out) != len(reply) {
				t.Fatalf("%s: call: got %d bytes, %v", c.name, len(out), err)
			}
		}
		for range 500 {
			do()
		}
		allocs := testing.AllocsPerRun(5000, do)
		t.Logf("%s: allocations per 1 KiB call, client and server together: %.2f (budget %d)", c.name, allocs, budget)
		if allocs > budget {
			t.Errorf("%s: %.2f allocations per 1 KiB call, want at most %d", c.name, allocs, budget)
		}
		if c.method == "Fixed" {
			fixed = allocs
		} else if allocs > fixed+0.1 {
			t.Errorf("%s: %.2f allocations per 1 KiB call, want no more than a preallocated reply's %.2f", c.name, allocs, fixed)
		}
	}
}
