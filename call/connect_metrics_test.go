package call_test

// Tests of a Connection's metrics (through a recording otel MeterProvider written here, so the
// SDK is not a dependency) and of its diagnostics: call.Channels and call.ChannelsHandler.
// Identifiers of this file start with "cmet".

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/resolve"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/embedded"
	"go.opentelemetry.io/otel/metric/noop"
)

// cmetProvider is a metric.MeterProvider that records the meters, instruments and callbacks
// it is given. Observations are made by calling the recorded callbacks with a cmetObserver.
type cmetProvider struct {
	embedded.MeterProvider
	failInstrument error // if not nil, creating an instrument fails with it
	failRegister   error // if not nil, RegisterCallback fails with it

	mu sync.Mutex
	// guarded by mu
	meters []*cmetMeter
}

func (p *cmetProvider) Meter(name string, _ ...metric.MeterOption) metric.Meter {
	m := &cmetMeter{name: name, p: p}
	p.mu.Lock()
	p.meters = append(p.meters, m)
	p.mu.Unlock()
	return m
}

// cmetMeter records instruments and callbacks; every other instrument is a no-op.
type cmetMeter struct {
	noop.Meter
	name string
	p    *cmetProvider

	mu sync.Mutex
	// guarded by mu
	insts []*cmetInstrument
	regs  []*cmetRegistration
}

// cmetInstrument describes an instrument created through a cmetMeter.
type cmetInstrument struct {
	name, kind, desc, unit string
}

type cmetGauge struct {
	noop.Int64ObservableGauge
	inst *cmetInstrument
}

type cmetCounter struct {
	noop.Int64ObservableCounter
	inst *cmetInstrument
}

func (m *cmetMeter) add(in *cmetInstrument) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.insts = append(m.insts, in)
}

func (m *cmetMeter) Int64ObservableGauge(name string, opts ...metric.Int64ObservableGaugeOption) (metric.Int64ObservableGauge, error) {
	if m.p.failInstrument != nil {
		return nil, m.p.failInstrument
	}
	cfg := metric.NewInt64ObservableGaugeConfig(opts...)
	g := &cmetGauge{inst: &cmetInstrument{name: name, kind: "gauge", desc: cfg.Description(), unit: cfg.Unit()}}
	m.add(g.inst)
	return g, nil
}

func (m *cmetMeter) Int64ObservableCounter(name string, opts ...metric.Int64ObservableCounterOption) (metric.Int64ObservableCounter, error) {
	if m.p.failInstrument != nil {
		return nil, m.p.failInstrument
	}
	cfg := metric.NewInt64ObservableCounterConfig(opts...)
	c := &cmetCounter{inst: &cmetInstrument{name: name, kind: "counter", desc: cfg.Description(), unit: cfg.Unit()}}
	m.add(c.inst)
	return c, nil
}

func (m *cmetMeter) RegisterCallback(cb metric.Callback, obs ...metric.Observable) (metric.Registration, error) {
	if m.p.failRegister != nil {
		return nil, m.p.failRegister
	}
	r := &cmetRegistration{cb: cb, obs: obs}
	m.mu.Lock()
	m.regs = append(m.regs, r)
	m.mu.Unlock()
	return r, nil
}

// cmetRegistration is a recorded callback.
type cmetRegistration struct {
	embedded.Registration
	cb           metric.Callback
	obs          []metric.Observable
	unregistered atomic.Int32
}

func (r *cmetRegistration) Unregister() error {
	r.unregistered.Add(1)
	return nil
}

// cmetPoint is one observation.
type cmetPoint struct {
	name  string
	value int64
	attrs map[string]string
}

// cmetObserver records the observations of a callback.
type cmetObserver struct {
	noop.Observer
	points []cmetPoint
}

func (o *cmetObserver) ObserveInt64(obs metric.Int64Observable, v int64, opts ...metric.ObserveOption) {
	name := "unknown instrument"
	switch x := obs.(type) {
	case *cmetGauge:
		name = x.inst.name
	case *cmetCounter:
		name = x.inst.name
	}
	attrs := map[string]string{}
	set := metric.NewObserveConfig(opts).Attributes()
	for _, kv := range set.ToSlice() {
		attrs[string(kv.Key)] = kv.Value.AsString()
	}
	o.points = append(o.points, cmetPoint{name: name, value: v, attrs: attrs})
}

// collect calls the registered callback and returns its observations.
func (r *cmetRegistration) collect(t *testing.T) []cmetPoint {
	t.Helper()
	var o cmetObserver
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := r.cb(ctx, &o); err != nil {
		t.Fatalf("metrics callback: %v", err)
	}
	return o.points
}

