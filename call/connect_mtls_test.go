package call_test

// RELIABILITY.md scenario 25 through call.Connect with endpoint.MTLS endpoints: the
// authentication failure matrix under TLS 1.2 and 1.3, failures that are neither retried by the
// call nor counted against other endpoints, redialling with backoff so that a rotated
// certificate recovers, and mTLS servers that survive plaintext, garbage and silent clients.
//
// The behaviour tests run mTLS over TCP and over Unix sockets (the "mtls" transport of
// testkit is TCP only and fixes its certificates); the timing tests run inside synctest bubbles
// over in-memory pipes given kernel-like buffering (cmBufConn).

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
)

// cmServerName is the name clients verify servers under.
const cmServerName = "weft-server"

// cmVersions are the TLS versions of the matrix; both sides are pinned to one of them.
var cmVersions = []struct {
	name string
	v    uint16
}{
	{"tls12", tls.VersionTLS12},
	{"tls13", tls.VersionTLS13},
}

// cmPKI holds two unrelated CAs and certificates issued by them, valid at the time of issue
// unless their name says otherwise.
type cmPKI struct {
	ca, other *testkit.CA

	server          tls.Certificate // by ca, for cmServerName
	serverExpired   tls.Certificate // by ca, for cmServerName, expired a day ago
	serverNotYet    tls.Certificate // by ca, for cmServerName, valid from tomorrow
	serverOtherName tls.Certificate // by ca, for another name

	client        tls.Certificate // by ca
	clientOther   tls.Certificate // by other
	clientExpired tls.Certificate // by ca, expired a day ago
}

// cmNewPKI issues the certificates at the current time (the bubble's, inside a bubble).
func cmNewPKI(t testing.TB) *cmPKI {
	t.Helper()
	now := time.Now()
	p := &cmPKI{ca: testkit.NewCA(t), other: testkit.NewCA(t)}
	server := func(name string, from, to time.Time) tls.Certificate {
		return p.ca.Issue(t, testkit.CertOptions{CommonName: name, DNSNames: []string{name}, NotBefore: from, NotAfter: to})
	}
	p.server = server(cmServerName, time.Time{}, time.Time{})
	p.serverExpired = server(cmServerName, now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	p.serverNotYet = server(cmServerName, now.Add(24*time.Hour), now.Add(48*time.Hour))
	p.serverOtherName = server("other-server.example", time.Time{}, time.Time{})
	p.client = p.ca.Issue(t, testkit.CertOptions{CommonName: "weft-client", Client: true})
	p.clientOther = p.other.Issue(t, testkit.CertOptions{CommonName: "weft-client", Client: true})
	p.clientExpired = p.ca.Issue(t, testkit.CertOptions{
		CommonName: "weft-client", Client: true, NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-24 * time.Hour),
	})
	return p
}

// cmServerConfig presents cert, requires a client certificate and verifies it against
// clientCAs, with exactly TLS version v.
func cmServerConfig(cert tls.Certificate, clientCAs *testkit.CA, v uint16) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientCAs.Pool(),
		MinVersion:   v,
		MaxVersion:   v,
	}
}

// cmClientConfig verifies the server against roots under cmServerName and presents cert (none if
// nil), with exactly TLS version v.
func cmClientConfig(roots *testkit.CA, cert *tls.Certificate, v uint16) *tls.Config {
	cfg := &tls.Config{RootCAs: roots.Pool(), ServerName: cmServerName, MinVersion: v, MaxVersion: v}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

// cmServer is a weft server behind a TLS listener that counts the TLS handshakes it starts.
type cmServer struct {
	handshakes atomic.Int64
	hs         chan struct{} // signalled (capacity 1) on every handshake
	done       chan struct{} // closed when Serve returns
	err        error         // Serve's error, set before done is closed
}

// cmServe serves raw through tls.NewListener with cfg (its GetConfigForClient is replaced by a
// counter). The server's method "Name" replies with name. Cleanup stops Serve hard and joins it.
func cmServe(t testing.TB, raw net.Listener, cfg *tls.Config, opts call.ServerOptions, name string) *cmServer {
	t.Helper()
	s := &cmServer{hs: make(chan struct{}, 1), done: make(chan struct{})}
	cfg = cfg.Clone()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		s.handshakes.Add(1)
		select {
		case s.hs <- struct{}{}:
		default:
		}
		return nil, nil
	}
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = -1
	}
	var hm call.HandlerMap
	hm.Set(cbComponent, "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer close(s.done)
		s.err = call.Serve(ctx, call.NetListener(tls.NewListener(raw, cfg), &hm), opts)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			t.Errorf("Serve did not return within 15s of a hard stop")
		}
	})
	return s
}

