package call

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/weftrpc/weft/balance"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Limits bounds what one side of a connection accepts. Each side advertises its limits in the
// handshake and obeys the other's. The zero value of every field means its default.
type Limits struct {
	// MaxFrameSize is the largest frame payload accepted. A larger frame is a protocol error
	// that closes the connection. If zero, 64 KiB. Values below 16 KiB are raised to 16 KiB.
	MaxFrameSize int

	// MaxMessageSize is the largest message accepted: requests on a server, replies on a
	// client. A larger message fails its call with [ErrMessageTooLarge] and the connection
	// stays usable. If zero, 4 MiB.
	MaxMessageSize int

	// MaxConcurrentCalls is the most handlers a server connection runs at once; a client
	// queues calls above the server's value. Ignored on clients. If zero, 1024.
	MaxConcurrentCalls int

	// MaxBufferedBytes is the per-connection budget of received request bytes held for
	// partial messages and running handlers; when it is spent the server stops reading until
	// handlers return. If zero, 16 MiB. It is never less than MaxMessageSize.
	MaxBufferedBytes int

	// MaxMetadataBytes bounds the sum of key and value lengths of a call's metadata. If zero,
	// 8 KiB.
	MaxMetadataBytes int

	// MaxMetadataEntries bounds the number of metadata entries of a call. If zero, 64.
	MaxMetadataEntries int

	// MaxTracestate bounds the length of a call's W3C tracestate. If zero, 512.
	MaxTracestate int
}

const (
	minFrameSize            = 16 << 10
	defaultFrameSize        = 64 << 10
	defaultMessageSize      = 4 << 20
	defaultConcurrentCalls  = 1024
	defaultBufferedBytes    = 16 << 20
	defaultMetadataBytes    = 8 << 10
	defaultMetadataEntries  = 64
	defaultTracestate       = 512
	defaultHandshakeTimeout = 10 * time.Second
	defaultIdleTimeout      = 5 * time.Minute
	defaultKeepalive        = 30 * time.Second
	defaultKeepaliveTimeout = 15 * time.Second
	defaultInline           = 50 * time.Microsecond
	defaultFlatten          = 4 << 10
	defaultDrainTimeout     = 30 * time.Second
	controlQueueLimit       = 256
	maxWireLimit            = 1<<31 - 1
)

func (l Limits) withDefaults() Limits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
		if *v > maxWireLimit {
			*v = maxWireLimit
		}
	}
	def(&l.MaxFrameSize, defaultFrameSize)
	if l.MaxFrameSize < minFrameSize {
		l.MaxFrameSize = minFrameSize
	}
	def(&l.MaxMessageSize, defaultMessageSize)
	def(&l.MaxConcurrentCalls, defaultConcurrentCalls)
	def(&l.MaxBufferedBytes, defaultBufferedBytes)
	if l.MaxBufferedBytes < l.MaxMessageSize {
		l.MaxBufferedBytes = l.MaxMessageSize
	}
	def(&l.MaxMetadataBytes, defaultMetadataBytes)
	def(&l.MaxMetadataEntries, defaultMetadataEntries)
	if l.MaxMetadataEntries > 0xFFFF {
		l.MaxMetadataEntries = 0xFFFF
	}
	def(&l.MaxTracestate, defaultTracestate)
	if l.MaxTracestate > 0xFFFF {
		l.MaxTracestate = 0xFFFF
	}
	return l
}

