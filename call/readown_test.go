package call

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
)

// The methods of the tests: Echo returns its argument; Hold waits until release is closed.
var (
	roEchoKey = MakeMethodKey("readown", "Echo")
	roHoldKey = MakeMethodKey("readown", "Hold")
)

// roSetup serves the readown methods on every transport and returns a client of each.
func roSetup(t *testing.T, tr testkit.Transport, release chan struct{}) (*Conn, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	var hm HandlerMap
	hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	hm.Set("readown", "Hold", func(ctx context.Context, args []byte) ([]byte, error) {
		<-release // not ctx: no reply may come before the client gives up
		return args, nil
	})
	l, ep := tr.Listen(t)
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	quiet := slog.New(slog.DiscardHandler)
	go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
	t.Cleanup(func() {
		stop()
		<-served
	})
	c, err := Dial(ctx, ep, ClientOptions{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, ctx
}

// Sequential calls whose context cannot end read their own replies; calls with a context that
// can end leave the reading to the reader, so cancellation and deadlines work as before and the
// role is handed back; the connection stays usable throughout.
func TestReadOwnMixedContexts(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			c, ctx := roSetup(t, tr, release)
			bg := context.Background() // bounded by the server's and the test's deadlines
			echo := func(ctx context.Context, i int) {
				t.Helper()
				msg := []byte(fmt.Sprint("m", i))
				got, err := c.Call(ctx, roEchoKey, msg, CallOptions{})
				if err != nil || string(got) != string(msg) {
					t.Fatalf("call %d: %q, %v", i, got, err)
				}
			}
			for i := range 50 {
				echo(bg, i)
			}
			c.roleMu.Lock()
			takes := c.roleTakes
			c.roleMu.Unlock()
			if takes == 0 {
				t.Errorf("50 sequential calls with a context that cannot end: no caller read its own reply")
			}

			// A call with a cancellable context is cancelled while the reader reads.
			cctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() {
				_, err := c.Call(cctx, roHoldKey, []byte("x"), CallOptions{})
				done <- err
			}()
			time.Sleep(10 * time.Millisecond)
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("cancelled call: %v, want context.Canceled", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a cancelled call did not return")
			}

			// Deadline calls and own-read calls alternate, with idle gaps longer than the grace.
			for i := range 20 {
				if i%5 == 4 {
					time.Sleep(5 * graceLimit)
				}
				if i%2 == 0 {
					echo(bg, i)
				} else {
					echo(ctx, i)
				}
			}
			start := time.Now()
			dctx, dcancel := context.WithTimeout(ctx, 100*time.Millisecond)
			_, err := c.Call(dctx, roHoldKey, []byte("y"), CallOptions{})
			dcancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("call past its deadline: %v, want context.DeadlineExceeded", err)
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("call with a 100ms deadline returned after %v", took)
			}
			echo(bg, 100)
			if _, err := c.Ping(ctx); err != nil {
				t.Errorf("ping after the calls: %v", err)
			}
			echo(bg, 101)
		})
	}
}