// waitHandshakes waits until the server has seen at least n handshakes, failing t after d.
func (s *cmServer) waitHandshakes(t testing.TB, n int64, d time.Duration) {
	t.Helper()
	timeout := time.NewTimer(d)
	defer timeout.Stop()
	for s.handshakes.Load() < n {
		select {
		case <-s.hs:
		case <-timeout.C:
			t.Fatalf("the server saw %d TLS handshakes in %v, want at least %d", s.handshakes.Load(), d, n)
		}
	}
}

// cmConnect connects to eps (a constant resolver) with a quiet logger; cleanup closes it.
func cmConnect(t testing.TB, opts call.ClientOptions, eps ...endpoint.Endpoint) call.Connection {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = cbQuiet
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := call.Connect(ctx, resolve.Constant(eps...), opts)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(conn.Close)
	return conn
}

// cmWantAuth checks that err is an authentication failure that never ran, and of no other
// category.
func cmWantAuth(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: got no error, want one matching ErrAuthentication", what)
		return
	}
	if !errors.Is(err, call.ErrAuthentication) {
		t.Errorf("%s: got error %q, want one matching ErrAuthentication", what, err)
	}
	if !call.NeverRan(err) {
		t.Errorf("%s: NeverRan(%q) = false, want true", what, err)
	}
	for _, c := range append(cbCategories, call.ErrProtocol) {
		if errors.Is(err, c) {
			t.Errorf("%s: error %q also matches %q", what, err, c)
		}
	}
}

// cmStatus returns the status of conn's endpoint at addr, failing t if there is none.
func cmStatus(t testing.TB, conn call.Connection, addr string) call.EndpointStatus {
	t.Helper()
	st := conn.(call.Inspectable).Status()
	for _, e := range st.Endpoints {
		if e.Address == addr {
			return e
		}
	}
	t.Fatalf("no endpoint %s in status %+v", addr, st)
	return call.EndpointStatus{}
}

// cmFailedAuth reports whether every endpoint of st has failed with an authentication error.
func cmFailedAuth(st call.ConnectionStatus) bool {
	for _, e := range st.Endpoints {
		if e.State != call.EndpointFailed || !errors.Is(e.Err, call.ErrAuthentication) {
			return false
		}
	}
	return len(st.Endpoints) > 0
}

// cmWaitFailedAuth waits until every endpoint of conn has failed, and checks that each failed
// authentication.
func cmWaitFailedAuth(t testing.TB, conn call.Connection) call.ConnectionStatus {
	t.Helper()
	st := ctWaitStatus(t, conn, "the endpoints to fail", func(st call.ConnectionStatus) bool {
		return len(st.Endpoints) > 0 && ctCount(st, call.EndpointFailed) == len(st.Endpoints)
	})
	for _, e := range st.Endpoints {
		if !errors.Is(e.Err, call.ErrAuthentication) {
			t.Errorf("endpoint %s failed with %v, want an error matching ErrAuthentication", e.Address, e.Err)
		}
	}
	return st
}

// --- The matrix ----------------------------------------------------------------------------------

// cmCase is one configuration of the matrix.
type cmCase struct {
	name       string
	serverCert tls.Certificate  // what the server presents
	clientCAs  *testkit.CA      // what the server verifies client certificates with
	roots      *testkit.CA      // what the client verifies the server with
	clientCert *tls.Certificate // what the client presents; nil for none
	ok         bool             // the control case: everything valid
}

