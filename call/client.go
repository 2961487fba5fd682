package call

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"go.opentelemetry.io/otel/trace"
)

// Conn is the client side of one weft connection: it multiplexes concurrent calls over a single
// network connection to one server. It is safe for concurrent use.
//
// Most programs use a Connection from Connect, which manages a Conn per server; Conn is for
// callers that manage connections themselves.
type Conn struct {
	conn    net.Conn
	opts    ClientOptions
	addr    string
	peer    hello // the server's hello
	w       *writer
	br      *bufio.Reader
	slots   chan struct{} // one token per call running on the server
	closed  chan struct{} // closed when the connection is closed
	readerG sync.WaitGroup
	pingID  atomic.Uint64
	recv    atomic.Bool       // a frame arrived since the last keepalive tick
	rh      [replyHdrLen]byte // reply header scratch, owned by the reader
	free    freeList[clientCall]
	upfront int           // declared bytes of replies allocated in full; owned by the reader
	ka      *time.Timer   // keepalive; nil if disabled
	wfTimer *time.Timer   // fails the connection a while after a write failed; guarded by mu
	active  atomic.Int32  // callers inside Call
	idle    atomic.Bool   // draining: close once active drops to zero
	load    atomic.Uint32 // float32 bits of the load the server last reported

	// The read role: whoever holds it reads frames. The background reader holds it unless it
	// released it (nothing buffered, no call outstanding); a caller whose request is written
	// may take a released role and read its own reply, saving the hand-over from the reader.
	roleMu sync.Mutex
	bgWake chan struct{} // buffered 1: gives the role back to the background reader
	grace  *time.Timer   // ticks while the role changes hands; see graceOver
	// interruptible: the connection takes read deadlines, so a caller whose context can end
	// can be woken from reading its own reply.
	interruptible bool
	wakeFn        func() // c.wake, made once
	// guarded by roleMu
	roleFree    bool            // no one holds the role
	callerHolds bool            // a caller holds the role
	ownCtx      context.Context // the holding caller's context, if it can end
	// Contexts are told apart by their Done channels (comparing two contexts could panic,
	// and contexts that share a Done channel end together).
	prevDone    <-chan struct{} // the Done channel of the hold before, while the role changes hands
	watchDone   <-chan struct{} // the Done channel of the context watchStop's AfterFunc watches
	watchStop   func() bool     // stops the watch; nil if none
	interrupted bool            // the read deadline was moved to the past to wake the holder
	roleTakes   uint64          // times callers took the role
	graceArmed  bool            // the grace timer runs
	graceSeen   uint64          // roleTakes at its last tick
	// Owned by the role's holder.
	rscratch    []byte
	lastOwnRead bool // the last call completed could have had its caller read its reply

	callsMu sync.Mutex
	// guarded by callsMu
	calls     map[uint64]*clientCall
	nextID    uint64 // the id of the next call; assigned under writer.mu, then callsMu
	exhausted bool   // ids are near the end of their space

	mu sync.Mutex
	// guarded by mu
	closeErr     error                    // why the connection closed (or the server's go-away reason); nil while open
	draining     bool                     // no new calls: go-away received, ids ran out, drained, or closed
	drainc       chan struct{}            // closed when draining starts; replaced by undrain
	localDrain   bool                     // draining only because drain was called
	goAway       bool                     // the server sent a go-away
	idsOut       bool                     // request ids ran out
	lastAccepted uint64                   // from the server's go-away
	kaPinged     bool                     // a keepalive ping is outstanding
	pings        map[uint64]chan struct{} // Ping calls waiting for their pong, by ping id
}

var _ Connection = (*Conn)(nil)

// Connection is a client that makes calls. Implementations are safe for concurrent use.
type Connection interface {
	// Call calls the method identified by key with args and returns its reply. The caller
	// owns the returned bytes; args are not retained after Call returns. Call blocks until
	// the reply arrives, the call fails, or ctx is done. Errors match one of the Err…
	// categories of this package (or a context error) with errors.Is, and [NeverRan]
	// reports whether the call provably never reached a handler.
	Call(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error)

	// Close closes the connection. Calls in progress fail, and later calls fail at once with
	// [ErrUnreachable]. Close can be called more than once.
	Close()
}

// clientCall is a call in progress. It is pooled; the reader and the caller hand it back
// and forth under callsMu.
type clientCall struct {
	msg  outMsg
	hdr  []byte        // encoded call header
	done chan struct{} // the reply arrived or the call failed (buffer 1)

	// Set by the reader before done is signalled (or by failAll).
	result   []byte
	err      error
	connDown bool // err is a connection failure, to be classified by what was sent

	// Reader state for multi-frame replies; owned by the reader until done is signalled.
	// A reply collected in chunks is assembled by the caller.
	in       inbound
	skipping bool
	started  bool
	ownRead  bool // its caller may read its own reply (its context cannot end)

	// guarded by Conn.callsMu
	abandoned bool // the caller returned; the reader frees the slot and recycles the call
}

func newClientCall() *clientCall {
	cc := &clientCall{msg: outMsg{sig: make(chan struct{}, 1)}, done: make(chan struct{}, 1)}
	cc.msg.call = cc
	return cc
}

// resetCall prepares cc for reuse.
func resetCall(cc *clientCall) {
	cc.msg.reset()
	select {
	case <-cc.done:
	default:
	}
	cc.result, cc.err, cc.connDown = nil, nil, false
	cc.in.release()
	cc.in = inbound{}
	cc.skipping, cc.started, cc.abandoned, cc.ownRead = false, false, false, false
	if cap(cc.hdr) > 4<<10 {
		cc.hdr = nil
	}
}

