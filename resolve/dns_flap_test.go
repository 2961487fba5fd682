package resolve_test

// An end-to-end test of call.Connect over a DNS resolver whose records flap while callers
// keep it busy. Identifiers of this file start with "dnsFlap".

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

const (
	// dnsFlapTarget is the SRV name the records of the test's servers live under.
	dnsFlapTarget = "_weft._tcp.flap.test"

	dnsFlapCallers  = 8                      // goroutines calling in a loop
	dnsFlapPeriod   = 100 * time.Millisecond // how long each set of records lasts
	dnsFlapRun      = 3 * time.Second        // how long the records flap
	dnsFlapDeadline = 2 * time.Second        // the deadline of every call
	dnsFlapMargin   = time.Second            // how far past its deadline a call may return

	// dnsFlapMaxReports bounds the failures each caller describes in detail.
	dnsFlapMaxReports = 5
)

// dnsFlapSteps are the sets of servers the records cycle through. The empty set has no SRV
// record, so the name is NXDOMAIN.
var dnsFlapSteps = [][]string{{"a"}, {"a", "b"}, {"b", "c"}, {"c"}, {}, {"a", "c"}}

// dnsFlapRecords returns the zone's records for the set of servers names, whose ports are in
// ports: one SRV record per server of the set, with its port and its own target name, and an
// A record of 127.0.0.1 for the target name of every server, in the set or not. Every TTL is
// 0.
func dnsFlapRecords(ports map[string]uint16, names ...string) []string {
	var rrs []string
	for _, name := range slices.Sorted(maps.Keys(ports)) {
		rrs = append(rrs, name+".flap.test. 0 IN A 127.0.0.1")
	}
	for _, name := range names {
		rrs = append(rrs, fmt.Sprintf("%s. 0 IN SRV 0 0 %d %s.flap.test.", dnsFlapTarget, ports[name], name))
	}
	return rrs
}

// dnsFlapStats is what one caller saw.
type dnsFlapStats struct {
	calls      int
	replies    map[string]int // successful calls by the server that answered
	failures   map[string]int // failed calls by category
	slow       int            // calls that returned later than their deadline plus the margin
	mayHaveRun int            // failed calls whose error does not prove that they never ran
	reports    []string       // details of the first slow calls and of calls that may have run
}

