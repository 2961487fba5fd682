package call

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// meterName is the instrumentation scope of a Connection's metrics.
const meterName = "github.com/weftrpc/weft/call"

// registerMetrics registers the client's observable instruments with
// ClientOptions.MeterProvider, if there is one. They are read from the client's state when
// the meter collects, so calls pay only for the atomic counters they already keep.
func (c *client) registerMetrics() error {
	mp := c.opts.MeterProvider
	if mp == nil {
		return nil
	}
	meter := mp.Meter(meterName)
	wanted, err1 := meter.Int64ObservableGauge("weft.client.connections.wanted",
		metric.WithDescription("Connections the pool keeps."), metric.WithUnit("{connection}"))
	open, err2 := meter.Int64ObservableGauge("weft.client.connections.open",
		metric.WithDescription("Open connections that take calls."), metric.WithUnit("{connection}"))
	healthy, err3 := meter.Int64ObservableGauge("weft.client.endpoints.healthy",
		metric.WithDescription("Endpoints that are healthy: connected, passing health checks, not ejected."), metric.WithUnit("{endpoint}"))
	opened, err4 := meter.Int64ObservableCounter("weft.client.connections.opened",
		metric.WithDescription("Connections opened since the Connection was created."), metric.WithUnit("{connection}"))
	health, err5 := meter.Int64ObservableGauge("weft.client.healthy",
		metric.WithDescription("1 if the Connection is healthy, 0 if not."))
	calls, err6 := meter.Int64ObservableCounter("weft.client.endpoint.calls",
		metric.WithDescription("Calls sent to an endpoint."), metric.WithUnit("{call}"))
	errs, err7 := meter.Int64ObservableCounter("weft.client.endpoint.errors",
		metric.WithDescription("Calls to an endpoint that failed in a way that counts against it."), metric.WithUnit("{call}"))
	for _, err := range []error{err1, err2, err3, err4, err5, err6, err7} {
		if err != nil {
			return err
		}
	}
	channel := attribute.String("weft.channel", c.name)
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := c.Status()
		if st.Closed {
			return nil
		}
		ch := metric.WithAttributes(channel)
		var nopen, nhealthy int64
		for _, e := range st.Endpoints {
			nopen += int64(e.Connections)
			if e.Healthy {
				nhealthy++
			}
			ep := metric.WithAttributes(channel, attribute.String("weft.endpoint", e.Address))
			o.ObserveInt64(calls, int64(e.Calls), ep)
			o.ObserveInt64(errs, int64(e.Errors), ep)
		}
		o.ObserveInt64(wanted, int64(st.Wanted), ch)
		o.ObserveInt64(open, nopen, ch)
		o.ObserveInt64(healthy, nhealthy, ch)
		o.ObserveInt64(opened, int64(c.opened.Load()), ch)
		h := int64(0)
		if st.Healthy {
			h = 1
		}
		o.ObserveInt64(health, h, ch)
		return nil
	}, wanted, open, healthy, opened, health, calls, errs)
	if err != nil {
		return err
	}
	c.metrics = reg
	return nil
}
