package call

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
	"go.opentelemetry.io/otel/metric"
)

// Connect returns a Connection to the servers at the endpoints resolver returns. It does not
// wait for a connection: ctx bounds only Connect itself, and the Connection lives until Close.
//
// From the start and for its whole life the Connection keeps a pool of connections ([Conn])
// to the endpoints of the current set, in the background: by default one to every endpoint,
// or ClientOptions.Pool.Size connections spread over distinct endpoints. It dials new
// endpoints, redials lost connections with ClientOptions.Backoff, drains removed endpoints
// (their calls in progress finish, then they close), and revives a removed endpoint that
// returns while it drains. A resolver error keeps the last good set.
//
// Every connection is health-checked with ping frames, and every endpoint by the outcome of
// its calls: a connection that misses a pong is evicted and replaced, and an endpoint whose
// calls fail in a row is ejected for a while, then re-admitted by a probe. When fewer
// endpoints than Pool.MinHealthy are healthy the Connection is unhealthy and degraded: it
// uses connected but unhealthy endpoints again and stops evicting. See [PoolOptions].
//
// Each call goes to the member ClientOptions.Balancer (or CallOptions.Balancer) picks among
// the healthy endpoints. While endpoints are still connecting and none is ready, calls wait,
// up to their deadline. When every endpoint has failed, or the resolver has none, calls fail
// at once with [ErrUnreachable] ([ErrAuthentication] if every endpoint failed its TLS
// handshake), unless CallOptions.WaitForReady is set. A call that its server never took in
// (its connection was draining or closed, broke before the request left, or the server's
// go-away refused it) is sent again, to the member the balancer picks next, up to 3 times;
// any other failure is returned to the caller.
//
// The returned Connection also implements [Inspectable] and [FanOut], and is listed by
// [Channels] until it is closed. ClientOptions.Retry and Hedge add retries and hedges, and
// ClientOptions.Mirror shadows calls to another Connection.
func Connect(ctx context.Context, resolver resolve.Resolver, opts ClientOptions) (Connection, error) {
	if resolver == nil {
		return nil, errors.New("call: Connect with a nil resolver")
	}
	if err := opts.Pool.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, ctxError(ctx, true)
	}
	opts = opts.withDefaults()
	c := &client{
		opts:     opts,
		pool:     opts.Pool.withDefaults(),
		name:     channelName(opts.Name, resolver),
		resolver: resolver,
		members:  map[string]*member{},
		healthc:  make(chan struct{}, 1),
		budget:   opts.RetryBudget,
	}
	if c.budget == nil {
		c.budget = NewRetryBudget(defaultBudgetRatio, defaultBudgetPerSecond)
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if err := c.registerMetrics(); err != nil {
		c.cancel()
		return nil, fmt.Errorf("call: registering metrics: %w", err)
	}
	c.mu.Lock()
	c.publishLocked()
	c.mu.Unlock()
	c.wg.Add(1)
	go c.resolveLoop()
	if opts.OnHealthChange != nil {
		c.wg.Add(1)
		go c.notifyHealth()
	}
	registerChannel(c)
	if opts.Mirror.Conn != nil {
		return Mirror(c, opts.Mirror.Conn, opts.Mirror.Options), nil
	}
	return c, nil
}

// channelName is the name of a Connection in logs, diagnostics and metrics.
func channelName(name string, r resolve.Resolver) string {
	if name != "" {
		return name
	}
	if s, ok := r.(fmt.Stringer); ok {
		return s.String()
	}
	return fmt.Sprintf("%T", r)
}

// Inspectable is implemented by the Connections [Connect] returns: Status describes the
// resolved set, the pool's health and the state of every endpoint. Further capabilities of
// Connections will be added as interfaces of their own, discovered with a type assertion, so
// implementations of [Connection] keep compiling.
type Inspectable interface {
	Status() ConnectionStatus
}

// ConnectionStatus is a snapshot of a Connection's state.
type ConnectionStatus struct {
	// Name is the Connection's name: ClientOptions.Name, or a description of its resolver.
	Name string

	// Resolved reports whether the resolver has answered at least once.
	Resolved bool

	// ResolveErr is the resolver's latest error, or nil if its latest answer succeeded.
	ResolveErr error

	// Healthy reports whether at least PoolOptions.MinHealthy endpoints (or every endpoint,
	// if there are fewer) are healthy. It is false before the first connection and after
	// Close.
	Healthy bool

	// Degraded reports whether too few endpoints are healthy, so that calls also go to
	// connected endpoints that are not.
	Degraded bool

	// Wanted is the number of connections the pool is keeping.
	Wanted int

	// Endpoints describes the resolved set, ordered by address, followed by the endpoints that
	// were removed and are still draining.
	Endpoints []EndpointStatus

	// Changed is closed when the resolved set, the health or the state of an endpoint
	// changes; loads, counters and in-flight counts change without closing it.
	Changed <-chan struct{}

	// Closed reports whether the Connection is closed.
	Closed bool
}