// ServerOptions configure a server. The zero value is ready to use.
type ServerOptions struct {
	// Logger receives the server's logs. If nil, [slog.Default]. Logs never contain metadata
	// values or payloads.
	Logger *slog.Logger

	// Tracer, if not nil, starts a server span for every call, as a child of the caller's
	// propagated trace context. If nil, no spans are started; the propagated context is still
	// visible to handlers through [trace.SpanContextFromContext].
	Tracer trace.Tracer

	// Limits bound what the server accepts; see [Limits].
	Limits Limits

	// InlineHandlerDuration is how long a handler may run on the connection's reader before a
	// new reader takes over (between one and two times this). Quick handlers then cost no
	// goroutine switch. If zero, 50µs. If negative, every handler runs on its own goroutine.
	InlineHandlerDuration time.Duration

	// WriteFlattenLimit is the size below which queued frames are copied into one buffer
	// before a write; larger payloads are written in place with a vectored write. If zero,
	// 4 KiB. If negative, nothing is flattened.
	WriteFlattenLimit int

	// HandshakeTimeout bounds the TLS and weft handshakes of a new connection. If zero, 10s.
	HandshakeTimeout time.Duration

	// IdleTimeout closes a connection on which nothing has been received for this long; the
	// server advertises it so clients ping more often. If zero, 5 minutes. If negative, never.
	IdleTimeout time.Duration

	// DrainTimeout bounds a graceful drain: when the context of [Serve] or [ServeOn] is
	// cancelled, the server sends a go-away, waits this long for calls in flight, then closes
	// the remaining connections (a hard stop). If zero, 30s. If negative, cancelling the
	// context stops at once.
	DrainTimeout time.Duration
}

func (o ServerOptions) withDefaults() ServerOptions {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	o.Limits = o.Limits.withDefaults()
	if o.InlineHandlerDuration == 0 {
		o.InlineHandlerDuration = defaultInline
	}
	if o.WriteFlattenLimit == 0 {
		o.WriteFlattenLimit = defaultFlatten
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = defaultHandshakeTimeout
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = defaultIdleTimeout
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = defaultDrainTimeout
	}
	return o
}

// ClientOptions configure a client: a [Connection] from [Connect], or a single [Conn]. The zero
// value is ready to use.
type ClientOptions struct {
	// Balancer picks the endpoint each call of a Connection goes to, unless the call names its
	// own in CallOptions. If nil, [balance.RoundRobin]. Ignored by a single Conn.
	Balancer balance.Balancer

	// Name names a Connection in logs, diagnostics ([Channels]) and metrics. If empty, the
	// resolver's String method names it, or failing that its type.
	Name string

	// Pool sizes a Connection's pool of connections and configures their health checks, the
	// ejection of failing endpoints and degraded mode. Ignored by a single Conn.
	Pool PoolOptions

	// OnHealthChange, if not nil, is called when a Connection becomes healthy or unhealthy
	// (see [ConnectionStatus].Healthy), one call at a time from a goroutine of the
	// Connection, and with false when it is closed while healthy. A Connection starts
	// unhealthy. It must not block for long, nor close the Connection (Close waits for it).
	OnHealthChange func(healthy bool)

	// MeterProvider, if not nil, receives a Connection's metrics: connections wanted, open,
	// healthy and opened, health, and calls and errors per endpoint. If nil, none are
	// recorded.
	MeterProvider metric.MeterProvider

	// Retry retries a Connection's failed calls; see [RetryPolicy]. The zero value makes no
	// retries. CallOptions.Retry overrides it for one call.
	Retry RetryPolicy

	// Hedge sends a Connection's slow idempotent calls again to another endpoint; see
	// [HedgePolicy]. The zero value sends no hedges. CallOptions.Hedge overrides it.
	Hedge HedgePolicy

	// RetryBudget bounds the retries and hedges of a Connection, and may be shared by
	// several. If nil, each Connection has its own: 10 % of its calls plus 10 a second.
	RetryBudget *RetryBudget

	// Mirror, if its Conn is set, makes Connect return a [Mirrored] Connection that shadows
	// calls to Mirror.Conn as Mirror.Options say; closing it closes Mirror.Conn too.
	Mirror MirrorTo

	// Backoff paces a Connection's reconnection to an endpoint that failed and its retries of a
	// failed resolver. The zero value means 1s × 1.6 per failure, ±20 % jitter, at most 2
	// minutes, with an immediate first retry.
	Backoff Backoff

	// Logger receives the client's logs. If nil, [slog.Default].
	Logger *slog.Logger

	// Tracer, if not nil, starts a client span for every call and propagates it. If nil, the
	// caller's span context (if any) is propagated unchanged.
	Tracer trace.Tracer

	// Limits bound what the client accepts (MaxFrameSize, MaxMessageSize for replies); the
	// server-side fields are ignored.
	Limits Limits

	// WriteFlattenLimit is the size below which queued frames are copied into one buffer
	// before a write. If zero, 4 KiB. If negative, nothing is flattened.
	WriteFlattenLimit int

	// HandshakeTimeout bounds dialling and the weft handshake. If zero, 10s.
	HandshakeTimeout time.Duration

	// KeepaliveInterval is how long the connection may be silent before the client pings. It
	// is lowered to half the server's idle timeout. If zero, 30s. If negative, no pings are
	// sent (the server's idle timeout may then close an idle connection).
	KeepaliveInterval time.Duration

	// KeepaliveTimeout is how long after a ping with no frame received the connection is
	// declared dead. If zero, 15s.
	KeepaliveTimeout time.Duration
}