// dnsFlapCategory names the category of a call's error.
func dnsFlapCategory(err error) string {
	for _, c := range []struct {
		err  error
		name string
	}{
		{call.ErrUnreachable, "unreachable"},
		{call.ErrRefused, "refused"},
		{call.ErrCommunication, "communication"},
		{call.ErrUnknownMethod, "unknown method"},
		{call.ErrSignatureMismatch, "signature mismatch"},
		{call.ErrMessageTooLarge, "message too large"},
		{call.ErrRemote, "remote"},
		{call.ErrAuthentication, "authentication"},
		{context.DeadlineExceeded, "deadline exceeded"},
		{context.Canceled, "cancelled"},
	} {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	return "uncategorised"
}

// dnsFlapCaller calls conn in a loop until stop is closed, each call with dnsFlapDeadline.
// step returns the set of records in place. After a failed call it waits for the
// Connection's state to change (or for stop), so a set without servers does not make it spin.
func dnsFlapCaller(ctx context.Context, conn call.Connection, stop <-chan struct{}, step func() string) *dnsFlapStats {
	key := call.MakeMethodKey("dnstest", "Name")
	insp := conn.(call.Inspectable)
	st := &dnsFlapStats{replies: map[string]int{}, failures: map[string]int{}}
	report := func(format string, args ...any) {
		if len(st.reports) < dnsFlapMaxReports {
			st.reports = append(st.reports, fmt.Sprintf(format, args...))
		}
	}
	for {
		select {
		case <-stop:
			return st
		default:
		}
		changed := insp.Status().Changed
		before := step()
		cctx, cancel := context.WithTimeout(ctx, dnsFlapDeadline)
		start := time.Now()
		out, err := conn.Call(cctx, key, nil, call.CallOptions{})
		elapsed := time.Since(start)
		cancel()
		st.calls++
		if elapsed > dnsFlapDeadline+dnsFlapMargin {
			st.slow++
			report("call %d took %v (deadline %v), records %s then %s: %q, %v", st.calls, elapsed, dnsFlapDeadline, before, step(), out, err)
		}
		if err == nil {
			st.replies[string(out)]++
			continue
		}
		st.failures[dnsFlapCategory(err)]++
		if !call.NeverRan(err) {
			st.mayHaveRun++
			report("call %d failed after %v, records %s then %s, with an error that does not prove it never ran (%s): %v", st.calls, elapsed, before, step(), dnsFlapCategory(err), err)
		}
		select {
		case <-changed:
		case <-stop:
			return st
		}
	}
}

// dnsFlapOnly waits until conn's status lists exactly one endpoint, addr, ready (removed
// endpoints have drained and left), failing t if that does not happen before ctx is done.
func dnsFlapOnly(t *testing.T, ctx context.Context, conn call.Connection, addr string) {
	t.Helper()
	insp := conn.(call.Inspectable)
	for {
		st := insp.Status()
		if len(st.Endpoints) == 1 && st.Endpoints[0].Address == addr && st.Endpoints[0].State == call.EndpointReady {
			return
		}
		select {
		case <-st.Changed:
		case <-ctx.Done():
			var got []string
			for _, e := range st.Endpoints {
				got = append(got, e.Address+" "+e.State.String())
			}
			t.Fatalf("the Connection did not settle on %s alone within %v: it lists %q", addr, dnsBound, got)
		}
	}
}

// TestDNSFlapUnderLoad connects through a DNS resolver following SRV records that flap every
// dnsFlapPeriod through dnsFlapSteps, including a period with no records (NXDOMAIN), while
// dnsFlapCallers goroutines call without pause. Every call must return by its deadline plus
// a margin, and succeed or fail with an error that proves it never ran: endpoints the records
// drop drain their calls, and the handlers return at once, so no call may be cut off. The
// calls must reach every server, and once the records settle on one server, only it.
//
// The three servers listen on separate ephemeral ports of 127.0.0.1, and SRV records carry
// the ports; that needs no port that is free on several loopback addresses at once.
func TestDNSFlapUnderLoad(t *testing.T) {
	testkit.CheckLeaks(t)
	ports := map[string]uint16{}
	for _, name := range []string{"a", "b", "c"} {
		ports[name] = dnsCallServer(t, name)
	}
	addrOf := func(name string) string { return "tcp://127.0.0.1:" + strconv.Itoa(int(ports[name])) }

	z := dnsNewZone(t, dnsFlapRecords(ports, dnsFlapSteps[0]...)...)
	z.update(func(z *dnsZone) { z.negTTL = 0 })
	server := dnsServe(t, z)
	r, err := resolve.DNS(dnsFlapTarget, resolve.DNSOptions{
		Servers: []string{server},
		Timeout: 500 * time.Millisecond,
		MinTTL:  50 * time.Millisecond,
		MaxTTL:  100 * time.Millisecond,
		Backoff: resolve.Backoff{Base: 50 * time.Millisecond, Max: 100 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := dnsBoundCtx(t)
	conn, err := call.Connect(ctx, r, call.ClientOptions{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// The callers run while the records flap; the deferred stop joins them if the test
	// fails early.
	var step atomic.Int64
	stepName := func() string {
		i := step.Load()
		return fmt.Sprintf("#%d {%s}", i, strings.Join(dnsFlapSteps[i%int64(len(dnsFlapSteps))], ","))
	}
	stop := make(chan struct{})
	stats := make([]*dnsFlapStats, dnsFlapCallers)
	var wg sync.WaitGroup
	var stopOnce sync.Once
	stopCallers := func() {
		stopOnce.Do(func() { close(stop) })
		wg.Wait()
	}
	defer stopCallers()
	for i := range stats {
		wg.Go(func() { stats[i] = dnsFlapCaller(ctx, conn, stop, stepName) })
	}

	ticker := time.NewTicker(dnsFlapPeriod)
	defer ticker.Stop()
	end := time.Now().Add(dnsFlapRun)
	for i := int64(1); time.Now().Before(end); i++ {
		select {
		case <-ticker.C:
		case <-ctx.Done():
			t.Fatalf("the test ran out of time while flapping: %v", ctx.Err())
		}
		z.set(t, dnsFlapRecords(ports, dnsFlapSteps[i%int64(len(dnsFlapSteps))]...)...)
		step.Store(i)
	}
	stopCallers()

	total := dnsFlapStats{replies: map[string]int{}, failures: map[string]int{}}
	for i, st := range stats {
		total.calls += st.calls
		total.slow += st.slow
		total.mayHaveRun += st.mayHaveRun
		for k, n := range st.replies {
			total.replies[k] += n
		}
		for k, n := range st.failures {
			total.failures[k] += n
		}
		for _, rep := range st.reports {
			t.Errorf("caller %d: %s", i, rep)
		}
	}
	t.Logf("%d calls over %d sets of records: replies %v, failures %v", total.calls, step.Load()+1, total.replies, total.failures)
	if total.slow > 0 {
		t.Errorf("%d calls returned later than their deadline (%v) plus %v", total.slow, dnsFlapDeadline, dnsFlapMargin)
	}
	if total.mayHaveRun > 0 {
		t.Errorf("%d calls failed with an error that does not prove they never ran, though no handler fails and removed endpoints drain", total.mayHaveRun)
	}
	for name := range ports {
		if total.replies[name] == 0 {
			t.Errorf("no call reached server %s while the records flapped: replies %v", name, total.replies)
		}
	}
	for name := range total.replies {
		if _, ok := ports[name]; !ok {
			t.Errorf("replies %v name a server %q that is not a, b or c", total.replies, name)
		}
	}

	// Records {B} for good: the Connection settles on B alone, and calls reach only B.
	z.set(t, dnsFlapRecords(ports, "b")...)
	dnsFlapOnly(t, ctx, conn, addrOf("b"))
	key := call.MakeMethodKey("dnstest", "Name")
	for i := range 10 {
		cctx, cancel := context.WithTimeout(ctx, dnsFlapDeadline)
		out, err := conn.Call(cctx, key, nil, call.CallOptions{})
		cancel()
		if err != nil || string(out) != "b" {
			t.Fatalf("call %d with records {B} = %q, %v; want the reply of server b", i, out, err)
		}
	}
	st := conn.(call.Inspectable).Status()
	if len(st.Endpoints) != 1 || st.Endpoints[0].Address != addrOf("b") {
		t.Fatalf("after the calls with records {B}, the Connection lists %+v; want %s alone", st.Endpoints, addrOf("b"))
	}
}