func (c *Conn) getCall() *clientCall { return c.free.get() }

func (c *Conn) putCall(cc *clientCall) {
	resetCall(cc)
	c.free.put(cc)
}

// Dial connects to ep and performs the weft handshake. ctx bounds only dialling and the
// handshake (as does ClientOptions.HandshakeTimeout). A TLS failure returns an error matching
// [ErrAuthentication]; a peer that is not a weft server, or speaks another version, one
// matching [ErrProtocol]; other failures match [ErrUnreachable].
func Dial(ctx context.Context, ep endpoint.Endpoint, opts ClientOptions) (*Conn, error) {
	opts = opts.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, opts.HandshakeTimeout)
	defer cancel()
	nc, err := ep.Dial(ctx)
	if err != nil {
		return nil, handshakeError(ep.Address(), err)
	}
	c, err := newConn(ctx, nc, ep.Address(), opts)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// NewConn performs the client side of the weft handshake on an established connection and
// returns a Conn that owns nc. On error nc is closed. ctx bounds only the handshake.
func NewConn(ctx context.Context, nc net.Conn, opts ClientOptions) (*Conn, error) {
	opts = opts.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, opts.HandshakeTimeout)
	defer cancel()
	c, err := newConn(ctx, nc, nc.RemoteAddr().String(), opts)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

func newConn(ctx context.Context, nc net.Conn, addr string, opts ClientOptions) (*Conn, error) {
	br := bufio.NewReaderSize(nc, readBufferSize)
	peer, err := clientHandshake(ctx, nc, br, opts)
	if err != nil {
		return nil, handshakeError(addr, err)
	}
	c := &Conn{
		conn:   nc,
		opts:   opts,
		addr:   addr,
		peer:   peer,
		br:     br,
		slots:  make(chan struct{}, max(peer.maxConcurrent, 1)),
		closed: make(chan struct{}),
		drainc: make(chan struct{}),
		calls:  map[uint64]*clientCall{},
		nextID: 1,
	}
	c.free.alloc = newClientCall
	c.w = newWriter(nc, int(peer.maxFrame), opts.WriteFlattenLimit)
	c.w.onCall = c.register
	c.w.onError = c.writeFailed
	c.w.budget = int(peer.budget)
	setNotSentLowat(nc)
	if iv := c.keepaliveInterval(); iv > 0 {
		c.mu.Lock()
		c.ka = time.AfterFunc(iv, c.keepalive)
		c.mu.Unlock()
	}
	c.bgWake = make(chan struct{}, 1)
	c.interruptible = nc.SetReadDeadline(time.Time{}) == nil
	c.wakeFn = c.wake
	c.grace = time.AfterFunc(time.Hour, c.graceOver)
	c.grace.Stop()
	c.readerG.Add(1)
	go c.readLoop()
	return c, nil
}

// clientHandshake writes the client's hello and reads the server's.
func clientHandshake(ctx context.Context, nc net.Conn, br *bufio.Reader, opts ClientOptions) (hello, error) {
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if tc, ok := nc.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			return hello{}, err
		}
	}
	h := helloFromLimits(opts.Limits, 0, 0)
	var buf [helloPrefixLen + helloRestLen]byte
	if _, err := nc.Write(h.append(buf[:0])); err != nil {
		if _, ok := nc.(*tls.Conn); ok {
			// Under TLS 1.3 a server that rejects the client's certificate does so after the
			// client's handshake has returned: it sends an alert and closes, and the write may
			// fail first. The alert, waiting to be read, says why.
			if _, rerr := br.ReadByte(); rerr != nil && !errors.Is(rerr, io.EOF) {
				return hello{}, rerr
			}
		}
		return hello{}, err
	}
	peer, err := readHello(br)
	if err != nil {
		return hello{}, err
	}
	if peer.version != protocolV1 {
		return hello{}, fmt.Errorf("%w: server speaks protocol version %d, this client speaks %d", ErrProtocol, peer.version, protocolV1)
	}
	if err := ctx.Err(); err != nil {
		return hello{}, err
	}
	nc.SetDeadline(time.Time{})
	return peer, nil
}

// readHello reads a hello. For a version other than 1 it returns only the prefix fields.
func readHello(br *bufio.Reader) (hello, error) {
	var prefix [helloPrefixLen]byte
	if _, err := io.ReadFull(br, prefix[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return hello{}, fmt.Errorf("peer closed the connection during the handshake: %w", err)
		}
		return hello{}, err
	}
	version, features, rest, err := parseHelloPrefix(prefix[:])
	if err != nil {
		return hello{}, err
	}
	if version != protocolV1 {
		return hello{version: version, features: features}, nil
	}
	b := make([]byte, rest)
	if _, err := io.ReadFull(br, b); err != nil {
		return hello{}, fmt.Errorf("reading hello: %w", err)
	}
	return parseHelloRest(version, features, b)
}

// handshakeError classifies a dial or handshake failure.
func handshakeError(addr string, err error) error {
	var alert tls.AlertError
	var verr *tls.CertificateVerificationError
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	var cerr x509.CertificateInvalidError
	var operr *net.OpError
	msg := "connecting to " + addr
	switch {
	case errors.As(err, &alert), errors.As(err, &verr), errors.As(err, &uerr), errors.As(err, &herr), errors.As(err, &cerr),
		errors.As(err, &operr) && operr.Op == "remote error": // a TLS alert from the server
		return newError(ErrAuthentication, true, msg, err)
	case errors.Is(err, ErrProtocol):
		return newError(ErrProtocol, true, msg, err)
	default:
		return newError(ErrUnreachable, true, msg, err)
	}
}