// A connection whose server goes away while its role is free is seen closed: the background
// reader takes the role back and reads the end.
func TestReadOwnIdleEndSeen(t *testing.T) {
	for _, tr := range testkit.Transports() {
		t.Run(tr.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var hm HandlerMap
			hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
			l, ep := tr.Listen(t)
			sctx, stop := context.WithCancel(ctx)
			served := make(chan error, 1)
			quiet := slog.New(slog.DiscardHandler)
			go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
			c, err := Dial(ctx, ep, ClientOptions{Logger: quiet})
			if err != nil {
				stop()
				<-served
				t.Fatal(err)
			}
			defer c.Close()
			for range 5 { // read by their callers: the role is left free after the last
				if _, err := c.Call(context.Background(), roEchoKey, []byte("x"), CallOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			stop()
			<-served
			deadline := time.Now().Add(5 * time.Second)
			for c.Err() == nil && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if c.Err() == nil {
				t.Fatal("the server closed, but the idle connection was not seen closed within 5s")
			}
		})
	}
}

// roKey is a context key.
type roKey struct{}

// roUncomparable is a context whose values cannot be compared with ==.
type roUncomparable struct {
	context.Context
	tags []int
}

// roHolder reports whether a caller holds the read role, and its context.
func roHolder(c *Conn) (bool, context.Context) {
	c.roleMu.Lock()
	defer c.roleMu.Unlock()
	return c.callerHolds, c.ownCtx
}

// A caller reading its own reply with a context that can end returns the instant the context
// ends: cancelled, past its deadline, or sharing a context cancelled by someone else. Each time
// the connection stays usable. Watches of a shared context are kept across calls; a context
// used once is no longer watched after its call.
func TestReadOwnContextEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		l := testkit.NewPipeListener("readown")
		var hm HandlerMap
		hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
		hm.Set("readown", "Hold", func(ctx context.Context, args []byte) ([]byte, error) {
			select {
			case <-release:
			case <-ctx.Done():
				// The reply comes after the client gave up, which it must do unaided.
				time.Sleep(time.Millisecond)
			}
			return args, nil
		})
		ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
		defer cancel()
		sctx, stop := context.WithCancel(ctx)
		served := make(chan error, 1)
		quiet := slog.New(slog.DiscardHandler)
		go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
		defer func() {
			close(release)
			stop()
			<-served
		}()
		c, err := Dial(ctx, l, ClientOptions{Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo := func(ctx context.Context, what string) {
			t.Helper()
			if got, err := c.Call(ctx, roEchoKey, []byte(what), CallOptions{}); err != nil || string(got) != what {
				t.Fatalf("%s: %q, %v", what, got, err)
			}
		}
		// hold starts a Hold call, waits until its caller reads its own reply, and ends it
		// with end; the call must fail with want at the instant end returned.
		hold := func(name string, hctx context.Context, end func(), want error) {
			t.Helper()
			done := make(chan error, 1)
			go func() {
				_, err := c.Call(hctx, roHoldKey, []byte(name), CallOptions{})
				done <- err
			}()
			synctest.Wait()
			if holds, own := roHolder(c); !holds || own != hctx {
				t.Fatalf("%s: the caller does not read its own reply (holds %v)", name, holds)
			}
			end()
			at := time.Now()
			err := <-done
			if !errors.Is(err, want) {
				t.Errorf("%s: %v, want %v", name, err, want)
			}
			if took := time.Since(at); took != 0 {
				t.Errorf("%s: returned %v after its context ended, want at once", name, took)
			}
			time.Sleep(2 * time.Millisecond) // the server's late reply ends the call there
			echo(ctx, name+": after")
			echo(ctx, name+": after, the role free again")
		}

		// A shared context: watched once, and the watch kept between its calls.
		shared, cancelShared := context.WithCancel(ctx)
		for i := range 5 {
			echo(shared, fmt.Sprint("shared ", i))
		}
		c.roleMu.Lock()
		watched, takes := c.watchDone == shared.Done(), c.roleTakes
		c.roleMu.Unlock()
		if takes < 4 || !watched {
			t.Fatalf("after 5 calls sharing a context: %d read by their callers, watched %v; want at least 4, true", takes, watched)
		}

		cctx, cancelOne := context.WithCancel(ctx)
		hold("cancelled", cctx, cancelOne, context.Canceled)
		dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer dcancel()
		hold("deadline", dctx, func() { time.Sleep(50 * time.Millisecond) }, context.DeadlineExceeded)

		echo(shared, "shared again")
		hold("shared cancelled", shared, cancelShared, context.Canceled)

		// Contexts are told apart by their Done channels: values added per call share the
		// watch of the context below them, and contexts that cannot be compared are fine.
		shared2, cancelShared2 := context.WithCancel(ctx)
		defer cancelShared2()
		for i := range 3 {
			echo(context.WithValue(shared2, roKey{}, i), fmt.Sprint("with a value ", i))
			echo(roUncomparable{shared2, []int{i}}, fmt.Sprint("uncomparable ", i))
		}
		c.roleMu.Lock()
		watched = c.watchDone == shared2.Done()
		c.roleMu.Unlock()
		if !watched {
			t.Errorf("calls with contexts over one cancellable context: it is not watched")
		}

		// A context used for one call is not watched after it.
		one, cancelOne2 := context.WithCancel(ctx)
		defer cancelOne2()
		echo(one, "once")
		c.roleMu.Lock()
		stale := c.watchDone == one.Done()
		c.roleMu.Unlock()
		if stale {
			t.Errorf("a context used for one call is still watched after it")
		}
		if _, err := c.Ping(ctx); err != nil {
			t.Errorf("ping: %v", err)
		}
	})
}

