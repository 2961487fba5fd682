package call

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Listener accepts connections to serve, each with the handlers to serve it with.
type Listener interface {
	// Accept waits for and returns the next connection and its handlers.
	Accept() (net.Conn, *HandlerMap, error)
	// Close closes the listener; a blocked Accept returns an error.
	Close() error
	// Addr returns the listener's network address.
	Addr() net.Addr
}

type netListener struct {
	net.Listener
	hm *HandlerMap
}

// NetListener returns a Listener that accepts connections from l and serves them with hm.
// Connections from a [crypto/tls] listener get their TLS handshake, bounded by
// ServerOptions.HandshakeTimeout, on the connection's own goroutine.
func NetListener(l net.Listener, hm *HandlerMap) Listener { return &netListener{l, hm} }

func (l *netListener) Accept() (net.Conn, *HandlerMap, error) {
	c, err := l.Listener.Accept()
	return c, l.hm, err
}

// Serve accepts connections from l and serves each on its own goroutine until ctx is done or
// Accept fails. It always returns a non-nil error and closes l.
//
// Cancelling ctx starts a graceful drain: l is closed, every connection is sent a go-away,
// calls in flight get up to ServerOptions.DrainTimeout to finish, and then the remaining
// connections are closed (a hard stop; with a negative DrainTimeout the hard stop is
// immediate). Serve returns after every connection is closed and every handler has returned,
// with an error wrapping ctx's cause. If Accept fails for a reason other than a transient one,
// Serve drains the same way and returns that error.
func Serve(ctx context.Context, l Listener, opts ServerOptions) error {
	opts = opts.withDefaults()
	ll := &logLimiter{}
	connCtx, stopConns := context.WithCancelCause(ctx)
	defer stopConns(nil)
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	for {
		conn, hm, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				l.Close()
				stopConns(context.Cause(ctx))
				return fmt.Errorf("call: serve: %w", context.Cause(ctx))
			}
			if isTransientAcceptError(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				opts.Logger.Warn("weft: accept failed; retrying", slog.Any("err", err), slog.Duration("backoff", backoff))
				t := time.NewTimer(backoff)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
				}
				continue
			}
			l.Close()
			stopConns(err)
			return fmt.Errorf("call: serve: accept: %w", err)
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveConn(connCtx, conn, hm, &opts, ll)
		}()
	}
}

func isTransientAcceptError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// ServeOn serves calls arriving on conn with the handlers in hm. It returns only after conn is
// closed and every handler it started has returned. Cancelling ctx drains the connection as
// [Serve] does.
func ServeOn(ctx context.Context, conn net.Conn, hm *HandlerMap, opts ServerOptions) {
	opts = opts.withDefaults()
	serveConn(ctx, conn, hm, &opts, &logLimiter{})
}

// serverConn is the server side of one connection.
type serverConn struct {
	conn    net.Conn
	hm      *HandlerMap
	opts    *ServerOptions
	lim     *Limits
	log     *logLimiter
	peer    hello
	w       *writer
	br      *bufio.Reader
	ctx     context.Context // parent of every handler's context: values and the peer
	addr    string
	recv    atomic.Bool    // a frame arrived since the last idle tick
	wg      sync.WaitGroup // reader and handler goroutines other than serveConn's own
	inline  time.Duration
	upfront int // declared bytes of requests allocated in full; owned by the reader
	msgs    freeList[outMsg]
	pings   tokenBucket // owned by the reader

	mu sync.Mutex
	// guarded by mu
	calls        map[uint64]*serverCall // received and not finished: partial, running, or skipped
	lastID       uint64                 // highest request id received
	running      int                    // calls holding a slot: from CALL until the handler returns
	active       int                    // handlers started whose terminal frame is not yet written
	skipping     int                    // refused calls whose remaining frames are being skipped
	partialBytes int                    // bytes of requests still being received
	heldBytes    int                    // bytes of assembled requests whose handlers run
	budgetCond   sync.Cond              // signalled when bytes are freed or the connection closes
	seen         uint64                 // calls received
	lateCancels  uint64                 // cancels for finished calls
	draining     bool
	goAwayID     uint64
	closing      *closeRequest // a close the reader must carry out
	closed       bool
	closedCh     chan struct{} // closed by shutdown
	idle         *time.Timer
	drainTimer   *time.Timer
}

