package call

import (
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// RetryPolicy makes a Connection from [Connect] try a failed call again, on another endpoint
// when there is one. The zero value makes no retries.
//
// A call is retried when its error proves it never reached a handler and another attempt may
// fare better ([ErrUnreachable], [ErrRefused]), whatever the method; when the server attached
// a retry-after delay to its error (see [HandlerError]) and the call never ran or is
// idempotent; and, for calls marked idempotent (CallOptions.Idempotent), when it may have run
// ([ErrCommunication], [ErrRemote]). Errors that another attempt cannot change (unknown
// method, signature mismatch, a message too large, authentication, the caller's context, a
// closed Connection) are never retried. Each retry waits Backoff, and at least the server's
// retry-after delay; a retry that could not start before the call's deadline is not made.
// Every retry takes a token from the Connection's [RetryBudget]; with none left the call
// fails with its last error.
type RetryPolicy struct {
	// MaxAttempts is the most attempts a call makes, the first included. 0 or 1 means no
	// retries.
	MaxAttempts int

	// Backoff paces the retries: retry n waits Backoff.Delay(n). Its zero fields default to
	// 50ms × 1.6 per retry, ±20 % jitter, at most 1s.
	Backoff Backoff
}

// HedgePolicy makes a Connection from [Connect] send an idempotent call
// (CallOptions.Idempotent) again to another endpoint when the first attempt is slow: the first
// reply wins and the other attempts are cancelled, which cancels their handlers. Hedges take
// tokens from the same [RetryBudget] as retries. The zero value sends no hedges.
type HedgePolicy struct {
	// Delay is how long an attempt runs before the next one starts.
	Delay time.Duration

	// Percentile, if in (0, 1), sets the delay to that percentile of the method's recent
	// successful calls on this Connection (such as 0.95), once 20 are known; Delay is used
	// until then (no hedges if it is zero), and as a floor.
	Percentile float64

	// MaxHedges is the most extra attempts a call makes. If zero, 1.
	MaxHedges int
}

func (p HedgePolicy) enabled() bool { return p.Delay > 0 || p.Percentile > 0 && p.Percentile < 1 }

// RetryBudget bounds the retries and hedges of Connections: a token bucket that every call
// fills by Ratio, that refills by MinPerSecond every second whatever the traffic, that holds at
// most Ratio×100 + MinPerSecond tokens, and from which every retry or hedge takes one. Under a
// failing backend, retries stay within Ratio of the calls plus a small floor instead of
// multiplying the load. It is safe for concurrent use and may be shared by Connections.
type RetryBudget struct {
	ratio, perSecond, max float64

	mu     sync.Mutex
	tokens float64
	last   time.Time

	spent, denied atomic.Uint64
}

// Defaults of a Connection's retry budget.
const (
	defaultBudgetRatio     = 0.1
	defaultBudgetPerSecond = 10
)

// NewRetryBudget returns a budget that allows retries of up to ratio of the calls (0.1 is
// ten percent) plus minPerSecond retries a second. Negative values count as zero.
func NewRetryBudget(ratio, minPerSecond float64) *RetryBudget {
	ratio, minPerSecond = max(ratio, 0), max(minPerSecond, 0)
	if math.IsNaN(ratio) {
		ratio = 0
	}
	if math.IsNaN(minPerSecond) {
		minPerSecond = 0
	}
	b := &RetryBudget{ratio: ratio, perSecond: minPerSecond, max: ratio*100 + minPerSecond, last: time.Now()}
	b.tokens = minPerSecond
	return b
}

// refillLocked adds the tokens of the time since the last refill.
//
// REQUIRES: b.mu is held.
func (b *RetryBudget) refillLocked() {
	now := time.Now()
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.tokens+b.perSecond*d.Seconds(), b.max)
	}
	b.last = now
}

// deposit records a call.
func (b *RetryBudget) deposit() {
	b.mu.Lock()
	b.refillLocked()
	b.tokens = min(b.tokens+b.ratio, b.max)
	b.mu.Unlock()
}

