package call

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// Connect returns a Connection to the servers at the endpoints resolver returns. It does not
// wait for a connection: ctx bounds only Connect itself, and the Connection lives until Close.
//
// In the background the Connection follows the resolver and keeps one connection ([Conn]) to
// every endpoint of the current set: it dials new endpoints, redials lost ones with
// ClientOptions.Backoff, drains removed ones (their calls in progress finish, then they
// close), and revives a removed endpoint that returns while it drains. A resolver error keeps
// the last good set.
//
// Each call goes to the member ClientOptions.Balancer (or CallOptions.Balancer) picks. While
// endpoints are still connecting and none is ready, calls wait, up to their deadline. When
// every endpoint has failed, or the resolver has none, calls fail at once with [ErrUnreachable]
// ([ErrAuthentication] if every endpoint failed its TLS handshake), unless
// CallOptions.WaitForReady is set. A call that its server never took in (its connection was
// draining or closed, broke before the request left, or the server's go-away refused it) is
// sent again, to the member the balancer picks next, up to 3 times; any other failure is
// returned to the caller.
//
// The returned Connection also implements [Inspectable].
func Connect(ctx context.Context, resolver resolve.Resolver, opts ClientOptions) (Connection, error) {
	if resolver == nil {
		return nil, errors.New("call: Connect with a nil resolver")
	}
	if err := ctx.Err(); err != nil {
		return nil, ctxError(ctx, true)
	}
	opts = opts.withDefaults()
	c := &client{
		opts:     opts,
		resolver: resolver,
		members:  map[string]*member{},
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.mu.Lock()
	c.publishLocked()
	c.mu.Unlock()
	c.wg.Add(1)
	go c.resolveLoop()
	return c, nil
}

// Inspectable is implemented by the Connections [Connect] returns: Status describes the
// resolved set and the state of every endpoint. Further capabilities of Connections will be
// added as interfaces of their own, discovered with a type assertion, so implementations of
// [Connection] keep compiling.
type Inspectable interface {
	Status() ConnectionStatus
}

// ConnectionStatus is a snapshot of a Connection's state.
type ConnectionStatus struct {
	// Resolved reports whether the resolver has answered at least once.
	Resolved bool

	// ResolveErr is the resolver's latest error, or nil if its latest answer succeeded.
	ResolveErr error

	// Endpoints describes the resolved set, ordered by address, followed by the endpoints that
	// were removed and are still draining.
	Endpoints []EndpointStatus

	// Changed is closed when the resolved set or the state of an endpoint changes; loads and
	// in-flight counts change without closing it.
	Changed <-chan struct{}

	// Closed reports whether the Connection is closed.
	Closed bool
}

// EndpointStatus describes one endpoint of a Connection.
type EndpointStatus struct {
	Address  string
	State    EndpointState
	InFlight int     // calls in progress on its connection
	Load     float64 // the load its server last reported
	Err      error   // why it is not ready (its last dial or connection failure), or nil
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
	}
	return fmt.Sprintf("EndpointState(%d)", int32(s))
}

const (
	// minResolveInterval spaces consecutive calls of a resolver's Resolve, so a resolver
	// that answers at once with ever-new versions cannot make the client spin.
	minResolveInterval = 100 * time.Millisecond

	// maxResends bounds how often a call that was never sent moves to another member.
	maxResends = 3
)

// client is the Connection returned by Connect.
type client struct {
	opts     ClientOptions
	resolver resolve.Resolver
	ctx      context.Context // cancelled by Close; bounds resolving and dialling
	cancel   context.CancelFunc
	snap     atomic.Pointer[snapshot]
	wg       sync.WaitGroup // the resolver loop and every member's goroutine

	mu sync.Mutex
	// guarded by mu
	members    map[string]*member // by address, including removed members still draining
	resolved   bool
	resolveErr error
	closed     bool
}

var (
	_ Connection  = (*client)(nil)
	_ Inspectable = (*client)(nil)
)

// snapshot is an immutable view of the client's members, replaced whenever the resolved set
// or a member's state changes. Calls read it without locking.
type snapshot struct {
	members    []balance.Member // the resolved set, by address
	ready      []balance.Member // the ready members, by address
	connecting int              // members in EndpointConnecting
	resolved   bool
	resolveErr error
	closed     bool
	changed    chan struct{} // closed when a newer snapshot replaces this one
}

// publishLocked replaces the snapshot, waking calls that wait for a change.
//
// REQUIRES: c.mu is held.
func (c *client) publishLocked() {
	s := &snapshot{resolved: c.resolved, resolveErr: c.resolveErr, closed: c.closed, changed: make(chan struct{})}
	if !c.closed {
		for _, m := range c.members {
			if m.removed {
				continue
			}
			s.members = append(s.members, m)
			switch EndpointState(m.state.Load()) {
			case EndpointReady:
				s.ready = append(s.ready, m)
			case EndpointConnecting:
				s.connecting++
			}
		}
	}
	byAddr := func(a, b balance.Member) int { return cmp.Compare(a.(*member).addr, b.(*member).addr) }
	slices.SortFunc(s.members, byAddr)
	slices.SortFunc(s.ready, byAddr)
	if old := c.snap.Swap(s); old != nil {
		close(old.changed)
	}
}