type closeRequest struct {
	code    int // GOAWAY close code, or -1 for no go-away
	reason  error
	drained bool
}

func serveConn(ctx context.Context, conn net.Conn, hm *HandlerMap, opts *ServerOptions, ll *logLimiter) {
	peer, pinfo, err := serverHandshake(ctx, conn, opts)
	if err != nil {
		conn.Close()
		ll.log(opts.Logger, "weft: handshake failed", slog.String("peer", remoteAddr(conn)), slog.Any("err", err))
		return
	}
	if hm == nil {
		hm = &HandlerMap{}
	}
	s := &serverConn{
		conn:     conn,
		hm:       hm,
		opts:     opts,
		lim:      &opts.Limits,
		log:      ll,
		peer:     peer,
		br:       bufio.NewReaderSize(conn, readBufferSize),
		ctx:      context.WithValue(context.WithoutCancel(ctx), peerKey{}, pinfo),
		addr:     remoteAddr(conn),
		calls:    map[uint64]*serverCall{},
		inline:   opts.InlineHandlerDuration,
		closedCh: make(chan struct{}),
	}
	s.budgetCond.L = &s.mu
	s.pings = tokenBucket{tokens: pingBurst, burst: pingBurst, rate: pingRate}
	s.msgs.alloc = newOutMsg
	s.w = newWriter(conn, int(peer.maxFrame), opts.WriteFlattenLimit)
	s.w.onError = func(err error) { s.shutdown(fmt.Errorf("writing: %w", err)) }
	setNotSentLowat(conn)
	if opts.IdleTimeout > 0 {
		s.mu.Lock()
		s.idle = time.AfterFunc(opts.IdleTimeout, s.idleTick)
		s.mu.Unlock()
	}
	s.wg.Add(1)
	stopDrain := context.AfterFunc(ctx, func() {
		defer s.wg.Done()
		s.drain()
	})

	s.newReader().loop()

	// The first reader may have handed reading to another goroutine; the connection lives on
	// until it is closed.
	<-s.closedCh
	if stopDrain() {
		s.wg.Done()
	}
	s.wg.Wait()
	s.w.wg.Wait()
	// Requests cut off by the close give back their up-front reservations.
	upfrontInUse.Add(-int64(s.upfront))
	s.mu.Lock()
	if s.idle != nil {
		s.idle.Stop()
	}
	if s.drainTimer != nil {
		s.drainTimer.Stop()
	}
	s.mu.Unlock()
}

// serverHandshake reads the client's hello and answers it. No connection state (buffers,
// goroutines, call tables) exists until the client has proven it speaks weft.
func serverHandshake(ctx context.Context, conn net.Conn, opts *ServerOptions) (hello, *Peer, error) {
	conn.SetDeadline(time.Now().Add(opts.HandshakeTimeout))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	pinfo := &Peer{Addr: conn.RemoteAddr()}
	if tc, ok := conn.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			return hello{}, nil, newError(ErrAuthentication, true, "TLS handshake", err)
		}
		st := tc.ConnectionState()
		pinfo.TLS = &st
	}
	var prefix [helloPrefixLen]byte
	if _, err := io.ReadFull(conn, prefix[:]); err != nil {
		return hello{}, nil, fmt.Errorf("reading hello: %w", err)
	}
	version, _, rest, err := parseHelloPrefix(prefix[:])
	if err != nil {
		return hello{}, nil, err
	}
	idle := uint32(0)
	if opts.IdleTimeout > 0 {
		idle = uint32(min(opts.IdleTimeout.Milliseconds(), math.MaxUint32))
	}
	own := helloFromLimits(opts.Limits, opts.Limits.MaxConcurrentCalls, idle)
	var out [helloPrefixLen + helloRestLen]byte
	var buf [helloMaxRest]byte
	if _, err := io.ReadFull(conn, buf[:rest]); err != nil {
		return hello{}, nil, fmt.Errorf("reading hello: %w", err)
	}
	if version != protocolV1 {
		// Answer with our version, having read all the client wrote, so that the client can
		// report the mismatch (an unbuffered transport would deadlock otherwise).
		conn.Write(own.append(out[:0]))
		return hello{}, nil, fmt.Errorf("%w: client speaks protocol version %d, this server speaks %d", ErrProtocol, version, protocolV1)
	}
	peer, err := parseHelloRest(version, prefix[5], buf[:rest])
	if err != nil {
		return hello{}, nil, err
	}
	if _, err := conn.Write(own.append(out[:0])); err != nil {
		return hello{}, nil, fmt.Errorf("writing hello: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return hello{}, nil, err
	}
	conn.SetDeadline(time.Time{})
	return peer, pinfo, nil
}

