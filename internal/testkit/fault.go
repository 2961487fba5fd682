package testkit

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftrpc/weft/endpoint"
)

// ErrInjected is the error a [FaultConn] returns by default once its fault has triggered. It
// implements net.Error (not a timeout). Test for it with errors.Is.
var ErrInjected error = injectedError{}

type injectedError struct{}

func (injectedError) Error() string   { return "testkit: injected connection fault" }
func (injectedError) Timeout() bool   { return false }
func (injectedError) Temporary() bool { return false }

var _ net.Error = injectedError{}

// Fault says when a [FaultConn] fails. A negative count means never; 0 fails the first call.
// Note that the zero Fault fails both directions at once: start from [NoFault].
type Fault struct {
	// ReadAfter is the number of bytes reads deliver before reads fail.
	ReadAfter int64
	// WriteAfter is the number of bytes writes pass on before writes fail.
	WriteAfter int64
	// Err is the error returned once the fault triggered; nil means [ErrInjected].
	Err error
}

// NoFault returns a Fault that never triggers: both counts are -1.
func NoFault() Fault { return Fault{ReadAfter: -1, WriteAfter: -1} }

// FaultConn is a connection that fails after a number of bytes, as a [Fault] says. Reads deliver
// at most ReadAfter bytes in total; the read after that fails. A write crossing WriteAfter passes
// on the bytes up to it and fails; a write ending exactly at it succeeds and the next one fails.
// When the fault triggers, in either direction, the underlying connection is closed (so the peer
// sees EOF or a reset) and from then on every Read and Write returns the fault's error, unwrapped
// (so an Err of io.EOF reads as a clean end).
type FaultConn struct {
	net.Conn
	fault     Fault
	read      atomic.Int64
	written   atomic.Int64
	triggered atomic.Bool
}

// WrapConn returns c wrapped to fail as f says.
func WrapConn(c net.Conn, f Fault) *FaultConn {
	if f.Err == nil {
		f.Err = ErrInjected
	}
	return &FaultConn{Conn: c, fault: f}
}

// BytesRead returns the number of bytes reads have delivered.
func (c *FaultConn) BytesRead() int64 { return c.read.Load() }

// BytesWritten returns the number of bytes writes have passed on.
func (c *FaultConn) BytesWritten() int64 { return c.written.Load() }

// Triggered reports whether the fault has triggered.
func (c *FaultConn) Triggered() bool { return c.triggered.Load() }

// Trigger makes the fault trigger now: the underlying connection is closed and every later Read
// and Write fails.
func (c *FaultConn) Trigger() {
	if c.triggered.CompareAndSwap(false, true) {
		c.Conn.Close()
	}
}

// Read implements net.Conn.
func (c *FaultConn) Read(b []byte) (int, error) {
	if c.triggered.Load() {
		return 0, c.fault.Err
	}
	if lim := c.fault.ReadAfter; lim >= 0 {
		left := lim - c.read.Load()
		if left <= 0 {
			c.Trigger()
			return 0, c.fault.Err
		}
		if int64(len(b)) > left {
			b = b[:left]
		}
	}
	n, err := c.Conn.Read(b)
	c.read.Add(int64(n))
	if err != nil && c.triggered.Load() {
		err = c.fault.Err
	}
	return n, err
}

// Write implements net.Conn.
func (c *FaultConn) Write(b []byte) (int, error) {
	if c.triggered.Load() {
		return 0, c.fault.Err
	}
	cut := false
	if lim := c.fault.WriteAfter; lim >= 0 {
		left := lim - c.written.Load()
		if left <= 0 {
			c.Trigger()
			return 0, c.fault.Err
		}
		if int64(len(b)) > left {
			b, cut = b[:left], true
		}
	}
	n, err := c.Conn.Write(b)
	c.written.Add(int64(n))
	if err != nil {
		if c.triggered.Load() {
			err = c.fault.Err
		}
		return n, err
	}
	if cut {
		c.Trigger()
		return n, c.fault.Err
	}
	return n, nil
}

// FaultEndpoint returns an endpoint that dials ep and wraps every connection (a new [FaultConn]
// with fresh counts) to fail as f says. For an MTLS endpoint the counts are of plaintext bytes,
// after the TLS handshake. Its address is ep's.
func FaultEndpoint(ep endpoint.Endpoint, f Fault) endpoint.Endpoint {
	return faultEndpoint{ep: ep, f: f}
}

type faultEndpoint struct {
	ep endpoint.Endpoint
	f  Fault
}

func (fe faultEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	c, err := fe.ep.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return WrapConn(c, fe.f), nil
}

func (fe faultEndpoint) Address() string { return fe.ep.Address() }

// FaultListener returns a listener that wraps the i-th connection l accepts (from 0) in a
// [FaultConn] failing as f(i) says.
func FaultListener(l net.Listener, f func(i int) Fault) net.Listener {
	return &faultListener{Listener: l, f: f}
}

type faultListener struct {
	net.Listener
	f func(i int) Fault
	n atomic.Int64
}

func (fl *faultListener) Accept() (net.Conn, error) {
	c, err := fl.Listener.Accept()
	if err != nil {
		return nil, err
	}
	i := fl.n.Add(1) - 1
	return WrapConn(c, fl.f(int(i))), nil
}

// Recorder is a connection that records the bytes of every Write, in order, as passed on to the
// underlying connection (a short write records the bytes written). A writer that gathers buffers
// into one vectored write on a real socket writes them one Write per buffer through a Recorder,
// since the vectored path needs the concrete socket type.
type Recorder struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

// NewRecorder returns c wrapped to record its writes.
func NewRecorder(c net.Conn) *Recorder { return &Recorder{Conn: c} }

// Write implements net.Conn.
func (r *Recorder) Write(b []byte) (int, error) {
	n, err := r.Conn.Write(b)
	if n > 0 {
		r.mu.Lock()
		r.writes = append(r.writes, append([]byte(nil), b[:n]...))
		r.mu.Unlock()
	}
	return n, err
}

// Writes returns a copy of the bytes of every Write so far, one slice per call.
func (r *Recorder) Writes() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([][]byte, len(r.writes))
	for i, w := range r.writes {
		out[i] = append([]byte(nil), w...)
	}
	return out
}

// Bytes returns all bytes written so far, concatenated.
func (r *Recorder) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []byte
	for _, w := range r.writes {
		out = append(out, w...)
	}
	return out
}

// SplitFrames splits b, a sequence of whole frames (for example a recorded stream after its
// hello, see [SplitHello]), into frames whose payloads alias b. If b ends inside a frame it
// returns the whole frames before it and an error wrapping [ErrMalformed].
func SplitFrames(b []byte) ([]Frame, error) {
	var fs []Frame
	for len(b) > 0 {
		f, rest, err := ParseFrame(b)
		if err != nil {
			return fs, err
		}
		fs = append(fs, f)
		b = rest
	}
	return fs, nil
}

// DelayConn returns c with every Read delayed by d: each Read sleeps d before reading, ignoring
// deadlines while it sleeps. Inside a synctest bubble the sleep uses the bubble's fake clock.
func DelayConn(c net.Conn, d time.Duration) net.Conn { return &delayConn{Conn: c, d: d} }

type delayConn struct {
	net.Conn
	d time.Duration
}

func (c *delayConn) Read(b []byte) (int, error) {
	time.Sleep(c.d)
	return c.Conn.Read(b)
}