func cmCases(p *cmPKI) []cmCase {
	return []cmCase{
		{name: "valid", serverCert: p.server, clientCAs: p.ca, roots: p.ca, clientCert: &p.client, ok: true},
		{name: "client_trusts_wrong_CA", serverCert: p.server, clientCAs: p.ca, roots: p.other, clientCert: &p.client},
		{name: "server_cert_expired", serverCert: p.serverExpired, clientCAs: p.ca, roots: p.ca, clientCert: &p.client},
		{name: "server_cert_not_yet_valid", serverCert: p.serverNotYet, clientCAs: p.ca, roots: p.ca, clientCert: &p.client},
		{name: "server_cert_wrong_name", serverCert: p.serverOtherName, clientCAs: p.ca, roots: p.ca, clientCert: &p.client},
		{name: "no_client_cert", serverCert: p.server, clientCAs: p.ca, roots: p.ca},
		{name: "client_cert_untrusted_CA", serverCert: p.server, clientCAs: p.ca, roots: p.ca, clientCert: &p.clientOther},
		{name: "client_cert_expired", serverCert: p.server, clientCAs: p.ca, roots: p.ca, clientCert: &p.clientExpired},
	}
}

// RELIABILITY 25: every certificate failure, under TLS 1.2 and 1.3, over TCP and Unix sockets,
// reaches the caller of Connect's Connection as ErrAuthentication (never ran; not unreachable,
// not a communication error), both for a call made while the endpoint is still connecting and,
// at once, for calls made after it has failed. The endpoint's status is Failed with that error.
// A valid configuration is the control.
func TestCMAuthFailureMatrix(t *testing.T) {
	pki := cmNewPKI(t)
	for _, tr := range cbTransports("tcp", "unix") {
		for _, v := range cmVersions {
			for _, c := range cmCases(pki) {
				t.Run(tr.Name+"/"+v.name+"/"+c.name, func(t *testing.T) {
					ctx := cbCtx(t, 30*time.Second)
					l, ep := tr.Listen(t)
					cmServe(t, l, cmServerConfig(c.serverCert, c.clientCAs, v.v), call.ServerOptions{}, "a")
					mep := endpoint.MTLS(cmClientConfig(c.roots, c.clientCert, v.v), ep)
					conn := cmConnect(t, call.ClientOptions{}, mep)

					// At once: the call waits while the endpoint connects, then fails.
					cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
					out, err := conn.Call(cctx, cbKey("Name"), nil, call.CallOptions{})
					expired := cctx.Err() != nil
					cancel()
					if c.ok {
						if err != nil || string(out) != "a" {
							t.Fatalf("control call: got (%q, %v), want (\"a\", nil)", out, err)
						}
						return
					}
					cmWantAuth(t, "call made while connecting", err)
					if expired {
						t.Errorf("call made while connecting returned only at its deadline: %v", err)
					}

					st := cmWaitFailedAuth(t, conn)
					if e := st.Endpoints[0]; e.Address != mep.Address() {
						t.Errorf("status names endpoint %q, want %q", e.Address, mep.Address())
					}

					// Once it has failed, calls fail at once, long before their deadline.
					for i := range 3 {
						cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
						start := time.Now()
						_, err := conn.Call(cctx, cbKey("Name"), nil, call.CallOptions{})
						took := time.Since(start)
						expired := cctx.Err() != nil
						cancel()
						cmWantAuth(t, "call after the endpoint failed", err)
						if expired || took > 5*time.Second {
							t.Errorf("call %d after the endpoint failed took %v (deadline 10s), want it to fail fast", i, took)
						}
					}
				})
			}
		}
	}
}

// --- Redialling, under synctest ------------------------------------------------------------------

// cmBufConn is one end of a net.Pipe whose writes never block: they queue, and a goroutine of
// its own delivers them in order. TLS over a bare net.Pipe deadlocks whenever both sides write
// at once (an alert about a certificate sent while the peer is still writing its flight or its
// hello); kernel socket buffers absorb that, and this stands in for them inside a synctest
// bubble. Reads and deadlines go to the pipe. Close stops local reads at once and closes the
// pipe once the queue is delivered (or after a second of bubble time), like a TCP close.
type cmBufConn struct {
	net.Conn
	mu      sync.Mutex
	queue   [][]byte // guarded by mu
	closing bool     // guarded by mu
	wake    chan struct{}
}