func (c *Conn) keepaliveInterval() time.Duration {
	iv := c.opts.KeepaliveInterval
	if iv < 0 {
		return 0
	}
	if c.peer.idleMillis > 0 {
		iv = min(iv, time.Duration(c.peer.idleMillis)*time.Millisecond/2)
	}
	return max(iv, time.Millisecond)
}

// keepalive runs on the keepalive timer: it pings a silent connection and declares it dead
// when a ping goes unanswered.
func (c *Conn) keepalive() {
	c.mu.Lock()
	if c.closeErr != nil {
		c.mu.Unlock()
		return
	}
	switch {
	case c.recv.Swap(false):
		c.kaPinged = false
		c.ka.Reset(c.keepaliveInterval())
	case !c.kaPinged:
		c.kaPinged = true
		c.ka.Reset(c.opts.KeepaliveTimeout)
		c.mu.Unlock()
		c.w.control(framePing, c.pingID.Add(1), nil)
		return
	default:
		c.mu.Unlock()
		c.fail(fmt.Errorf("keepalive: no frame from %s for %v after a ping", c.addr, c.opts.KeepaliveTimeout))
		return
	}
	c.mu.Unlock()
}

// Ping sends a ping frame and waits for the server's pong. It returns the round-trip time, or
// an error if the connection closed or ctx ended first. A pong proves that the connection and
// the server's reader and writer work, not that a handler would run.
func (c *Conn) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	id, pong, err := c.startPing()
	if err != nil {
		return 0, err
	}
	select {
	case <-pong:
		return time.Since(start), nil
	case <-c.closed:
		c.cancelPing(id)
		return 0, newError(ErrCommunication, false, "ping "+c.addr, c.Err())
	case <-ctx.Done():
		c.cancelPing(id)
		return 0, ctxError(ctx, false)
	}
}

// startPing sends a ping and returns its id and a channel that is closed when its pong
// arrives. Unless it arrives, the caller must call cancelPing.
func (c *Conn) startPing() (uint64, <-chan struct{}, error) {
	id := c.pingID.Add(1)
	ch := make(chan struct{})
	c.mu.Lock()
	if c.closeErr != nil {
		err := c.closeErr
		c.mu.Unlock()
		return 0, nil, newError(ErrUnreachable, true, "ping "+c.addr, err)
	}
	if c.pings == nil {
		c.pings = map[uint64]chan struct{}{}
	}
	c.pings[id] = ch
	c.mu.Unlock()
	if !c.w.control(framePing, id, nil) {
		c.cancelPing(id)
		return 0, nil, newError(ErrUnreachable, true, "ping "+c.addr+": control queue full or connection closed", c.Err())
	}
	return id, ch, nil
}

// cancelPing forgets a ping whose pong is no longer awaited.
func (c *Conn) cancelPing(id uint64) {
	c.mu.Lock()
	delete(c.pings, id)
	c.mu.Unlock()
}

// Addr returns the address the connection was dialled at.
func (c *Conn) Addr() string { return c.addr }

// Done returns a channel that is closed when the connection has closed.
func (c *Conn) Done() <-chan struct{} { return c.closed }

// Err returns why the connection closed or is draining, or nil while it is open.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// Draining reports whether the connection accepts no new calls (the server sent a go-away, the
// request ids ran out, or it is closed).
func (c *Conn) Draining() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.draining || c.closeErr != nil
}

// InFlight returns the number of calls that occupy a server slot on this connection.
func (c *Conn) InFlight() int { return len(c.slots) }

// Load returns the load the server reported with its latest reply, or 0 if it has reported
// none; see [SetLoad].
func (c *Conn) Load() float64 { return float64(math.Float32frombits(c.load.Load())) }

// setDrainingLocked stops new calls.
//
// REQUIRES: c.mu is held.
func (c *Conn) setDrainingLocked() {
	if !c.draining {
		c.draining = true
		close(c.drainc)
	}
}

// drain stops new calls and closes the connection once every caller inside Call has returned.
// A go-away from the server does the same.
func (c *Conn) drain() {
	c.mu.Lock()
	if !c.draining {
		c.localDrain = true
	}
	c.setDrainingLocked()
	c.idle.Store(true)
	c.mu.Unlock()
	if c.active.Load() == 0 {
		c.closeIfIdle()
	}
}

// undrain reverses drain if the connection is still open and nothing else (a go-away, running
// out of request ids) stops new calls. It reports whether the connection takes calls again.
func (c *Conn) undrain() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.localDrain || c.goAway || c.idsOut || c.closeErr != nil || isClosed(c.closed) {
		return false
	}
	c.localDrain, c.draining = false, false
	c.idle.Store(false)
	c.drainc = make(chan struct{})
	return true
}

// drainChan returns a channel that is closed when the connection stops taking new calls.
func (c *Conn) drainChan() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.drainc
}

// leave is deferred by every Call that counted itself in active.
func (c *Conn) leave() {
	if c.active.Add(-1) == 0 && c.idle.Load() {
		c.closeIfIdle()
	}
}

// closeIfIdle closes a draining connection that no caller is using.
func (c *Conn) closeIfIdle() {
	c.mu.Lock()
	if !c.idle.Load() || c.active.Load() != 0 || c.closeErr != nil && isClosed(c.closed) {
		c.mu.Unlock()
		return
	}
	if c.closeErr == nil {
		c.closeErr = errConnDrained // decided under mu, so undrain cannot revive it
	}
	c.mu.Unlock()
	c.fail(errConnDrained)
}