// EndpointStatus describes one endpoint of a Connection.
type EndpointStatus struct {
	Address string
	State   EndpointState

	// Healthy reports whether the endpoint takes calls outside degraded mode: it has a
	// connection whose health checks pass, and it is not ejected.
	Healthy bool

	// Ejected reports whether the endpoint is ejected for failing calls, until EjectedUntil
	// and then a successful probe. Ejections counts its ejections (a failed probe is one).
	Ejected      bool
	EjectedUntil time.Time
	Ejections    int

	Connections int           // open connections to the endpoint that take calls
	Wanted      int           // connections the pool keeps to the endpoint
	InFlight    int           // calls in progress on its connections
	Load        float64       // the load its server last reported
	RTT         time.Duration // the round trip of its last successful health check
	Calls       uint64        // calls sent to it
	Errors      uint64        // calls that failed in a way that counts against it
	Err         error         // why it is not ready (its last dial or connection failure), or nil

	// RecentErrors are its latest failures (dials, connections, health checks and calls),
	// oldest first.
	RecentErrors []RecentError
}

// RecentError is a failure of an endpoint and when it happened.
type RecentError struct {
	Time time.Time
	Err  error
}

// EndpointState is the state of one endpoint of a Connection.
type EndpointState int32

const (
	// EndpointConnecting means the endpoint is being dialled for the first time, or redialled
	// at once after its connection was lost. Calls wait for it.
	EndpointConnecting EndpointState = iota
	// EndpointReady means the endpoint has a connection that takes calls.
	EndpointReady
	// EndpointFailed means the last attempt to connect failed; the endpoint is redialled with
	// backoff, and calls do not wait for it.
	EndpointFailed
	// EndpointDraining means the resolver removed the endpoint and its connection finishes the
	// calls it has before closing.
	EndpointDraining
	// EndpointIdle means the pool keeps no connection to the endpoint: it has more endpoints
	// than PoolOptions.Size. A balancer that picks an idle endpoint (a shard's owner) makes
	// the pool connect to it, and the call waits.
	EndpointIdle
)

func (s EndpointState) String() string {
	switch s {
	case EndpointConnecting:
		return "connecting"
	case EndpointReady:
		return "ready"
	case EndpointFailed:
		return "failed"
	case EndpointDraining:
		return "draining"
	case EndpointIdle:
		return "idle"
	}
	return fmt.Sprintf("EndpointState(%d)", int32(s))
}

const (
	// minResolveInterval spaces consecutive calls of a resolver's Resolve, so a resolver
	// that answers at once with ever-new versions cannot make the client spin.
	minResolveInterval = 100 * time.Millisecond

	// maxResends bounds how often a call that was never sent moves to another member.
	maxResends = 3

	// recentErrors is how many failures an endpoint remembers for diagnostics.
	recentErrors = 5
)

// client is the Connection returned by Connect.
type client struct {
	opts     ClientOptions
	pool     PoolOptions
	name     string
	resolver resolve.Resolver
	ctx      context.Context // cancelled by Close; bounds resolving and dialling
	cancel   context.CancelFunc
	snap     atomic.Pointer[snapshot]
	wg       sync.WaitGroup // the resolver loop, the health notifier and every link's goroutine
	opened   atomic.Uint64  // connections opened
	healthc  chan struct{}  // signals a change of health to notifyHealth (buffer 1)
	metrics  metric.Registration
	budget   *RetryBudget
	lat      sync.Map // MethodKey → *latencyWindow, for hedging by percentile

	mu sync.Mutex
	// guarded by mu
	members        map[string]*member // by address, including removed members still draining
	resolved       bool
	resolveErr     error
	closed         bool
	healthy        bool
	degraded       bool
	warnedDegraded bool // a fall into degraded mode was logged; its recovery will be
}

var (
	_ Connection  = (*client)(nil)
	_ Inspectable = (*client)(nil)
)

// snapshot is an immutable view of the client's members, replaced whenever the resolved set,
// a member's state or the pool's health changes. Calls read it without locking.
type snapshot struct {
	members    []balance.Member // the resolved set, by address
	ready      []balance.Member // the members calls may use, by address: healthy, or ready when degraded
	connecting int              // members in EndpointConnecting
	resolved   bool
	resolveErr error
	closed     bool
	changed    chan struct{} // closed when a newer snapshot replaces this one
}

// publishLocked replaces the snapshot, waking calls that wait for a change, and updates the
// pool's health.
//
// REQUIRES: c.mu is held.
func (c *client) publishLocked() {
	s := &snapshot{resolved: c.resolved, resolveErr: c.resolveErr, closed: c.closed, changed: make(chan struct{})}
	var healthy, ready []balance.Member
	if !c.closed {
		for _, m := range c.members {
			if m.removed {
				continue
			}
			s.members = append(s.members, m)
			switch EndpointState(m.state.Load()) {
			case EndpointReady:
				ready = append(ready, m)
				if m.healthyLocked() {
					healthy = append(healthy, m)
				}
			case EndpointConnecting:
				s.connecting++
			}
		}
	}
	byAddr := func(a, b balance.Member) int { return cmp.Compare(a.(*member).addr, b.(*member).addr) }
	slices.SortFunc(s.members, byAddr)
	degraded := len(healthy) < min(c.pool.MinHealthy, max(len(s.members), 1))
	if degraded {
		s.ready = ready
	} else {
		s.ready = healthy
	}
	slices.SortFunc(s.ready, byAddr)
	if old := c.snap.Swap(s); old != nil {
		close(old.changed)
	}
	// A Connection starts degraded; only a fall from health, and the recovery from it, are news.
	if degraded && !c.degraded && c.resolved && !c.closed {
		c.warnedDegraded = true
		c.opts.Logger.Warn("weft: too few healthy endpoints; using unhealthy ones and not evicting",
			slog.String("channel", c.name), slog.Int("healthy", len(healthy)), slog.Int("ready", len(ready)))
	} else if !degraded && c.warnedDegraded {
		c.warnedDegraded = false
		c.opts.Logger.Info("weft: enough healthy endpoints again", slog.String("channel", c.name), slog.Int("healthy", len(healthy)))
	}
	c.degraded = degraded
	if h := c.resolved && !c.closed && !degraded; h != c.healthy {
		c.healthy = h
		select {
		case c.healthc <- struct{}{}:
		default:
		}
	}
}