func cmBuffer(c net.Conn) *cmBufConn {
	b := &cmBufConn{Conn: c, wake: make(chan struct{}, 1)}
	go b.pump()
	return b
}

func (b *cmBufConn) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *cmBufConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing {
		return 0, net.ErrClosed
	}
	b.queue = append(b.queue, bytes.Clone(p))
	b.signal()
	return len(p), nil
}

func (b *cmBufConn) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closing {
		b.closing = true
		b.Conn.SetReadDeadline(time.Unix(1, 0))
		b.signal()
	}
	return nil
}

func (b *cmBufConn) pump() {
	defer b.Conn.Close()
	for range b.wake {
		b.mu.Lock()
		q, closing := b.queue, b.closing
		b.queue = nil
		b.mu.Unlock()
		if closing {
			b.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		}
		for _, p := range q {
			if _, err := b.Conn.Write(p); err != nil {
				b.mu.Lock()
				b.closing = true
				b.queue = nil
				b.mu.Unlock()
				return
			}
		}
		if closing {
			return // nothing more can be queued
		}
	}
}

// cmBufListener accepts the server ends of a PipeListener, buffered.
type cmBufListener struct{ *testkit.PipeListener }

func (l cmBufListener) Accept() (net.Conn, error) {
	c, err := l.PipeListener.Accept()
	if err != nil {
		return nil, err
	}
	return cmBuffer(c), nil
}

// cmBufEndpoint dials a PipeListener and buffers the client end.
type cmBufEndpoint struct{ *testkit.PipeListener }

func (e cmBufEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	c, err := e.PipeListener.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return cmBuffer(c), nil
}

// cmRejections are the two sides a certificate can be rejected on, for the synctest tests.
var cmRejections = []struct {
	name   string
	server func(p *cmPKI, v uint16) *tls.Config
	client func(p *cmPKI, v uint16) *tls.Config
}{
	{
		name:   "server_rejects_client",
		server: func(p *cmPKI, v uint16) *tls.Config { return cmServerConfig(p.server, p.ca, v) },
		client: func(p *cmPKI, v uint16) *tls.Config { return cmClientConfig(p.ca, &p.clientOther, v) },
	},
	{
		name:   "client_rejects_server",
		server: func(p *cmPKI, v uint16) *tls.Config { return cmServerConfig(p.server, p.ca, v) },
		client: func(p *cmPKI, v uint16) *tls.Config { return cmClientConfig(p.other, &p.client, v) },
	},
}

// cmPipeSetup starts, inside a bubble, an mTLS server over buffered pipes and a Connection to it
// with backoff b, configured by server and client.
func cmPipeSetup(t *testing.T, v uint16, server, client func(*cmPKI, uint16) *tls.Config, b call.Backoff) (*cmServer, call.Connection) {
	t.Helper()
	pki := cmNewPKI(t)
	pl := testkit.NewPipeListener(t.Name())
	t.Cleanup(func() { pl.Close() })
	srv := cmServe(t, cmBufListener{pl}, server(pki, v), call.ServerOptions{}, "a")
	conn := cmConnect(t, call.ClientOptions{Backoff: b}, endpoint.MTLS(client(pki, v), cmBufEndpoint{pl}))
	return srv, conn
}

