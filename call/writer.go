package call

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"sync"
	"time"
)

// msgState is where a queued message is in the writer.
type msgState uint8

const (
	msgIdle     msgState = iota // not queued
	msgQueued                   // queued, no bytes in a system call now
	msgInWrite                  // bytes of the message are in the current system call
	msgFinished                 // all frames written, removed, or failed; the writer holds no reference
)

// outMsg is one message for the writer: a request or reply split into frames, or a control
// frame. Its fields before state are set by the owner before it is queued and not changed while
// it is queued.
type outMsg struct {
	typ     byte        // type of the first frame: frameCall, frameReply, or a control type
	id      uint64      // request id (or ping id, or last accepted id)
	head    []byte      // sub-header (call or reply header) or the whole control payload
	payload []byte      // message bytes, referenced until the message is finished
	owned   bool        // an owner waits on sig and can take the writer role
	call    *clientCall // the client call this message belongs to, if any
	// cancel, if not nil, is the owner's context's Done channel, and deadline its deadline:
	// once either passes, the writer sends no further frames of the message, and a write the
	// owner performs for the writer role is interrupted at the deadline.
	cancel   <-chan struct{}
	deadline time.Time

	// sig wakes the owner: the writer role was handed to it, or the message finished.
	sig chan struct{}

	// guarded by writer.mu
	state   msgState
	off     int   // payload bytes already framed
	started bool  // the first frame has been framed
	sentAll bool  // the final frame was handed to the kernel in full
	sentAny bool  // at least one complete frame was handed to the kernel
	counted bool  // its size is in writer.partial
	err     error // why the message could not be written, if it failed
	endPos  int   // during a round: end offset of this message's frame in the round
	// During a round, to undo framing if the write is interrupted before the frame starts.
	rChunk      int  // payload bytes in the frame
	rFrame      int  // frame bytes, header included
	rWasStarted bool // started before this round
	rCounted    bool // counted in writer.partial in this round
	inRound     bool // part of the current round
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func newOutMsg() *outMsg { return &outMsg{sig: make(chan struct{}, 1)} }

// reset prepares m for reuse.
func (m *outMsg) reset() {
	select {
	case <-m.sig:
	default:
	}
	m.head, m.payload, m.cancel, m.deadline = nil, nil, nil, time.Time{}
	m.state, m.off, m.started, m.sentAll, m.sentAny, m.counted, m.err = msgIdle, 0, false, false, false, false, nil
}

func (m *outMsg) wake() {
	select {
	case m.sig <- struct{}{}:
	default:
	}
}

// errWriterClosed is the error of messages queued on a writer that was closed.
var errWriterClosed = errors.New("connection closed")

// writer multiplexes messages onto a connection. There is no writer goroutine: the goroutine
// that finds the writer idle becomes the writer (flat combining) and writes rounds until its own
// message is finished, then hands the role to another waiting owner or, when none is left, writes
// the remaining control frames and goes idle. A round frames at most one chunk of every queued
// message and writes them with one vectored write.
type writer struct {
	conn     net.Conn
	chunk    int // max payload bytes per frame, the peer's max frame size
	flatten  int // frames up to this size are copied into the flat buffer
	maxRound int // a round stops adding frames past this many bytes

	// onCall, if set, is called with w.mu held for every frameCall message queued; it assigns
	// the request id and registers the call, so ids reach the wire in increasing order.
	onCall func(m *outMsg) error

	// onError, if set, is called once, without locks held, when a write fails; the owner
	// closes the connection so its reader stops too.
	onError func(error)

	wg    sync.WaitGroup // goroutines started by control
	space chan struct{}  // signalled when a control frame leaves a full queue

	// budget, if positive, bounds the declared sizes of multi-frame requests that have been
	// started and not yet answered (the server's buffered-bytes budget; the server frees a
	// request's bytes before it answers, so it never has to stop reading a conforming client);
	// a request that would go over it waits, unless none is outstanding. The owner calls
	// answered when a request's terminal frame arrives.
	budget int

	mu sync.Mutex
	// guarded by mu
	partial int       // declared bytes of started, unanswered multi-frame requests
	queue   []*outMsg // unfinished messages in round-robin order
	writing bool      // some goroutine holds the writer role (or was handed it)
	idle    sync.Cond // signalled when writing becomes false
	handoff *outMsg   // the owner the role was handed to and who has not yet taken it
	nctl    int       // control frames queued
	dirty   bool      // withdraw changed conn's write deadline to interrupt a write
	err     error     // sticky: the first write error, or errWriterClosed

	// Owned by the writer role.
	pending   []byte    // the rest of a frame whose write was interrupted: written first
	wdeadline time.Time // the write deadline set on conn, unless dirty
	fatalTime bool      // an interrupted write breaks conn (TLS), so deadlines are not used
	flat      []byte
	rotated   []*outMsg
	bufs      net.Buffers
	wbufs     net.Buffers // the copy of bufs that a write consumes
	segs      []segment
	round     []*outMsg
}

// segment is a run of flat bytes ending at flatEnd, followed by ext bytes written in place.
type segment struct {
	flatEnd int
	ext     []byte
}

func newWriter(conn net.Conn, peerMaxFrame, flatten int) *writer {
	if flatten < 0 {
		flatten = 0
	}
	w := &writer{conn: conn, chunk: peerMaxFrame, flatten: flatten, maxRound: 256 << 10, space: make(chan struct{}, 1)}
	// A TLS connection is unusable after a write times out.
	_, w.fatalTime = conn.(*tls.Conn)
	w.idle.L = &w.mu
	return w
}

// waitIdle waits until nobody is writing and the queue is empty (or the writer failed).
func (w *writer) waitIdle() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.writing {
		w.idle.Wait()
	}
}