// cmetKey names an observation: the instrument, and the endpoint for per-endpoint ones.
func cmetKey(p cmetPoint) string {
	if ep, ok := p.attrs["weft.endpoint"]; ok {
		return p.name + "{" + ep + "}"
	}
	return p.name
}

// cmetValues checks every observation's attributes and returns the values by cmetKey.
func cmetValues(t *testing.T, channel string, points []cmetPoint) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, p := range points {
		if p.attrs["weft.channel"] != channel {
			t.Errorf("%s: weft.channel = %q, want %q", p.name, p.attrs["weft.channel"], channel)
		}
		perEndpoint := strings.HasPrefix(p.name, "weft.client.endpoint.")
		want := "weft.channel"
		if perEndpoint {
			want += " and weft.endpoint"
		}
		if _, ok := p.attrs["weft.endpoint"]; ok != perEndpoint || len(p.attrs) != 1+cmetB2N(perEndpoint) {
			t.Errorf("%s: attributes %v; want %s", p.name, p.attrs, want)
		}
		k := cmetKey(p)
		if _, dup := out[k]; dup {
			t.Errorf("%s observed twice in one collection", k)
		}
		out[k] = p.value
	}
	return out
}

// cmetB2N is 1 for true and 0 for false.
func cmetB2N(b bool) int {
	if b {
		return 1
	}
	return 0
}

// cmetWant checks the values of want in got.
func cmetWant(t *testing.T, what string, got, want map[string]int64) {
	t.Helper()
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s: %s = %d (observed %v), want %d", what, k, g, ok, v)
		}
	}
}

// The instruments, their names and units, and their values after calls, a failure, an
// endpoint going down and coming back; nothing is observed after Close, which unregisters the
// callback.
func TestCMetMetrics(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a, b := bs[0], bs[1]
		p := &cmetProvider{}
		const name = "cmet-channel"
		conn := cpConnect(t, call.ClientOptions{Name: name, MeterProvider: p}, bs...)
		if len(p.meters) != 1 || p.meters[0].name != "github.com/weftrpc/weft/call" {
			t.Fatalf("meters %v, want one named github.com/weftrpc/weft/call", p.meters)
		}
		m := p.meters[0]
		m.mu.Lock()
		insts, regs := slices.Clone(m.insts), slices.Clone(m.regs)
		m.mu.Unlock()
		want := map[string][2]string{
			"weft.client.connections.wanted": {"gauge", "{connection}"},
			"weft.client.connections.open":   {"gauge", "{connection}"},
			"weft.client.endpoints.healthy":  {"gauge", "{endpoint}"},
			"weft.client.connections.opened": {"counter", "{connection}"},
			"weft.client.healthy":            {"gauge", ""},
			"weft.client.endpoint.calls":     {"counter", "{call}"},
			"weft.client.endpoint.errors":    {"counter", "{call}"},
		}
		got := map[string][2]string{}
		for _, in := range insts {
			got[in.name] = [2]string{in.kind, in.unit}
			if in.desc == "" {
				t.Errorf("instrument %s has no description", in.name)
			}
		}
		if !maps.Equal(got, want) {
			t.Errorf("instruments (kind, unit) %v, want %v", got, want)
		}
		if len(regs) != 1 || len(regs[0].obs) != len(want) {
			t.Fatalf("%d callbacks registered (%v), want one for the %d instruments", len(regs), regs, len(want))
		}
		reg := regs[0]

		synctest.Wait()
		for range 3 {
			cttWantReply(t, "call to a", conn, "Name", nil, call.CallOptions{Balancer: crTo(a.addr())}, "a")
		}
		cpFail(t, conn, a, 1)
		for range 2 {
			cttWantReply(t, "call to b", conn, "Name", nil, call.CallOptions{Balancer: crTo(b.addr())}, "b")
		}
		if _, _, err := cttCall(conn, "NoSuchMethod", nil, call.CallOptions{Balancer: crTo(b.addr())}); !errors.Is(err, call.ErrUnknownMethod) {
			t.Fatalf("call of an unknown method: %v, want ErrUnknownMethod", err)
		}
		vals := cmetValues(t, name, reg.collect(t))
		if len(vals) != 9 {
			t.Errorf("%d observations, want 9 (5 per Connection, 2 per endpoint): %v", len(vals), vals)
		}
		cmetWant(t, "after calls", vals, map[string]int64{
			"weft.client.connections.wanted": 2, "weft.client.connections.open": 2,
			"weft.client.endpoints.healthy": 2, "weft.client.connections.opened": 2, "weft.client.healthy": 1,
			"weft.client.endpoint.calls{" + a.addr() + "}": 4, "weft.client.endpoint.calls{" + b.addr() + "}": 3,
			"weft.client.endpoint.errors{" + a.addr() + "}": 1, "weft.client.endpoint.errors{" + b.addr() + "}": 0,
		})

		// b goes down: one connection fewer, one healthy endpoint; still wanted.
		time.Sleep(5 * time.Second)
		b.ep.setFail(true)
		b.ep.breakAll()
		time.Sleep(time.Second)
		cmetWant(t, "with b down", cmetValues(t, name, reg.collect(t)), map[string]int64{
			"weft.client.connections.wanted": 2, "weft.client.connections.open": 1,
			"weft.client.endpoints.healthy": 1, "weft.client.connections.opened": 2, "weft.client.healthy": 1,
		})

		// b comes back: a third connection was opened.
		b.ep.setFail(false)
		time.Sleep(10 * time.Second)
		cmetWant(t, "after b came back", cmetValues(t, name, reg.collect(t)), map[string]int64{
			"weft.client.connections.open": 2, "weft.client.endpoints.healthy": 2, "weft.client.connections.opened": 3,
		})

		conn.Close()
		if n := reg.unregistered.Load(); n != 1 {
			t.Errorf("callback unregistered %d times after Close, want once", n)
		}
		if pts := reg.collect(t); len(pts) != 0 {
			t.Errorf("observations after Close: %v, want none", pts)
		}
	})
}