func (o ClientOptions) withDefaults() ClientOptions {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	o.Limits = o.Limits.withDefaults()
	if o.WriteFlattenLimit == 0 {
		o.WriteFlattenLimit = defaultFlatten
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = defaultHandshakeTimeout
	}
	if o.KeepaliveInterval == 0 {
		o.KeepaliveInterval = defaultKeepalive
	}
	if o.KeepaliveTimeout <= 0 {
		o.KeepaliveTimeout = defaultKeepaliveTimeout
	}
	if o.Balancer == nil {
		o.Balancer = balance.RoundRobin()
	}
	o.Backoff = o.Backoff.withDefaults()
	return o
}

// PoolOptions configure the pool of connections of a Connection from [Connect], their health
// checks and the ejection of endpoints whose calls fail. The zero value of every field means
// its default.
type PoolOptions struct {
	// Size is the number of connections the pool keeps. If zero, one to every endpoint of the
	// resolved set. Otherwise Size connections spread over distinct endpoints: a subset of
	// them when there are more endpoints than Size (the rest stay idle until a balancer asks
	// for one), several to each when there are fewer. A connection to an endpoint that fails
	// or is ejected is replaced by one to another endpoint when there is one.
	Size int

	// MinHealthy is the critical minimum of healthy endpoints (capped at the size of the
	// resolved set, and at most Size when Size is set). With fewer the Connection reports unhealthy and runs degraded: calls
	// also go to connected endpoints that failed a health check or are ejected, and nothing
	// is evicted or ejected, instead of piling every call on the few survivors. If zero, 1.
	MinHealthy int

	// HealthCheckInterval is how often each connection is pinged. If zero, 5s. Values under
	// 200ms are raised to 200ms: servers accept at most 10 pings a second. If negative,
	// connections are not pinged (the keepalive of ClientOptions still runs), except to probe
	// an ejected endpoint.
	HealthCheckInterval time.Duration

	// HealthCheckTimeout is how long a health check waits for its pong. A connection whose
	// pong is late is unhealthy: outside degraded mode it is evicted (it stops taking calls,
	// finishes those it has, and a replacement is dialled). If zero, 2s.
	HealthCheckTimeout time.Duration

	// EjectAfter is the number of consecutive calls to an endpoint that fail in a way that
	// points at the server (a communication error, a handler that could not run, a deadline
	// that expired after the request was sent) after which it is ejected: it takes no calls
	// until EjectionTime has passed and a ping probe succeeds. If zero, 5. If negative,
	// endpoints are never ejected.
	EjectAfter int

	// EjectionTime is how long a first ejection lasts; the n-th ejection in a row lasts n
	// times as long, up to MaxEjectionTime. An endpoint that stays admitted for
	// MaxEjectionTime starts again from one. If zero, 10s.
	EjectionTime time.Duration

	// MaxEjectionTime caps the length of an ejection. If zero, 5 minutes.
	MaxEjectionTime time.Duration

	// MaxEjectedFraction is the largest fraction of the resolved set that may be ejected at
	// once; when the set has two endpoints or more, one may always be. If zero, 0.5.
	MaxEjectedFraction float64
}

const (
	defaultHealthInterval = 5 * time.Second
	defaultHealthTimeout  = 2 * time.Second
	defaultEjectAfter     = 5
	defaultEjectionTime   = 10 * time.Second
	defaultMaxEjection    = 5 * time.Minute
	defaultMaxEjected     = 0.5
	minHealthInterval     = 200 * time.Millisecond
)

