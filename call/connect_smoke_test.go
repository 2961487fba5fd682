package call_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/weftrpc/weft/balance"
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

// TestConnectMembersReportLoad checks that a balancer sees, through balance.Member, the calls in
// flight on each member and the load its server reported with its last reply, and that
// ConnectionStatus shows the same.
func TestConnectMembersReportLoad(t *testing.T) {
	for _, tr := range cbTransports("tcp", "unix", "mtls") {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 20*time.Second)
			entered := make(chan struct{})
			release := make(chan struct{})
			var eps []endpoint.Endpoint
			for _, load := range []float64{0.25, 0.75} {
				l, ep := tr.Listen(t)
				var hm call.HandlerMap
				hm.Set(cbComponent, "Load", func(ctx context.Context, _ []byte) ([]byte, error) {
					call.SetLoad(ctx, load)
					return nil, nil
				})
				hm.Set(cbComponent, "Hold", func(ctx context.Context, _ []byte) ([]byte, error) {
					call.SetLoad(ctx, load)
					entered <- struct{}{}
					select {
					case <-release:
					case <-ctx.Done():
					}
					return nil, nil
				})
				cbServe(t, l, &hm, call.ServerOptions{})
				eps = append(eps, ep)
			}
			conn, err := call.Connect(ctx, resolve.Constant(eps...), call.ClientOptions{Logger: cbQuiet})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctWaitStatus(t, conn, "two ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 2 })
			for range 4 { // round-robin: each server answers twice
				if _, err := conn.Call(ctx, cbKey("Load"), nil, call.CallOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			held := cbGo(ctx, conn, cbKey("Hold"), nil, call.CallOptions{})
			cbWait(t, "the held call to start", entered, 10*time.Second)

			// A balancer that records what it sees and picks the least loaded member.
			type seen struct {
				addr     string
				load     float64
				inFlight int
			}
			var got []seen
			leastLoaded := balance.Func(func(info balance.PickInfo) (balance.Member, error) {
				got = got[:0]
				var best balance.Member
				for _, m := range info.Ready {
					got = append(got, seen{m.Endpoint().Address(), m.Load(), m.InFlight()})
					if best == nil || m.Load() < best.Load() {
						best = m
					}
				}
				return best, nil
			})
			if _, err := conn.Call(ctx, cbKey("Load"), nil, call.CallOptions{Balancer: leastLoaded}); err != nil {
				t.Fatal(err)
			}
			loads := map[string]float64{}
			inFlight := 0
			for _, s := range got {
				loads[s.addr] = s.load
				inFlight += s.inFlight
			}
			if loads[eps[0].Address()] != 0.25 || loads[eps[1].Address()] != 0.75 {
				t.Errorf("balancer saw loads %v, want 0.25 for %s and 0.75 for %s", loads, eps[0].Address(), eps[1].Address())
			}
			if inFlight != 1 {
				t.Errorf("balancer saw %d calls in flight over both members, want the 1 held call (%+v)", inFlight, got)
			}
			close(release)
			if r := cbAwait(t, "held call", held, 10*time.Second); r.err != nil {
				t.Fatal(r.err)
			}
			st := conn.(call.Inspectable).Status()
			for _, e := range st.Endpoints {
				if want := loads[e.Address]; e.Load != want || e.InFlight != 0 {
					t.Errorf("status of %s: load %v, %d in flight; want %v, 0", e.Address, e.Load, e.InFlight, want)
				}
			}
		})
	}
}

// TestConnectWithShardKey checks that a shard key carried by the context routes calls like
// CallOptions.ShardKey does, and that CallOptions win over the context.
func TestConnectWithShardKey(t *testing.T) {
	for _, tr := range cbTransports("tcp", "unix", "mtls") {
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
			conn, err := call.Connect(ctx, resolve.Constant(eps...), call.ClientOptions{Logger: cbQuiet, Balancer: balance.Sharded()})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctWaitStatus(t, conn, "three ready endpoints", func(st call.ConnectionStatus) bool { return ctCount(st, call.EndpointReady) == 3 })
			owner := map[uint64]string{}
			for k := range uint64(6) {
				for range 3 {
					out, err := conn.Call(call.WithShardKey(ctx, k), cbKey("Name"), nil, call.CallOptions{})
					if err != nil {
						t.Fatal(err)
					}
					if prev, ok := owner[k]; ok && prev != string(out) {
						t.Fatalf("key %d reached %s and %s", k, prev, out)
					}
					owner[k] = string(out)
				}
				// Keys k and k+3 share an owner; the options' key overrides the context's.
				out, err := conn.Call(call.WithShardKey(ctx, k+1), cbKey("Name"), nil, call.CallOptions{Sharded: true, ShardKey: k + 3})
				if err != nil {
					t.Fatal(err)
				}
				if string(out) != owner[k] {
					t.Errorf("CallOptions key %d reached %s, want the owner of key %d, %s", k+3, out, k, owner[k])
				}
			}
			if owner[0] == owner[1] || owner[1] == owner[2] || owner[0] == owner[2] {
				t.Errorf("keys 0, 1, 2 reached %s, %s, %s; want three different servers", owner[0], owner[1], owner[2])
			}
		})
	}
}

// TestConnectBadArguments checks that Connect refuses a nil resolver and a done context with
// an error, instead of returning a Connection that cannot work.
func TestConnectBadArguments(t *testing.T) {
	ctx := cbCtx(t, 10*time.Second)
	if c, err := call.Connect(ctx, nil, call.ClientOptions{}); err == nil || c != nil {
		t.Errorf("Connect with a nil resolver: got %v, %v; want an error", c, err)
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	c, err := call.Connect(done, resolve.Constant(), call.ClientOptions{})
	if err == nil || c != nil {
		t.Fatalf("Connect with a done context: got %v, %v; want an error", c, err)
	}
	if !errors.Is(err, context.Canceled) || !call.NeverRan(err) {
		t.Errorf("Connect with a done context: %v; want context.Canceled, never ran", err)
	}
}