// shardKey is the context key of WithShardKey.
type shardKey struct{}

// WithShardKey returns a context whose calls through a Connection carry shard key k, unless
// their CallOptions set one. It lets callers shard calls made through generated stubs.
func WithShardKey(ctx context.Context, k uint64) context.Context {
	return context.WithValue(ctx, shardKey{}, k)
}

// callOptionsKey is the context key of WithCallOptions.
type callOptionsKey struct{}

// WithCallOptions returns a context whose calls through a Connection from [Connect] — those
// of generated stubs included — take from o the options their own CallOptions leave unset:
// Idempotent and WaitForReady (when true), Retry, Hedge, Affinity and Balancer (when not nil),
// and the shard key (when o.Sharded). It is how a caller of a stub overrides, for some calls,
// the settings the stub was generated with.
func WithCallOptions(ctx context.Context, o CallOptions) context.Context {
	return context.WithValue(ctx, callOptionsKey{}, &o)
}

// merge fills the unset fields of opts from o.
func (opts *CallOptions) merge(o *CallOptions) {
	opts.Idempotent = opts.Idempotent || o.Idempotent
	opts.WaitForReady = opts.WaitForReady || o.WaitForReady
	if opts.Retry == nil {
		opts.Retry = o.Retry
	}
	if opts.Hedge == nil {
		opts.Hedge = o.Hedge
	}
	if opts.Affinity == nil {
		opts.Affinity = o.Affinity
	}
	if opts.Balancer == nil {
		opts.Balancer = o.Balancer
	}
	if !opts.Sharded && o.Sharded {
		opts.ShardKey, opts.Sharded = o.ShardKey, true
	}
}

// Call implements [Connection].
func (c *client) Call(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error) {
	if o, ok := ctx.Value(callOptionsKey{}).(*CallOptions); ok {
		opts.merge(o)
	}
	if !opts.Sharded {
		if k, ok := ctx.Value(shardKey{}).(uint64); ok {
			opts.ShardKey, opts.Sharded = k, true
		}
	}
	c.budget.calls.Add(1) // every call earns retries
	if opts.Affinity != nil {
		return c.callByAffinity(ctx, key, args, opts)
	}
	if p := c.policies(&opts); p.active {
		return c.callWithPolicies(ctx, key, args, opts, p)
	}
	result, _, err := c.attempt(ctx, key, args, opts, nil, nil)
	return result, err
}

// attempt makes one attempt of a call: it picks a member (avoiding those in avoid while others
// are ready), sends the call, and resends it elsewhere if the server never took it in. It
// returns the member that answered last, or nil. If picked is not nil, it is called with every
// member the attempt sends the call to, before sending.
func (c *client) attempt(ctx context.Context, key MethodKey, args []byte, opts CallOptions, avoid []*member, picked func(*member)) ([]byte, *member, error) {
	bal := c.opts.Balancer
	if opts.Balancer != nil {
		bal = opts.Balancer
	}
	resends := 0
	for {
		s := c.snap.Load()
		m, err := c.pick(s, bal, &opts, avoid)
		if err != nil {
			return nil, nil, err
		}
		var result []byte
		if m != nil {
			conn := m.pickConn()
			if conn == nil {
				// It lost its connections since s was published; s has been replaced.
				continue
			}
			if picked != nil {
				picked(m)
			}
			result, err = conn.Call(ctx, key, args, opts)
			m.record(err)
			if err == nil || resends >= maxResends || !isUnsent(err) || ctx.Err() != nil {
				return result, m, err
			}
			// The server never took the call in: the connection was draining or closed,
			// broke before the request left, or the server refused it with a go-away. The
			// link publishes its new state at once; pick again from that.
			resends++
		}
		// Nothing to call yet, or a resend: wait for the resolver or a member to move on.
		if c.snap.Load() == s {
			if err := wait(ctx, s); err != nil {
				return nil, nil, err
			}
		}
	}
}

