package testkit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/weftrpc/weft/endpoint"
)

// ProxyMode says what a [Proxy] does with the bytes of its connections.
type ProxyMode int

const (
	// ProxyPass forwards bytes in both directions as they arrive.
	ProxyPass ProxyMode = iota

	// ProxyBlackhole stops forwarding in both directions without closing anything, as a
	// network partition does: each direction holds the last chunk it read and reads no more,
	// so the peers' writes block once their socket buffers are full, and neither peer sees a
	// FIN or an RST (a peer's close is held too). New connections are accepted and held the
	// same way. Leaving the mode forwards what was held, in order.
	ProxyBlackhole

	// ProxyReset resets every open connection on both sides (an RST over TCP, a plain close
	// over Unix sockets, which have no reset) and, while the mode lasts, every new one as
	// soon as it is accepted.
	ProxyReset

	// ProxySlow forwards every chunk after the delay given to [Proxy.Slow]. Each direction
	// delays its chunks one after the other, so a slow proxy also limits throughput.
	ProxySlow
)

// String returns the mode's name: "pass", "blackhole", "reset" or "slow".
func (m ProxyMode) String() string {
	switch m {
	case ProxyPass:
		return "pass"
	case ProxyBlackhole:
		return "blackhole"
	case ProxyReset:
		return "reset"
	case ProxySlow:
		return "slow"
	}
	return fmt.Sprintf("ProxyMode(%d)", int(m))
}

// proxyDialTimeout bounds the proxy's dial of its target.
const proxyDialTimeout = 10 * time.Second

// proxyChunk is the most a direction of a proxied connection reads at once.
const proxyChunk = 32 << 10

// Proxy is an in-process fault-injecting proxy: it accepts connections on a listener of its
// own and forwards each one to a target address, passing, holding, delaying or resetting its
// bytes as its mode says ([ProxyMode]). It starts in [ProxyPass]. Its methods are safe for
// concurrent use. Close stops it and waits for every goroutine it started.
type Proxy struct {
	ln      net.Listener
	network string
	target  string
	dir     string // the directory of a Unix listener's socket, removed by Close
	ctx     context.Context
	cancel  context.CancelFunc // cancelled by Close: ends dials of the target and waits
	wg      sync.WaitGroup     // the accept loop and every connection's goroutines

	mu sync.Mutex
	// guarded by mu
	mode     ProxyMode
	delay    time.Duration
	changed  chan struct{} // closed and replaced when the mode changes
	pairs    map[*proxyPair]struct{}
	accepted int
	closed   bool
}

// NewProxy returns a running proxy forwarding to target over network, "tcp" or "unix". A TCP
// proxy listens on 127.0.0.1 and an ephemeral port; a Unix proxy on a socket in a new short
// directory under os.TempDir, removed by Close.
func NewProxy(network, target string) (*Proxy, error) {
	p := &Proxy{network: network, target: target, changed: make(chan struct{}), pairs: map[*proxyPair]struct{}{}}
	var err error
	switch network {
	case "tcp":
		p.ln, err = net.Listen("tcp", "127.0.0.1:0")
	case "unix":
		p.dir, err = os.MkdirTemp("", "weftpx")
		if err == nil {
			p.ln, err = net.Listen("unix", filepath.Join(p.dir, "s"))
			if err != nil {
				os.RemoveAll(p.dir)
			}
		}
	default:
		return nil, fmt.Errorf("testkit: proxy network %q: want tcp or unix", network)
	}
	if err != nil {
		return nil, fmt.Errorf("testkit: proxy listening: %w", err)
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr returns the address the proxy listens on.
func (p *Proxy) Addr() net.Addr { return p.ln.Addr() }

// Endpoint returns an endpoint that dials the proxy.
func (p *Proxy) Endpoint() endpoint.Endpoint {
	if p.network == "unix" {
		return endpoint.Unix(p.ln.Addr().String())
	}
	return endpoint.TCP(p.ln.Addr().String())
}

// Mode returns the proxy's mode.
func (p *Proxy) Mode() ProxyMode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// Pass makes the proxy forward bytes as they arrive, releasing what a blackhole held.
func (p *Proxy) Pass() { p.setMode(ProxyPass, 0) }

// Blackhole makes the proxy hold the bytes of every connection; see [ProxyBlackhole].
func (p *Proxy) Blackhole() { p.setMode(ProxyBlackhole, 0) }

// Slow makes the proxy delay every chunk by d; see [ProxySlow].
func (p *Proxy) Slow(d time.Duration) { p.setMode(ProxySlow, d) }

// Reset resets every open connection and every new one until the mode changes; see
// [ProxyReset].
func (p *Proxy) Reset() {
	p.mu.Lock()
	p.setModeLocked(ProxyReset, 0)
	pairs := make([]*proxyPair, 0, len(p.pairs))
	for pp := range p.pairs {
		pairs = append(pairs, pp)
	}
	p.mu.Unlock()
	for _, pp := range pairs {
		pp.reset()
	}
}

func (p *Proxy) setMode(m ProxyMode, d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.setModeLocked(m, d)
}

// setModeLocked sets the mode and wakes the connections waiting for it to change.
//
// REQUIRES: p.mu is held.
func (p *Proxy) setModeLocked(m ProxyMode, d time.Duration) {
	p.mode, p.delay = m, d
	close(p.changed)
	p.changed = make(chan struct{})
}

// Accepted returns the number of connections the proxy has accepted.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// Open returns the number of proxied connections that are open (connected to the target and
// not yet closed on both sides).
func (p *Proxy) Open() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pairs)
}

