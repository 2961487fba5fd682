package call

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// MirrorOptions configure [Mirror]. The zero value mirrors every call, through 4 goroutines
// and a queue of 64 calls, each mirrored call bounded by 5 seconds.
type MirrorOptions struct {
	// Fraction is the share of calls that are mirrored, in [0, 1]; the calls are sampled at
	// random. If zero, 1 (every call). A negative value (or NaN) mirrors nothing.
	Fraction float64

	// Filter, if not nil, selects the calls that may be mirrored by method key (see
	// [MirrorMethods]).
	Filter func(key MethodKey) bool

	// Queue bounds the mirrored calls waiting to be sent. When it is full a call is not
	// mirrored, and the drop is counted: the caller never waits for the mirror. If zero or
	// negative, 64.
	Queue int

	// Workers is the number of goroutines that send mirrored calls. If zero or negative, 4.
	Workers int

	// Timeout bounds each mirrored call (the caller's deadline does not apply: the caller
	// does not wait for it). If zero or negative, 5s.
	Timeout time.Duration

	// Compare, if not nil, is called (from a worker goroutine) with the primary's and the
	// mirror's outcomes of every mirrored call; false counts a mismatch. With Compare set, the
	// primary's result is copied for it.
	Compare func(key MethodKey, primary, mirror []byte, primaryErr, mirrorErr error) bool
}

// MirrorMethods returns a MirrorOptions.Filter that selects the methods with the given keys.
func MirrorMethods(keys ...MethodKey) func(MethodKey) bool {
	set := make(map[MethodKey]bool, len(keys))
	for _, k := range keys {
		set[k] = true
	}
	return func(k MethodKey) bool { return set[k] }
}

// MirrorStats counts what a [Mirrored] Connection did.
type MirrorStats struct {
	Mirrored   uint64 // calls queued for the mirror
	Dropped    uint64 // calls not mirrored because the queue was full
	Failed     uint64 // mirrored calls that failed
	Compared   uint64 // mirrored calls whose outcomes were compared
	Mismatches uint64 // comparisons that reported a difference
}

// Mirrored is a Connection that sends every call to its primary Connection and returns the
// primary's outcome, and sends copies of some calls to a mirror Connection (a canary, a
// recorder) in the background. It is safe for concurrent use.
type Mirrored struct {
	primary, mirror Connection
	opts            MirrorOptions
	queue           chan mirrorCall
	wg              sync.WaitGroup
	closed          context.Context // cancelled by Close
	closeAll        context.CancelFunc
	closeOnce       sync.Once

	mirrored, dropped, failed, compared, mismatches atomic.Uint64
}

var _ Connection = (*Mirrored)(nil)

type mirrorCall struct {
	ctx        context.Context // the caller's values, without its cancellation
	key        MethodKey
	args       []byte
	opts       CallOptions
	result     []byte // the primary's, if compared
	primaryErr error
}

// Mirror returns a Connection that calls primary and mirrors calls to mirror as opts say.
// Mirrored calls carry the caller's context values (metadata, trace, shard key) but not its
// cancellation or deadline. Close stops the mirroring (calls still queued are dropped) and
// closes both Connections.
func Mirror(primary, mirror Connection, opts MirrorOptions) *Mirrored {
	if opts.Fraction == 0 {
		opts.Fraction = 1
	}
	if opts.Queue <= 0 {
		opts.Queue = 64
	}
	if opts.Workers <= 0 {
		opts.Workers = 4
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	m := &Mirrored{primary: primary, mirror: mirror, opts: opts, queue: make(chan mirrorCall, opts.Queue)}
	m.closed, m.closeAll = context.WithCancel(context.Background())
	m.wg.Add(opts.Workers)
	for range opts.Workers {
		go m.work()
	}
	return m
}

// Call implements [Connection]: it returns the primary's outcome and never waits for the
// mirror.
func (m *Mirrored) Call(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error) {
	mirror := m.opts.Fraction >= 1 || m.opts.Fraction > 0 && rand.Float64() < m.opts.Fraction
	if mirror && m.opts.Filter != nil {
		mirror = m.opts.Filter(key)
	}
	if mirror && m.closed.Err() != nil {
		mirror = false
	}
	var mc mirrorCall
	if mirror {
		// The caller owns args once Call returns: the mirror needs its own copy.
		mc = mirrorCall{ctx: context.WithoutCancel(ctx), key: key, args: slices.Clone(args), opts: opts}
	}
	result, err := m.primary.Call(ctx, key, args, opts)
	if mirror {
		if m.opts.Compare != nil {
			mc.result, mc.primaryErr = slices.Clone(result), err
		}
		select {
		case m.queue <- mc:
			m.mirrored.Add(1)
		default:
			m.dropped.Add(1)
		}
	}
	return result, err
}

// work sends mirrored calls until the Connection closes.
func (m *Mirrored) work() {
	defer m.wg.Done()
	for {
		select {
		case <-m.closed.Done():
			return
		case mc := <-m.queue:
			if m.closed.Err() != nil {
				return // Close drops what is queued
			}
			ctx, cancel := context.WithTimeout(mc.ctx, m.opts.Timeout)
			stop := context.AfterFunc(m.closed, cancel) // Close ends the mirrored call
			res, err := m.mirror.Call(ctx, mc.key, mc.args, mc.opts)
			stop()
			cancel()
			if err != nil {
				m.failed.Add(1)
			}
			if m.opts.Compare != nil {
				m.compared.Add(1)
				if !m.opts.Compare(mc.key, mc.result, res, mc.primaryErr, err) {
					m.mismatches.Add(1)
				}
			}
		}
	}
}

// Stats returns the Connection's counters.
func (m *Mirrored) Stats() MirrorStats {
	return MirrorStats{Mirrored: m.mirrored.Load(), Dropped: m.dropped.Load(), Failed: m.failed.Load(),
		Compared: m.compared.Load(), Mismatches: m.mismatches.Load()}
}

// Status implements [Inspectable] with the primary's status, if the primary has one.
func (m *Mirrored) Status() ConnectionStatus {
	if in, ok := m.primary.(Inspectable); ok {
		return in.Status()
	}
	return ConnectionStatus{Closed: m.closed.Err() != nil}
}

// Close implements [Connection]: it stops mirroring, waits for the mirrored calls in progress
// (cancelled), and closes the primary and the mirror.
func (m *Mirrored) Close() {
	m.closeOnce.Do(func() {
		m.closeAll()
		m.wg.Wait()
		m.primary.Close()
		m.mirror.Close()
	})
}