// pick chooses the member for a call from s, avoiding the members in avoid while another is
// ready. It returns (nil, nil) if the call should wait for s to change.
func (c *client) pick(s *snapshot, bal balance.Balancer, opts *CallOptions, avoid []*member) (*member, error) {
	if s.closed {
		return nil, newError(ErrUnreachable, true, "connection closed", ErrClosed)
	}
	if !s.resolved {
		if s.resolveErr != nil && !opts.WaitForReady {
			return nil, newError(ErrUnreachable, true, "resolver failed", s.resolveErr)
		}
		return nil, nil
	}
	ready := s.ready
	if len(avoid) > 0 {
		ready = without(ready, avoid)
	}
	bm, err := bal.Pick(balance.PickInfo{Members: s.members, Ready: ready, ShardKey: opts.ShardKey, Sharded: opts.Sharded})
	if err != nil {
		switch {
		case len(s.ready) > 0:
			return nil, newError(ErrUnreachable, true, "balancer", err)
		case s.connecting > 0 || opts.WaitForReady:
			return nil, nil
		}
		return nil, c.noneReady(s, err)
	}
	m, ok := bm.(*member)
	if !ok || m.c != c {
		return nil, newError(ErrUnreachable, true, fmt.Sprintf("balancer returned %v, which is not a member of this connection", bm), nil)
	}
	switch EndpointState(m.state.Load()) {
	case EndpointReady:
		return m, nil
	case EndpointFailed, EndpointIdle:
		if slices.Contains(s.ready, bm) {
			// It was ready when s was published and has changed since: a newer snapshot is
			// on its way. Pick again from it.
			return nil, nil
		}
		if EndpointState(m.state.Load()) == EndpointIdle {
			c.demand(m) // a shard's owner the pool keeps no connection to
		} else if !opts.WaitForReady {
			return nil, m.downError()
		}
	}
	return nil, nil
}

// without returns ready without the members of avoid, or ready itself if that leaves none.
func without(ready []balance.Member, avoid []*member) []balance.Member {
	out := make([]balance.Member, 0, len(ready))
	for _, bm := range ready {
		if !slices.Contains(avoid, bm.(*member)) {
			out = append(out, bm)
		}
	}
	if len(out) == 0 {
		return ready
	}
	return out
}

// wait blocks until s is replaced or ctx is done.
func wait(ctx context.Context, s *snapshot) error {
	select {
	case <-s.changed:
		return nil
	case <-ctx.Done():
		return ctxError(ctx, true)
	}
}

// noneReady explains why no member could take a call.
func (c *client) noneReady(s *snapshot, pickErr error) error {
	if len(s.members) == 0 {
		msg := "resolver returned no endpoints"
		if s.resolveErr != nil {
			msg = "resolver failed and returned no endpoints earlier"
		}
		return newError(ErrUnreachable, true, msg, s.resolveErr)
	}
	// Every member failed. If they all failed authentication, say so: that is not fixed by
	// retrying.
	c.mu.Lock()
	var last error
	auth := true
	for _, bm := range s.members {
		m := bm.(*member)
		if m.lastErr != nil {
			last = m.lastErr
			auth = auth && errors.Is(m.lastErr, ErrAuthentication)
		}
	}
	c.mu.Unlock()
	cat := ErrUnreachable
	if auth && last != nil {
		cat = ErrAuthentication
	}
	msg := fmt.Sprintf("none of %d endpoints is ready", len(s.members))
	if last == nil {
		return newError(cat, true, msg, pickErr)
	}
	return newError(cat, true, msg+"; last failure", last)
}

// Close implements [Connection]: calls in progress fail, later calls fail with ErrUnreachable
// (wrapping ErrClosed), and every connection is closed. Close waits for the Connection's
// goroutines to exit.
func (c *client) Close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		c.publishLocked()
	}
	c.mu.Unlock()
	unregisterChannel(c)
	c.cancel()
	c.wg.Wait()
	if c.metrics != nil {
		c.metrics.Unregister()
	}
}

// notifyHealth calls ClientOptions.OnHealthChange, one call at a time, when the pool's health
// changes. It reports unhealthy when the client closes.
func (c *client) notifyHealth() {
	defer c.wg.Done()
	last := false
	for {
		select {
		case <-c.healthc:
		case <-c.ctx.Done():
			if last {
				c.opts.OnHealthChange(false)
			}
			return
		}
		c.mu.Lock()
		h := c.healthy
		c.mu.Unlock()
		if h != last {
			last = h
			c.opts.OnHealthChange(h)
		}
	}
}

// Status implements [Inspectable].
func (c *client) Status() ConnectionStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.snap.Load()
	st := ConnectionStatus{
		Name: c.name, Resolved: c.resolved, ResolveErr: c.resolveErr, Healthy: c.healthy,
		Degraded: c.degraded && c.resolved && !c.closed, Changed: s.changed, Closed: c.closed,
	}
	var removed []EndpointStatus
	for _, bm := range s.members {
		e := bm.(*member).statusLocked()
		st.Wanted += e.Wanted
		st.Endpoints = append(st.Endpoints, e)
	}
	for _, m := range c.members {
		if m.removed {
			removed = append(removed, m.statusLocked())
		}
	}
	slices.SortFunc(removed, func(a, b EndpointStatus) int { return cmp.Compare(a.Address, b.Address) })
	st.Endpoints = append(st.Endpoints, removed...)
	return st
}