func remoteAddr(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

// readerState is one reader goroutine's state. A reader that runs a handler inline and is
// handed off keeps its scratch buffer (the handler's arguments may live there).
type readerState struct {
	s       *serverConn
	scratch []byte
	timer   *time.Timer
	state   atomic.Int32  // readerReading, readerInline, readerHandedOff
	seq     atomic.Uint64 // inline handlers started
	// callbacks counts an armed timer and a running callback; a handed-off callback starts
	// the next reader before it is done, so the reader that waits for it is still counted in
	// serverConn.wg when the new reader is added.
	callbacks sync.WaitGroup

	// The timer is not set for every handler (each setting can wake the runtime's network
	// poller, a thread switch per call): once armed it ticks every InlineHandlerDuration while
	// handlers run inline, and hands off a handler seen running at two ticks in a row.
	// A dispatch stores state before it loads armed, and a tick that disarms stores armed
	// before it loads state again, so one of them sees the other: no inline handler is left
	// unwatched, and a dispatch finding the timer armed takes no lock.
	armed atomic.Bool // changed under mu
	mu    sync.Mutex
	seen  uint64 // guarded by mu: seq at the last tick
}

const (
	readerReading = iota
	readerInline
	readerHandedOff
)

func (s *serverConn) newReader() *readerState {
	rs := &readerState{s: s}
	if s.inline > 0 {
		rs.timer = time.AfterFunc(time.Hour, rs.tick)
		rs.timer.Stop()
	}
	return rs
}

// tick runs on the inline timer. With no handler inline it disarms; with a handler started
// since the last tick it ticks again; a handler inline at both ticks has run too long, so a
// new reader takes over.
func (rs *readerState) tick() {
	defer rs.callbacks.Done()
	s := rs.s
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.state.Load() == readerInline {
		if cur := rs.seq.Load(); cur != rs.seen {
			rs.seen = cur
			rs.callbacks.Add(1)
			rs.timer.Reset(s.inline)
			return
		}
		s.wg.Add(1)
		if rs.state.CompareAndSwap(readerInline, readerHandedOff) {
			go func() {
				defer s.wg.Done()
				s.newReader().loop()
			}()
			return
		}
		s.wg.Done()
	}
	rs.armed.Store(false)
	if rs.state.Load() == readerInline {
		rs.armLocked() // a dispatch that found the timer armed just now
	}
}

// arm starts the inline timer's ticks unless they run.
func (rs *readerState) arm() {
	if rs.armed.Load() {
		return
	}
	rs.mu.Lock()
	if !rs.armed.Load() {
		rs.armLocked()
	}
	rs.mu.Unlock()
}

// armLocked starts the inline timer's ticks.
//
// REQUIRES: rs.mu is held and the ticks do not run.
func (rs *readerState) armLocked() {
	rs.armed.Store(true)
	rs.seen = rs.seq.Load()
	rs.callbacks.Add(1) // done by the callback, or by the reader's end if it stops it first
	rs.timer.Reset(rs.s.inline)
}

// disarm stops the inline timer's ticks, for a reader that ends.
func (rs *readerState) disarm() {
	rs.mu.Lock()
	if rs.armed.Load() && rs.timer.Stop() {
		rs.armed.Store(false)
		rs.callbacks.Done()
	}
	rs.mu.Unlock()
}

// loop reads frames until the connection fails or the reader is handed off.
func (rs *readerState) loop() {
	s := rs.s
	defer func() {
		if rs.timer != nil {
			// A tick may be armed or running: it must finish before the reader is gone.
			rs.disarm()
			rs.callbacks.Wait()
		}
		putScratch(rs.scratch)
	}()
	for {
		err := rs.next()
		if err == errHandedOff {
			return
		}
		if err != nil {
			s.readFailed(err)
			return
		}
	}
}

var errHandedOff = errors.New("reader handed off")

// next reads and handles one frame.
func (rs *readerState) next() error {
	s := rs.s
	hb, err := s.br.Peek(headerSize)
	if err != nil {
		return readError(err)
	}
	h, err := parseHeader(hb, s.lim.MaxFrameSize)
	if err != nil {
		return err
	}
	s.br.Discard(headerSize)
	s.recv.Store(true)
	switch h.typ {
	case frameCall:
		return rs.onCall(h)
	case frameData:
		return rs.onData(h)
	case frameCancel:
		return s.onCancel(h.id)
	case framePing:
		if !s.pings.allow(time.Now()) || !s.w.controlWait(framePong, h.id, nil) {
			return errFlood("pings")
		}
		return nil
	case framePong:
		return nil
	default:
		return fmt.Errorf("%w: frame type %#x is not sent by clients", ErrProtocol, h.typ)
	}
}

type floodError string

func (f floodError) Error() string { return "peer floods " + string(f) + " without reading replies" }

func errFlood(what string) error { return fmt.Errorf("%w: %w", ErrProtocol, floodError(what)) }

// onCall handles the first frame of a request.
func (rs *readerState) onCall(h frameHeader) error {
	s := rs.s
	n := int(h.length)
	s.mu.Lock()
	if h.id <= s.lastID {
		last := s.lastID
		s.mu.Unlock()
		return fmt.Errorf("%w: request id %d is not above the previous id %d", ErrProtocol, h.id, last)
	}
	s.lastID = h.id
	s.seen++
	draining, goAwayID := s.draining, s.goAwayID
	s.mu.Unlock()

	rs.scratch = growScratch(rs.scratch, n)
	payload := rs.scratch[:n]
	if _, err := io.ReadFull(s.br, payload); err != nil {
		return readError(err)
	}
	hdr, args, err := parseCallHeader(payload, s.lim)
	end := h.flags&flagEnd != 0
	if err != nil {
		if errors.Is(err, ErrProtocol) {
			return err
		}
		return s.refuse(h.id, end, codeTooLarge, err.Error())
	}
	total := int(hdr.total)
	if len(args) > total || end && len(args) != total {
		return fmt.Errorf("%w: request %d declares %d bytes but carries %d", ErrProtocol, h.id, total, len(args))
	}
	if total > s.lim.MaxMessageSize {
		return s.refuse(h.id, end, codeTooLarge, fmt.Sprintf("request of %d bytes exceeds the server's limit of %d", total, s.lim.MaxMessageSize))
	}
	if draining && h.id > goAwayID {
		return s.refuse(h.id, end, codeRefused, "server is draining")
	}
	entry := s.hm.lookup(hdr.key)
	if entry == nil {
		return s.refuse(h.id, end, codeUnknownMethod, unknownMethodMessage(hdr.key))
	}
	if entry.signature != 0 && hdr.signature != 0 && entry.signature != hdr.signature {
		return s.refuse(h.id, end, codeSignatureMismatch, fmt.Sprintf("%s.%s: the caller was built from a different signature than the server", entry.component, entry.method))
	}
	var deadline time.Time
	if hdr.flags&callDeadline != 0 {
		if hdr.deadline == 0 {
			return s.refuse(h.id, end, codeDeadline, "deadline expired before the call arrived")
		}
		deadline = time.Now().Add(time.Duration(min(hdr.deadline, math.MaxInt64/2)))
	}

	sc := &serverCall{parent: s.ctx, id: h.id, entry: entry, deadline: deadline, md: hdr.md}
	if hdr.flags&callTrace != 0 {
		sc.trace = spanContextOf(&hdr)
	}
	s.mu.Lock()
	if s.closed {
		// A frame still buffered when the connection closed: nothing would cancel it.
		s.mu.Unlock()
		return errConnClosing
	}
	if s.running >= s.lim.MaxConcurrentCalls {
		s.mu.Unlock()
		return s.refuse(h.id, end, codeRefused, fmt.Sprintf("over the limit of %d concurrent calls", s.lim.MaxConcurrentCalls))
	}
	s.running++
	s.calls[h.id] = sc
	if end {
		sc.started = true
		s.active++
	} else {
		s.partialBytes += len(args)
	}
	s.mu.Unlock()

	if !end {
		sc.in.start(args, total, &s.upfront, true)
		return nil
	}
	return rs.dispatch(sc, args, true)
}

// onData handles a continuation frame of a request.
func (rs *readerState) onData(h frameHeader) error {
	s := rs.s
	n := int(h.length)
	end := h.flags&flagEnd != 0
	s.mu.Lock()
	sc := s.calls[h.id]
	lastID := s.lastID
	s.mu.Unlock()
	if sc == nil {
		if h.id > lastID {
			return fmt.Errorf("%w: data for request %d, which was never opened", ErrProtocol, h.id)
		}
		_, err := s.br.Discard(n) // the tail of a call that already ended
		return readError(err)
	}
	if sc.skipping {
		if _, err := s.br.Discard(n); err != nil {
			return readError(err)
		}
		if end {
			s.mu.Lock()
			delete(s.calls, h.id)
			s.skipping--
			s.mu.Unlock()
		}
		return nil
	}
	if sc.started {
		return fmt.Errorf("%w: data after the end of request %d", ErrProtocol, h.id)
	}
	got, total := sc.in.n, sc.in.total
	if got+n > total || end && got+n != total {
		return fmt.Errorf("%w: request %d declares %d bytes but carries %d", ErrProtocol, h.id, total, got+n)
	}
	if err := s.reserve(n); err != nil {
		return err
	}
	if err := sc.in.read(s.br, n); err != nil {
		return readError(err)
	}
	if !end {
		return nil
	}
	sc.in.end(&s.upfront)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errConnClosing
	}
	s.partialBytes -= total
	s.heldBytes += total
	sc.started = true
	s.active++
	s.mu.Unlock()
	sc.held = total
	if sc.in.chunked() {
		// Assembling a large request copies it: that is the handler's goroutine's work,
		// never the reader's.
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			args := sc.in.assemble(getBuffer)
			sc.pooled = true
			s.run(sc, args)
		}()
		return nil
	}
	sc.pooled = sc.in.pooled
	return rs.dispatch(sc, sc.in.assemble(nil), false)
}