// stopWritingLocked gives up the writer role.
//
// REQUIRES: w.mu is held.
func (w *writer) stopWritingLocked() {
	w.writing = false
	w.idle.Broadcast()
}

// send queues m, owned by the calling goroutine, and writes until m is finished (done) or, if
// another goroutine is writing, returns at once; the owner then waits on m.sig and calls woken.
// It returns an error, and does not queue m, if the writer is closed or onCall refuses m.
func (w *writer) send(m *outMsg) (done bool, err error) {
	m.owned = true
	w.mu.Lock()
	if w.err != nil {
		m.state = msgFinished
		w.mu.Unlock()
		return false, w.err
	}
	if m.typ == frameCall && w.onCall != nil {
		if err := w.onCall(m); err != nil {
			m.state = msgFinished
			w.mu.Unlock()
			return false, err
		}
	}
	m.state = msgQueued
	w.queue = append(w.queue, m)
	if w.writing {
		w.mu.Unlock()
		return false, nil
	}
	w.writing = true
	w.mu.Unlock()
	w.run(m) // returns once m is finished
	return true, nil
}

// woken handles a wake-up of m's owner: if the writer role was handed to it, it writes until m
// is finished. It reports whether m is finished.
func (w *writer) woken(m *outMsg) bool {
	w.mu.Lock()
	if w.handoff == m {
		w.handoff = nil
		w.mu.Unlock()
		w.run(m)
		w.mu.Lock()
	}
	done := m.state == msgFinished
	w.mu.Unlock()
	return done
}

// wait blocks until m is finished, taking the writer role when it is handed over.
func (w *writer) wait(m *outMsg) {
	for !w.woken(m) {
		<-m.sig
	}
}

// withdraw stops writing m: if none of it is in a system call it is removed at once; otherwise
// withdraw waits until the current write ends. It reports whether any complete frame of m was
// sent, and whether all of it was. After withdraw the writer holds no reference to m.
func (w *writer) withdraw(m *outMsg) (sentAny, sentAll bool) {
	w.mu.Lock()
	for m.state == msgInWrite {
		if !w.fatalTime && !w.dirty {
			// Interrupt the write that holds our bytes; the writer puts back what it had not
			// begun and carries on. (An interrupted TLS write would break the connection:
			// there we wait for the write to end.)
			w.dirty = true
			w.conn.SetWriteDeadline(time.Unix(1, 0))
		}
		w.mu.Unlock()
		<-m.sig
		w.mu.Lock()
	}
	if m.state == msgQueued {
		w.removeLocked(m)
		w.finishLocked(m)
	}
	sentAny, sentAll = m.sentAny, m.sentAll
	if w.handoff == m {
		// The role was handed to us but we are leaving: keep writing for the others.
		w.handoff = nil
		w.mu.Unlock()
		w.run(nil)
		return sentAny, sentAll
	}
	w.mu.Unlock()
	return sentAny, sentAll
}

// control queues a control frame (no owner). If no goroutine is writing, a new goroutine
// writes it, so the caller (a reader) never blocks on the connection. It returns false if the
// control queue is full or the writer is closed.
func (w *writer) control(typ byte, id uint64, payload []byte) bool {
	return w.queueControl(typ, id, payload, controlLimited)
}

// controlForce queues a control frame even when the control queue is full: a go-away must reach
// the peer. It returns false if the writer is closed.
func (w *writer) controlForce(typ byte, id uint64, payload []byte) bool {
	return w.queueControl(typ, id, payload, controlForced)
}

