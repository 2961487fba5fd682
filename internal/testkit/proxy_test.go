package testkit_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// pxBound is the generous bound on anything that must not hang.
const pxBound = 10 * time.Second

// pxQuiet is how long a read waits to show that nothing arrives.
const pxQuiet = 150 * time.Millisecond

// pxTarget is a target for a proxy: it accepts connections and hands their server ends to the
// test.
type pxTarget struct {
	l     net.Listener
	conns chan net.Conn
	done  chan struct{}
}

// pxListen starts a target on network ("tcp" or "unix"). Cleanup closes the listener, every
// accepted connection and joins the accept loop.
func pxListen(t *testing.T, network string) *pxTarget {
	t.Helper()
	var l net.Listener
	var err error
	if network == "unix" {
		dir, derr := os.MkdirTemp("", "weftpxt")
		if derr != nil {
			t.Fatal(derr)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		l, err = net.Listen("unix", filepath.Join(dir, "s"))
	} else {
		l, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		t.Fatal(err)
	}
	tg := &pxTarget{l: l, conns: make(chan net.Conn, 16), done: make(chan struct{})}
	go func() {
		defer close(tg.done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tg.conns <- c
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-tg.done
		close(tg.conns)
		for c := range tg.conns {
			c.Close()
		}
	})
	return tg
}

// accept returns the server end of the next connection the target accepted.
func (tg *pxTarget) accept(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-tg.conns:
		c.SetDeadline(time.Now().Add(pxBound))
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(pxBound):
		t.Fatalf("the target accepted no connection within %v", pxBound)
		return nil
	}
}

// pxProxy starts a proxy to tg; cleanup closes it.
func pxProxy(t *testing.T, network string, tg *pxTarget) *testkit.Proxy {
	t.Helper()
	p, err := testkit.NewProxy(network, tg.l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// pxDial dials the proxy; cleanup closes the connection.
func pxDial(t *testing.T, p *testkit.Proxy) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pxBound)
	defer cancel()
	c, err := p.Endpoint().Dial(ctx)
	if err != nil {
		t.Fatalf("dialling the proxy: %v", err)
	}
	c.SetDeadline(time.Now().Add(pxBound))
	t.Cleanup(func() { c.Close() })
	return c
}

// pxWrite writes msg to c.
func pxWrite(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// pxRead reads exactly len(want) bytes from c and checks them.
func pxRead(t *testing.T, what string, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(pxBound))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("%s: reading %q: %v", what, want, err)
	}
	if string(got) != want {
		t.Fatalf("%s: read %q, want %q", what, got, want)
	}
}

// pxSilent checks that a read of c neither delivers bytes nor ends within pxQuiet: it times out.
func pxSilent(t *testing.T, what string, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(pxQuiet))
	var b [16]byte
	n, err := c.Read(b[:])
	var ne net.Error
	if n != 0 || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: read returned %q, %v; want a timeout (nothing forwarded, no FIN, no RST)", what, b[:n], err)
	}
	c.SetReadDeadline(time.Now().Add(pxBound))
}

// pxWantReset checks that reading c fails with a connection reset (TCP) or ends (Unix).
func pxWantReset(t *testing.T, what, network string, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(pxBound))
	_, err := io.ReadAll(c)
	switch {
	case network == "tcp" && !errors.Is(err, syscall.ECONNRESET):
		t.Errorf("%s: read ended with %v, want a connection reset", what, err)
	case network == "unix" && err != nil && !errors.Is(err, syscall.ECONNRESET):
		t.Errorf("%s: read ended with %v, want the end of the connection", what, err)
	}
}

// pxDialReset dials the proxy, which resets the connection at once: either the dial or the
// first read fails with a reset (TCP), or the connection ends (Unix).
func pxDialReset(t *testing.T, what, network string, p *testkit.Proxy) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pxBound)
	defer cancel()
	c, err := p.Endpoint().Dial(ctx)
	if err != nil {
		// The reset can arrive before the dial has seen the connection established.
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: dial failed with %v, want a reset", what, err)
		}
		return
	}
	defer c.Close()
	pxWantReset(t, what, network, c)
}

var pxNetworks = []string{"tcp", "unix"}