// reserve waits until n more request bytes fit the buffered-bytes budget. A conforming client
// never makes it wait (it counts a request's bytes until the request is answered, and the
// server frees them earlier), so the wait is bounded: a peer still over the budget after
// budgetWaitTimeout, or whose partial requests alone exceed it, violates the protocol.
func (s *serverConn) reserve(n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var timer *time.Timer
	timedOut := false
	for s.partialBytes+s.heldBytes+n > s.lim.MaxBufferedBytes && !s.closed && s.closing == nil {
		if s.heldBytes == 0 || timedOut {
			return fmt.Errorf("%w: requests exceed the buffered-bytes budget of %d", ErrProtocol, s.lim.MaxBufferedBytes)
		}
		if timer == nil {
			timer = time.AfterFunc(budgetWaitTimeout, func() {
				s.mu.Lock()
				timedOut = true
				s.budgetCond.Broadcast()
				s.mu.Unlock()
			})
			defer timer.Stop()
		}
		s.budgetCond.Wait()
	}
	if s.closed || s.closing != nil {
		return errConnClosing
	}
	s.partialBytes += n
	return nil
}

var errConnClosing = errors.New("connection closing")

// budgetWaitTimeout bounds how long the reader waits for handlers to free buffered bytes.
const budgetWaitTimeout = time.Second

