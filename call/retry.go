package call

import (
	"context"
	"errors"
	"math"
	"slices"
	"strings"
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

func (p HedgePolicy) enabled() bool { return p.Delay > 0 || p.byPercentile() }

// byPercentile reports whether the delay follows a latency percentile.
func (p HedgePolicy) byPercentile() bool { return p.Percentile > 0 && p.Percentile < 1 }

// RetryBudget bounds the retries and hedges of Connections: a token bucket that every call
// fills by Ratio, that refills by MinPerSecond every second whatever the traffic, that holds at
// most Ratio×100 + MinPerSecond tokens, and from which every retry or hedge takes one. Under a
// failing backend, retries stay within Ratio of the calls plus a small floor instead of
// multiplying the load. It is safe for concurrent use and may be shared by Connections.
type RetryBudget struct {
	ratio, perSecond, max float64

	// calls counts the calls of the Connections that use the budget; withdraw turns the new
	// ones into tokens, so a call costs one atomic add.
	calls atomic.Uint64

	mu        sync.Mutex
	tokens    float64
	last      time.Time
	seenCalls uint64 // calls already turned into tokens

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

// refillLocked adds the tokens of the time since the last refill and of the calls made since.
//
// REQUIRES: b.mu is held.
func (b *RetryBudget) refillLocked() {
	now := time.Now()
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.tokens+b.perSecond*d.Seconds(), b.max)
	}
	b.last = now
	n := b.calls.Load()
	b.tokens = min(b.tokens+b.ratio*float64(n-b.seenCalls), b.max)
	b.seenCalls = n
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
	start := time.Now()
	var result []byte
	var err error
	if p.hedge.enabled() {
		result, err = c.hedged(ctx, key, args, opts, p)
	} else {
		result, err = c.retried(ctx, key, args, opts, p.retry)
	}
	if err == nil && p.hedge.byPercentile() {
		c.latencies(key).record(time.Since(start))
	}
	return result, err
}

// retryDelay is how long retry n of a call that failed with err waits.
func retryDelay(p RetryPolicy, n int, err error) time.Duration {
	delay := p.Backoff.Delay(n)
	if ra, ok := RetryAfter(err); ok {
		delay = max(delay, ra)
	}
	return delay
}

// mayHaveRun returns err, the last error of a call, changed to say that the call may have run
// when an earlier attempt may have: a caller must never be told that a call that may have run
// did not.
func mayHaveRun(err error) error {
	ce, ok := err.(*callError)
	if !ok || !ce.neverRan {
		return err
	}
	e := *ce
	e.neverRan, e.unsent, e.local = false, false, false
	e.msg = strings.TrimPrefix(e.msg+"; an earlier attempt may have run", "; ")
	return &e
}

// retried makes a call with retries.
func (c *client) retried(ctx context.Context, key MethodKey, args []byte, opts CallOptions, p RetryPolicy) ([]byte, error) {
	var tried []*member
	ran := false // an attempt may have run
	final := func(err error) error {
		if ran {
			return mayHaveRun(err)
		}
		return err
	}
	for n := 1; ; n++ {
		result, m, err := c.attempt(ctx, key, args, opts, tried, nil)
		if err == nil {
			return result, nil
		}
		if n >= p.MaxAttempts || !retryable(err, opts.Idempotent) {
			return nil, final(err)
		}
		ran = ran || !NeverRan(err)
		delay := retryDelay(p, n, err)
		if d, ok := ctx.Deadline(); ok && time.Until(d) <= delay {
			return nil, final(err)
		}
		if !c.budget.withdraw() {
			return nil, final(err)
		}
		if m != nil {
			tried = append(tried, m)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctxError(ctx, !ran)
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
// when there is one, whenever the running ones have taken the hedge delay, or — after the
// retry policy's backoff and the server's retry-after delay — when one fails in a way worth
// retrying, up to 1+MaxHedges attempts (and the retry policy's MaxAttempts, if larger). The
// first success wins; the other attempts are cancelled and joined before it returns.
func (c *client) hedged(ctx context.Context, key MethodKey, args []byte, opts CallOptions, p policies) ([]byte, error) {
	delay := p.hedge.Delay
	if p.hedge.byPercentile() {
		if d, ok := c.latencies(key).percentile(p.hedge.Percentile); ok {
			delay = max(delay, d)
		}
	}
	attempts := max(1+p.hedge.MaxHedges, p.retry.MaxAttempts)
	actx, cancel := context.WithCancel(ctx)
	results := make(chan hedgeResult, attempts)
	var triedMu sync.Mutex
	var tried []*member // every member an attempt sent the call to, as it is sent
	picked := func(m *member) {
		triedMu.Lock()
		tried = append(tried, m)
		triedMu.Unlock()
	}
	launched, outstanding, failed := 0, 0, 0
	launch := func() {
		triedMu.Lock()
		avoid := slices.Clone(tried)
		triedMu.Unlock()
		launched++
		outstanding++
		go func() {
			result, m, err := c.attempt(actx, key, args, opts, avoid, picked)
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
	var hedgeC, retryC <-chan time.Time
	var hedgeT, retryT *time.Timer
	if delay > 0 {
		hedgeT = time.NewTimer(delay)
		defer hedgeT.Stop()
		hedgeC = hedgeT.C
	}
	var lastErr error
	ran := false
	for {
		select {
		case r := <-results:
			outstanding--
			if r.err == nil {
				return finish(r.result, nil)
			}
			lastErr = r.err
			ran = ran || !NeverRan(r.err)
			failed++
			if launched < attempts && retryC == nil && retryable(r.err, true) && ctx.Err() == nil {
				d := retryDelay(p.retry, failed, r.err)
				if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > d {
					retryT = time.NewTimer(d)
					defer retryT.Stop()
					retryC = retryT.C
				}
			}
			if outstanding == 0 && retryC == nil {
				if ran {
					lastErr = mayHaveRun(lastErr)
				}
				return finish(nil, lastErr)
			}
		case <-retryC:
			retryC = nil
			if launched < attempts && c.budget.withdraw() {
				launch()
			} else if outstanding == 0 {
				if ran {
					lastErr = mayHaveRun(lastErr)
				}
				return finish(nil, lastErr)
			}
		case <-hedgeC:
			if launched < attempts && c.budget.withdraw() {
				launch()
			}
			if launched < attempts {
				hedgeT.Reset(delay)
			} else {
				hedgeC = nil
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

// percentile returns the q-quantile (nearest rank) of the recorded latencies. It is
// recomputed once a thirty-second of the window has been recorded since the last time.
func (w *latencyWindow) percentile(q float64) (time.Duration, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n < minLatencies {
		return 0, false
	}
	k := min(w.n, len(w.ring))
	if w.cachedQ == q && w.n-w.cachedN < max(1, k/32) {
		return w.cached, true
	}
	s := slices.Clone(w.ring[:k])
	slices.Sort(s)
	rank := int(math.Ceil(q*float64(k))) - 1
	w.cached, w.cachedQ, w.cachedN = s[min(max(rank, 0), k-1)], q, w.n
	return w.cached, true
}