func TestProxyPass(t *testing.T) {
	for _, network := range pxNetworks {
		t.Run(network, func(t *testing.T) {
			tg := pxListen(t, network)
			p := pxProxy(t, network, tg)
			if p.Mode() != testkit.ProxyPass {
				t.Errorf("new proxy's mode is %v, want pass", p.Mode())
			}
			c := pxDial(t, p)
			s := tg.accept(t)
			pxWrite(t, c, "ping")
			pxRead(t, "target", s, "ping")
			pxWrite(t, s, "pong")
			pxRead(t, "client", c, "pong")

			// A large message crosses in several chunks, whole and in order.
			big := bytes.Repeat([]byte("0123456789abcdef"), 16<<10)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(big)
				errc <- err
			}()
			pxRead(t, "target, 256 KiB", s, string(big))
			if err := <-errc; err != nil {
				t.Fatalf("writing 256 KiB: %v", err)
			}

			// The client's close reaches the target as an orderly end.
			c.Close()
			if b, err := io.ReadAll(s); err != nil || len(b) != 0 {
				t.Errorf("target after the client closed: read %q, %v; want a clean end", b, err)
			}
			if n := p.Accepted(); n != 1 {
				t.Errorf("Accepted() = %d, want 1", n)
			}
		})
	}
}

func TestProxyBlackhole(t *testing.T) {
	for _, network := range pxNetworks {
		t.Run(network, func(t *testing.T) {
			tg := pxListen(t, network)
			p := pxProxy(t, network, tg)
			c := pxDial(t, p)
			s := tg.accept(t)
			pxWrite(t, c, "before")
			pxRead(t, "target before the blackhole", s, "before")

			p.Blackhole()
			if p.Mode() != testkit.ProxyBlackhole {
				t.Errorf("mode is %v, want blackhole", p.Mode())
			}
			pxWrite(t, c, "held up")
			pxWrite(t, s, "held down")
			pxSilent(t, "target during the blackhole", s)
			pxSilent(t, "client during the blackhole", c)

			// A connection made during the blackhole is held too.
			c2 := pxDial(t, p)
			s2 := tg.accept(t)
			pxWrite(t, c2, "new")
			pxSilent(t, "target of a new connection during the blackhole", s2)

			// The client closes: the target sees no end while the blackhole lasts, also when
			// nothing else was held before the end.
			c2.Close()
			pxSilent(t, "target of a closed connection during the blackhole", s2)
			c3 := pxDial(t, p)
			s3 := tg.accept(t)
			c3.Close()
			pxSilent(t, "target of a connection closed before sending anything, during the blackhole", s3)

			// Healing forwards what was held, in order, then the end.
			p.Pass()
			pxRead(t, "target after the heal", s, "held up")
			pxRead(t, "client after the heal", c, "held down")
			pxRead(t, "new connection's target after the heal", s2, "new")
			for _, sc := range []net.Conn{s2, s3} {
				if b, err := io.ReadAll(sc); err != nil || len(b) != 0 {
					t.Errorf("target of a closed connection after the heal: read %q, %v; want a clean end", b, err)
				}
			}
			pxWrite(t, c, "after")
			pxRead(t, "target after the heal", s, "after")
		})
	}
}

func TestProxyReset(t *testing.T) {
	for _, network := range pxNetworks {
		t.Run(network, func(t *testing.T) {
			tg := pxListen(t, network)
			p := pxProxy(t, network, tg)
			c := pxDial(t, p)
			s := tg.accept(t)
			pxWrite(t, c, "x")
			pxRead(t, "target", s, "x")

			p.Reset()
			pxWantReset(t, "client after Reset", network, c)
			pxWantReset(t, "target after Reset", network, s)

			// While the mode lasts, new connections are reset at once and never reach the
			// target.
			pxDialReset(t, "new connection during reset mode", network, p)
			select {
			case s2 := <-tg.conns:
				s2.Close()
				t.Errorf("a connection made in reset mode reached the target")
			case <-time.After(pxQuiet):
			}

			p.Pass()
			c3 := pxDial(t, p)
			s3 := tg.accept(t)
			pxWrite(t, c3, "again")
			pxRead(t, "target after leaving reset mode", s3, "again")
			if n, want := p.Accepted(), 3; n != want {
				t.Errorf("Accepted() = %d, want %d", n, want)
			}
		})
	}
}