// validate rejects options that have no meaning.
func (p PoolOptions) validate() error {
	switch {
	case p.Size < 0:
		return fmt.Errorf("call: PoolOptions.Size is %d; it must be 0 (one connection per endpoint) or positive", p.Size)
	case p.MinHealthy < 0:
		return fmt.Errorf("call: PoolOptions.MinHealthy is %d; it must not be negative", p.MinHealthy)
	case math.IsNaN(p.MaxEjectedFraction) || p.MaxEjectedFraction < 0 || p.MaxEjectedFraction > 1:
		return fmt.Errorf("call: PoolOptions.MaxEjectedFraction is %v; it must be in [0, 1]", p.MaxEjectedFraction)
	case p.EjectionTime < 0 || p.MaxEjectionTime < 0:
		return errors.New("call: PoolOptions.EjectionTime and MaxEjectionTime must not be negative")
	case p.HealthCheckTimeout < 0:
		return errors.New("call: PoolOptions.HealthCheckTimeout must not be negative")
	case p.Size > 0 && p.MinHealthy > p.Size:
		return fmt.Errorf("call: PoolOptions.MinHealthy (%d) is more than Size (%d): the pool could never be healthy", p.MinHealthy, p.Size)
	}
	return nil
}

func (p PoolOptions) withDefaults() PoolOptions {
	if p.MinHealthy == 0 {
		p.MinHealthy = 1
	}
	if p.HealthCheckInterval == 0 {
		p.HealthCheckInterval = defaultHealthInterval
	}
	if p.HealthCheckInterval > 0 {
		p.HealthCheckInterval = max(p.HealthCheckInterval, minHealthInterval)
	}
	if p.HealthCheckTimeout == 0 {
		p.HealthCheckTimeout = defaultHealthTimeout
	}
	if p.EjectAfter == 0 {
		p.EjectAfter = defaultEjectAfter
	}
	if p.EjectionTime == 0 {
		p.EjectionTime = defaultEjectionTime
	}
	if p.MaxEjectionTime == 0 {
		p.MaxEjectionTime = defaultMaxEjection
	}
	p.MaxEjectionTime = max(p.MaxEjectionTime, p.EjectionTime)
	if p.MaxEjectedFraction == 0 {
		p.MaxEjectedFraction = defaultMaxEjected
	}
	return p
}

// MirrorTo names the Connection calls are mirrored to, and how; see [Mirror].
type MirrorTo struct {
	Conn    Connection
	Options MirrorOptions
}

// CallOptions are per-call options.
type CallOptions struct {
	// Signature, if not zero, is the digest of the method's signature as the caller's stub
	// was built. A server whose handler was registered with a different non-zero signature
	// refuses the call with [ErrSignatureMismatch].
	Signature uint64

	// ShardKey routes the call to the endpoint that owns the key, for balancers that shard
	// (such as [balance.Sharded]). It is used only when Sharded is true, so 0 is a key like any
	// other.
	ShardKey uint64

	// Sharded reports whether ShardKey is set.
	Sharded bool

	// Balancer, if not nil, picks the endpoint for this call instead of
	// ClientOptions.Balancer.
	Balancer balance.Balancer

	// Idempotent declares that running the call more than once does no harm, so a Connection
	// may retry it after an error that leaves open whether it ran, and may hedge it.
	Idempotent bool

	// Retry, if not nil, replaces ClientOptions.Retry for this call.
	Retry *RetryPolicy

	// Hedge, if not nil, replaces ClientOptions.Hedge for this call.
	Hedge *HedgePolicy

	// Affinity, if not nil, makes a call of a Connection from Connect choose its endpoint by
	// the servers' affinity to it; see [SelectionOptions].
	Affinity *SelectionOptions

	// WaitForReady makes a call of a Connection wait (until its context is done) for an
	// endpoint to become ready, instead of failing at once with [ErrUnreachable] when every
	// endpoint has failed or the resolver has none.
	WaitForReady bool
}

func (l Limits) String() string {
	return fmt.Sprintf("frame=%d message=%d concurrent=%d buffered=%d metadata=%d/%d tracestate=%d",
		l.MaxFrameSize, l.MaxMessageSize, l.MaxConcurrentCalls, l.MaxBufferedBytes,
		l.MaxMetadataBytes, l.MaxMetadataEntries, l.MaxTracestate)
}