// shardKey is the context key of WithShardKey.
type shardKey struct{}

// WithShardKey returns a context whose calls through a Connection carry shard key k, unless
// their CallOptions set one. It lets callers shard calls made through generated stubs.
func WithShardKey(ctx context.Context, k uint64) context.Context {
	return context.WithValue(ctx, shardKey{}, k)
}

// Call implements [Connection].
func (c *client) Call(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error) {
	bal := c.opts.Balancer
	if opts.Balancer != nil {
		bal = opts.Balancer
	}
	if !opts.Sharded {
		if k, ok := ctx.Value(shardKey{}).(uint64); ok {
			opts.ShardKey, opts.Sharded = k, true
		}
	}
	resends := 0
	for {
		s := c.snap.Load()
		m, err := c.pick(s, bal, &opts)
		if err != nil {
			return nil, err
		}
		if m == nil {
			// Nothing to call yet: wait for the resolver or a member to move on.
			if err := wait(ctx, s); err != nil {
				return nil, err
			}
			continue
		}
		// A ready member's connection is stored before its state becomes ready.
		result, err := m.conn.Load().Call(ctx, key, args, opts)
		if err == nil || resends >= maxResends || !isUnsent(err) || ctx.Err() != nil {
			return result, err
		}
		// The server never took the call in: the connection was draining or closed, broke
		// before the request left, or the server refused it with a go-away. The member
		// publishes its new state at once; pick again from that.
		resends++
		if c.snap.Load() == s {
			if err := wait(ctx, s); err != nil {
				return nil, err
			}
		}
	}
}

// pick chooses the member for a call from s. It returns (nil, nil) if the call should wait for
// s to change.
func (c *client) pick(s *snapshot, bal balance.Balancer, opts *CallOptions) (*member, error) {
	if s.closed {
		return nil, newError(ErrUnreachable, true, "connection closed", ErrClosed)
	}
	if !s.resolved {
		if s.resolveErr != nil && !opts.WaitForReady {
			return nil, newError(ErrUnreachable, true, "resolver failed", s.resolveErr)
		}
		return nil, nil
	}
	bm, err := bal.Pick(balance.PickInfo{Members: s.members, Ready: s.ready, ShardKey: opts.ShardKey, Sharded: opts.Sharded})
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
	case EndpointFailed:
		if !opts.WaitForReady {
			return nil, m.downError()
		}
	}
	return nil, nil
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
	c.cancel()
	c.wg.Wait()
}

// Status implements [Inspectable].
func (c *client) Status() ConnectionStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.snap.Load()
	st := ConnectionStatus{Resolved: c.resolved, ResolveErr: c.resolveErr, Changed: s.changed, Closed: c.closed}
	var removed []EndpointStatus
	for _, bm := range s.members {
		st.Endpoints = append(st.Endpoints, bm.(*member).statusLocked())
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
			c.opts.Logger.Warn("weft: resolver failed; keeping the last good set", slog.Any("err", err), slog.Int("failures", failures))
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
			m.kickLocked()
		}
	}
	for addr, ep := range want {
		if m, ok := c.members[addr]; ok {
			if m.removed {
				m.removed = false
				m.kickLocked()
			}
			continue
		}
		m := &member{c: c, ep: ep, addr: addr, kick: make(chan struct{}, 1)}
		c.members[addr] = m
		c.wg.Add(1)
		go m.run()
	}
	c.resolved, c.resolveErr = true, nil
	c.publishLocked()
}

// member is one endpoint of a client, with the goroutine that keeps it connected.
type member struct {
	c     *client
	ep    endpoint.Endpoint
	addr  string
	state atomic.Int32         // an EndpointState
	conn  atomic.Pointer[Conn] // the connection calls use; set before the state becomes ready
	kick  chan struct{}        // wakes the goroutine: removed, revived

	// guarded by c.mu
	removed bool
	lastErr error
}

var _ balance.Member = (*member)(nil)

// Endpoint implements [balance.Member].
func (m *member) Endpoint() endpoint.Endpoint { return m.ep }

// Ready implements [balance.Member].
func (m *member) Ready() bool { return EndpointState(m.state.Load()) == EndpointReady }

// InFlight implements [balance.Member].
func (m *member) InFlight() int {
	if conn := m.conn.Load(); conn != nil {
		return int(conn.active.Load())
	}
	return 0
}

// Load implements [balance.Member].
func (m *member) Load() float64 {
	if conn := m.conn.Load(); conn != nil {
		return conn.Load()
	}
	return 0
}

func (m *member) String() string { return m.addr }