// unknownMethodMessage is kept out of line so that the call header does not escape on every
// call for the sake of this error path.
//
//go:noinline
func unknownMethodMessage(key MethodKey) string {
	return fmt.Sprintf("no handler for method key %x", key[:])
}

// refuse answers a call that will not run with an ERROR frame marked never-ran. If more of its
// request is to come, the rest is skipped without buffering.
func (s *serverConn) refuse(id uint64, end bool, code byte, msg string) error {
	if !end {
		s.mu.Lock()
		if s.skipping >= s.lim.MaxConcurrentCalls+controlQueueLimit {
			s.mu.Unlock()
			return fmt.Errorf("%w: %d refused calls still sending", ErrProtocol, s.skipping)
		}
		s.skipping++
		s.calls[id] = &serverCall{id: id, skipping: true}
		s.mu.Unlock()
	}
	body := appendErrorBody(nil, &errorBody{code: code, neverRan: true, msg: msg})
	if !s.w.controlWait(frameError, id, body) {
		return errFlood("refused calls")
	}
	return nil
}

// onCancel handles a client's cancel.
func (s *serverConn) onCancel(id uint64) error {
	s.mu.Lock()
	sc := s.calls[id]
	switch {
	case sc == nil:
		if id > s.lastID {
			s.mu.Unlock()
			return fmt.Errorf("%w: cancel for request %d, which was never opened", ErrProtocol, id)
		}
		s.lateCancels++
		flood := s.lateCancels > s.seen+64
		s.mu.Unlock()
		if flood {
			return errFlood("cancels")
		}
		return nil
	case sc.skipping:
		// Its terminal frame was sent when it was refused.
		delete(s.calls, id)
		s.skipping--
		s.mu.Unlock()
		return nil
	case !sc.started:
		// Still being received: drop it and answer for it.
		delete(s.calls, id)
		s.partialBytes -= sc.in.n
		sc.in.end(&s.upfront)
		sc.in.release()
		s.running--
		s.budgetCond.Broadcast()
		s.mu.Unlock()
		body := appendErrorBody(nil, &errorBody{code: codeCanceled, neverRan: true, msg: "cancelled by the caller"})
		if !s.w.controlWait(frameError, id, body) {
			return errFlood("cancels")
		}
		s.checkDrained()
		return nil
	default:
		s.mu.Unlock()
		sc.cancel(context.Canceled)
		return nil
	}
}

