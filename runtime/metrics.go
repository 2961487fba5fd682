package runtime

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/weftrpc/weft/call"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// meterName is the instrumentation scope of the runtime's metrics.
const meterName = "github.com/weftrpc/weft/runtime"

// methodMetrics records the calls of one side (client or server) of a deployment's
// connections, per component method: calls, their duration, and the bytes of arguments and
// results, with the error category of failed calls.
type methodMetrics struct {
	calls    metric.Int64Counter
	duration metric.Float64Histogram
	reqSize  metric.Int64Histogram
	respSize metric.Int64Histogram
}

// newMethodMetrics creates the instruments of side ("client" or "server") from mp; it returns
// nil if mp is nil (no metrics, the default).
func newMethodMetrics(mp metric.MeterProvider, side string) (*methodMetrics, error) {
	if mp == nil {
		return nil, nil
	}
	meter := mp.Meter(meterName)
	prefix := "weft." + side + "."
	m := &methodMetrics{}
	var errs [4]error
	m.calls, errs[0] = meter.Int64Counter(prefix+"calls", metric.WithUnit("{call}"),
		metric.WithDescription("Calls of component methods, by outcome."))
	m.duration, errs[1] = meter.Float64Histogram(prefix+"duration", metric.WithUnit("s"),
		metric.WithDescription("How long calls of component methods took."),
		metric.WithExplicitBucketBoundaries(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	m.reqSize, errs[2] = meter.Int64Histogram(prefix+"request.size", metric.WithUnit("By"),
		metric.WithDescription("Encoded arguments of calls of component methods."))
	m.respSize, errs[3] = meter.Int64Histogram(prefix+"response.size", metric.WithUnit("By"),
		metric.WithDescription("Encoded results of calls of component methods that succeeded."))
	if err := errors.Join(errs[:]...); err != nil {
		return nil, err
	}
	return m, nil
}

// method is what a recording needs about one method: its attributes, computed once.
type method struct {
	attrs []attribute.KeyValue
	ok    metric.MeasurementOption // attrs and weft.error=""
}

func newMethod(component, name string) *method {
	attrs := []attribute.KeyValue{attribute.String("rpc.service", component), attribute.String("rpc.method", name)}
	return &method{attrs: attrs, ok: metric.WithAttributes(append(attrs[:2:2], attribute.String("weft.error", ""))...)}
}

// record records one call of m that started at start.
func (mm *methodMetrics) record(ctx context.Context, m *method, start time.Time, req, resp int, err error) {
	opt := m.ok
	if err != nil {
		opt = metric.WithAttributes(append(m.attrs[:2:2], attribute.String("weft.error", errorCategory(err)))...)
	}
	mm.calls.Add(ctx, 1, opt)
	mm.duration.Record(ctx, time.Since(start).Seconds(), opt)
	mm.reqSize.Record(ctx, int64(req), opt)
	if err == nil {
		mm.respSize.Record(ctx, int64(resp), opt)
	}
}

// errorCategory names the category of a call's error for metrics.
func errorCategory(err error) string {
	for _, c := range []struct {
		err  error
		name string
	}{
		{context.DeadlineExceeded, "deadline"}, {context.Canceled, "canceled"},
		{call.ErrUnreachable, "unreachable"}, {call.ErrRefused, "refused"},
		{call.ErrCommunication, "communication"}, {call.ErrUnknownMethod, "unknown_method"},
		{call.ErrSignatureMismatch, "signature_mismatch"}, {call.ErrMessageTooLarge, "too_large"},
		{call.ErrRemote, "remote"}, {call.ErrAuthentication, "authentication"},
	} {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	return "other"
}

// meteredConn is a Connection to a component's group that records the client side of every
// call of the component's methods.
type meteredConn struct {
	call.Connection
	mm      *methodMetrics
	methods map[call.MethodKey]*method
}

// meter returns conn, recording the calls of reg's methods through it if mm is not nil.
func (mm *methodMetrics) meter(conn call.Connection, reg *Registration) call.Connection {
	if mm == nil {
		return conn
	}
	methods := make(map[call.MethodKey]*method, len(reg.Methods))
	for _, name := range reg.Methods {
		methods[call.MakeMethodKey(reg.Name, name)] = newMethod(reg.Name, name)
	}
	return &meteredConn{Connection: conn, mm: mm, methods: methods}
}

// Call implements [call.Connection].
func (c *meteredConn) Call(ctx context.Context, key call.MethodKey, args []byte, opts call.CallOptions) ([]byte, error) {
	m := c.methods[key]
	if m == nil {
		return c.Connection.Call(ctx, key, args, opts)
	}
	start := time.Now()
	res, err := c.Connection.Call(ctx, key, args, opts)
	c.mm.record(ctx, m, start, len(args), len(res), err)
	return res, err
}

// CallAll implements [call.FanOut] through the wrapped Connection, if it can; fan-out calls
// are not measured.
func (c *meteredConn) CallAll(ctx context.Context, key call.MethodKey, args []byte, opts call.CallOptions) iter.Seq[call.Reply] {
	if f, ok := c.Connection.(call.FanOut); ok {
		return f.CallAll(ctx, key, args, opts)
	}
	return func(yield func(call.Reply) bool) {
		yield(call.Reply{Err: errors.New("runtime: the connection cannot call every replica")})
	}
}

// Close does nothing: the group's connection is shared and closed by its owner.
func (c *meteredConn) Close() {}

// meterHandlers wraps every handler of hm to record the server side of its calls, if mm is
// not nil.
func (mm *methodMetrics) meterHandlers(hm *call.HandlerMap) {
	if mm == nil {
		return
	}
	hm.Wrap(func(component, name string, h call.Handler) call.Handler {
		m := newMethod(component, name)
		return func(ctx context.Context, args []byte) ([]byte, error) {
			start := time.Now()
			n := len(args) // args may be reused once the handler returns
			res, err := h(ctx, args)
			if err != nil {
				// The handler could not run the call: its caller gets ErrRemote.
				mm.record(ctx, m, start, n, 0, fmt.Errorf("%w: %w", call.ErrRemote, err))
			} else {
				mm.record(ctx, m, start, n, len(res), nil)
			}
			return res, err
		}
	})
}