var errConnDrained = fmt.Errorf("%w: connection drained", ErrClosed)

// admit reports whether the connection takes new calls and returns the channel that is closed
// when it stops.
func (c *Conn) admit() (<-chan struct{}, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.drainc, !c.draining && c.closeErr == nil
}

// Close closes the connection: calls in progress fail with ErrCommunication (or
// ErrUnreachable if their request was not sent in full), and later calls fail at once. Close
// waits for the connection's goroutines to exit. It can be called more than once.
func (c *Conn) Close() {
	c.fail(ErrClosed)
	c.readerG.Wait()
	c.w.wg.Wait()
}

// writeFailGrace is how long a connection whose write failed keeps reading before it fails
// its calls: a server that drained and closed sent a go-away first, which tells which calls it
// never took in.
const writeFailGrace = time.Second

// writeFailed handles the writer's failure: no new calls; the reader goes on until the peer's
// end (a go-away may be on its way), for at most writeFailGrace, and then the calls still
// waiting fail.
func (c *Conn) writeFailed(err error) {
	reason := fmt.Errorf("writing to %s: %w", c.addr, err)
	c.mu.Lock()
	defer c.mu.Unlock()
	if isClosed(c.closed) || c.wfTimer != nil {
		return
	}
	if c.closeErr == nil {
		c.closeErr = reason
	}
	c.setDrainingLocked()
	c.wfTimer = time.AfterFunc(writeFailGrace, func() { c.fail(reason) })
}

// fail closes the connection for reason; the first reason wins. The reader, whose read then
// fails, ends the calls still waiting: only the reader finishes calls of the table, so a reply
// it is reading is never ended twice.
func (c *Conn) fail(reason error) {
	c.mu.Lock()
	if isClosed(c.closed) {
		c.mu.Unlock()
		return
	}
	if c.closeErr == nil {
		c.closeErr = reason
	}
	c.setDrainingLocked()
	close(c.closed)
	ka, wf := c.ka, c.wfTimer
	c.mu.Unlock()
	if ka != nil {
		ka.Stop()
	}
	if wf != nil {
		wf.Stop()
	}
	c.w.close(errWriterClosed)
	c.conn.Close()
	// A free read role goes back to the background reader, which sees the end.
	c.roleMu.Lock()
	if c.roleFree {
		c.roleFree = false
		c.bgWake <- struct{}{}
	}
	c.roleMu.Unlock()
}

// failAll completes every registered call with the connection's failure.
func (c *Conn) failAll() {
	c.callsMu.Lock()
	calls := c.calls
	c.calls = map[uint64]*clientCall{}
	c.callsMu.Unlock()
	for _, cc := range calls {
		c.finish(cc, nil, nil, true, false)
	}
}

// register assigns the next request id to a call and records it, so that ids reach the wire in
// increasing order.
//
// REQUIRES: c.w.mu is held.
func (c *Conn) register(m *outMsg) error {
	cc := m.call
	c.callsMu.Lock()
	defer c.callsMu.Unlock()
	if c.exhausted {
		return errIDsExhausted
	}
	id := c.nextID
	c.nextID++
	if c.nextID >= maxRequestID {
		c.exhausted = true
	}
	m.id = id
	c.calls[id] = cc
	return nil
}

var errIDsExhausted = errors.New("request ids exhausted; a new connection is needed")

// Call implements [Connection].
func (c *Conn) Call(ctx context.Context, key MethodKey, args []byte, opts CallOptions) ([]byte, error) {
	if ctx.Err() != nil {
		return nil, markLocal(ctxError(ctx, true))
	}
	var deadline time.Duration
	d, hasDeadline := ctx.Deadline()
	if hasDeadline {
		if deadline = time.Until(d); deadline <= 0 {
			return nil, &callError{category: context.DeadlineExceeded, neverRan: true, local: true, msg: "deadline expired before sending"}
		}
	}
	if len(args) > int(c.peer.maxMessage) {
		return nil, markLocal(newError(ErrMessageTooLarge, true, fmt.Sprintf("request of %d bytes exceeds the server's limit of %d", len(args), c.peer.maxMessage), nil))
	}
	c.active.Add(1)
	defer c.leave()
	drainc, ok := c.admit()
	if !ok {
		return nil, unsentError(ErrUnreachable, "connection to "+c.addr+" is closed or draining", c.Err())
	}

	// Wait for a slot on the server.
	select {
	case c.slots <- struct{}{}:
	default:
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, ctxError(ctx, true)
		case <-drainc:
			return nil, unsentError(ErrUnreachable, "connection to "+c.addr+" is closed or draining", c.Err())
		}
	}

	cc := c.getCall()
	var span trace.Span
	if c.opts.Tracer != nil {
		ctx, span = c.opts.Tracer.Start(ctx, "weft.call", trace.WithSpanKind(trace.SpanKindClient))
		defer span.End()
	}
	if err := c.encodeHeader(ctx, cc, key, opts.Signature, hasDeadline, deadline, len(args)); err != nil {
		<-c.slots
		c.putCall(cc)
		return nil, markLocal(err)
	}
	cc.msg.typ = frameCall
	cc.msg.head = cc.hdr
	cc.msg.payload = args
	cc.msg.cancel = ctx.Done()
	cc.ownRead = cc.msg.cancel == nil || c.interruptible
	if hasDeadline {
		cc.msg.deadline = d
	}
	written, err := c.w.send(&cc.msg)
	if err != nil {
		// Not queued: the connection is closed or out of request ids.
		<-c.slots
		c.putCall(cc)
		if err == errIDsExhausted {
			c.mu.Lock()
			c.idsOut = true
			c.setDrainingLocked()
			c.idle.Store(true)
			c.mu.Unlock()
		} else {
			err = c.Err()
		}
		return nil, unsentError(ErrUnreachable, "connection to "+c.addr, err)
	}

	if c.takeRole(ctx) {
		// No one reads. A caller whose request is written reads its reply here, if its
		// context cannot end or the connection can wake it when it does; otherwise the reader
		// goroutine reads it.
		if !cc.ownRead || !written {
			c.giveRoleToReader()
		} else if c.readOwn(cc) {
			return c.complete(cc)
		}
	}
	for {
		select {
		case <-cc.done:
			return c.complete(cc)
		case <-cc.msg.sig:
			// The writer role was handed to us, or our request was written.
			c.w.woken(&cc.msg)
		case <-ctx.Done():
			return c.abandon(ctx, cc)
		}
	}
}