// checkDrained closes a draining connection once no call holds a slot and every terminal frame
// is written or queued.
func (s *serverConn) checkDrained() {
	s.mu.Lock()
	done := s.drainedLocked()
	s.mu.Unlock()
	if done {
		s.closeDrained()
	}
}

// drainedLocked reports whether a draining connection has nothing left to answer.
//
// REQUIRES: s.mu is held.
func (s *serverConn) drainedLocked() bool {
	return s.draining && s.running == 0 && s.active == 0
}

// closeDrained asks the reader to close a drained connection.
func (s *serverConn) closeDrained() {
	s.requestClose(&closeRequest{code: -1, reason: errDrained, drained: true})
}

var errDrained = errors.New("drained")

// dispatch runs a complete request's handler: inline on this reader when inline handlers are
// enabled, else on a new goroutine. inScratch reports whether args live in the reader's scratch
// buffer.
func (rs *readerState) dispatch(sc *serverCall, args []byte, inScratch bool) error {
	s := rs.s
	if rs.timer != nil {
		// A tick sees the handler as new (seq) before it can hand it off: a handler is handed
		// off after running between one and two InlineHandlerDurations.
		rs.seq.Add(1)
		rs.state.Store(readerInline)
		rs.arm()
		s.run(sc, args)
		if rs.state.CompareAndSwap(readerInline, readerReading) {
			return nil
		}
		return errHandedOff
	}
	if inScratch {
		buf := getBuffer(len(args))
		copy(buf, args)
		args = buf
		sc.pooled = true
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.run(sc, args)
	}()
	return nil
}

// run runs a handler, sends its terminal frame, and frees its slot. A call whose deadline has
// passed by the time it would start does not run.
func (s *serverConn) run(sc *serverCall, args []byte) {
	if !sc.deadline.IsZero() && !time.Now().Before(sc.deadline) {
		s.finish(sc, args, nil, &errorBody{code: codeDeadline, neverRan: true, msg: "deadline expired before the handler started"})
		return
	}
	ctx := context.Context(sc)
	var span trace.Span
	if sc.trace.IsValid() {
		ctx = trace.ContextWithRemoteSpanContext(ctx, sc.trace)
	}
	if s.opts.Tracer != nil {
		ctx, span = s.opts.Tracer.Start(ctx, sc.entry.component+"."+sc.entry.method, trace.WithSpanKind(trace.SpanKindServer))
	}
	result, err := s.invoke(sc, ctx, args)
	if span != nil {
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}
	var eb *errorBody
	switch {
	case err != nil:
		eb = handlerErrorBody(err)
	case len(result) > int(s.peer.maxMessage):
		eb = &errorBody{code: codeTooLarge, msg: fmt.Sprintf("reply of %d bytes exceeds the client's limit of %d", len(result), s.peer.maxMessage)}
	}
	s.finish(sc, args, result, eb)
}