// A MeterProvider that fails makes Connect fail, leaving nothing behind.
func TestCMetMetricsError(t *testing.T) {
	errMeter := errors.New("cmet: meter is broken")
	for _, p := range []*cmetProvider{{failInstrument: errMeter}, {failRegister: errMeter}} {
		ctx := cbCtx(t, 10*time.Second)
		conn, err := call.Connect(ctx, resolve.Constant(), call.ClientOptions{Name: "cmet-broken", MeterProvider: p, Logger: cbQuiet})
		if err == nil {
			conn.Close()
			t.Fatalf("Connect with a failing MeterProvider succeeded")
		}
		if !errors.Is(err, errMeter) {
			t.Errorf("Connect with a failing MeterProvider: %v, want it to wrap the meter's error", err)
		}
		for _, st := range call.Channels() {
			if st.Name == "cmet-broken" {
				t.Errorf("Channels lists a Connection whose Connect failed")
			}
		}
	}
}

// Channels lists open Connections and not closed ones; ChannelsHandler serves them as HTML
// (every value escaped) and as JSON, and neither shows a metadata value sent in calls.
func TestCMetChannels(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		bs := cpBackends(t, "a", "b")
		a, b := bs[0], bs[1]
		b.ep.setFail(true)
		const name = "cmet<script>alert(1)</script>"
		const secret = "cmet-secret-metadata-value"
		conn := cpConnect(t, call.ClientOptions{Name: name}, bs...)
		closed := cpConnect(t, call.ClientOptions{Name: "cmet-closed"}, a)
		synctest.Wait()
		closed.Close()

		ctx := call.WithMetadata(cbCtx(t, time.Minute), call.Metadata{"cmet-key": secret})
		if out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{}); err != nil || string(out) != "a" {
			t.Fatalf("call with metadata: %q, %v", out, err)
		}
		a.failing.Store(true)
		if _, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{}); !errors.Is(err, call.ErrRemote) {
			t.Fatalf("failing call with metadata: %v, want ErrRemote", err)
		}
		a.failing.Store(false)
		big := call.Metadata{}
		for i := range 100 {
			big[strings.Repeat("k", i+1)] = secret
		}
		if _, err := conn.Call(call.WithMetadata(ctx, big), cbKey("Name"), nil, call.CallOptions{}); !errors.Is(err, call.ErrMessageTooLarge) {
			t.Fatalf("call with too much metadata: %v, want ErrMessageTooLarge", err)
		}

		var mine *call.ConnectionStatus
		for _, st := range call.Channels() {
			switch st.Name {
			case name:
				mine = &st
			case "cmet-closed":
				t.Errorf("Channels lists a closed Connection")
			}
		}
		if mine == nil {
			t.Fatalf("Channels does not list the open Connection %q", name)
		}
		if !mine.Healthy || len(mine.Endpoints) != 2 {
			t.Errorf("Channels: Healthy %v, %d endpoints; want true, 2", mine.Healthy, len(mine.Endpoints))
		}

		serve := func(target, accept string) (string, string) {
			req := httptest.NewRequest(http.MethodGet, target, nil)
			if accept != "" {
				req.Header.Set("Accept", accept)
			}
			rec := httptest.NewRecorder()
			call.ChannelsHandler().ServeHTTP(rec, req)
			if rec.Code != http.StatusOK {
				t.Errorf("GET %s: status %d", target, rec.Code)
			}
			body := rec.Body.String()
			if strings.Contains(body, secret) {
				t.Errorf("GET %s shows a metadata value: %s", target, body)
			}
			if strings.Contains(body, "cmet-closed") {
				t.Errorf("GET %s shows a closed Connection", target)
			}
			return rec.Header().Get("Content-Type"), body
		}

		ct, page := serve("/debug/channels", "")
		if !strings.HasPrefix(ct, "text/html") {
			t.Errorf("HTML page Content-Type %q", ct)
		}
		if strings.Contains(page, "<script>") {
			t.Errorf("HTML page contains an unescaped <script> from the channel's name")
		}
		for _, want := range []string{"cmet&lt;script&gt;alert(1)&lt;/script&gt;", a.addr(), b.addr(), "ready", "failed"} {
			if !strings.Contains(page, want) {
				t.Errorf("HTML page does not contain %q:\n%s", want, page)
			}
		}

		for _, req := range [][2]string{{"/debug/channels?format=json", ""}, {"/debug/channels", "application/json"}} {
			ct, body := serve(req[0], req[1])
			if ct != "application/json" {
				t.Errorf("JSON (%v) Content-Type %q", req, ct)
			}
			var chans []call.ChannelJSON
			if err := json.Unmarshal([]byte(body), &chans); err != nil {
				t.Fatalf("JSON (%v) does not parse: %v\n%s", req, err, body)
			}
			var ch *call.ChannelJSON
			for i := range chans {
				if chans[i].Name == name {
					ch = &chans[i]
				}
			}
			if ch == nil {
				t.Fatalf("JSON (%v) does not list %q: %s", req, name, body)
			}
			if !ch.Resolved || !ch.Healthy || ch.Degraded || ch.Wanted != 2 || len(ch.Endpoints) != 2 {
				t.Errorf("JSON channel %+v; want resolved, healthy, not degraded, 2 wanted, 2 endpoints", ch)
				continue
			}
			ea, eb := ch.Endpoints[0], ch.Endpoints[1]
			// (Calls is 2 or 3: see TestCMetCallsCountSent.)
			if ea.Address != a.addr() || ea.State != "ready" || !ea.Healthy || ea.Connections != 1 || ea.Calls < 2 || ea.Errors != 1 {
				t.Errorf("JSON endpoint a: %+v; want ready, healthy, 1 connection, 2 calls, 1 error", ea)
			}
			if len(ea.RecentErrors) != 1 || !strings.Contains(ea.RecentErrors[0], "is failing") {
				t.Errorf("JSON endpoint a's recent errors %q, want the handler's failure", ea.RecentErrors)
			}
			if eb.Address != b.addr() || eb.State != "failed" || eb.Healthy || eb.Err == "" {
				t.Errorf("JSON endpoint b: %+v; want failed, unhealthy, with its error", eb)
			}
		}

		conn.Close()
		for _, st := range call.Channels() {
			if st.Name == name {
				t.Errorf("Channels lists the Connection after Close")
			}
		}
		if _, page := serve("/debug/channels", ""); strings.Contains(page, "cmet&lt;script") {
			t.Errorf("HTML page shows the Connection after Close")
		}
	})
}

// EndpointStatus.Calls and the weft.client.endpoint.calls metric count calls sent to the
// endpoint: a call refused before any byte left (its metadata exceeds the server's limit) is
// not one.
func TestCMetCallsCountSent(t *testing.T) {
	cbBubble(t, func(t *testing.T) {
		a := cpNewBackend(t, "a", call.ServerOptions{})
		conn := cpConnect(t, call.ClientOptions{}, a)
		synctest.Wait()
		big := call.Metadata{}
		for i := range 100 {
			big[strings.Repeat("k", i+1)] = "v"
		}
		_, err := conn.Call(call.WithMetadata(cbCtx(t, time.Minute), big), cbKey("Name"), nil, call.CallOptions{})
		cbWantErr(t, "call with 100 metadata entries", err, call.ErrMessageTooLarge, true)
		if e := cttState(t, conn, a.addr()); e.Calls != 0 {
			t.Errorf("Calls = %d after a call rejected before sending, want 0", e.Calls)
		}
	})
}