// controlWait queues a control frame, waiting up to controlWaitTimeout for room in a full
// control queue: a peer that reads its answers gets backpressure, one that does not gets false.
func (w *writer) controlWait(typ byte, id uint64, payload []byte) bool {
	return w.queueControl(typ, id, payload, controlWaiting)
}

const (
	controlLimited = iota
	controlForced
	controlWaiting

	controlWaitTimeout = time.Second
)

func (w *writer) queueControl(typ byte, id uint64, payload []byte, mode int) bool {
	m := &outMsg{typ: typ, id: id, head: payload}
	w.mu.Lock()
	var timer *time.Timer
	for w.err == nil && w.nctl >= controlQueueLimit && mode != controlForced {
		if mode != controlWaiting {
			w.mu.Unlock()
			return false
		}
		if timer == nil {
			timer = time.NewTimer(controlWaitTimeout)
			defer timer.Stop()
		}
		w.mu.Unlock()
		select {
		case <-w.space:
		case <-timer.C:
			return false
		}
		w.mu.Lock()
	}
	if w.err != nil {
		w.mu.Unlock()
		return false
	}
	w.nctl++
	m.state = msgQueued
	w.queue = append(w.queue, m)
	if w.writing {
		w.mu.Unlock()
		return true
	}
	w.writing = true
	w.wg.Add(1)
	w.mu.Unlock()
	go func() {
		defer w.wg.Done()
		w.run(nil)
	}()
	return true
}

// controlDoneLocked records that a control frame left the queue.
//
// REQUIRES: w.mu is held.
func (w *writer) controlDoneLocked() {
	w.nctl--
	select {
	case w.space <- struct{}{}:
	default:
	}
}

// close fails every queued message with err and makes later sends fail. It does not close the
// connection; a write in progress ends when the owner closes it.
func (w *writer) close(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
	w.failLocked()
}

// failLocked finishes every message not in a system call with w.err.
//
// REQUIRES: w.mu is held.
func (w *writer) failLocked() {
	q := w.queue[:0]
	for _, m := range w.queue {
		if m.state == msgInWrite {
			q = append(q, m)
			continue
		}
		m.err = w.err
		w.finishLocked(m)
		if m.owned {
			m.wake()
		}
	}
	clear(w.queue[len(q):])
	w.queue = q
	w.nctl = 0
	for _, m := range q {
		if !m.owned {
			w.nctl++
		}
	}
	select {
	case w.space <- struct{}{}:
	default:
	}
}

// finishLocked marks m finished. A counted request stays counted until it is answered.
//
// REQUIRES: w.mu is held.
func (w *writer) finishLocked(m *outMsg) {
	m.state = msgFinished
}

// answered returns a request's share of the budget once its terminal frame has arrived (or the
// call is over for another reason).
func (w *writer) answered(m *outMsg) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if m.counted {
		m.counted = false
		w.partial -= len(m.payload)
	}
}

// removeLocked removes m from the queue.
//
// REQUIRES: w.mu is held.
func (w *writer) removeLocked(m *outMsg) {
	for i, q := range w.queue {
		if q == m {
			copy(w.queue[i:], w.queue[i+1:])
			w.queue[len(w.queue)-1] = nil
			w.queue = w.queue[:len(w.queue)-1]
			return
		}
	}
}