// finish sends a started call's terminal frame — the reply, or eb if not nil — and releases
// the call.
func (s *serverConn) finish(sc *serverCall, args, result []byte, eb *errorBody) {
	sc.release()
	// The slot is free as soon as the handler returns, before the terminal frame can reach
	// the client and prompt its next call.
	s.mu.Lock()
	load := s.loadLocked(sc)
	s.running--
	s.mu.Unlock()

	m := s.msgs.get()
	m.id = sc.id
	if eb != nil {
		m.typ = frameError
		m.head = appendErrorBody(nil, eb)
	} else {
		m.typ = frameReply
		m.head = appendReplyHeader(sc.rh[:0], len(result), load)
		m.payload = result
	}
	if _, err := s.w.send(m); err == nil {
		s.w.wait(m)
	}
	m.reset()
	m.owned = false
	s.msgs.put(m)

	s.mu.Lock()
	if s.calls[sc.id] == sc {
		delete(s.calls, sc.id)
	}
	if sc.held > 0 {
		s.heldBytes -= sc.held
		s.budgetCond.Broadcast()
	}
	s.active--
	drained := s.drainedLocked()
	s.mu.Unlock()
	if sc.pooled {
		putBuffer(args)
	}
	if sc.entry != nil && sc.entry.recycled && !overlaps(result, args) {
		putBuffer(result)
	}
	if drained {
		s.closeDrained()
	}
}

// loadLocked returns the load reported with a call's reply: the handler's, or the number of
// handlers running, this one included.
//
// REQUIRES: s.mu is held.
func (s *serverConn) loadLocked(sc *serverCall) float32 {
	if v := sc.load.Load(); v&loadSetBit != 0 {
		return math.Float32frombits(v &^ loadSetBit)
	}
	return float32(s.running)
}

// invoke calls the handler, turning a panic into an error for this caller alone.
func (s *serverConn) invoke(sc *serverCall, ctx context.Context, args []byte) (result []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.log(s.opts.Logger, "weft: handler panicked",
				slog.String("method", sc.entry.component+"."+sc.entry.method),
				slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			result, err = nil, errHandlerPanic
		}
	}()
	return sc.entry.h(ctx, args)
}

var errHandlerPanic = errors.New("handler panicked")

func handlerErrorBody(err error) *errorBody {
	if err == errHandlerPanic {
		return &errorBody{code: codePanic, msg: "handler panicked"}
	}
	b := &errorBody{code: codeHandlerFailed, msg: err.Error()}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		b.code = codeDeadline
	case errors.Is(err, context.Canceled):
		b.code = codeCanceled
	}
	var he *HandlerError
	if errors.As(err, &he) {
		b.retryAfter = he.RetryAfter
	}
	return b
}

// readFailed ends the connection after the reader stopped with err.
func (s *serverConn) readFailed(err error) {
	s.mu.Lock()
	req := s.closing
	s.mu.Unlock()
	switch {
	case req != nil && req.drained:
		s.flushAndClose(-1, nil)
		s.linger()
		s.shutdown(errDrained)
	case req != nil:
		s.flushAndClose(req.code, req.reason)
		s.linger()
		s.shutdown(req.reason)
	case errors.Is(err, ErrProtocol):
		code := closeProtocol
		var fe floodError
		if errors.As(err, &fe) {
			code = closeFlood
		}
		s.log.log(s.opts.Logger, "weft: closing connection: protocol error", slog.String("peer", s.addr), slog.Any("err", err))
		s.flushAndClose(code, err)
		s.shutdown(err)
	default:
		s.shutdown(err)
	}
}

// lingerTimeout bounds how long a server reads what a client still sends after the server
// closed its end.
const lingerTimeout = time.Second

// linger half-closes the connection, when it can, and reads and drops what the client still
// sends (calls it sent before it saw the go-away) until the client closes its end, for at most
// lingerTimeout. Closing a socket with unread input would reset the connection, and the reset
// can destroy the go-away before the client reads it: the client would then not know which of
// its calls never ran.
func (s *serverConn) linger() {
	cw, ok := s.conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	s.conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	io.Copy(io.Discard, s.conn)
}

// flushAndClose sends a go-away with code (unless code is negative) and waits, at most a
// second, for queued frames to leave.
func (s *serverConn) flushAndClose(code int, reason error) {
	if code >= 0 {
		s.mu.Lock()
		last := s.lastID
		s.mu.Unlock()
		msg := ""
		if reason != nil {
			msg = reason.Error()
		}
		body := append([]byte{byte(code)}, truncateUTF8(msg, maxErrorMsg)...)
		s.w.controlForce(frameGoAway, last, body)
	}
	s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	s.w.waitIdle()
}