// resolveLoop follows the resolver until the client is closed.
func (c *client) resolveLoop() {
	defer c.wg.Done()
	var version *resolve.Version
	failures := 0
	var spaceUntil time.Time // when the last answer came back at once, the next call waits
	for {
		if !spaceUntil.IsZero() {
			if !c.sleep(time.Until(spaceUntil)) {
				return
			}
			spaceUntil = time.Time{}
		}
		start := time.Now()
		eps, v, err := c.resolver.Resolve(c.ctx, version)
		if version != nil && time.Since(start) < minResolveInterval {
			// A versioned Resolve that did not block: the next one waits, so a resolver
			// that always has something new cannot make the client spin. The first
			// (unversioned) call, and answers that took a while, cost no delay.
			spaceUntil = start.Add(minResolveInterval)
		}
		if c.ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			c.opts.Logger.Warn("weft: resolver failed; keeping the last good set", slog.String("channel", c.name), slog.Any("err", err), slog.Int("failures", failures))
			c.mu.Lock()
			c.resolveErr = err
			c.publishLocked()
			c.mu.Unlock()
			if !c.sleep(c.opts.Backoff.Delay(failures)) {
				return
			}
			continue
		}
		failures = 0
		if version != nil && v != nil && *v == *version {
			// Nothing new: the resolver asks to be polled again later.
			c.mu.Lock()
			if c.resolveErr != nil {
				c.resolveErr = nil
				c.publishLocked()
			}
			c.mu.Unlock()
			if !c.sleep(c.opts.Backoff.Delay(1)) {
				return
			}
			continue
		}
		c.apply(eps)
		if c.resolver.IsConstant() {
			return
		}
		version = v
	}
}