// run writes rounds while the calling goroutine holds the writer role. own, if not nil, is the
// caller's message; run returns once own is finished and the role has been handed off or
// given up. With own nil (a background writer), run hands off at once if any owner waits,
// else writes until nothing is left.
//
// A write made for own is interrupted at own's deadline: the frames not yet begun are put back,
// the rest of a frame cut in the middle is kept in w.pending (the stream must stay whole), and
// once own is finished the remaining work goes to a background writer, so that the caller never
// waits on a stalled connection past its deadline.
func (w *writer) run(own *outMsg) {
	for {
		w.mu.Lock()
		if w.err != nil {
			w.failLocked()
			if len(w.queue) == 0 {
				w.stopWritingLocked()
			}
			w.mu.Unlock()
			return
		}
		if own != nil && own.state == msgQueued && own.expired() {
			// The owner gave up on its message: stop writing it.
			w.removeLocked(own)
			w.finishLocked(own)
			own.wake()
		}
		if own == nil || own.state == msgFinished {
			// Our message is done: hand the role to a waiting owner, if there is one.
			for _, m := range w.queue {
				if m.owned {
					w.handoff = m
					w.mu.Unlock()
					m.wake()
					return
				}
			}
			if len(w.queue) == 0 && len(w.pending) == 0 {
				w.stopWritingLocked()
				w.mu.Unlock()
				return
			}
			if own != nil {
				// Only frames without an owner are left: a background writer takes them,
				// so the caller does not wait on the connection.
				w.wg.Add(1)
				w.mu.Unlock()
				go func() {
					defer w.wg.Done()
					w.run(nil)
				}()
				return
			}
		}
		var deadline time.Time
		if own != nil && !w.fatalTime {
			deadline = own.deadline
		}
		if len(w.pending) > 0 {
			w.beginWriteLocked(deadline)
			n, err := w.conn.Write(w.pending)
			w.mu.Lock()
			w.pending = w.pending[n:]
			if len(w.pending) == 0 {
				w.pending = nil
			}
			fatal := err != nil && !w.interruptedLocked(err, deadline)
			first := fatal && w.err == nil
			if first {
				w.err = err
				w.failLocked()
			}
			w.mu.Unlock()
			if first && w.onError != nil {
				w.onError(err)
			}
			continue
		}
		n := w.buildRoundLocked()
		w.beginWriteLocked(deadline)
		written, err := w.write()

		w.mu.Lock()
		interrupted := err != nil && w.interruptedLocked(err, deadline)
		first := err != nil && !interrupted && w.err == nil
		w.endRoundLocked(n, written, err, interrupted)
		werr := w.err
		w.mu.Unlock()
		if first && w.onError != nil {
			w.onError(werr)
		}
	}
}

// expired reports whether m's owner has given up on it.
func (m *outMsg) expired() bool {
	return m.cancel != nil && isClosed(m.cancel) || !m.deadline.IsZero() && !time.Now().Before(m.deadline)
}

// beginWriteLocked unlocks w.mu and sets the connection's write deadline for the write the
// caller is about to make.
//
// REQUIRES: w.mu is held and the caller holds the writer role.
func (w *writer) beginWriteLocked(deadline time.Time) {
	if w.dirty {
		// withdraw moved the deadline to interrupt an earlier write: set it again.
		w.dirty = false
		w.wdeadline = time.Unix(1, 0)
	}
	w.mu.Unlock()
	w.setDeadline(deadline)
}

