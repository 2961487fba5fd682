package testkit

import (
	"context"
	"net"
	"sync"
	"syscall"

	"github.com/weftrpc/weft/endpoint"
)

// PipeListener is an in-memory listener whose connections are [net.Pipe]s: synchronous and
// unbuffered, with no goroutine of their own. It is also the endpoint that dials it, so one value
// serves both sides of a test. It starts no goroutine and works inside a testing/synctest bubble
// when created there (its channels then belong to the bubble, so Accept and Dial block durably).
type PipeListener struct {
	name      string
	conns     chan net.Conn // unbuffered: a Dial hands its server end to one Accept
	done      chan struct{}
	closeOnce sync.Once
}

var (
	_ net.Listener      = (*PipeListener)(nil)
	_ endpoint.Endpoint = (*PipeListener)(nil)
)

// NewPipeListener returns a listener named name; its address is "pipe://name".
func NewPipeListener(name string) *PipeListener {
	return &PipeListener{name: name, conns: make(chan net.Conn), done: make(chan struct{})}
}

// Accept waits for a Dial and returns the server end of its pipe. After Close it returns an
// error wrapping net.ErrClosed.
func (l *PipeListener) Accept() (net.Conn, error) {
	select {
	case <-l.done:
		return nil, l.opError("accept", net.ErrClosed)
	default:
	}
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, l.opError("accept", net.ErrClosed)
	}
}

// Close closes the listener: blocked and later Accepts return net.ErrClosed and Dials fail with
// an error wrapping syscall.ECONNREFUSED. Connections already accepted stay open. Close is
// idempotent and always returns nil.
func (l *PipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

// Addr returns the listener's address: network "pipe", string the listener's name.
func (l *PipeListener) Addr() net.Addr { return pipeAddr(l.name) }

// Dial returns the client end of a new pipe once an Accept has taken the server end. It fails
// with an error wrapping syscall.ECONNREFUSED if the listener is or gets closed first, or with
// ctx's error if ctx ends first.
func (l *PipeListener) Dial(ctx context.Context) (net.Conn, error) {
	select {
	case <-l.done:
		return nil, l.opError("dial", syscall.ECONNREFUSED)
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, l.opError("dial", err)
	}
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		err := l.opError("dial", syscall.ECONNREFUSED)
		client.Close()
		server.Close()
		return nil, err
	case <-ctx.Done():
		client.Close()
		server.Close()
		return nil, l.opError("dial", ctx.Err())
	}
}

// Address returns "pipe://" followed by the listener's name.
func (l *PipeListener) Address() string { return "pipe://" + l.name }

// String returns the listener's address.
func (l *PipeListener) String() string { return l.Address() }

func (l *PipeListener) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "pipe", Addr: l.Addr(), Err: err}
}

type pipeAddr string

func (pipeAddr) Network() string  { return "pipe" }
func (a pipeAddr) String() string { return string(a) }