// sleep waits for d or until the client is closed; it reports whether the client is open.
func (c *client) sleep(d time.Duration) bool {
	if d <= 0 {
		return c.ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// apply makes eps the resolved set: new endpoints get a member, removed ones drain, and
// removed ones that return are revived.
func (c *client) apply(eps []endpoint.Endpoint) {
	want := make(map[string]endpoint.Endpoint, len(eps))
	for _, ep := range eps {
		if ep == nil {
			continue
		}
		if _, dup := want[ep.Address()]; !dup {
			want[ep.Address()] = ep
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	for addr, m := range c.members {
		if _, keep := want[addr]; !keep && !m.removed {
			m.removed = true
			m.demanded = false
			m.kickLocked()
			m.refreshLocked()
			m.leaveIfDoneLocked()
		}
	}
	for addr, ep := range want {
		if m, ok := c.members[addr]; ok {
			if m.removed {
				m.removed = false
				m.kickLocked()
				m.refreshLocked()
			}
			continue
		}
		m := &member{c: c, ep: ep, addr: addr, rank: rand.Uint64()}
		m.state.Store(int32(EndpointIdle))
		c.members[addr] = m
	}
	c.resolved, c.resolveErr = true, nil
	c.rebalanceLocked()
	c.publishLocked()
}

// rebalanceLocked decides how many connections the pool keeps to each endpoint of the set, and
// starts or retires links to match.
//
// With PoolOptions.Size zero, every endpoint gets one. Otherwise Size connections are spread
// over the good endpoints (neither ejected nor recently failed), preferring those already in
// use and then a random order fixed per client: one each when there are enough, several each
// when there are fewer. If no endpoint is good, those that failed longest ago are tried. An
// endpoint a balancer asked for, and an ejected one with a connection to probe, keep one.
//
// REQUIRES: c.mu is held.
func (c *client) rebalanceLocked() {
	now := time.Now()
	var cands []*member
	for _, m := range c.members {
		if !m.removed {
			cands = append(cands, m)
		}
	}
	want := make(map[*member]int, len(cands))
	if c.pool.Size == 0 {
		for _, m := range cands {
			want[m] = 1
		}
	} else {
		var good []*member
		for _, m := range cands {
			if (!m.ejected || !now.Before(m.ejectedUntil)) && !now.Before(m.badUntil) {
				good = append(good, m)
			}
		}
		if len(good) > 0 {
			slices.SortFunc(good, func(a, b *member) int {
				if (a.want > 0) != (b.want > 0) {
					if a.want > 0 {
						return -1
					}
					return 1
				}
				return cmp.Compare(a.rank, b.rank)
			})
		} else {
			good = slices.Clone(cands)
			slices.SortFunc(good, func(a, b *member) int {
				return cmp.Or(a.badUntil.Compare(b.badUntil), cmp.Compare(a.rank, b.rank))
			})
		}
		if n, size := len(good), c.pool.Size; n >= size {
			for _, m := range good[:size] {
				want[m] = 1
			}
		} else {
			for i, m := range good {
				want[m] = size / n
				if i < size%n {
					want[m]++
				}
			}
		}
		for _, m := range cands {
			if want[m] == 0 && (m.demanded || (m.ejected && len(m.links) > 0)) {
				want[m] = 1
			}
		}
	}
	for _, m := range cands {
		m.setWantLocked(want[m])
	}
}

// spareLocked reports whether the pool could move a connection away from m: it keeps a Size
// and has another endpoint that is idle, not ejected and not backing off after a failure.
//
// REQUIRES: c.mu is held.
func (c *client) spareLocked(m *member) bool {
	if c.pool.Size == 0 {
		return false
	}
	now := time.Now()
	for _, o := range c.members {
		if o != m && !o.removed && o.want == 0 && (!o.ejected || !now.Before(o.ejectedUntil)) && !now.Before(o.badUntil) {
			return true
		}
	}
	return false
}

// demand makes the pool connect to an idle member a balancer picked.
func (c *client) demand(m *member) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || m.removed || m.demanded {
		return
	}
	m.demanded = true
	c.rebalanceLocked()
	c.publishLocked()
}

// member is one endpoint of a client, with the links (connections and the goroutines that
// keep them) the pool wants to it.
type member struct {
	c     *client
	ep    endpoint.Endpoint
	addr  string
	rank  uint64                  // this client's random preference among endpoints
	state atomic.Int32            // an EndpointState, derived from the links
	conns atomic.Pointer[[]*Conn] // connections calls use; stored before state becomes ready
	fails atomic.Int32            // consecutive calls that failed against the member
	calls atomic.Uint64
	errs  atomic.Uint64

	// guarded by c.mu
	removed        bool
	demanded       bool // a balancer picked it while idle
	links          []*link
	want           int
	healthyConns   int // ready links whose health checks pass
	lastErr        error
	failures       int       // consecutive failures of its links to connect or stay connected
	badUntil       time.Time // with a pool Size: failed or evicted, used last until then
	ejected        bool
	ejections      int // ejections in a row, which set the length of the next
	ejectionsTotal int
	ejectedUntil   time.Time
	readmitted     time.Time // when its last ejection ended
	recent         [recentErrors]RecentError
	nrecent        int // failures recorded in recent (a ring)
}

var _ balance.Member = (*member)(nil)

// Endpoint implements [balance.Member].
func (m *member) Endpoint() endpoint.Endpoint { return m.ep }

// Ready implements [balance.Member].
func (m *member) Ready() bool { return EndpointState(m.state.Load()) == EndpointReady }

// InFlight implements [balance.Member].
func (m *member) InFlight() int {
	n := 0
	if p := m.conns.Load(); p != nil {
		for _, conn := range *p {
			n += int(conn.active.Load())
		}
	}
	return n
}

// Load implements [balance.Member]: the mean of the loads its servers last reported.
func (m *member) Load() float64 {
	p := m.conns.Load()
	if p == nil || len(*p) == 0 {
		return 0
	}
	sum := 0.0
	for _, conn := range *p {
		sum += conn.Load()
	}
	return sum / float64(len(*p))
}

func (m *member) String() string { return m.addr }

// pickConn returns the member's connection with the fewest callers, or nil if it has none.
func (m *member) pickConn() *Conn {
	p := m.conns.Load()
	if p == nil {
		return nil
	}
	conns := *p
	switch len(conns) {
	case 0:
		return nil
	case 1:
		return conns[0]
	}
	best := conns[0]
	for _, conn := range conns[1:] {
		if conn.active.Load() < best.active.Load() {
			best = conn
		}
	}
	return best
}

// healthyLocked reports whether the member takes calls outside degraded mode.
//
// REQUIRES: m.c.mu is held.
func (m *member) healthyLocked() bool {
	return EndpointState(m.state.Load()) == EndpointReady && m.healthyConns > 0 && !m.ejected
}

// kickLocked wakes the member's link goroutines.
//
// REQUIRES: m.c.mu is held.
func (m *member) kickLocked() {
	for _, l := range m.links {
		l.kickLocked()
	}
}

// refreshLocked derives the member's state and the connections calls use from its links. It
// reports whether either changed, or the number of healthy connections.
//
// REQUIRES: m.c.mu is held.
func (m *member) refreshLocked() bool {
	var ready, healthy []*Conn
	connecting, failed := false, false
	for _, l := range m.links {
		switch l.state {
		case EndpointReady:
			ready = append(ready, l.conn)
			if !l.unhealthy {
				healthy = append(healthy, l.conn)
			}
		case EndpointConnecting:
			connecting = true
		case EndpointFailed:
			failed = true
		}
	}
	changed := m.healthyConns != len(healthy)
	m.healthyConns = len(healthy)
	use := healthy
	if len(use) == 0 {
		use = ready
	}
	var old []*Conn
	if p := m.conns.Load(); p != nil {
		old = *p
	}
	if !slices.Equal(old, use) {
		changed = true
		if len(use) == 0 {
			m.conns.Store(nil)
		} else {
			m.conns.Store(&use)
		}
	}
	st := EndpointIdle
	switch {
	case m.removed:
		st = EndpointDraining
	case len(ready) > 0:
		st = EndpointReady
	case connecting:
		st = EndpointConnecting
	case failed:
		st = EndpointFailed
	}
	return EndpointState(m.state.Swap(int32(st))) != st || changed
}

// setWantLocked starts or retires links so that n of them are live. It retires links that are
// not ready first.
//
// REQUIRES: m.c.mu is held.
func (m *member) setWantLocked(n int) {
	c := m.c
	m.want = n
	var live []*link
	for _, l := range m.links {
		if !l.retired {
			live = append(live, l)
		}
	}
	for len(live) < n {
		l := &link{m: m, kick: make(chan struct{}, 1), state: EndpointConnecting}
		m.links = append(m.links, l)
		live = append(live, l)
		c.wg.Add(1)
		go l.run()
	}
	if len(live) > n {
		slices.SortStableFunc(live, func(a, b *link) int {
			return cmp.Compare(b2i(a.state == EndpointReady), b2i(b.state == EndpointReady))
		})
		for _, l := range live[:len(live)-n] {
			l.retired = true
			l.kickLocked()
		}
	}
	m.refreshLocked()
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// leaveIfDoneLocked takes a removed member without links out of the client.
//
// REQUIRES: m.c.mu is held.
func (m *member) leaveIfDoneLocked() {
	if m.removed && len(m.links) == 0 && m.c.members[m.addr] == m {
		delete(m.c.members, m.addr)
	}
}

// noteLocked records a failure for diagnostics.
//
// REQUIRES: m.c.mu is held.
func (m *member) noteLocked(err error) {
	m.recent[m.nrecent%recentErrors] = RecentError{Time: time.Now(), Err: err}
	m.nrecent++
}

// statusLocked describes the member.
//
// REQUIRES: m.c.mu is held.
func (m *member) statusLocked() EndpointStatus {
	st := EndpointStatus{
		Address: m.addr, State: EndpointState(m.state.Load()), Healthy: m.healthyLocked(),
		Ejected: m.ejected, Ejections: m.ejectionsTotal, Wanted: m.want,
		Load: m.Load(), Calls: m.calls.Load(), Errors: m.errs.Load(),
	}
	if m.ejected {
		st.EjectedUntil = m.ejectedUntil
	}
	for _, l := range m.links {
		if l.conn != nil {
			st.InFlight += int(l.conn.active.Load())
		}
		if l.state == EndpointReady {
			st.Connections++
			st.RTT = max(st.RTT, l.rtt)
		}
	}
	if st.State != EndpointReady {
		st.Err = m.lastErr
	}
	for i := max(0, m.nrecent-recentErrors); i < m.nrecent; i++ {
		st.RecentErrors = append(st.RecentErrors, m.recent[i%recentErrors])
	}
	return st
}

// downError is the error of a call whose member has failed.
func (m *member) downError() error {
	m.c.mu.Lock()
	err := m.lastErr
	m.c.mu.Unlock()
	cat := ErrUnreachable
	if errors.Is(err, ErrAuthentication) {
		cat = ErrAuthentication
	}
	return newError(cat, true, "endpoint "+m.addr+" is down", err)
}

func (m *member) logFailure(failures int, err error) {
	log := m.c.opts.Logger
	lvl := slog.LevelDebug
	if failures == 1 || failures%10 == 0 {
		lvl = slog.LevelWarn
	}
	log.Log(context.Background(), lvl, "weft: cannot connect to endpoint", slog.String("channel", m.c.name),
		slog.String("addr", m.addr), slog.Int("failures", failures), slog.Any("err", err))
}

// link is one connection the pool keeps to a member, with the goroutine that dials it,
// health-checks it and redials it when it is lost.
type link struct {
	m    *member
	kick chan struct{} // wakes the goroutine: removed, revived, retired, ejected

	// guarded by m.c.mu
	retired   bool // the pool no longer wants it: drain and exit
	state     EndpointState
	conn      *Conn // its connection while ready
	unhealthy bool  // its last health check failed
	rtt       time.Duration
}

// kickLocked wakes the link's goroutine.
//
// REQUIRES: l.m.c.mu is held.
func (l *link) kickLocked() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// gone reports whether the link should drain: its member was removed or it was retired.
func (l *link) gone() bool {
	l.m.c.mu.Lock()
	defer l.m.c.mu.Unlock()
	return l.retired || l.m.removed
}

// set records the link's state (and its connection while ready) and publishes the change.
// With a pool Size, a failure makes the member a last choice until its backoff (which grows
// with the member's consecutive failures, whichever link had them) has passed, which may move
// the link elsewhere; a link started for it meanwhile waits that long before dialling.
func (l *link) set(s EndpointState, conn *Conn, err error) {
	m, c := l.m, l.m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	l.state, l.conn = s, conn
	switch s {
	case EndpointReady:
		l.unhealthy = false
		m.lastErr = nil
		m.badUntil = time.Time{}
		m.failures = 0
	case EndpointFailed:
		m.failures++
	}
	if err != nil {
		m.lastErr = err
		m.noteLocked(err)
	}
	changed := m.refreshLocked()
	if s == EndpointFailed && c.pool.Size > 0 && !m.removed {
		m.badUntil = time.Now().Add(c.opts.Backoff.Delay(m.failures))
		c.rebalanceLocked()
		changed = true
	}
	if changed {
		c.publishLocked()
	}
}

// cooldown returns how long a new link must wait before its first dial: until the member's
// backoff after its last failure has passed.
func (l *link) cooldown() time.Duration {
	l.m.c.mu.Lock()
	defer l.m.c.mu.Unlock()
	return time.Until(l.m.badUntil)
}

// exitIfGone reports whether the link still should drain, and if so takes it out of its
// member (and a removed member without links out of the client); its goroutine then exits.
func (l *link) exitIfGone() bool {
	m, c := l.m, l.m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if !l.retired && !m.removed {
		return false
	}
	m.links = slices.DeleteFunc(m.links, func(o *link) bool { return o == l })
	m.refreshLocked()
	m.leaveIfDoneLocked()
	c.publishLocked()
	return true
}

// serveOutcome is how a ready connection stopped serving its link.
type serveOutcome int

const (
	serveGone    serveOutcome = iota // the link was retired or removed and the connection drained, or the client closed
	serveLost                        // the connection broke or the server sent a go-away
	serveEvicted                     // the connection failed a health check and was drained
)

// run keeps the link connected until the client closes or the link is gone and its
// connections have drained.
func (l *link) run() {
	m, c := l.m, l.m.c
	defer c.wg.Done()
	var old []*Conn // connections that stopped taking calls and still finish theirs
	defer func() {
		for _, o := range old {
			o.Close()
		}
	}()
	failures := 0 // consecutive failures; the first retry is immediate
	if d := l.cooldown(); d > 0 && !l.pause(d) {
		return
	}
	for {
		old = pruneClosed(old)
		if failures > 0 && !l.pause(c.opts.Backoff.Delay(failures-1)) {
			return
		}
		if c.ctx.Err() != nil {
			return
		}
		if l.gone() {
			if l.drainOld(old) {
				return
			}
			continue
		}
		conn, err := Dial(c.ctx, m.ep, c.opts)
		if err != nil {
			if c.ctx.Err() != nil {
				return
			}
			failures++
			m.logFailure(failures, err)
			l.set(EndpointFailed, nil, err)
			continue
		}
		c.opened.Add(1)
		l.set(EndpointReady, conn, nil)
		if failures > 0 {
			c.opts.Logger.Info("weft: endpoint connected", slog.String("channel", c.name), slog.String("addr", m.addr), slog.Int("after_failures", failures))
		}
		born := time.Now()
		outcome, reason := l.serve(conn)
		if c.ctx.Err() != nil {
			conn.Close()
			return
		}
		if outcome == serveGone {
			conn.Close()
			failures = 0
			continue
		}
		if isClosed(conn.Done()) {
			conn.Close()
		} else {
			old = append(old, conn)
		}
		// A connection that had been up for a while is redialled at once; one that keeps
		// dying (or failing its health checks) soon after it is made backs off. An evicted
		// connection's endpoint does not answer: calls do not wait for its redial.
		if time.Since(born) >= c.opts.Backoff.Base {
			failures = 0
		} else {
			failures++
		}
		if outcome == serveLost && failures == 0 {
			l.set(EndpointConnecting, nil, reason)
		} else {
			l.set(EndpointFailed, nil, reason)
		}
		c.opts.Logger.Info("weft: connection to endpoint lost", slog.String("channel", c.name), slog.String("addr", m.addr), slog.Any("reason", reason))
	}
}

// serve watches a ready connection and health-checks it. It returns serveLost when the
// connection stops taking calls (broken, or a go-away) while the link is wanted,
// serveEvicted when it failed a health check outside degraded mode (it is then draining), and
// serveGone when the link was retired or removed and the connection has drained and closed,
// or the client is closed. The error says why the connection was lost or evicted.
func (l *link) serve(conn *Conn) (serveOutcome, error) {
	c := l.m.c
	check := newChecker(c.pool)
	defer check.stop(conn)
	for {
		wake := check.arm(l.m.ejectedUntilIfEjected())
		select {
		case <-conn.drainChan():
			reason := conn.Err()
			if reason == nil {
				reason = errors.New("the server sent a go-away")
			}
			return serveLost, reason
		case <-l.kick:
		case <-c.ctx.Done():
			return serveGone, nil
		case <-wake:
			check.start(conn)
			continue
		case <-check.pong:
			l.checked(check.done(), nil)
			continue
		case <-check.timeout():
			err := check.fail(conn)
			if l.checked(0, err) {
				conn.drain()
				return serveEvicted, err
			}
			continue
		}
		if !l.gone() {
			continue
		}
		// Gone: no new calls; the connection closes once its calls are done, unless the
		// member is revived first.
		l.set(EndpointDraining, conn, nil)
		conn.drain()
		for revived := false; !revived; {
			select {
			case <-conn.Done():
				return serveGone, nil
			case <-l.kick:
			case <-c.ctx.Done():
				return serveGone, nil
			}
			if !l.gone() {
				if !conn.undrain() {
					// Too late: it closed or the server sent a go-away meanwhile.
					return serveLost, cmp.Or(conn.Err(), errors.New("closed while draining"))
				}
				revived = true
				l.set(EndpointReady, conn, nil)
			}
		}
	}
}

// drainOld waits, for a link that is gone, until its old connections have closed. It returns
// true if the link left its member, false if it was revived meanwhile.
func (l *link) drainOld(old []*Conn) bool {
	for _, o := range old {
		select {
		case <-o.Done():
		case <-l.kick:
			if !l.gone() {
				return false
			}
		case <-l.m.c.ctx.Done():
			return true
		}
	}
	return l.exitIfGone()
}

// pause waits d before the link's next dial. It returns false if the client closed. A link
// that is gone stops waiting.
func (l *link) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case <-l.kick:
			if l.gone() {
				return true
			}
		case <-l.m.c.ctx.Done():
			return false
		}
	}
}

// pruneClosed closes (joining their goroutines) and drops the connections that have closed.
func pruneClosed(conns []*Conn) []*Conn {
	return slices.DeleteFunc(conns, func(o *Conn) bool {
		if isClosed(o.Done()) {
			o.Close()
			return true
		}
		return false
	})
}