// Close stops the proxy: it closes its listener and every connection (without forwarding
// what a blackhole held), and waits for its goroutines to exit. It can be called more than
// once and always returns nil.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return nil
	}
	p.closed = true
	pairs := make([]*proxyPair, 0, len(p.pairs))
	for pp := range p.pairs {
		pairs = append(pairs, pp)
	}
	p.mu.Unlock()
	p.cancel()
	p.ln.Close()
	for _, pp := range pairs {
		pp.close()
	}
	p.wg.Wait()
	if p.dir != "" {
		os.RemoveAll(p.dir)
	}
	return nil
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if p.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// A transient failure (such as running out of descriptors): try again shortly.
			t := time.NewTimer(10 * time.Millisecond)
			select {
			case <-t.C:
			case <-p.ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.accepted++
		reset := p.mode == ProxyReset
		p.mu.Unlock()
		if reset {
			resetConn(c)
			continue
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

// serve dials the target for the accepted connection c and forwards between them until both
// directions have ended.
func (p *Proxy) serve(c net.Conn) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, proxyDialTimeout)
	var d net.Dialer
	s, err := d.DialContext(ctx, p.network, p.target)
	cancel()
	if err != nil {
		// The target refuses: the client sees its connection reset, as near as a proxy can
		// come to a refused connection.
		resetConn(c)
		return
	}
	pp := &proxyPair{client: c, server: s, done: make(chan struct{})}
	p.mu.Lock()
	if p.closed || p.mode == ProxyReset {
		p.mu.Unlock()
		pp.reset()
		return
	}
	p.pairs[pp] = struct{}{}
	p.mu.Unlock()
	defer func() {
		pp.close()
		p.mu.Lock()
		delete(p.pairs, pp)
		p.mu.Unlock()
	}()
	up := make(chan struct{})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(up)
		p.pump(pp, s, c)
	}()
	p.pump(pp, c, s)
	<-up
}

// pump forwards src to dst until src ends, then half-closes dst (or closes the pair if src
// failed). Every chunk, and the end, waits for the mode to let it through.
func (p *Proxy) pump(pp *proxyPair, src, dst net.Conn) {
	buf := make([]byte, proxyChunk)
	for {
		n, err := src.Read(buf)
		if n == 0 && err == nil {
			continue
		}
		if !p.await(pp) {
			pp.close()
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				pp.close()
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
					return
				}
			}
			pp.close()
			return
		}
	}
}

// await waits until the mode lets a chunk of pp through: at once when passing, after the delay
// when slow, and when the mode changes while holding. It returns false if the pair is closed,
// the proxy is closed or the pair is to be reset.
func (p *Proxy) await(pp *proxyPair) bool {
	for {
		p.mu.Lock()
		mode, delay, changed, closed := p.mode, p.delay, p.changed, p.closed
		p.mu.Unlock()
		if closed {
			return false
		}
		switch mode {
		case ProxyPass:
			return true
		case ProxyReset:
			return false
		case ProxySlow:
			t := time.NewTimer(delay)
			select {
			case <-t.C:
				return true
			case <-pp.done:
				t.Stop()
				return false
			case <-p.ctx.Done():
				t.Stop()
				return false
			}
		}
		select {
		case <-changed:
		case <-pp.done:
			return false
		case <-p.ctx.Done():
			return false
		}
	}
}

// proxyPair is a proxied connection: the accepted client side and the server side.
type proxyPair struct {
	client, server net.Conn
	once           sync.Once
	done           chan struct{} // closed when the pair is closed
}

// close closes both sides (an orderly close).
func (pp *proxyPair) close() {
	pp.once.Do(func() {
		close(pp.done)
		pp.client.Close()
		pp.server.Close()
	})
}

// reset closes both sides with an RST where the transport has one.
func (pp *proxyPair) reset() {
	pp.once.Do(func() {
		close(pp.done)
		resetConn(pp.client)
		resetConn(pp.server)
	})
}

// resetConn closes c, with an RST if it is a TCP connection.
func resetConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