// Authentication failures are not retried by calls: after the first dial and its immediate
// retry the manager waits its backoff (an hour here), and twenty failed calls meanwhile cause no
// handshake at all and fail at once (no bubble time passes). The next handshake comes only when
// the backoff is due.
func TestCMAuthFailureNotRetriedByCalls(t *testing.T) {
	for _, v := range cmVersions {
		for _, rej := range cmRejections {
			t.Run(v.name+"/"+rej.name, func(t *testing.T) {
				cbBubble(t, func(t *testing.T) {
					srv, conn := cmPipeSetup(t, v.v, rej.server, rej.client, call.Backoff{Base: time.Hour, Max: time.Hour})
					synctest.Wait()
					if n := srv.handshakes.Load(); n != 2 {
						t.Fatalf("after the first dial and its immediate retry the server saw %d handshakes, want 2", n)
					}
					if st := conn.(call.Inspectable).Status(); !cmFailedAuth(st) {
						t.Fatalf("status %+v; want the endpoint failed with ErrAuthentication", st)
					}
					ctx := cbCtx(t, 10*time.Minute)
					start := time.Now()
					for i := range 20 {
						_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
						cmWantAuth(t, fmt.Sprintf("call %d", i), err)
					}
					if took := time.Since(start); took != 0 {
						t.Errorf("20 failing calls took %v of bubble time, want them to fail at once", took)
					}
					synctest.Wait()
					if n := srv.handshakes.Load(); n != 2 {
						t.Errorf("after 20 failed calls the server saw %d handshakes, want still 2: calls must not redial", n)
					}
					// The next redial is due an hour (±20 %) after the second failure.
					time.Sleep(45 * time.Minute)
					synctest.Wait()
					if n := srv.handshakes.Load(); n != 2 {
						t.Errorf("45 minutes into an hour's backoff the server saw %d handshakes, want 2", n)
					}
					time.Sleep(30 * time.Minute)
					synctest.Wait()
					if n := srv.handshakes.Load(); n != 3 {
						t.Errorf("75 minutes after the second failure (backoff 1h±20%%) the server saw %d handshakes, want 3", n)
					}
					if st := conn.(call.Inspectable).Status(); !cmFailedAuth(st) {
						t.Errorf("status %+v; want the endpoint still failed with ErrAuthentication", st)
					}
				})
			})
		}
	}
}

// The manager keeps redialling an endpoint that fails authentication, with backoff: with
// Base 20ms, Factor 1.6, Max 100ms and ±20 % jitter, the server sees 12 to 16 handshakes in the
// first second (two at once, then delays 20, 32, 51, 82, 100, 100, ... ms, each ±20 %) and 8 to
// 13 more in the next. The endpoint stays Failed throughout (no flapping through Connecting).
func TestCMAuthFailureRedialsWithBackoff(t *testing.T) {
	for _, v := range cmVersions {
		for _, rej := range cmRejections {
			t.Run(v.name+"/"+rej.name, func(t *testing.T) {
				cbBubble(t, func(t *testing.T) {
					srv, conn := cmPipeSetup(t, v.v, rej.server, rej.client,
						call.Backoff{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond})
					synctest.Wait()
					st := conn.(call.Inspectable).Status()
					if !cmFailedAuth(st) {
						t.Fatalf("status %+v; want the endpoint failed with ErrAuthentication", st)
					}
					changed := st.Changed
					time.Sleep(time.Second)
					synctest.Wait()
					n1 := srv.handshakes.Load()
					if n1 < 12 || n1 > 16 {
						t.Errorf("in the first second the server saw %d handshakes, want 12 to 16", n1)
					}
					time.Sleep(time.Second)
					synctest.Wait()
					n2 := srv.handshakes.Load()
					t.Logf("handshakes after 1s: %d, after 2s: %d", n1, n2)
					if d := n2 - n1; d < 8 || d > 13 {
						t.Errorf("in the second second the server saw %d more handshakes, want 8 to 13", d)
					}
					select {
					case <-changed:
						t.Errorf("the status changed while the endpoint kept failing: now %+v", conn.(call.Inspectable).Status())
					default:
					}
				})
			})
		}
	}
}

// The same over real sockets: the handshake count keeps rising while calls keep failing with
// ErrAuthentication, and the endpoint stays Failed.
func TestCMAuthFailureRedialsOverSockets(t *testing.T) {
	pki := cmNewPKI(t)
	for _, tr := range cbTransports("tcp", "unix") {
		for _, v := range cmVersions {
			t.Run(tr.Name+"/"+v.name, func(t *testing.T) {
				ctx := cbCtx(t, 30*time.Second)
				l, ep := tr.Listen(t)
				srv := cmServe(t, l, cmServerConfig(pki.server, pki.ca, v.v), call.ServerOptions{}, "a")
				conn := cmConnect(t, call.ClientOptions{Backoff: call.Backoff{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond}},
					endpoint.MTLS(cmClientConfig(pki.ca, &pki.clientOther, v.v), ep))
				cmWaitFailedAuth(t, conn)
				for want := int64(3); want <= 9; want += 3 {
					srv.waitHandshakes(t, want, 20*time.Second)
					_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
					cmWantAuth(t, "call while the manager redials", err)
				}
				if st := conn.(call.Inspectable).Status(); !cmFailedAuth(st) {
					t.Errorf("status %+v; want the endpoint still failed with ErrAuthentication", st)
				}
			})
		}
	}
}

