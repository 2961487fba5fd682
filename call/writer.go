package call

import (
	"errors"
	"net"
	"sync"
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
	// cancel, if not nil, is the owner's context's Done channel: once it is closed the writer
	// sends no further frames of the message.
	cancel <-chan struct{}

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
	m.head, m.payload, m.cancel = nil, nil, nil
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

	wg sync.WaitGroup // goroutines started by control

	// budget, if positive, bounds the declared sizes of requests that have been started but
	// not finished (the server's buffered-bytes budget); a multi-frame request that would go
	// over it waits until others finish, unless none is in progress.
	budget int

	mu sync.Mutex
	// guarded by mu
	partial int       // declared bytes of started, unfinished multi-frame requests
	queue   []*outMsg // unfinished messages in round-robin order
	writing bool      // some goroutine holds the writer role (or was handed it)
	idle    sync.Cond // signalled when writing becomes false
	handoff *outMsg   // the owner the role was handed to and who has not yet taken it
	nctl    int       // control frames queued
	err     error     // sticky: the first write error, or errWriterClosed

	// Owned by the writer role.
	flat  []byte
	bufs  net.Buffers
	wbufs net.Buffers // the copy of bufs that a write consumes
	segs  []segment
	round []*outMsg
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
	w := &writer{conn: conn, chunk: peerMaxFrame, flatten: flatten, maxRound: 256 << 10}
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

// send queues m, owned by the calling goroutine, and writes until m is finished or, if another
// goroutine is writing, returns at once; the owner then waits on m.sig and calls woken. It
// returns an error, and does not queue m, if the writer is closed or onCall refuses m.
func (w *writer) send(m *outMsg) error {
	m.owned = true
	w.mu.Lock()
	if w.err != nil {
		m.state = msgFinished
		w.mu.Unlock()
		return w.err
	}
	if m.typ == frameCall && w.onCall != nil {
		if err := w.onCall(m); err != nil {
			m.state = msgFinished
			w.mu.Unlock()
			return err
		}
	}
	m.state = msgQueued
	w.queue = append(w.queue, m)
	if w.writing {
		w.mu.Unlock()
		return nil
	}
	w.writing = true
	w.mu.Unlock()
	w.run(m)
	return nil
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
	m := &outMsg{typ: typ, id: id, head: payload}
	w.mu.Lock()
	if w.err != nil || w.nctl >= controlQueueLimit {
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
}

// finishLocked marks m finished and returns its share of the partial budget.
//
// REQUIRES: w.mu is held.
func (w *writer) finishLocked(m *outMsg) {
	m.state = msgFinished
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
// caller's message; run returns once own is finished and the role has been handed off or given
// up. With own nil, run hands off at once if any owner waits, else writes until the queue is
// empty.
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
		if own != nil && own.state == msgQueued && own.cancel != nil && isClosed(own.cancel) {
			// The owner gave up on its message: stop writing it.
			w.removeLocked(own)
			w.finishLocked(own)
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
			if len(w.queue) == 0 {
				w.stopWritingLocked()
				w.mu.Unlock()
				return
			}
		}
		n := w.buildRoundLocked()
		w.mu.Unlock()

		written, err := w.write()

		w.mu.Lock()
		first := err != nil && w.err == nil
		w.endRoundLocked(n, written, err)
		werr := w.err
		w.mu.Unlock()
		if first && w.onError != nil {
			w.onError(werr)
		}
	}
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
	for _, m := range w.queue {
		if total >= w.maxRound {
			break
		}
		typ, flags := m.typ, byte(0)
		head := m.head
		if m.started {
			typ, head = frameData, nil
		}
		isMsg := m.typ == frameCall || m.typ == frameReply
		if !m.started && m.typ == frameCall && w.budget > 0 && len(head)+len(m.payload) > w.chunk {
			if w.partial > 0 && w.partial+len(m.payload) > w.budget {
				continue // the server could not buffer it yet; the queue order is kept
			}
			w.partial += len(m.payload)
			m.counted = true
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
	for i := range w.segs {
		w.segs[i].ext = nil
	}
	return int(n), err
}

// endRoundLocked records the outcome of a round: finished messages leave the queue, unfinished
// ones move behind the messages that were not in the round, and waiting owners are woken.
// The round's messages are exactly the queued ones in state msgInWrite: while a round is
// written, other goroutines only append messages or remove ones not in a write.
//
// REQUIRES: w.mu is held and the caller holds the writer role.
func (w *writer) endRoundLocked(roundLen, written int, err error) {
	if err == nil && written < roundLen {
		err = errors.New("short write")
	}
	if err != nil && w.err == nil {
		w.err = err
	}
	q := w.queue[:0]
	for _, m := range w.queue {
		if m.state != msgInWrite {
			q = append(q, m)
		}
	}
	for _, m := range w.round {
		if m.endPos <= written {
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
			q = append(q, m)
		}
		if m.state == msgFinished && !m.owned {
			w.nctl--
		}
		if m.owned {
			m.wake()
		}
	}
	clear(w.queue[len(q):])
	w.queue = q
	clear(w.round)
	w.round = w.round[:0]
	if cap(w.flat) > 1<<20 {
		w.flat = nil
	}
	if err != nil {
		w.failLocked()
	}
}