// setDeadline sets the connection's write deadline to d if it is not already set.
//
// REQUIRES: the caller holds the writer role.
func (w *writer) setDeadline(d time.Time) {
	if !d.Equal(w.wdeadline) {
		w.conn.SetWriteDeadline(d)
		w.wdeadline = d
	}
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// interruptedLocked reports whether a failed write was interrupted on purpose — by the owner's
// deadline, which the writer set, or by withdraw — so that writing can go on. Any other
// failure, including a deadline someone else set on the connection, is fatal.
//
// REQUIRES: w.mu is held.
func (w *writer) interruptedLocked(err error, deadline time.Time) bool {
	if !isTimeout(err) || w.fatalTime {
		return false
	}
	return w.dirty || !deadline.IsZero() && !time.Now().Before(deadline)
}

// buildRoundLocked frames one chunk of each queued message, up to maxRound bytes, into w.flat
// and w.segs. It returns the number of bytes in the round.
//
// REQUIRES: w.mu is held and the caller holds the writer role.
func (w *writer) buildRoundLocked() int {
	w.flat = w.flat[:0]
	w.segs = w.segs[:0]
	w.round = w.round[:0]
	total := 0
	holdCalls := false // a request was held back: later requests wait too, so ids stay in order
	for _, m := range w.queue {
		if total >= w.maxRound {
			break
		}
		if holdCalls && !m.started && m.typ == frameCall {
			continue
		}
		typ, flags := m.typ, byte(0)
		head := m.head
		if m.started {
			typ, head = frameData, nil
		}
		isMsg := m.typ == frameCall || m.typ == frameReply
		m.rCounted = false
		if !m.started && m.typ == frameCall && w.budget > 0 && len(head)+len(m.payload) > w.chunk {
			if w.partial > 0 && w.partial+len(m.payload) > w.budget {
				holdCalls = true // the server could not buffer it yet
				continue
			}
			w.partial += len(m.payload)
			m.counted = true
			m.rCounted = true
		}
		chunk := 0
		if isMsg {
			chunk = min(len(m.payload)-m.off, w.chunk-len(head))
			if m.off+chunk == len(m.payload) {
				flags = flagEnd
			}
		}
		frameLen := len(head) + chunk
		w.flat = appendHeader(w.flat, typ, flags, frameLen, m.id)
		w.flat = append(w.flat, head...)
		data := m.payload[m.off : m.off+chunk]
		if headerSize+frameLen <= w.flatten || chunk == 0 {
			w.flat = append(w.flat, data...)
		} else {
			w.segs = append(w.segs, segment{flatEnd: len(w.flat), ext: data})
		}
		m.rWasStarted = m.started
		m.inRound = true
		m.rChunk = chunk
		m.rFrame = headerSize + frameLen
		m.started = true
		m.off += chunk
		m.state = msgInWrite
		total += headerSize + frameLen
		m.endPos = total
		w.round = append(w.round, m)
	}
	return total
}

// write writes the current round and returns how many bytes were written.
func (w *writer) write() (int, error) {
	if len(w.segs) == 0 {
		n, err := w.conn.Write(w.flat)
		return n, err
	}
	w.bufs = w.bufs[:0]
	prev := 0
	for _, s := range w.segs {
		if s.flatEnd > prev {
			w.bufs = append(w.bufs, w.flat[prev:s.flatEnd])
		}
		w.bufs = append(w.bufs, s.ext)
		prev = s.flatEnd
	}
	if prev < len(w.flat) {
		w.bufs = append(w.bufs, w.flat[prev:])
	}
	w.wbufs = w.bufs // WriteTo consumes its receiver
	n, err := w.wbufs.WriteTo(w.conn)
	clear(w.bufs[:cap(w.bufs)])
	return int(n), err
}

// endRoundLocked records the outcome of a round: finished messages leave the queue, started
// but unfinished ones move behind the others (round robin), and waiting owners are woken.
// Messages not yet started keep their place, so requests reach the wire in id order.
//
// If the write was interrupted by a deadline (and the connection survives that), frames not
// begun are put back, and the unwritten rest of a frame cut in the middle goes to w.pending.
//
// REQUIRES: w.mu is held and the caller holds the writer role.
func (w *writer) endRoundLocked(roundLen, written int, err error, interrupted bool) {
	if interrupted {
		err = nil
	} else if err == nil && written < roundLen {
		err = errors.New("short write")
	}
	if err != nil && w.err == nil {
		w.err = err
	}
	for _, m := range w.round {
		frameStart := m.endPos - m.rFrame
		if interrupted && frameStart >= written {
			// Not begun: undo the framing; the message keeps its place.
			m.off -= m.rChunk
			m.started = m.rWasStarted
			if m.rCounted {
				m.counted = false
				w.partial -= len(m.payload)
			}
			m.state = msgQueued
			continue
		}
		if interrupted && m.endPos > written {
			// Cut in the middle: the rest must be written before anything else.
			w.pending = w.copyRound(w.pending, written, m.endPos)
		}
		if m.endPos <= written || interrupted {
			m.sentAny = true
		}
		done := m.off == len(m.payload) || m.typ != frameCall && m.typ != frameReply
		switch {
		case err != nil:
			m.err = w.err
			m.sentAll = done && m.endPos <= written
			w.finishLocked(m)
		case done:
			m.sentAll = true
			w.finishLocked(m)
		default:
			m.state = msgQueued
		}
		if m.state == msgFinished && !m.owned {
			w.controlDoneLocked()
		}
		if m.owned {
			m.wake()
		}
	}
	// Rebuild the queue: drop finished messages, rotate started unfinished round members to
	// the back, keep everything else in place.
	q := w.queue[:0]
	rotated := w.rotated[:0]
	for _, m := range w.queue {
		switch {
		case m.state == msgFinished:
		case m.started && m.inRound:
			rotated = append(rotated, m)
		default:
			q = append(q, m)
		}
		m.inRound = false
	}
	q = append(q, rotated...)
	clear(rotated)
	w.rotated = rotated[:0]
	clear(w.queue[len(q):])
	w.queue = q
	for i := range w.segs {
		w.segs[i].ext = nil
	}
	clear(w.round)
	w.round = w.round[:0]
	if cap(w.flat) > 1<<20 {
		w.flat = nil
	}
	if err != nil {
		w.failLocked()
	}
}

// copyRound appends bytes [from, to) of the current round to dst.
func (w *writer) copyRound(dst []byte, from, to int) []byte {
	pos := 0
	take := func(b []byte) {
		lo, hi := max(from-pos, 0), min(to-pos, len(b))
		if lo < hi {
			dst = append(dst, b[lo:hi]...)
		}
		pos += len(b)
	}
	prev := 0
	for _, sg := range w.segs {
		take(w.flat[prev:sg.flatEnd])
		take(sg.ext)
		prev = sg.flatEnd
	}
	take(w.flat[prev:])
	return dst
}
