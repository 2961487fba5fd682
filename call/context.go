package call

import (
	"context"
	"crypto/tls"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// Metadata is a set of string key/value pairs that travels with a call, bounded by the server's
// [Limits] (MaxMetadataBytes, MaxMetadataEntries). Values are never logged.
type Metadata map[string]string

type outgoingMetadataKey struct{}

// WithMetadata returns a context whose calls carry md to the handler, in place of any metadata
// ctx already carried. The caller must not modify md afterwards.
func WithMetadata(ctx context.Context, md Metadata) context.Context {
	return context.WithValue(ctx, outgoingMetadataKey{}, md)
}

func outgoingMetadata(ctx context.Context) Metadata {
	md, _ := ctx.Value(outgoingMetadataKey{}).(Metadata)
	return md
}

// IncomingMetadata returns the metadata the caller attached to the call a handler is running
// (or, in a context from [LocalContext], to the local call), or nil. The handler must not
// modify it.
func IncomingMetadata(ctx context.Context) Metadata {
	if sc := serverCallFrom(ctx); sc != nil {
		return sc.md
	}
	md, _ := ctx.Value(localMetadataKey{}).(Metadata)
	return md
}

type localMetadataKey struct{}

// LocalContext returns the context for a call made within the process (a generated local
// stub's call), so that the callee sees what it would across a connection: its
// IncomingMetadata is the metadata ctx would have sent, and ctx's outgoing metadata, shard key
// and WithCallOptions do not carry into the callee's own calls. Deadline, cancellation, values and trace
// context carry as they are.
func LocalContext(ctx context.Context) context.Context {
	return &localCall{Context: ctx, md: outgoingMetadata(ctx)}
}

type localCall struct {
	context.Context
	md Metadata
}

func (c *localCall) Value(key any) any {
	switch key.(type) {
	case localMetadataKey:
		return c.md
	case outgoingMetadataKey, shardKey, callOptionsKey, serverCallKey:
		return nil // not carried across a call, as over a connection
	}
	return c.Context.Value(key)
}

// Peer describes the other end of a server connection.
type Peer struct {
	// Addr is the peer's network address.
	Addr net.Addr
	// TLS is the state of a TLS connection, with the verified certificate chains, or nil for a
	// plaintext connection. A handler authorizes a caller by inspecting
	// TLS.VerifiedChains[0][0], the peer's verified leaf certificate.
	TLS *tls.ConnectionState
}

type peerKey struct{}

// PeerFromContext returns the peer of the connection a handler's call arrived on.
func PeerFromContext(ctx context.Context) (*Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(*Peer)
	return p, ok
}

// SetLoad reports the server's load (for example a utilization between 0 and 1) to the caller
// with the reply of the call running in ctx; client balancers use it. Without it, the reply
// carries the number of calls running on the connection. It has no effect outside a handler.
func SetLoad(ctx context.Context, load float64) {
	if sc := serverCallFrom(ctx); sc != nil && load >= 0 && !math.IsInf(load, 0) {
		sc.load.Store(math.Float32bits(float32(load)) | loadSetBit)
	}
}

// loadSetBit marks a load set by the handler in serverCall.load; a non-negative float32's sign
// bit is otherwise zero.
const loadSetBit = 1 << 31

type serverCallKey struct{}

func serverCallFrom(ctx context.Context) *serverCall {
	if sc, ok := ctx.(*serverCall); ok {
		return sc
	}
	sc, _ := ctx.Value(serverCallKey{}).(*serverCall)
	return sc
}

// serverCall is one call on a server connection, and also the handler's context: a single
// allocation per call. Its Done channel and deadline timer are created only if the handler asks
// for Done.
type serverCall struct {
	parent   context.Context // the connection's context: peer identity
	id       uint64
	entry    *handlerEntry
	deadline time.Time // zero if none
	md       Metadata
	trace    trace.SpanContext // the caller's propagated span context, if any
	load     atomic.Uint32     // float32 bits | loadSetBit, set by SetLoad
	rh       [replyHdrLen]byte // the reply header

	// Request assembly, owned by the reader until the request is complete.
	in       inbound // the request as it arrives
	held     int     // bytes of the request counted in the connection's held bytes
	pooled   bool    // the handler's args came from the buffer pool
	skipping bool    // the call failed before completion; remaining chunks are discarded
	started  bool    // the handler has been started

	mu sync.Mutex
	// guarded by mu
	done       chan struct{}
	err        error
	timer      *time.Timer
	afterFuncs []*afterFunc
}

type afterFunc struct {
	f       func()
	stopped bool // guarded by serverCall.mu
}

var _ context.Context = (*serverCall)(nil)

// Deadline implements context.Context.
func (sc *serverCall) Deadline() (time.Time, bool) { return sc.deadline, !sc.deadline.IsZero() }

// Done implements context.Context.
func (sc *serverCall) Done() <-chan struct{} {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.done == nil {
		sc.checkDeadlineLocked() // before done exists, so that it is closed once, below
		sc.done = make(chan struct{})
		if sc.err != nil {
			close(sc.done)
		} else if !sc.deadline.IsZero() {
			sc.timer = time.AfterFunc(time.Until(sc.deadline), func() {
				sc.cancel(context.DeadlineExceeded)
			})
		}
	}
	return sc.done
}

// Err implements context.Context.
func (sc *serverCall) Err() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.checkDeadlineLocked()
	return sc.err
}