// --- Rotation ------------------------------------------------------------------------------------

// A certificate supplied through GetClientCertificate can be rotated: calls fail with
// ErrAuthentication while the server rejects it; once a good one is swapped in, the manager's
// next redial succeeds and the same Connection takes calls.
func TestCMRotatedClientCertificateRecovers(t *testing.T) {
	pki := cmNewPKI(t)
	for _, tr := range cbTransports("tcp", "unix") {
		for _, v := range cmVersions {
			t.Run(tr.Name+"/"+v.name, func(t *testing.T) {
				ctx := cbCtx(t, 30*time.Second)
				l, ep := tr.Listen(t)
				srv := cmServe(t, l, cmServerConfig(pki.server, pki.ca, v.v), call.ServerOptions{}, "a")
				var cert atomic.Pointer[tls.Certificate]
				var goodServed atomic.Int64
				cert.Store(&pki.clientOther)
				cfg := cmClientConfig(pki.ca, nil, v.v)
				cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
					c := cert.Load()
					if c == &pki.client {
						goodServed.Add(1)
					}
					return c, nil
				}
				conn := cmConnect(t, call.ClientOptions{Backoff: call.Backoff{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond}},
					endpoint.MTLS(cfg, ep))

				_, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
				cmWantAuth(t, "call with the rejected certificate", err)
				cmWaitFailedAuth(t, conn)
				_, err = conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
				cmWantAuth(t, "call after the endpoint failed", err)

				cert.Store(&pki.client)
				st := ctWaitStatus(t, conn, "the endpoint to become ready after rotation", func(st call.ConnectionStatus) bool {
					return ctCount(st, call.EndpointReady) == 1
				})
				if e := st.Endpoints[0]; e.Err != nil {
					t.Errorf("ready endpoint has error %v", e.Err)
				}
				for range 3 {
					out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
					if err != nil || string(out) != "a" {
						t.Fatalf("call after rotation: got (%q, %v), want (\"a\", nil)", out, err)
					}
				}
				if n := goodServed.Load(); n == 0 {
					t.Errorf("the Connection became ready without a handshake presenting the rotated certificate")
				}
				if n := srv.handshakes.Load(); n < 2 {
					t.Errorf("the server saw %d handshakes, want at least 2 (a failure, then the rotated certificate)", n)
				}
			})
		}
	}
}

// --- Other endpoints are unaffected --------------------------------------------------------------

// With one endpoint failing authentication (its server rejects the client, or the client rejects
// its server) and one good, every call succeeds on the good one, and Status shows the bad one
// Failed with ErrAuthentication and the good one Ready.
func TestCMAuthFailureOnlyAffectsItsEndpoint(t *testing.T) {
	pki := cmNewPKI(t)
	bads := []string{"server_rejects_client", "client_rejects_server"}
	for _, tr := range cbTransports("tcp", "unix") {
		for _, v := range cmVersions {
			for _, bad := range bads {
				t.Run(tr.Name+"/"+v.name+"/"+bad, func(t *testing.T) {
					ctx := cbCtx(t, 30*time.Second)
					gl, gep := tr.Listen(t)
					cmServe(t, gl, cmServerConfig(pki.server, pki.ca, v.v), call.ServerOptions{}, "good")
					bl, bep := tr.Listen(t)
					badServer := cmServerConfig(pki.server, pki.other, v.v) // trusts no client of ca
					if bad == "client_rejects_server" {
						badServer = cmServerConfig(pki.serverExpired, pki.ca, v.v)
					}
					badSrv := cmServe(t, bl, badServer, call.ServerOptions{}, "bad")
					cfg := cmClientConfig(pki.ca, &pki.client, v.v)
					good, badEP := endpoint.MTLS(cfg, gep), endpoint.MTLS(cfg, bep)
					conn := cmConnect(t, call.ClientOptions{Backoff: call.Backoff{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond}}, good, badEP)

					ctWaitStatus(t, conn, "one endpoint ready and one failed", func(st call.ConnectionStatus) bool {
						return ctCount(st, call.EndpointReady) == 1 && ctCount(st, call.EndpointFailed) == 1
					})
					for i := range 20 {
						out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
						if err != nil || string(out) != "good" {
							t.Fatalf("call %d: got (%q, %v), want (\"good\", nil)", i, out, err)
						}
					}
					if e := cmStatus(t, conn, badEP.Address()); e.State != call.EndpointFailed || !errors.Is(e.Err, call.ErrAuthentication) {
						t.Errorf("bad endpoint: state %v, error %v; want failed with ErrAuthentication", e.State, e.Err)
					}
					if e := cmStatus(t, conn, good.Address()); e.State != call.EndpointReady || e.Err != nil {
						t.Errorf("good endpoint: state %v, error %v; want ready", e.State, e.Err)
					}
					// The manager still redials the bad one.
					badSrv.waitHandshakes(t, badSrv.handshakes.Load()+2, 20*time.Second)
				})
			}
		}
	}
}