// splitListener's connections write the first half of every Write, wait gap, and write the
// rest: a TLS record on top of them arrives in two parts.
type splitListener struct {
	net.Listener
	gap time.Duration
}

func (l splitListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return splitConn{c, l.gap}, nil
}

type splitConn struct {
	net.Conn
	gap time.Duration
}

func (c splitConn) Write(p []byte) (int, error) {
	if len(p) < 2 {
		return c.Conn.Write(p)
	}
	h := len(p) / 2
	n, err := c.Conn.Write(p[:h])
	if err != nil {
		return n, err
	}
	time.Sleep(c.gap)
	m, err := c.Conn.Write(p[h:])
	return n + m, err
}

// Over TLS, a caller reading its own reply may be interrupted in the middle of a record (the
// server's records arrive in halves, 30ms apart, and each call is cancelled 15ms in): the
// record's first half is kept, and the connection reads on correctly. Whether a cancelled call
// lost the race to its reply or not, every later call gets its own reply.
func TestReadOwnInterruptTLS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ca := testkit.NewCA(t)
	srvCert := ca.Issue(t, testkit.CertOptions{CommonName: testkit.MTLSServerName, DNSNames: []string{testkit.MTLSServerName}})
	cliCert := ca.Issue(t, testkit.CertOptions{CommonName: testkit.MTLSClientName, Client: true})
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	const gap = 30 * time.Millisecond
	l := tls.NewListener(splitListener{tcp, gap}, testkit.ServerTLS(t, ca, srvCert))
	var hm HandlerMap
	hm.Set("readown", "Echo", func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	quiet := slog.New(slog.DiscardHandler)
	go func() { served <- Serve(sctx, NetListener(l, &hm), ServerOptions{Logger: quiet, DrainTimeout: -1}) }()
	defer func() {
		stop()
		<-served
	}()
	ep := endpoint.MTLS(testkit.ClientTLS(t, ca, cliCert, testkit.MTLSServerName), endpoint.TCP(tcp.Addr().String()))
	c, err := Dial(ctx, ep, ClientOptions{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(what string) {
		t.Helper()
		if got, err := c.Call(ctx, roEchoKey, []byte(what), CallOptions{}); err != nil || string(got) != what {
			t.Fatalf("%s: %q, %v", what, got, err)
		}
	}
	echo("warm-up")
	interrupted := 0
	for i := range 6 {
		c.roleMu.Lock()
		takes := c.roleTakes
		c.roleMu.Unlock()
		cctx, ccancel := context.WithCancel(ctx)
		timer := time.AfterFunc(gap/2, ccancel)
		got, err := c.Call(cctx, roEchoKey, []byte(fmt.Sprint("cancelled ", i)), CallOptions{})
		timer.Stop()
		ccancel()
		switch {
		case errors.Is(err, context.Canceled):
			c.roleMu.Lock()
			if c.roleTakes > takes {
				interrupted++
			}
			c.roleMu.Unlock()
		case err != nil || string(got) != fmt.Sprint("cancelled ", i):
			t.Fatalf("call %d: %q, %v", i, got, err)
		}
		echo(fmt.Sprint("after ", i))
		echo(fmt.Sprint("after ", i, ", again"))
	}
	if interrupted == 0 {
		t.Errorf("no call was interrupted while reading its own reply")
	}
	t.Logf("%d of 6 calls interrupted while reading their own replies", interrupted)
}
