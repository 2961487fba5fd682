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

// rtAllocBudget is what a 1 KiB call through a Connection from Connect allocates, client and
// server together, when no retry or hedge policy applies: the reply the caller owns and the
// server's call state. TestCBEchoAllocations holds the same path to the project's goal of 3.
const rtAllocBudget = 2

// Retries and hedging cost nothing on the path of a call they do not apply to: through a
// Connection with zero options, a Connection whose policy is turned off for the call, and one
// whose hedging does not apply (the call is not idempotent), a 1 KiB call over TCP makes at
// most rtAllocBudget allocations; so does a call whose retry policy is on but whose first
// attempt succeeds. A hedged call that answers before its hedge delay is measured and logged.
func TestRTNoPolicyAllocations(t *testing.T) {
	reply := bytes.Repeat([]byte{'r'}, 1<<10)
	var hm call.HandlerMap
	hm.Set(cbComponent, "Fixed", func(context.Context, []byte) ([]byte, error) { return reply, nil })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cbServe(t, l, &hm, call.ServerOptions{})
	ep := endpoint.TCP(l.Addr().String())
	ctx := cbCtx(t, time.Minute)
	connect := func(opts call.ClientOptions) call.Connection {
		opts.Logger = cbQuiet
		conn, err := call.Connect(ctx, resolve.Constant(ep), opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(conn.Close)
		return conn
	}
	retry := call.RetryPolicy{MaxAttempts: 3}
	hedge := call.HedgePolicy{Delay: time.Second}
	args := bytes.Repeat([]byte{'a'}, 1<<10)
	key := cbKey("Fixed")
	measure := func(name string, conn call.Connection, opts call.CallOptions) float64 {
		do := func() {
			out, err := conn.Call(ctx, key, args, opts)
			if err != nil || len(out) != len(reply) {
				t.Fatalf("%s: call: got %d bytes, %v", name, len(out), err)
			}
		}
		for range 500 {
			do()
		}
		allocs := testing.AllocsPerRun(5000, do)
		t.Logf("%s: %.2f allocations per 1 KiB call, client and server together", name, allocs)
		return allocs
	}
	for _, c := range []struct {
		name string
		conn call.Connection
		opts call.CallOptions
	}{
		{"zero options", connect(call.ClientOptions{}), call.CallOptions{}},
		{"retry turned off for the call", connect(call.ClientOptions{Retry: retry}), call.CallOptions{Retry: &call.RetryPolicy{}}},
		{"hedging a call that is not idempotent", connect(call.ClientOptions{Hedge: hedge}), call.CallOptions{}},
		{"retry policy on, first attempt succeeds", connect(call.ClientOptions{Retry: retry}), call.CallOptions{Idempotent: true}},
	} {
		if allocs := measure(c.name, c.conn, c.opts); allocs > rtAllocBudget {
			t.Errorf("%s: %.2f allocations per call, want at most %d", c.name, allocs, rtAllocBudget)
		}
	}
	measure("hedged call, answered before the hedge delay", connect(call.ClientOptions{Hedge: hedge}), call.CallOptions{Idempotent: true})
}