// --- Hostile and confused clients ----------------------------------------------------------------

// A plaintext weft client, garbage bytes, and TCP connections that say nothing, to an mTLS
// server's port, never stop Serve: a proper mTLS client through Connect works while a silent
// connection is still open and again after all of them. The plaintext Dial fails (not hangs)
// well within its handshake timeout, and the server closes the garbage and silent connections
// itself (the silent one at its HandshakeTimeout).
func TestCMMTLSServerSurvivesNonTLSClients(t *testing.T) {
	pki := cmNewPKI(t)
	for _, tr := range cbTransports("tcp", "unix") {
		t.Run(tr.Name, func(t *testing.T) {
			ctx := cbCtx(t, 30*time.Second)
			l, ep := tr.Listen(t)
			nep := ep.(endpoint.NetEndpoint)
			srv := cmServe(t, l, cmServerConfig(pki.server, pki.ca, tls.VersionTLS12), call.ServerOptions{HandshakeTimeout: 300 * time.Millisecond}, "a")
			mep := endpoint.MTLS(cmClientConfig(pki.ca, &pki.client, tls.VersionTLS12), ep)
			rawDial := func() net.Conn {
				t.Helper()
				c, err := net.DialTimeout(nep.Net, nep.Addr, 10*time.Second)
				if err != nil {
					t.Fatalf("dialling %s: %v", nep.Address(), err)
				}
				t.Cleanup(func() { c.Close() })
				return c
			}
			// closedByServer reads c until the server closes it, failing t after d.
			closedByServer := func(what string, c net.Conn, d time.Duration) {
				t.Helper()
				c.SetReadDeadline(time.Now().Add(d))
				_, err := io.Copy(io.Discard, c)
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Errorf("%s: the server had not closed the connection after %v", what, d)
				}
			}
			check := func(what string) {
				t.Helper()
				select {
				case <-srv.done:
					t.Fatalf("Serve returned after %s: %v", what, srv.err)
				default:
				}
			}

			// A plaintext weft client.
			const hsTimeout = 5 * time.Second
			start := time.Now()
			c, err := call.Dial(ctx, nep, call.ClientOptions{Logger: cbQuiet, HandshakeTimeout: hsTimeout})
			took := time.Since(start)
			if err == nil {
				c.Close()
				t.Fatalf("a plaintext Dial to an mTLS port succeeded")
			}
			t.Logf("plaintext Dial: %v (after %v)", err, took)
			if took >= hsTimeout {
				t.Errorf("plaintext Dial failed only after %v, at its handshake timeout (%v); want a prompt error", took, hsTimeout)
			}
			if !call.NeverRan(err) {
				t.Errorf("plaintext Dial: NeverRan(%q) = false", err)
			}
			check("a plaintext client")

			// A connection that says nothing, held open while a proper client connects.
			silent := rawDial()

			// Garbage bytes, then an HTTP request.
			for _, junk := range [][]byte{bytes.Repeat([]byte{0xff, 0x00, 0x17}, 700), []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")} {
				g := rawDial()
				if _, err := g.Write(junk); err != nil {
					t.Fatalf("writing garbage: %v", err)
				}
				closedByServer("garbage", g, 10*time.Second)
				check("garbage")
			}

			conn := cmConnect(t, call.ClientOptions{}, mep)
			out, err := conn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
			if err != nil || string(out) != "a" {
				t.Fatalf("mTLS call with a silent connection open: got (%q, %v), want (\"a\", nil)", out, err)
			}
			closedByServer("silent connection", silent, 10*time.Second)
			check("a silent connection")
			more := []net.Conn{rawDial(), rawDial(), rawDial()}
			for _, c := range more {
				closedByServer("silent connection", c, 10*time.Second)
			}
			check("silent connections")

			// A new Connection still gets through.
			conn2 := cmConnect(t, call.ClientOptions{}, mep)
			out, err = conn2.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
			if err != nil || string(out) != "a" {
				t.Fatalf("mTLS call after the hostile clients: got (%q, %v), want (\"a\", nil)", out, err)
			}
			check("everything")
		})
	}
}