// encodeHeader encodes the call header into cc.hdr, checking the server's limits.
func (c *Conn) encodeHeader(ctx context.Context, cc *clientCall, key MethodKey, sig uint64, hasDeadline bool, deadline time.Duration, n int) error {
	h := callHeader{key: key, signature: sig, total: uint32(n)}
	if hasDeadline {
		h.flags |= callDeadline
		h.deadline = uint64(deadline)
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		h.flags |= callTrace
		h.traceID = sc.TraceID()
		h.spanID = sc.SpanID()
		h.traceFlags = byte(sc.TraceFlags())
		if ts := sc.TraceState(); ts.Len() > 0 {
			h.tracestate = ts.String()
			if len(h.tracestate) > int(c.peer.tracestate) {
				return newError(ErrMessageTooLarge, true, fmt.Sprintf("tracestate of %d bytes exceeds the server's limit of %d", len(h.tracestate), c.peer.tracestate), nil)
			}
		}
	}
	if md := outgoingMetadata(ctx); len(md) > 0 {
		if len(md) > int(c.peer.mdEntries) {
			return newError(ErrMessageTooLarge, true, fmt.Sprintf("%d metadata entries exceed the server's limit of %d", len(md), c.peer.mdEntries), nil)
		}
		size := 0
		for k, v := range md {
			size += len(k) + len(v)
			if len(k) > 0xFFFF || len(v) > 0xFFFF {
				return newError(ErrMessageTooLarge, true, "a metadata key or value exceeds 65535 bytes", nil)
			}
		}
		if size > int(c.peer.mdBytes) {
			return newError(ErrMessageTooLarge, true, fmt.Sprintf("metadata of %d bytes exceeds the server's limit of %d", size, c.peer.mdBytes), nil)
		}
		h.flags |= callMetadata
		h.md = md
	}
	if hl := callHeaderLen(&h); hl > int(c.peer.maxFrame) {
		return newError(ErrMessageTooLarge, true, fmt.Sprintf("call header of %d bytes exceeds the server's max frame size %d", hl, c.peer.maxFrame), nil)
	}
	cc.hdr = appendCallHeader(cc.hdr[:0], &h)
	return nil
}

// complete returns the outcome of a call whose terminal frame (or failure) arrived.
func (c *Conn) complete(cc *clientCall) ([]byte, error) {
	sentAny, sentAll := c.w.withdraw(&cc.msg)
	if sentAny && !sentAll && !cc.connDown {
		// The server answered before the request was complete: tell it to drop the rest.
		c.w.control(frameCancel, cc.msg.id, nil)
	}
	result, err := cc.result, cc.err
	if err == nil && !cc.connDown && cc.in.chunked() {
		// A large reply collected in chunks: the caller copies it into the buffer it owns.
		result = cc.in.assemble(allocResult)
	}
	if cc.connDown {
		err = c.downError(cc.msg.id, sentAll)
	}
	c.putCall(cc)
	return result, err
}

// downError classifies a call that was in progress when the connection failed or drained.
func (c *Conn) downError(id uint64, sentAll bool) error {
	c.mu.Lock()
	reason, lastAccepted, goAway := c.closeErr, c.lastAccepted, c.goAway
	c.mu.Unlock()
	switch {
	case goAway && id > lastAccepted:
		return unsentError(ErrRefused, fmt.Sprintf("server %s is draining (go-away after request %d)", c.addr, lastAccepted), reason)
	case !sentAll:
		return unsentError(ErrUnreachable, "connection to "+c.addr+" failed before the request was sent", reason)
	default:
		return newError(ErrCommunication, false, "connection to "+c.addr+" failed", reason)
	}
}

// abandon ends a call whose context is done.
func (c *Conn) abandon(ctx context.Context, cc *clientCall) ([]byte, error) {
	sentAny, _ := c.w.withdraw(&cc.msg)
	c.callsMu.Lock()
	select {
	case <-cc.done:
		// The outcome arrived meanwhile: use it.
		c.callsMu.Unlock()
		return c.complete(cc)
	default:
	}
	if !sentAny {
		// The server has not seen it: forget it and free the slot. cc is not recycled: a
		// server that answers ids it was never sent could have the reader holding it still.
		delete(c.calls, cc.msg.id)
		c.callsMu.Unlock()
		<-c.slots
		return nil, ctxError(ctx, true)
	}
	// The server knows it: cancel it there. Its terminal frame frees the slot and recycles cc.
	cc.abandoned = true
	id := cc.msg.id
	c.callsMu.Unlock()
	c.w.control(frameCancel, id, nil)
	return nil, ctxError(ctx, false)
}