// requestClose asks the reader to close the connection: it interrupts the reader's read.
func (s *serverConn) requestClose(req *closeRequest) {
	s.mu.Lock()
	if s.closed || s.closing != nil {
		s.mu.Unlock()
		return
	}
	s.closing = req
	s.budgetCond.Broadcast()
	s.mu.Unlock()
	s.conn.SetReadDeadline(time.Unix(1, 0))
}

// shutdown closes the connection at once: queued frames are dropped and every handler's
// context is cancelled.
func (s *serverConn) shutdown(reason error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	close(s.closedCh)
	running := s.startedCallsLocked()
	s.budgetCond.Broadcast()
	if s.idle != nil {
		s.idle.Stop()
	}
	if s.drainTimer != nil {
		s.drainTimer.Stop()
	}
	s.mu.Unlock()
	s.w.close(errWriterClosed)
	s.conn.Close()
	for _, sc := range running {
		sc.cancel(context.Canceled)
	}
	s.opts.Logger.Debug("weft: connection closed", slog.String("peer", s.addr), slog.Any("reason", reason))
}

// startedCallsLocked returns the calls whose handlers have started, to cancel them.
//
// REQUIRES: s.mu is held.
func (s *serverConn) startedCallsLocked() []*serverCall {
	var started []*serverCall
	for _, sc := range s.calls {
		if sc.started {
			started = append(started, sc)
		}
	}
	return started
}

// idleTick runs on the idle timer.
func (s *serverConn) idleTick() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	if s.recv.Swap(false) || s.active > 0 {
		s.idle.Reset(s.opts.IdleTimeout)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.requestClose(&closeRequest{code: closeIdle, reason: fmt.Errorf("idle for %v", s.opts.IdleTimeout)})
}

// drain starts a graceful drain: a go-away with the last accepted id, then a close when the
// accepted calls are done, or a hard stop after DrainTimeout.
func (s *serverConn) drain() {
	if s.opts.DrainTimeout < 0 {
		s.hardStop()
		return
	}
	s.mu.Lock()
	if s.closed || s.draining {
		s.mu.Unlock()
		return
	}
	s.draining = true
	s.goAwayID = s.lastID
	s.drainTimer = time.AfterFunc(s.opts.DrainTimeout, s.hardStop)
	idle := s.running == 0
	s.mu.Unlock()
	s.w.controlForce(frameGoAway, s.goAwayID, []byte{closeDrain})
	if idle {
		s.closeDrained()
	}
}

// hardStop ends the connection now: handlers are cancelled, a go-away with the stopping code
// is queued, and the reader closes the connection after at most a second of flushing.
func (s *serverConn) hardStop() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	last := s.lastID
	running := s.startedCallsLocked()
	s.mu.Unlock()
	// The go-away is queued before the handlers are cancelled: the last of them to return
	// may close a draining connection at once, and the go-away must be written first.
	s.w.controlForce(frameGoAway, last, append([]byte{closeStopping}, errStopping.Error()...))
	for _, sc := range running {
		sc.cancel(context.Canceled)
	}
	s.requestClose(&closeRequest{code: -1, reason: errStopping})
}

var errStopping = errors.New("server stopping")

// A client's keepalive pings every few seconds at most; a burst of pingBurst pings, then more
// than pingRate a second, is a flood.
const (
	pingBurst = 64
	pingRate  = 10
)

// tokenBucket is a rate limiter owned by one goroutine.
type tokenBucket struct {
	tokens float64
	burst  float64
	rate   float64 // tokens per second
	last   time.Time
}

// allow takes a token, reporting false if none is left.
func (b *tokenBucket) allow(now time.Time) bool {
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// logLimiter lets at most one warning a second through; the rest go to debug level.
type logLimiter struct {
	mu sync.Mutex
	// guarded by mu
	last       time.Time
	suppressed int
}

func (l *logLimiter) log(logger *slog.Logger, msg string, attrs ...any) {
	l.mu.Lock()
	now := time.Now()
	if now.Sub(l.last) < time.Second {
		l.suppressed++
		l.mu.Unlock()
		logger.Debug(msg, attrs...)
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.mu.Unlock()
	if suppressed > 0 {
		attrs = append(attrs, slog.Int("suppressed", suppressed))
	}
	logger.Warn(msg, attrs...)
}