// Slow mode delays every chunk: a round trip through it takes at least two delays. (A lower
// bound only: a slow machine can only make it longer.)
func TestProxySlow(t *testing.T) {
	tg := pxListen(t, "tcp")
	p := pxProxy(t, "tcp", tg)
	c := pxDial(t, p)
	s := tg.accept(t)
	const d = 40 * time.Millisecond
	p.Slow(d)
	if p.Mode() != testkit.ProxySlow {
		t.Errorf("mode is %v, want slow", p.Mode())
	}
	start := time.Now()
	pxWrite(t, c, "a")
	pxRead(t, "target", s, "a")
	pxWrite(t, s, "b")
	pxRead(t, "client", c, "b")
	if took := time.Since(start); took < 2*d {
		t.Errorf("a round trip through a proxy delaying each chunk by %v took %v, want at least %v", d, took, 2*d)
	}
	p.Pass()
	pxWrite(t, c, "c")
	pxRead(t, "target after leaving slow mode", s, "c")
}

// A target that refuses connections makes the proxy reset the client's connection.
func TestProxyTargetDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var p *testkit.Proxy
	for p == nil || p.Addr().String() == addr {
		// The proxy must not get the port just freed: it would then be its own target.
		if p != nil {
			p.Close()
		}
		if p, err = testkit.NewProxy("tcp", addr); err != nil {
			t.Fatal(err)
		}
	}
	defer p.Close()
	pxDialReset(t, "client of a proxy whose target is down", "tcp", p)
}

// Close ends held connections without forwarding what they held, joins every goroutine (the
// package's TestMain checks for leaks), and makes later dials fail.
func TestProxyClose(t *testing.T) {
	for _, network := range pxNetworks {
		t.Run(network, func(t *testing.T) {
			tg := pxListen(t, network)
			p := pxProxy(t, network, tg)
			idle := pxDial(t, p) // its directions wait in reads when Close comes
			tg.accept(t)
			c := pxDial(t, p)
			s := tg.accept(t)
			p.Blackhole()
			pxWrite(t, c, "held")
			// The target's accept can return before the proxy has recorded the pair it dialled.
			for deadline := time.Now().Add(pxBound); p.Open() < 2 && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if n := p.Open(); n != 2 {
				t.Errorf("Open() = %d, want 2", n)
			}
			done := make(chan struct{})
			go func() {
				p.Close()
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(pxBound):
				t.Fatalf("Close with a held connection did not return within %v", pxBound)
			}
			for _, c := range []net.Conn{idle, c} {
				c.SetReadDeadline(time.Now().Add(pxBound))
				if b, err := io.ReadAll(c); len(b) != 0 {
					t.Errorf("client after Close: read %q, %v; want the end of the connection", b, err)
				}
			}
			s.SetReadDeadline(time.Now().Add(pxBound))
			if b, err := io.ReadAll(s); len(b) != 0 {
				t.Errorf("target after Close: read %q (%v); want nothing of what was held", b, err)
			}
			if n := p.Open(); n != 0 {
				t.Errorf("Open() after Close = %d, want 0", n)
			}
			p.Close() // a second Close is harmless
			ctx, cancel := context.WithTimeout(context.Background(), pxBound)
			defer cancel()
			if c2, err := p.Endpoint().Dial(ctx); err == nil {
				c2.Close()
				t.Errorf("dialling a closed proxy succeeded")
			}
		})
	}
}

func TestProxyBadNetwork(t *testing.T) {
	if p, err := testkit.NewProxy("udp", "127.0.0.1:1"); err == nil {
		p.Close()
		t.Fatalf("NewProxy(udp) succeeded, want an error")
	}
}

func TestProxyModeString(t *testing.T) {
	for m, want := range map[testkit.ProxyMode]string{
		testkit.ProxyPass: "pass", testkit.ProxyBlackhole: "blackhole", testkit.ProxyReset: "reset",
		testkit.ProxySlow: "slow", testkit.ProxyMode(9): "ProxyMode(9)",
	} {
		if got := m.String(); got != want {
			t.Errorf("ProxyMode(%d).String() = %q, want %q", int(m), got, want)
		}
	}
}