// kickLocked wakes the member's goroutine.
//
// REQUIRES: m.c.mu is held.
func (m *member) kickLocked() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// statusLocked describes the member.
//
// REQUIRES: m.c.mu is held.
func (m *member) statusLocked() EndpointStatus {
	st := EndpointStatus{Address: m.addr, State: EndpointState(m.state.Load()), InFlight: m.InFlight(), Load: m.Load()}
	if st.State != EndpointReady {
		st.Err = m.lastErr
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

// setState records the member's state (and its connection, if conn is not nil, and the
// reason it is not ready) and publishes it if it changed.
func (m *member) setState(s EndpointState, conn *Conn, err error) {
	c := m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if conn != nil {
		m.conn.Store(conn)
	}
	old := EndpointState(m.state.Swap(int32(s)))
	if err != nil || s == EndpointReady {
		m.lastErr = err
	}
	if old != s {
		c.publishLocked()
	}
}

// exitIfRemoved reports whether the member is still out of the resolved set, and if so takes
// it out of the client; its goroutine then exits.
func (m *member) exitIfRemoved() bool {
	c := m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if !m.removed {
		return false
	}
	delete(c.members, m.addr)
	c.publishLocked()
	return true
}

// isRemoved reports whether the member is out of the resolved set.
func (m *member) isRemoved() bool {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	return m.removed
}

// run keeps the member connected until the client closes or the member is removed and its
// connections have drained.
func (m *member) run() {
	c := m.c
	defer c.wg.Done()
	var old []*Conn // connections lost to a go-away that still finish their calls
	defer func() {
		for _, o := range old {
			o.Close()
		}
	}()
	failures := 0 // consecutive failures; the first retry is immediate
	for {
		old = pruneClosed(old)
		if failures > 0 && !m.pause(c.opts.Backoff.Delay(failures-1)) {
			return
		}
		if c.ctx.Err() != nil {
			return
		}
		if m.isRemoved() {
			if m.drainOld(old) {
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
			m.setState(EndpointFailed, nil, err)
			continue
		}
		m.setState(EndpointReady, conn, nil)
		if failures > 0 {
			c.opts.Logger.Info("weft: endpoint connected", slog.String("addr", m.addr), slog.Int("after_failures", failures))
		}
		born := time.Now()
		lost := m.serve(conn)
		if c.ctx.Err() != nil {
			conn.Close()
			return
		}
		if !lost {
			// Removed and drained (or removed while reviving failed): go round to exit.
			conn.Close()
			failures = 0
			continue
		}
		// The connection broke or the server sent a go-away. Redial at once if it had been
		// up for a while; a connection that keeps dying soon after it is made backs off.
		reason := conn.Err()
		if reason == nil {
			reason = errors.New("the server sent a go-away")
		}
		if isClosed(conn.Done()) {
			conn.Close()
		} else {
			old = append(old, conn)
		}
		if time.Since(born) >= c.opts.Backoff.Base {
			failures = 0
			m.setState(EndpointConnecting, nil, reason)
		} else {
			failures++
			m.setState(EndpointFailed, nil, reason)
		}
		c.opts.Logger.Info("weft: connection to endpoint lost", slog.String("addr", m.addr), slog.Any("reason", reason))
	}
}

// serve watches a ready connection. It returns true when the connection stops taking calls
// (broken, or a go-away) while the member is in the set, and false when the member was
// removed and the connection has drained and closed, or the client is closed.
func (m *member) serve(conn *Conn) bool {
	c := m.c
	for {
		select {
		case <-conn.drainChan():
			return true
		case <-m.kick:
		case <-c.ctx.Done():
			return false
		}
		if !m.isRemoved() {
			continue
		}
		// Removed: no new calls; the connection closes once its calls are done, unless the
		// member is revived first.
		m.setState(EndpointDraining, nil, nil)
		conn.drain()
		for revived := false; !revived; {
			select {
			case <-conn.Done():
				return false
			case <-m.kick:
			case <-c.ctx.Done():
				return false
			}
			if !m.isRemoved() {
				if !conn.undrain() {
					// Too late: it closed or the server sent a go-away meanwhile.
					return true
				}
				revived = true
				m.setState(EndpointReady, nil, nil)
			}
		}
	}
}

// drainOld waits, for a removed member, until its old connections have closed. It returns
// true if the member left the client, false if it was revived meanwhile.
func (m *member) drainOld(old []*Conn) bool {
	for _, o := range old {
		select {
		case <-o.Done():
		case <-m.kick:
			if !m.isRemoved() {
				return false
			}
		case <-m.c.ctx.Done():
			return true
		}
	}
	return m.exitIfRemoved()
}

// pause waits d before the member's next dial. It returns false if the client closed. A member
// removed meanwhile stops waiting.
func (m *member) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case <-m.kick:
			if m.isRemoved() {
				return true
			}
		case <-m.c.ctx.Done():
			return false
		}
	}
}

func (m *member) logFailure(failures int, err error) {
	log := m.c.opts.Logger
	if failures == 1 || failures%10 == 0 {
		log.Warn("weft: cannot connect to endpoint", slog.String("addr", m.addr), slog.Int("failures", failures), slog.Any("err", err))
		return
	}
	log.Debug("weft: cannot connect to endpoint", slog.String("addr", m.addr), slog.Int("failures", failures), slog.Any("err", err))
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