// finish delivers the outcome of a call (from the reader or failAll), or recycles an abandoned
// call. connDown marks a connection failure or go-away, to be classified by the caller with
// downError. freeSlot frees the call's slot: a terminal frame from the server, or a go-away
// that refuses the call, ends its use of the server.
func (c *Conn) finish(cc *clientCall, result []byte, err error, connDown, freeSlot bool) {
	if freeSlot {
		<-c.slots
	}
	c.w.answered(&cc.msg)
	c.lastOwnRead = cc.ownRead
	c.callsMu.Lock()
	if cc.abandoned {
		c.callsMu.Unlock()
		c.putCall(cc)
		return
	}
	cc.result, cc.err, cc.connDown = result, err, connDown
	cc.done <- struct{}{}
	c.callsMu.Unlock()
}

// take removes the call with id from the table and returns it, or nil.
func (c *Conn) take(id uint64) *clientCall {
	c.callsMu.Lock()
	defer c.callsMu.Unlock()
	cc := c.calls[id]
	if cc != nil {
		delete(c.calls, id)
	}
	return cc
}

// lookup returns the call with id, or nil.
func (c *Conn) lookup(id uint64) *clientCall {
	c.callsMu.Lock()
	defer c.callsMu.Unlock()
	return c.calls[id]
}

// readLoop reads frames until the connection fails.
func (c *Conn) readLoop() {
	defer c.readerG.Done()
	var err error
	for {
		if err = c.read(); err != errReleased {
			break
		}
		<-c.bgWake
	}
	c.grace.Stop()
	c.roleMu.Lock()
	c.forgetWatchLocked()
	c.roleMu.Unlock()
	// Replies cut off by the failure give back their up-front reservations.
	upfrontInUse.Add(-int64(c.upfront))
	c.upfront = 0
	c.fail(err)
	// The writer is closed: no call can be registered any more.
	c.failAll()
}

// outstanding returns the number of calls waiting for their outcome.
func (c *Conn) outstanding() int {
	c.callsMu.Lock()
	defer c.callsMu.Unlock()
	return len(c.calls)
}

// isCallFrame reports whether frames of type typ belong to a call's reply.
func isCallFrame(typ byte) bool {
	return typ == frameReply || typ == frameData || typ == frameError
}

// errReleased is returned by read when the background reader released the read role.
var errReleased = errors.New("read role released")

// graceLimit is how long a read role left free waits for callers before the background
// reader takes it back (to see pings, go-aways and the connection's end while no call waits):
// between one and two graceLimits.
const graceLimit = time.Millisecond

// releaseRole gives up the read role: to the background reader if calls are outstanding (their
// callers wait for it to read their replies), else it stays free for the next caller.
//
// REQUIRES: the caller holds the read role.
func (c *Conn) releaseRole() {
	outstanding := c.outstanding()
	c.roleMu.Lock()
	c.dropHoldLocked()
	if outstanding > 0 || isClosed(c.closed) {
		c.bgWake <- struct{}{}
	} else {
		c.freeRoleLocked()
	}
	c.roleMu.Unlock()
}

// freeRoleLocked leaves the read role free, for graceLimit or so.
//
// REQUIRES: c.roleMu is held.
func (c *Conn) freeRoleLocked() {
	c.roleFree = true
	if !c.graceArmed {
		// The timer is not set at every release (each setting can wake the runtime's network
		// poller, a thread switch per call): it ticks while the role changes hands, and ends
		// the grace after a whole tick with the role free.
		c.graceArmed = true
		c.graceSeen = c.roleTakes
		c.grace.Reset(graceLimit)
	}
}

// giveRoleToReader hands the read role to the background reader.
//
// REQUIRES: the caller holds the read role.
func (c *Conn) giveRoleToReader() {
	c.roleMu.Lock()
	c.dropHoldLocked()
	c.bgWake <- struct{}{}
	c.roleMu.Unlock()
}

// dropHoldLocked ends a caller's hold on the read role. The watch of its context is kept only
// if the hold before had the same context (callers sharing one context pay for its watch
// once); the read deadline moved by an interruption is cleared.
//
// REQUIRES: c.roleMu is held, and the caller holds the read role.
func (c *Conn) dropHoldLocked() {
	var done <-chan struct{}
	if c.ownCtx != nil {
		done = c.ownCtx.Done()
	}
	if done == nil || done != c.prevDone {
		c.stopWatchLocked()
	}
	c.prevDone = done
	c.callerHolds = false
	c.ownCtx = nil
	if c.interrupted {
		c.conn.SetReadDeadline(time.Time{})
		c.interrupted = false
	}
}

// stopWatchLocked ends the watch of a caller's context.
//
// REQUIRES: c.roleMu is held.
func (c *Conn) stopWatchLocked() {
	if c.watchStop != nil {
		c.watchStop()
		c.watchDone, c.watchStop = nil, nil
	}
}

// forgetWatchLocked ends the watch and forgets the last holder's context, for a role that
// goes back to the background reader.
//
// REQUIRES: c.roleMu is held.
func (c *Conn) forgetWatchLocked() {
	c.stopWatchLocked()
	c.prevDone = nil
}

// takeRole takes a free read role for the caller whose context is ctx. If ctx can end, it is
// watched: when it ends, wake interrupts the caller's read.
func (c *Conn) takeRole(ctx context.Context) bool {
	c.roleMu.Lock()
	defer c.roleMu.Unlock()
	if !c.roleFree {
		return false
	}
	c.roleFree = false
	c.roleTakes++
	c.callerHolds = true
	if done := ctx.Done(); done != nil {
		c.ownCtx = ctx
		if done != c.watchDone && c.interruptible {
			c.stopWatchLocked()
			c.watchDone, c.watchStop = done, context.AfterFunc(ctx, c.wakeFn)
		}
	}
	return true
}

