package stack

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// RawTCP returns the floor: a length-prefixed echo over plain sockets, with no request ids, no
// method, no deadline on the wire and no multiplexing. The server runs one goroutine per
// connection that reads a message and writes it back; the client gives every concurrent caller
// a connection of its own (an idle one, or a new one). Each side reads through a 4 KiB
// bufio.Reader, writes a message with one system call (small ones copied behind their length,
// large ones as a vectored write), and the client allocates the reply its caller owns.
//
// The client honours a context's deadline (as the connection's deadline); a context cancelled
// without one does not interrupt a call already sent.
func RawTCP() Stack { return rawStack{} }

type rawStack struct{}

var _ Stack = rawStack{}

func (rawStack) Name() string { return "raw-tcp" }

const (
	rawHeader       = 4       // bytes of the big-endian length before each message
	rawReadBuffer   = 4 << 10 // bytes of each side's bufio.Reader
	rawFlattenLimit = 4 << 10 // messages up to this size are copied behind their header
	rawDefaultMax   = 64 << 20
)

// errRawTooLarge is the error of a message over the configured maximum.
var errRawTooLarge = errors.New("stack: raw-tcp: message too large")

// rawMax returns the largest message of cfg.
func rawMax(cfg Config) int {
	if cfg.MaxMessageSize > 0 {
		return cfg.MaxMessageSize
	}
	return rawDefaultMax
}

func (rawStack) Serve(l net.Listener, cfg Config) (Server, error) {
	limit := rawMax(cfg)
	return startServer(l, func(nc net.Conn) {
		r := bufio.NewReaderSize(nc, rawReadBuffer)
		var (
			hdr [rawHeader]byte
			buf []byte // the header and the message, reused
		)
		for {
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				return
			}
			n := int(binary.BigEndian.Uint32(hdr[:]))
			if n > limit {
				return
			}
			if cap(buf) < rawHeader+n {
				buf = make([]byte, rawHeader+n)
			}
			buf = buf[:rawHeader+n]
			copy(buf, hdr[:])
			if _, err := io.ReadFull(r, buf[rawHeader:]); err != nil {
				return
			}
			if _, err := nc.Write(buf); err != nil {
				return
			}
		}
	}), nil
}

func (rawStack) Dial(ctx context.Context, network, addr string, cfg Config) (Client, error) {
	c := &rawClient{network: network, addr: addr, limit: rawMax(cfg)}
	// Dial one connection now, so that a bad address fails here.
	rc, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	c.idle = append(c.idle, rc)
	return c, nil
}

type rawClient struct {
	network, addr string
	limit         int

	// mu guards idle, all and closed.
	mu     sync.Mutex
	idle   []*rawConn            // connections no caller is using
	all    map[*rawConn]struct{} // every open connection
	closed bool
}

// rawConn is one connection of the client, used by one caller at a time.
type rawConn struct {
	nc       net.Conn
	r        *bufio.Reader
	wbuf     []byte      // header and small message
	vec      [2][]byte   // header and large message
	bufs     net.Buffers // what a vectored write still has to write
	deadline time.Time   // the deadline set on nc
	hdr      [rawHeader]byte
}

func (c *rawClient) dial(ctx context.Context) (*rawConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, c.network, c.addr)
	if err != nil {
		return nil, err
	}
	rc := &rawConn{nc: nc, r: bufio.NewReaderSize(nc, rawReadBuffer)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		nc.Close()
		return nil, errClosed
	}
	if c.all == nil {
		c.all = make(map[*rawConn]struct{})
	}
	c.all[rc] = struct{}{}
	return rc, nil
}

// get returns an idle connection, or dials one.
func (c *rawClient) get(ctx context.Context) (*rawConn, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errClosed
	}
	if n := len(c.idle); n > 0 {
		rc := c.idle[n-1]
		c.idle = c.idle[:n-1]
		c.mu.Unlock()
		return rc, nil
	}
	c.mu.Unlock()
	return c.dial(ctx)
}

// put makes rc idle again, or closes it if the call on it failed or the client is closed.
func (c *rawClient) put(rc *rawConn, failed bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if failed || c.closed {
		rc.nc.Close()
		delete(c.all, rc)
		return
	}
	c.idle = append(c.idle, rc)
}

func (c *rawClient) Call(ctx context.Context, payload []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(payload) > c.limit {
		return nil, errRawTooLarge
	}
	rc, err := c.get(ctx)
	if err != nil {
		return nil, err
	}
	reply, err := rc.call(ctx, payload, c.limit)
	c.put(rc, err != nil)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("stack: raw-tcp: %w (%w)", ctxErr, err)
		}
		return nil, err
	}
	return reply, nil
}

// call writes payload and reads the reply.
func (rc *rawConn) call(ctx context.Context, payload []byte, limit int) ([]byte, error) {
	if d, _ := ctx.Deadline(); !d.Equal(rc.deadline) {
		if err := rc.nc.SetDeadline(d); err != nil {
			return nil, err
		}
		rc.deadline = d
	}
	binary.BigEndian.PutUint32(rc.hdr[:], uint32(len(payload)))
	if len(payload) <= rawFlattenLimit {
		rc.wbuf = append(append(rc.wbuf[:0], rc.hdr[:]...), payload...)
		if _, err := rc.nc.Write(rc.wbuf); err != nil {
			return nil, err
		}
	} else {
		rc.vec = [2][]byte{rc.hdr[:], payload}
		rc.bufs = rc.vec[:]
		_, err := rc.bufs.WriteTo(rc.nc)
		rc.vec = [2][]byte{}
		if err != nil {
			return nil, err
		}
	}
	if _, err := io.ReadFull(rc.r, rc.hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(rc.hdr[:]))
	if n > limit {
		return nil, errRawTooLarge
	}
	reply := make([]byte, n)
	if _, err := io.ReadFull(rc.r, reply); err != nil {
		return nil, err
	}
	return reply, nil
}

func (c *rawClient) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for rc := range c.all {
		rc.nc.Close()
	}
	c.all = nil
	c.idle = nil
	return nil
}
