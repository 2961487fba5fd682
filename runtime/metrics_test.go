package runtime

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// recorder is a metric.MeterProvider that keeps every measurement of the synchronous
// instruments the runtime uses, as "name{attr=value,...}" → values.
type recorder struct {
	noop.MeterProvider
	mu   sync.Mutex
	vals map[string][]float64
}

func newRecorder() *recorder { return &recorder{vals: map[string][]float64{}} }

func (r *recorder) Meter(string, ...metric.MeterOption) metric.Meter { return recMeter{r: r} }

func (r *recorder) add(name string, v float64, attrs attribute.Set) {
	var parts []string
	for _, kv := range attrs.ToSlice() {
		parts = append(parts, string(kv.Key)+"="+kv.Value.String())
	}
	sort.Strings(parts)
	key := name + "{" + strings.Join(parts, ",") + "}"
	r.mu.Lock()
	r.vals[key] = append(r.vals[key], v)
	r.mu.Unlock()
}

func (r *recorder) get(key string) []float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.vals[key])
}

func (r *recorder) keys() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ks []string
	for k := range r.vals {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

type recMeter struct {
	noop.Meter
	r *recorder
}

func (m recMeter) Int64Counter(name string, _ ...metric.Int64CounterOption) (metric.Int64Counter, error) {
	return recInt64Counter{r: m.r, name: name}, nil
}

func (m recMeter) Int64Histogram(name string, _ ...metric.Int64HistogramOption) (metric.Int64Histogram, error) {
	return recInt64Histogram{r: m.r, name: name}, nil
}

func (m recMeter) Float64Histogram(name string, _ ...metric.Float64HistogramOption) (metric.Float64Histogram, error) {
	return recFloat64Histogram{r: m.r, name: name}, nil
}

type recInt64Counter struct {
	noop.Int64Counter
	r    *recorder
	name string
}

func (c recInt64Counter) Add(_ context.Context, v int64, opts ...metric.AddOption) {
	c.r.add(c.name, float64(v), metric.NewAddConfig(opts).Attributes())
}

type recInt64Histogram struct {
	noop.Int64Histogram
	r    *recorder
	name string
}

func (h recInt64Histogram) Record(_ context.Context, v int64, opts ...metric.RecordOption) {
	h.r.add(h.name, float64(v), metric.NewRecordConfig(opts).Attributes())
}

type recFloat64Histogram struct {
	noop.Float64Histogram
	r    *recorder
	name string
}

func (h recFloat64Histogram) Record(_ context.Context, v float64, opts ...metric.RecordOption) {
	h.r.add(h.name, v, metric.NewRecordConfig(opts).Attributes())
}

// fakeConn answers every call with reply, or fails it with err.
type fakeConn struct {
	reply []byte
	err   error
}

func (f *fakeConn) Call(context.Context, call.MethodKey, []byte, call.CallOptions) ([]byte, error) {
	return f.reply, f.err
}
func (*fakeConn) Close() {}

func TestMetricsNilProviderRecordsNothing(t *testing.T) {
	mm, err := newMethodMetrics(nil, "client")
	if err != nil || mm != nil {
		t.Fatalf("newMethodMetrics(nil) = %v, %v; want nil, nil", mm, err)
	}
	conn := &fakeConn{reply: []byte("x")}
	if got := mm.meter(conn, &Registration{Name: "p/C", Methods: []string{"M"}}); got != call.Connection(conn) {
		t.Errorf("meter without a provider wrapped the connection: %T", got)
	}
	var hm call.HandlerMap
	mm.meterHandlers(&hm) // must not panic on a nil receiver
}

func TestMetricsClientSide(t *testing.T) {
	rec := newRecorder()
	mm, err := newMethodMetrics(rec, "client")
	if err != nil {
		t.Fatal(err)
	}
	reg := &Registration{Name: "example.com/app/Store", Methods: []string{"Get", "Put"}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	get, put := call.MakeMethodKey(reg.Name, "Get"), call.MakeMethodKey(reg.Name, "Put")
	ok := mm.meter(&fakeConn{reply: []byte("hello")}, reg)
	for range 3 {
		if _, err := ok.Call(ctx, get, []byte("key"), call.CallOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	failing := mm.meter(&fakeConn{err: fmt.Errorf("wrapped: %w", call.ErrCommunication)}, reg)
	if _, err := failing.Call(ctx, put, []byte("key=value"), call.CallOptions{}); !errors.Is(err, call.ErrCommunication) {
		t.Fatalf("the metered call returned %v, want the connection's error", err)
	}
	// An unknown key passes through unmeasured.
	if _, err := ok.Call(ctx, call.MakeMethodKey(reg.Name, "Other"), nil, call.CallOptions{}); err != nil {
		t.Fatal(err)
	}

	okAttrs := "{rpc.method=Get,rpc.service=example.com/app/Store,weft.error=}"
	errAttrs := "{rpc.method=Put,rpc.service=example.com/app/Store,weft.error=communication}"
	if got := rec.get("weft.client.calls" + okAttrs); !slices.Equal(got, []float64{1, 1, 1}) {
		t.Errorf("calls of Get: %v, want three 1s; recorded: %v", got, rec.keys())
	}
	if got := rec.get("weft.client.calls" + errAttrs); !slices.Equal(got, []float64{1}) {
		t.Errorf("failed calls of Put: %v; recorded: %v", got, rec.keys())
	}
	if got := rec.get("weft.client.request.size" + okAttrs); !slices.Equal(got, []float64{3, 3, 3}) {
		t.Errorf("request sizes of Get: %v", got)
	}
	if got := rec.get("weft.client.response.size" + okAttrs); !slices.Equal(got, []float64{5, 5, 5}) {
		t.Errorf("response sizes of Get: %v", got)
	}
	if got := rec.get("weft.client.request.size" + errAttrs); !slices.Equal(got, []float64{9}) {
		t.Errorf("request size of the failed Put: %v", got)
	}
	if got := rec.get("weft.client.response.size" + errAttrs); len(got) != 0 {
		t.Errorf("a failed call recorded a response size: %v", got)
	}
	if got := rec.get("weft.client.duration" + okAttrs); len(got) != 3 || slices.Min(got) < 0 {
		t.Errorf("durations of Get: %v", got)
	}
	for _, k := range rec.keys() {
		if strings.Contains(k, "Other") {
			t.Errorf("a method the registration does not list was measured: %s", k)
		}
	}
}

func TestMetricsServerSide(t *testing.T) {
	rec := newRecorder()
	mm, err := newMethodMetrics(rec, "server")
	if err != nil {
		t.Fatal(err)
	}
	var hm call.HandlerMap
	hm.Set("p/Echo", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return append([]byte("re:"), args...), nil })
	hm.Set("p/Echo", "Fail", func(context.Context, []byte) ([]byte, error) { return nil, errors.New("cannot") })
	mm.meterHandlers(&hm)
	hm.Set("p/Echo", "Later", func(context.Context, []byte) ([]byte, error) { return nil, nil })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cs, ss := net.Pipe()
	served := make(chan struct{})
	go func() {
		defer close(served)
		call.ServeOn(ctx, ss, &hm, call.ServerOptions{})
	}()
	conn, err := call.NewConn(ctx, cs, call.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		conn.Close()
		<-served
	}()
	if res, err := conn.Call(ctx, call.MakeMethodKey("p/Echo", "Echo"), []byte("ab"), call.CallOptions{}); err != nil || string(res) != "re:ab" {
		t.Fatalf("Echo: %q, %v", res, err)
	}
	if _, err := conn.Call(ctx, call.MakeMethodKey("p/Echo", "Fail"), []byte("x"), call.CallOptions{}); !errors.Is(err, call.ErrRemote) {
		t.Fatalf("Fail: %v, want ErrRemote", err)
	}
	if _, err := conn.Call(ctx, call.MakeMethodKey("p/Echo", "Later"), nil, call.CallOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := rec.get("weft.server.calls{rpc.method=Echo,rpc.service=p/Echo,weft.error=}"); !slices.Equal(got, []float64{1}) {
		t.Errorf("server calls of Echo: %v; recorded %v", got, rec.keys())
	}
	if got := rec.get("weft.server.response.size{rpc.method=Echo,rpc.service=p/Echo,weft.error=}"); !slices.Equal(got, []float64{5}) {
		t.Errorf("server response size of Echo: %v", got)
	}
	if got := rec.get("weft.server.calls{rpc.method=Fail,rpc.service=p/Echo,weft.error=remote}"); !slices.Equal(got, []float64{1}) {
		t.Errorf("server calls of Fail: %v; recorded %v", got, rec.keys())
	}
	for _, k := range rec.keys() {
		if strings.Contains(k, "Later") {
			t.Errorf("a handler set after Wrap was measured: %s", k)
		}
	}
}
