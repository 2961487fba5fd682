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
)

// A 1 KiB call over TCP whose handler returns a preallocated reply: allocations of the client and
// the server together, per call. The goal is 3 (the reply the caller owns, the server's call
// state, and one more); the budget is 6 for now.
func TestCBEchoAllocations(t *testing.T) {
	const budget = 6
	reply := bytes.Repeat([]byte{'r'}, 1<<10)
	var hm call.HandlerMap
	hm.Set(cbComponent, "Fixed", func(context.Context, []byte) ([]byte, error) { return reply, nil })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cbServe(t, l, &hm, call.ServerOptions{})
	c := cbDial(t, endpoint.TCP(l.Addr().String()), call.ClientOptions{})
	ctx := cbCtx(t, time.Minute)
	args := bytes.Repeat([]byte{'a'}, 1<<10)
	key := cbKey("Fixed")
	do := func() {
		out, err := c.Call(ctx, key, args, call.CallOptions{})
		if err != nil || len(out) != len(reply) {
			t.Fatalf("call: got %d bytes, %v", len(out), err)
		}
	}
	for range 500 {
		do()
	}
	allocs := testing.AllocsPerRun(5000, do)
	t.Logf("allocations per 1 KiB call, client and server together: %.2f (goal 3, budget %d)", allocs, budget)
	if allocs > budget {
		t.Errorf("%.2f allocations per 1 KiB call, want at most %d", allocs, budget)
	}
}
