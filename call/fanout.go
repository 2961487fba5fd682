package call

import (
	"context"
	"iter"
	"sync"
)

// Reply is one endpoint's outcome of a call sent to every endpoint ([FanOut]).
type Reply struct {
	Endpoint string // the endpoint's address
	Result   []byte // the reply, owned by the caller; nil if Err is not nil
	Err      error
}

// FanOut is implemented by the Connections [Connect] returns (and by a [Mirrored] Connection
// whose primary implements it).
type FanOut interface {
	// CallAll sends one call to every endpoint of the resolved set at once and yields each
	// endpoint's reply or error as it arrives, identified by the endpoint's address: an
	// endpoint that is down yields its error while the others answer. It first waits for the
	// resolver's first answer. Endpoints that are connecting are waited for, up to ctx's
	// deadline, which bounds the whole fan-out; with an empty set nothing is yielded. Breaking
	// out of the loop cancels the calls still in progress; either way every call has ended
	// when the loop ends. args must not change until then. Retries, hedges and the balancer
	// do not apply.
	CallAll(ctx context.Context, key MethodKey, args []byte, opts CallOptions) iter.Seq[Reply]
}

var _ FanOut = (*client)(nil)

// CallAll implements [FanOut].
func (c *client) CallAll(ctx context.Context, key MethodKey, args []byte, opts CallOptions) iter.Seq[Reply] {
	if o, ok := ctx.Value(callOptionsKey{}).(*CallOptions); ok {
		opts.merge(o)
	}
	return func(yield func(Reply) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var s *snapshot
		for s = c.snap.Load(); !s.resolved && !s.closed; s = c.snap.Load() {
			if s.resolveErr != nil && !opts.WaitForReady {
				yield(Reply{Err: newError(ErrUnreachable, true, "resolver failed", s.resolveErr)})
				return
			}
			if err := wait(ctx, s); err != nil {
				yield(Reply{Err: err})
				return
			}
		}
		if s.closed {
			yield(Reply{Err: newError(ErrUnreachable, true, "connection closed", ErrClosed)})
			return
		}
		replies := make(chan Reply, len(s.members))
		var wg sync.WaitGroup
		defer func() {
			cancel()
			wg.Wait()
		}()
		for _, bm := range s.members {
			m := bm.(*member)
			wg.Add(1)
			go func() {
				defer wg.Done()
				replies <- c.callMember(ctx, m, key, args, opts)
			}()
		}
		for range s.members {
			if !yield(<-replies) {
				return
			}
		}
	}
}

// callMember sends a call to member m, waiting while it connects.
func (c *client) callMember(ctx context.Context, m *member, key MethodKey, args []byte, opts CallOptions) Reply {
	r := Reply{Endpoint: m.addr}
	resends := 0
	for {
		s := c.snap.Load()
		if s.closed {
			r.Err = newError(ErrUnreachable, true, "connection closed", ErrClosed)
			return r
		}
		switch EndpointState(m.state.Load()) {
		case EndpointReady:
			if conn := m.pickConn(); conn != nil {
				r.Result, r.Err = conn.Call(ctx, key, args, opts)
				m.record(r.Err)
				if r.Err == nil || resends >= maxResends || !isUnsent(r.Err) || ctx.Err() != nil {
					return r
				}
				resends++
			}
		case EndpointFailed:
			if !opts.WaitForReady {
				r.Err = m.downError()
				return r
			}
		case EndpointIdle:
			c.demand(m)
		case EndpointDraining:
			r.Err = newError(ErrUnreachable, true, "endpoint "+m.addr+" left the resolved set", nil)
			return r
		}
		if c.snap.Load() == s {
			if err := wait(ctx, s); err != nil {
				r.Result, r.Err = nil, err
				return r
			}
		}
	}
}

// CallAll implements [FanOut] with the primary's fan-out; nothing is mirrored. If the primary
// cannot fan out, it yields one Reply whose error says so.
func (m *Mirrored) CallAll(ctx context.Context, key MethodKey, args []byte, opts CallOptions) iter.Seq[Reply] {
	if f, ok := m.primary.(FanOut); ok {
		return f.CallAll(ctx, key, args, opts)
	}
	return func(yield func(Reply) bool) {
		yield(Reply{Err: newError(ErrUnreachable, true, "the primary Connection cannot call every endpoint", nil)})
	}
}