// graceOver runs on the grace timer, which ticks every graceLimit while callers take the role:
// a role free since the last tick goes back to the background reader.
func (c *Conn) graceOver() {
	c.roleMu.Lock()
	defer c.roleMu.Unlock()
	switch {
	case c.roleFree && c.roleTakes == c.graceSeen:
		c.roleFree = false
		c.graceArmed = false
		c.forgetWatchLocked()
		c.bgWake <- struct{}{}
	case !c.roleFree && !c.callerHolds:
		// The background reader has it.
		c.graceArmed = false
		c.forgetWatchLocked()
	default:
		c.graceSeen = c.roleTakes
		c.grace.Reset(graceLimit)
	}
}

// wake runs when a watched context ends: if the caller holding the read role has a context
// that ended (not necessarily the one watched: a watch may end as another begins), its read
// is interrupted. The read fails with a timeout, and the caller hands the role to the
// background reader and returns.
func (c *Conn) wake() {
	c.roleMu.Lock()
	defer c.roleMu.Unlock()
	if c.callerHolds && c.ownCtx != nil && !c.interrupted && c.ownCtx.Err() != nil {
		c.interrupted = true
		c.conn.SetReadDeadline(time.Unix(1, 0))
	}
}

// read reads frames while it holds the read role: until the connection fails, or it releases
// the role (errReleased).
func (c *Conn) read() error {
	maxFrame := c.opts.Limits.MaxFrameSize
	// The role is released only after a call's frame was handled: given the role with nothing
	// to do, or after a ping, pong or go-away, the reader waits for the connection's next frame
	// or end.
	handled := false
	for {
		if handled && c.br.Buffered() == 0 && c.outstanding() == 0 {
			c.roleMu.Lock()
			if !isClosed(c.closed) {
				c.freeRoleLocked()
				c.roleMu.Unlock()
				return errReleased
			}
			c.roleMu.Unlock()
		}
		hb, err := c.br.Peek(headerSize)
		if err != nil {
			return readError(err)
		}
		h, err := parseHeader(hb, maxFrame)
		if err != nil {
			return err
		}
		c.br.Discard(headerSize)
		c.recv.Store(true)
		if err := c.frame(h); err != nil {
			return err
		}
		// Only a call's frame lets the role go, when that call's caller could have read it
		// (and may soon make the next such call).
		handled = isCallFrame(h.typ) && c.lastOwnRead
	}
}

// readOwn reads frames on the caller's goroutine, holding the read role, until cc's outcome
// arrives. If its caller's context can end, wake interrupts the read when it does. It
// reads only frames that are whole in the buffer and belong to a call's reply, so that it never
// stops in the middle of a frame. At any other frame, or a read error (a deadline among them),
// it hands the role to the background reader and reports false; the caller then waits for
// its outcome or its context as any other. It has given up the role when it returns.
func (c *Conn) readOwn(cc *clientCall) bool {
	maxFrame := c.opts.Limits.MaxFrameSize
	for {
		select {
		case <-cc.done:
			c.releaseRole()
			return true
		default:
		}
		hb, err := c.br.Peek(headerSize)
		var h frameHeader
		if err == nil {
			h, err = parseHeader(hb, maxFrame)
		}
		if err != nil || !isCallFrame(h.typ) || c.br.Buffered() < headerSize+int(h.length) {
			// The background reader reads it (and meets the error again).
			c.giveRoleToReader()
			return false
		}
		c.br.Discard(headerSize)
		c.recv.Store(true)
		if err := c.frame(h); err != nil {
			c.fail(err)
			c.giveRoleToReader()
			return false
		}
	}
}

// frame handles a frame whose header was read.
//
// REQUIRES: the caller holds the read role.
func (c *Conn) frame(h frameHeader) error {
	n := int(h.length)
	var err error
	switch h.typ {
	case frameReply:
		if err := c.onReply(h); err != nil {
			return err
		}
	case frameData:
		if err := c.onData(h); err != nil {
			return err
		}
	case frameError:
		if c.rscratch, err = c.readPayload(c.rscratch, n); err != nil {
			return err
		}
		body, err := parseErrorBody(c.rscratch[:n])
		if err != nil {
			return err
		}
		if cc := c.take(h.id); cc != nil {
			// The error may end a partly received reply: give back its reservation.
			cc.in.end(&c.upfront)
			c.finish(cc, nil, errorFromWire(body), false, true)
		}
	case framePing:
		if !c.w.controlWait(framePong, h.id, nil) {
			return fmt.Errorf("%w: server %s floods pings", ErrProtocol, c.addr)
		}
	case framePong:
		c.mu.Lock()
		if ch, ok := c.pings[h.id]; ok {
			delete(c.pings, h.id)
			close(ch)
		}
		c.mu.Unlock()
	case frameGoAway:
		if c.rscratch, err = c.readPayload(c.rscratch, n); err != nil {
			return err
		}
		if err := c.onGoAway(h.id, c.rscratch[:n]); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: unexpected frame type %#x from server", ErrProtocol, h.typ)
	}
	return nil
}

func (c *Conn) readPayload(scratch []byte, n int) ([]byte, error) {
	if cap(scratch) < n {
		scratch = make([]byte, n)
	}
	if _, err := io.ReadFull(c.br, scratch[:n]); err != nil {
		return scratch, readError(err)
	}
	return scratch, nil
}