// withdraw takes a token for a retry or hedge, if there is one.
func (b *RetryBudget) withdraw() bool {
	b.mu.Lock()
	b.refillLocked()
	ok := b.tokens >= 1
	if ok {
		b.tokens--
	}
	b.mu.Unlock()
	if ok {
		b.spent.Add(1)
	} else {
		b.denied.Add(1)
	}
	return ok
}

// Stats returns how many retries and hedges the budget allowed, and how many it denied.
func (b *RetryBudget) Stats() (allowed, denied uint64) {
	return b.spent.Load(), b.denied.Load()
}

// retryBackoffDefaults are the defaults of RetryPolicy.Backoff.
var retryBackoffDefaults = Backoff{Base: 50 * time.Millisecond, Factor: 1.6, Jitter: 0.2, Max: time.Second}

func (p RetryPolicy) withDefaults() RetryPolicy {
	b := &p.Backoff
	if b.Base <= 0 {
		b.Base = retryBackoffDefaults.Base
	}
	if b.Max <= 0 {
		b.Max = retryBackoffDefaults.Max
	}
	return p
}

// policies is the retry and hedging of one call, or nothing.
type policies struct {
	active bool
	retry  RetryPolicy
	hedge  HedgePolicy
}

// policies returns the policies of a call with opts.
func (c *client) policies(opts *CallOptions) policies {
	p := policies{retry: c.opts.Retry, hedge: c.opts.Hedge}
	if opts.Retry != nil {
		p.retry = *opts.Retry
	}
	if opts.Hedge != nil {
		p.hedge = *opts.Hedge
	}
	if !opts.Idempotent {
		p.hedge = HedgePolicy{}
	}
	p.active = p.retry.MaxAttempts > 1 || p.hedge.enabled()
	if p.active {
		p.retry = p.retry.withDefaults()
		p.hedge.MaxHedges = max(p.hedge.MaxHedges, 1)
	}
	return p
}

// retryable reports whether a call that failed with err may be tried again.
func retryable(err error, idempotent bool) bool {
	var ce *callError
	if !errors.As(err, &ce) || ce.local || errors.Is(err, ErrClosed) {
		return false
	}
	switch {
	case ce.neverRan && (ce.category == ErrUnreachable || ce.category == ErrRefused):
		return true
	case ce.retryAfter > 0 && (ce.neverRan || idempotent):
		return true
	case idempotent && (ce.category == ErrCommunication || ce.category == ErrRemote):
		return true
	}
	return false
}

// callWithPolicies makes a call with retries or hedges.
func (c *client) callWithPolicies(ctx context.Context, key MethodKey, args []byte, opts CallOptions, p policies) ([]byte, error) {
	c.budget.deposit()
	start := time.Now()
	var result []byte
	var err error
	if p.hedge.enabled() {
		result, err = c.hedged(ctx, key, args, opts, p)
	} else {
		result, err = c.retried(ctx, key, args, opts, p.retry)
	}
	if err == nil && p.hedge.Percentile > 0 {
		c.latencies(key).record(time.Since(start))
	}
	return result, err
}

// retried makes a call with retries.
func (c *client) retried(ctx context.Context, key MethodKey, args []byte, opts CallOptions, p RetryPolicy) ([]byte, error) {
	var tried []*member
	for n := 1; ; n++ {
		result, m, err := c.attempt(ctx, key, args, opts, tried)
		if err == nil || n >= p.MaxAttempts || !retryable(err, opts.Idempotent) {
			return result, err
		}
		delay := p.Backoff.Delay(n)
		if ra, ok := RetryAfter(err); ok {
			delay = max(delay, ra)
		}
		if d, ok := ctx.Deadline(); ok && time.Until(d) <= delay {
			return nil, err
		}
		if !c.budget.withdraw() {
			return nil, err
		}
		if m != nil {
			tried = append(tried, m)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, err
		}
	}
}

