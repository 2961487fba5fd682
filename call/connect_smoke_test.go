package call_test

import (
	"context"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// ctWaitStatus waits until cond holds for the status of conn (a Connection from Connect),
// failing t if it does not hold before t's context deadline (cbCtx) or 20 seconds.
func ctWaitStatus(t testing.TB, conn call.Connection, what string, cond func(call.ConnectionStatus) bool) call.ConnectionStatus {
	t.Helper()
	in, ok := conn.(call.Inspectable)
	if !ok {
		t.Fatalf("%T does not implement call.Inspectable", conn)
	}
	timeout := time.NewTimer(20 * time.Second)
	defer timeout.Stop()
	for {
		st := in.Status()
		if cond(st) {
			return st
		}
		select {
		case <-st.Changed:
		case <-timeout.C:
			t.Fatalf("waiting for %s: status is %+v", what, st)
		}
	}
}

// ctCount returns the number of endpoints of st in state s.
func ctCount(st call.ConnectionStatus, s call.EndpointState) int {
	n := 0
	for _, e := range st.Endpoints {
		if e.State == s {
			n++
		}
	}
	return n
}

// TestConnectRoundRobinSmoke calls three servers through one Connection over every
// transport and checks that round-robin spreads calls evenly.
func TestConnectRoundRobinSmoke(t *testing.T) {
	for _, tr := range cbTransports("tcp", "unix", "mtls", "pipe") {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			var eps []endpoint.Endpoint
			for _, name := range []string{"a", "b", "c"} {
				l, ep := tr.Listen(t)
				var hm call.HandlerMap
				hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
				cbServe(t, l, &hm, call.ServerOptions{})
				eps = append(eps, ep)
			}
			conn, err := call.Connect(ctx, resolve.Constant(eps...), call.ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctWaitStatus(t, conn, "three ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 3 })
			counts := map[string]int{}
			for range 30 {
				out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
				if err != nil {
					t.Fatal(err)
				}
				counts[string(out)]++
			}
			if counts["a"] < 8 || counts["b"] < 8 || counts["c"] < 8 {
				t.Errorf("calls per server %v; want about 10 each", counts)
			}
		})
	}
}
