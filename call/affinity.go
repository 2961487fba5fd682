package call

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/weftrpc/weft/balance"
)

// An AffinityFunc scores how well a server suits a call, from its arguments: a higher score
// is better, and 0 (or less, or NaN) means the server cannot take it. It must be quick: it
// runs on the server for every call that selects by affinity, on every candidate server. args
// are valid only until it returns.
type AffinityFunc func(ctx context.Context, args []byte) float32

// SetAffinity registers f as the affinity function of method of component. A server without
// one for a method scores its calls 1; a method without a handler scores 0.
func (hm *HandlerMap) SetAffinity(component, method string, f AffinityFunc) {
	k := MakeMethodKey(component, method)
	hm.mu.Lock()
	defer hm.mu.Unlock()
	if hm.affinity == nil {
		hm.affinity = map[MethodKey]AffinityFunc{}
	}
	hm.affinity[k] = f
}

// affinityComponent and the key of its one method answer affinity queries: the arguments
// are the 16-byte key of the method and then the call's arguments; the reply is the score, a
// little-endian float32.
const affinityComponent = "weft.call"

var affinityKey = MakeMethodKey(affinityComponent, "Affinity")

// affinityEntry is the handler of affinity queries of hm.
func (hm *HandlerMap) affinityEntry() *handlerEntry {
	return &handlerEntry{component: affinityComponent, method: "Affinity", h: func(ctx context.Context, args []byte) ([]byte, error) {
		if len(args) < len(MethodKey{}) {
			return nil, fmt.Errorf("affinity query of %d bytes: too short", len(args))
		}
		var k MethodKey
		copy(k[:], args)
		score := float32(0)
		if hm.lookup(k) != nil {
			score = 1
			hm.mu.Lock()
			f := hm.affinity[k]
			hm.mu.Unlock()
			if f != nil {
				score = f(ctx, args[len(k):])
			}
		}
		return binary.LittleEndian.AppendUint32(nil, math.Float32bits(score)), nil
	}}
}

// SelectionOptions make a call of a Connection from [Connect] choose its endpoint by
// affinity: the client first asks every healthy endpoint, in parallel, for its affinity to the
// call (see [HandlerMap.SetAffinity]), then sends the call to the one chosen as these options
// say. That costs one more round trip (to every candidate at once) before the call, and an
// affinity function run on each candidate; calls without SelectionOptions pay nothing.
// Retries and hedges do not apply to such calls. The zero value waits for every candidate
// (within the call's deadline) and takes the highest score above 0.
type SelectionOptions struct {
	// MinAffinity is the lowest score of a candidate; 0 and below never qualify.
	MinAffinity float32

	// AcceptFirstAvailable takes the first candidate that qualifies instead of the best.
	AcceptFirstAvailable bool

	// AffinityTimeout, if positive, bounds the selection: when it expires, the best candidate
	// so far is taken, and the call fails if there is none.
	AffinityTimeout time.Duration

	// ShortCircuitTimeout, if positive, bounds the wait for better candidates once one
	// qualifies.
	ShortCircuitTimeout time.Duration
}

// scored is a candidate's answer to an affinity query.
type scored struct {
	m     *member
	score float32
	err   error
}

// callByAffinity selects an endpoint by affinity and sends the call to it.
func (c *client) callByAffinity(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error) {
	sel := *opts.Affinity
	opts.Affinity = nil
	for tries := 1; ; tries++ {
		m, s, err := c.selectByAffinity(ctx, key, args, sel, opts.WaitForReady)
		if err != nil {
			if m == nil && s != nil && (s.connecting > 0 || opts.WaitForReady) && ctx.Err() == nil {
				// None of the ready endpoints accepted the call, but others may: ask again
				// once the set changes.
				if wait(ctx, s) == nil {
					continue
				}
			}
			return nil, err
		}
		// The chosen endpoint only: if it stops being ready before the call leaves, the call
		// fails as never run, and the selection starts over.
		opts.Balancer = balance.Func(func(balance.PickInfo) (balance.Member, error) {
			if !m.Ready() {
				return nil, balance.ErrNoMember
			}
			return m, nil
		})
		result, _, err := c.attempt(ctx, key, args, opts, nil, nil)
		if err != nil && tries < maxResends && NeverRan(err) && errors.Is(err, ErrUnreachable) && ctx.Err() == nil {
			continue
		}
		return result, err
	}
}

// selectByAffinity asks the ready endpoints of the current set for their affinity to a call
// and chooses one as sel says. It returns the snapshot it asked, when it asked one.
func (c *client) selectByAffinity(ctx context.Context, key MethodKey, args []byte, sel SelectionOptions, waitForReady bool) (*member, *snapshot, error) {
	var s *snapshot
	for s = c.snap.Load(); len(s.ready) == 0; s = c.snap.Load() {
		switch {
		case s.closed:
			return nil, nil, newError(ErrUnreachable, true, "connection closed", ErrClosed)
		case waitForReady:
		case !s.resolved && s.resolveErr != nil:
			return nil, nil, newError(ErrUnreachable, true, "resolver failed", s.resolveErr)
		case s.resolved && s.connecting == 0:
			return nil, nil, newError(ErrUnreachable, true, "no endpoint is ready to select by affinity", nil)
		}
		if err := wait(ctx, s); err != nil {
			return nil, nil, err
		}
	}
	qctx, cancel := context.WithCancel(ctx)
	defer cancel()
	query := make([]byte, 0, len(key)+len(args))
	query = append(append(query, key[:]...), args...)
	answers := make(chan scored, len(s.ready))
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, bm := range s.ready {
		m := bm.(*member)
		wg.Add(1)
		go func() {
			defer wg.Done()
			a := scored{m: m}
			conn := m.pickConn()
			if conn == nil {
				a.err = newError(ErrUnreachable, true, "endpoint "+m.addr+" lost its connection", nil)
				answers <- a
				return
			}
			var res []byte
			if res, a.err = conn.Call(qctx, affinityKey, query, CallOptions{}); a.err == nil {
				if len(res) != 4 {
					a.err = newError(ErrCommunication, false, fmt.Sprintf("affinity reply of %d bytes from %s", len(res), m.addr), nil)
				} else {
					a.score = math.Float32frombits(binary.LittleEndian.Uint32(res))
				}
			}
			answers <- a
		}()
	}
	var deadline, short <-chan time.Time
	if sel.AffinityTimeout > 0 {
		t := time.NewTimer(sel.AffinityTimeout)
		defer t.Stop()
		deadline = t.C
	}
	var best *scored
	var lastErr error
	for pending := len(s.ready); pending > 0; {
		select {
		case a := <-answers:
			pending--
			switch {
			case a.err != nil:
				lastErr = a.err
				continue
			case !(a.score > 0) || a.score < sel.MinAffinity: // NaN never qualifies
				continue
			}
			if best == nil || a.score > best.score {
				best = &a
			}
			if sel.AcceptFirstAvailable {
				return best.m, s, nil
			}
			if short == nil && sel.ShortCircuitTimeout > 0 {
				t := time.NewTimer(sel.ShortCircuitTimeout)
				defer t.Stop()
				short = t.C
			}
		case <-deadline:
			pending = 0
		case <-short:
			pending = 0
		case <-ctx.Done():
			return nil, s, ctxError(ctx, true)
		}
	}
	if best == nil {
		return nil, s, newError(ErrUnreachable, true, fmt.Sprintf("none of %d endpoints accepted the call by affinity", len(s.ready)), lastErr)
	}
	return best.m, s, nil
}