// --- TLS 1.3: the server's rejection arrives after the client's handshake -----------------------

// cmCloseListener reports on closed every time one of its connections is closed (by the server).
type cmCloseListener struct {
	net.Listener
	closed chan struct{}
}

func (l cmCloseListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &cmCloseConn{Conn: c, closed: l.closed}, nil
}

type cmCloseConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *cmCloseConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		select {
		case c.closed <- struct{}{}:
		default:
		}
	})
	return err
}

// cmLateEndpoint dials a NetEndpoint whose connections hold their third write (under TLS 1.3 with
// a client certificate: ClientHello, the client's flight, then weft's hello) until the server
// has closed a connection, or 10s.
type cmLateEndpoint struct {
	endpoint.NetEndpoint
	closed <-chan struct{}
}

func (e cmLateEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	c, err := e.NetEndpoint.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return &cmLateConn{Conn: c, closed: e.closed}, nil
}

type cmLateConn struct {
	net.Conn
	writes atomic.Int64
	closed <-chan struct{}
}

func (c *cmLateConn) Write(p []byte) (int, error) {
	if c.writes.Add(1) == 3 {
		select {
		case <-c.closed:
		case <-time.After(10 * time.Second):
		}
	}
	return c.Conn.Write(p)
}

// Under TLS 1.3 the client's handshake completes before the server has checked the client's
// certificate; the server then sends its alert and closes. Here weft's hello is written only
// after the server has closed (deterministically, what a slow client or a busy machine sees):
// the failure must still be ErrAuthentication, from Dial and from a call through Connect, not
// the write's "broken pipe" or "connection reset" as ErrUnreachable. The server's alert is in
// the client's receive buffer all along.
func TestCMTLS13RejectionAfterServerClosed(t *testing.T) {
	pki := cmNewPKI(t)
	for _, tr := range cbTransports("tcp", "unix") {
		for _, c := range []struct {
			name string
			cert *tls.Certificate
		}{{"no_client_cert", nil}, {"client_cert_untrusted_CA", &pki.clientOther}, {"client_cert_expired", &pki.clientExpired}} {
			t.Run(tr.Name+"/"+c.name, func(t *testing.T) {
				ctx := cbCtx(t, 30*time.Second)
				l, ep := tr.Listen(t)
				closed := make(chan struct{}, 64)
				cmServe(t, cmCloseListener{l, closed}, cmServerConfig(pki.server, pki.ca, tls.VersionTLS13), call.ServerOptions{}, "a")
				mep := endpoint.MTLS(cmClientConfig(pki.ca, c.cert, tls.VersionTLS13), cmLateEndpoint{ep.(endpoint.NetEndpoint), closed})

				conn, err := call.Dial(ctx, mep, call.ClientOptions{Logger: cbQuiet})
				if err == nil {
					conn.Close()
					t.Fatalf("Dial succeeded")
				}
				cmWantAuth(t, "Dial", err)

				cn := cmConnect(t, call.ClientOptions{}, mep)
				_, err = cn.Call(ctx, cbKey("Name"), nil, call.CallOptions{})
				cmWantAuth(t, "call through Connect", err)
			})
		}
	}
}