// hedgeResult is the outcome of one attempt of a hedged call.
type hedgeResult struct {
	result []byte
	m      *member
	err    error
}

// hedged makes an idempotent call with hedges: a new attempt, to an endpoint not tried yet
// when there is one, whenever the running ones have taken the hedge delay, or at once when one
// fails in a way worth retrying, up to 1+MaxHedges attempts (and the retry policy's
// MaxAttempts, if larger). The first success wins; the other attempts are cancelled and joined
// before it returns.
func (c *client) hedged(ctx context.Context, key MethodKey, args []byte, opts CallOptions, p policies) ([]byte, error) {
	delay := p.hedge.Delay
	if p.hedge.Percentile > 0 {
		if d, ok := c.latencies(key).percentile(p.hedge.Percentile); ok {
			delay = max(delay, d)
		}
	}
	attempts := max(1+p.hedge.MaxHedges, p.retry.MaxAttempts)
	actx, cancel := context.WithCancel(ctx)
	results := make(chan hedgeResult, attempts)
	var tried []*member
	var triedMu sync.Mutex
	launched, outstanding := 0, 0
	launch := func() {
		triedMu.Lock()
		avoid := slices.Clone(tried)
		triedMu.Unlock()
		launched++
		outstanding++
		go func() {
			result, m, err := c.attempt(actx, key, args, opts, avoid)
			if m != nil {
				triedMu.Lock()
				tried = append(tried, m)
				triedMu.Unlock()
			}
			results <- hedgeResult{result, m, err}
		}()
	}
	finish := func(result []byte, err error) ([]byte, error) {
		cancel()
		for ; outstanding > 0; outstanding-- {
			<-results
		}
		return result, err
	}
	launch()
	var timer *time.Timer
	var tick <-chan time.Time
	if delay > 0 {
		timer = time.NewTimer(delay)
		defer timer.Stop()
		tick = timer.C
	}
	var lastErr error
	for {
		select {
		case r := <-results:
			outstanding--
			if r.err == nil {
				return finish(r.result, nil)
			}
			lastErr = r.err
			if launched < attempts && retryable(r.err, true) && ctx.Err() == nil && c.budget.withdraw() {
				launch()
				continue
			}
			if outstanding == 0 {
				return finish(nil, lastErr)
			}
		case <-tick:
			if launched < attempts && c.budget.withdraw() {
				launch()
			}
			if launched < attempts {
				timer.Reset(delay)
			}
		case <-ctx.Done():
			return finish(nil, ctxError(ctx, false))
		}
	}
}

// latencies returns the recent latencies of the calls of key.
func (c *client) latencies(key MethodKey) *latencyWindow {
	if w, ok := c.lat.Load(key); ok {
		return w.(*latencyWindow)
	}
	w, _ := c.lat.LoadOrStore(key, &latencyWindow{})
	return w.(*latencyWindow)
}

// latencyWindow holds the latencies of a method's last calls.
type latencyWindow struct {
	mu      sync.Mutex
	ring    [256]time.Duration
	n       int // latencies recorded
	cached  time.Duration
	cachedQ float64
	cachedN int
}

// minLatencies is how many latencies a percentile needs.
const minLatencies = 20

func (w *latencyWindow) record(d time.Duration) {
	w.mu.Lock()
	w.ring[w.n%len(w.ring)] = d
	w.n++
	w.mu.Unlock()
}

// percentile returns the q-quantile of the recorded latencies, recomputed every 32 records.
func (w *latencyWindow) percentile(q float64) (time.Duration, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n < minLatencies {
		return 0, false
	}
	if w.cachedQ == q && w.n-w.cachedN < 32 {
		return w.cached, true
	}
	k := min(w.n, len(w.ring))
	s := slices.Clone(w.ring[:k])
	slices.Sort(s)
	w.cached, w.cachedQ, w.cachedN = s[min(int(q*float64(k)), k-1)], q, w.n
	return w.cached, true
}