// onReply handles the first frame of a reply.
func (c *Conn) onReply(h frameHeader) error {
	n := int(h.length)
	if n < replyHdrLen {
		return fmt.Errorf("%w: reply frame of %d bytes", ErrProtocol, n)
	}
	rh := c.rh[:]
	if _, err := io.ReadFull(c.br, rh); err != nil {
		return readError(err)
	}
	hdr, _, _ := parseReplyHeader(rh)
	c.load.Store(math.Float32bits(hdr.load))
	n -= replyHdrLen
	total := int(hdr.total)
	end := h.flags&flagEnd != 0
	if n > total || end && n != total {
		return fmt.Errorf("%w: reply %d declares %d bytes but carries %d", ErrProtocol, h.id, total, n)
	}
	cc := c.lookup(h.id)
	if cc == nil || cc.started {
		if cc != nil {
			return fmt.Errorf("%w: second reply for request %d", ErrProtocol, h.id)
		}
		_, err := c.br.Discard(n)
		return readError(err)
	}
	cc.started = true
	cc.in.total = total
	if total > c.opts.Limits.MaxMessageSize {
		cc.skipping = true
		if end {
			if c.take(h.id) != nil {
				c.finish(cc, nil, newError(ErrMessageTooLarge, false, fmt.Sprintf("reply of %d bytes exceeds the client's limit of %d", total, c.opts.Limits.MaxMessageSize), nil), false, true)
			}
		}
		_, err := c.br.Discard(n)
		return readError(err)
	}
	if end {
		result := make([]byte, n)
		if _, err := io.ReadFull(c.br, result); err != nil {
			return readError(err)
		}
		if c.take(h.id) != nil {
			c.finish(cc, result, nil, false, true)
		}
		return nil
	}
	cc.in.begin(total, &c.upfront, false)
	return readError(cc.in.read(c.br, n))
}

// onData handles a continuation frame of a reply.
func (c *Conn) onData(h frameHeader) error {
	n := int(h.length)
	cc := c.lookup(h.id)
	if cc == nil || !cc.started {
		if cc != nil {
			return fmt.Errorf("%w: data before reply for request %d", ErrProtocol, h.id)
		}
		_, err := c.br.Discard(n)
		return readError(err)
	}
	end := h.flags&flagEnd != 0
	got, total := cc.in.n, cc.in.total
	if cc.skipping {
		if _, err := c.br.Discard(n); err != nil {
			return readError(err)
		}
		if end {
			if c.take(h.id) != nil {
				c.finish(cc, nil, newError(ErrMessageTooLarge, false, fmt.Sprintf("reply of %d bytes exceeds the client's limit of %d", total, c.opts.Limits.MaxMessageSize), nil), false, true)
			}
		}
		return nil
	}
	if got+n > total || end && got+n != total {
		return fmt.Errorf("%w: reply %d declares %d bytes but carries %d", ErrProtocol, h.id, total, got+n)
	}
	if err := cc.in.read(c.br, n); err != nil {
		return readError(err)
	}
	if !end {
		return nil
	}
	cc.in.end(&c.upfront)
	if c.take(h.id) != nil {
		var result []byte
		if !cc.in.chunked() {
			result = cc.in.assemble(nil)
		}
		c.finish(cc, result, nil, false, true)
	}
	return nil
}

// onGoAway handles a go-away: calls above the last accepted id fail as never run, and no new
// calls start. A non-zero close code is the reason the server is closing the connection.
func (c *Conn) onGoAway(lastID uint64, body []byte) error {
	if len(body) < 1 {
		return fmt.Errorf("%w: empty go-away", ErrProtocol)
	}
	code, msg := body[0], string(body[1:min(len(body), maxErrorMsg+1)])
	var reason error
	switch code {
	case closeDrain:
	case closeIdle, closeStopping:
		reason = fmt.Errorf("server closed the connection: %s (code %d)", msg, code)
	default:
		reason = fmt.Errorf("%w: server closed the connection: %s (code %d)", ErrProtocol, msg, code)
	}
	c.mu.Lock()
	if c.closeErr == nil {
		c.closeErr = reason
	}
	c.setDrainingLocked()
	c.goAway = true
	c.lastAccepted = lastID
	c.idle.Store(true) // closed once the calls it accepted are answered
	c.mu.Unlock()
	if c.active.Load() == 0 {
		defer c.closeIfIdle()
	}

	// Fail the calls the server will not run.
	c.callsMu.Lock()
	var refused []*clientCall
	for id, cc := range c.calls {
		if id > lastID {
			delete(c.calls, id)
			refused = append(refused, cc)
		}
	}
	c.callsMu.Unlock()
	for _, cc := range refused {
		c.finish(cc, nil, nil, true, true) // classified by downError as refused
	}
	c.opts.Logger.Debug("weft: go-away from server", slog.String("addr", c.addr), slog.Uint64("last_id", lastID), slog.Int("code", int(code)))
	return nil
}

// readError converts a read failure into the connection's close reason.
func readError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("connection closed by peer: %w", err)
	}
	return err
}

// allocResult allocates a reply buffer that the caller owns.
func allocResult(n int) []byte { return make([]byte, n) }

// endMessage returns a reservation made by inbound.begin.
func endMessage(upfront *int, reserved int) {
	if reserved > 0 {
		*upfront -= reserved
		upfrontInUse.Add(-int64(reserved))
	}
}

// upfrontInUse is the sum of up-front reservations of all connections in the process, so that
// many connections cannot each pin their allowance with a few bytes declaring large messages.
var upfrontInUse atomic.Int64

const (
	readBufferSize      = 4 << 10
	upfrontAllowance    = 1 << 20
	upfrontProcessLimit = 64 << 20
)