// checkDeadlineLocked sets err once the deadline has passed, for handlers that poll Err
// without ever asking for Done.
//
// REQUIRES: sc.mu is held.
func (sc *serverCall) checkDeadlineLocked() {
	if sc.err == nil && !sc.deadline.IsZero() && !time.Now().Before(sc.deadline) {
		sc.cancelLocked(context.DeadlineExceeded)
	}
}

// Value implements context.Context.
func (sc *serverCall) Value(key any) any {
	if _, ok := key.(serverCallKey); ok {
		return sc
	}
	return sc.parent.Value(key)
}

// AfterFunc lets context.WithCancel and context.AfterFunc children of a handler's context hook
// into its cancellation without a goroutine each.
func (sc *serverCall) AfterFunc(f func()) (stop func() bool) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.checkDeadlineLocked()
	if sc.err != nil {
		go f()
		return func() bool { return false }
	}
	if sc.done == nil && !sc.deadline.IsZero() && sc.timer == nil {
		sc.timer = time.AfterFunc(time.Until(sc.deadline), func() {
			sc.cancel(context.DeadlineExceeded)
		})
	}
	af := &afterFunc{f: f}
	sc.afterFuncs = append(sc.afterFuncs, af)
	return func() bool {
		sc.mu.Lock()
		defer sc.mu.Unlock()
		if af.stopped {
			return false
		}
		af.stopped = true
		return true
	}
}

// cancel cancels the handler's context with err (context.Canceled or
// context.DeadlineExceeded).
func (sc *serverCall) cancel(err error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.cancelLocked(err)
}

// cancelLocked cancels the handler's context with err.
//
// REQUIRES: sc.mu is held.
func (sc *serverCall) cancelLocked(err error) {
	if sc.err != nil {
		return
	}
	sc.err = err
	if sc.done != nil {
		close(sc.done)
	}
	if sc.timer != nil {
		sc.timer.Stop()
	}
	for _, af := range sc.afterFuncs {
		if !af.stopped {
			af.stopped = true
			go af.f()
		}
	}
	sc.afterFuncs = nil
}

// release cancels the context once the handler has returned (as net/http does), so
// goroutines the handler left behind see it, and stops the deadline timer.
func (sc *serverCall) release() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.cancelLocked(context.Canceled)
}

// spanContextOf builds the caller's remote span context from a call header. A tracestate that
// does not parse is dropped; the trace and span ids still propagate.
func spanContextOf(h *callHeader) trace.SpanContext {
	cfg := trace.SpanContextConfig{
		TraceID:    h.traceID,
		SpanID:     h.spanID,
		TraceFlags: trace.TraceFlags(h.traceFlags),
		Remote:     true,
	}
	if h.tracestate != "" {
		if ts, err := trace.ParseTraceState(h.tracestate); err == nil {
			cfg.TraceState = ts
		}
	}
	return trace.NewSpanContext(cfg)
}
