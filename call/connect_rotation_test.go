package call_test

// RELIABILITY.md scenario 20 end to end: an mTLS server whose certificate comes from an
// endpoint.CertReloader, and Connections whose client certificate comes from another one, over
// TCP and Unix sockets under TLS 1.2 and 1.3. Rotating both files changes what new handshakes
// present; connections already open keep working on the identities they were established
// with, without reconnecting; a half-written pair is never presented. Identifiers start with
// "rot".

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
)

// rotFiles are the certificate and key files of one side.
type rotFiles struct{ cert, key string }

// rotPEM returns c's leaf certificate and its key in PEM form.
func rotPEM(t testing.TB, c tls.Certificate) (certPEM, keyPEM []byte) {
	t.Helper()
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatalf("encoding key: %v", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
}

// writeRaw writes certPEM and keyPEM over the files, one after the other.
func (f rotFiles) writeRaw(t testing.TB, certPEM, keyPEM []byte) {
	t.Helper()
	if err := os.WriteFile(f.cert, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.key, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
}

// write writes c over the files.
func (f rotFiles) write(t testing.TB, c tls.Certificate) {
	t.Helper()
	certPEM, keyPEM := rotPEM(t, c)
	f.writeRaw(t, certPEM, keyPEM)
}

// rotListener counts the connections it accepts.
type rotListener struct {
	net.Listener
	accepts atomic.Int64
}

func (l *rotListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepts.Add(1)
	}
	return c, err
}

// rotSeen records the serial numbers of the server certificates the client verified, one per
// handshake.
type rotSeen struct {
	mu      sync.Mutex
	serials []string
}

// verify is a tls.Config.VerifyConnection.
func (s *rotSeen) verify(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no server certificate")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.serials = append(s.serials, cs.PeerCertificates[0].SerialNumber.Text(16))
	return nil
}

// want checks the server certificates of every handshake so far.
func (s *rotSeen) want(t testing.TB, what string, certs ...tls.Certificate) {
	t.Helper()
	var want []string
	for _, c := range certs {
		want = append(want, c.Leaf.SerialNumber.Text(16))
	}
	s.mu.Lock()
	got := slices.Clone(s.serials)
	s.mu.Unlock()
	if !slices.Equal(got, want) {
		t.Errorf("%s: the client verified server certificates %v, want %v", what, got, want)
	}
}

// rotPeer replies with the serial number of the caller's verified certificate.
func rotPeer(ctx context.Context, _ []byte) ([]byte, error) {
	p, ok := call.PeerFromContext(ctx)
	if !ok || p.TLS == nil || len(p.TLS.VerifiedChains) == 0 {
		return nil, fmt.Errorf("no verified peer (peer %v)", p)
	}
	return []byte(p.TLS.VerifiedChains[0][0].SerialNumber.Text(16)), nil
}

// rotWantPeer calls conn and checks that the server saw the client present want.
func rotWantPeer(t testing.TB, ctx context.Context, what string, conn call.Connection, want tls.Certificate) {
	t.Helper()
	out, err := conn.Call(ctx, cbKey("Peer"), nil, call.CallOptions{})
	if err != nil {
		t.Fatalf("%s: call: %v", what, err)
	}
	if got, w := string(out), want.Leaf.SerialNumber.Text(16); got != w {
		t.Errorf("%s: the server saw client certificate %s, want %s", what, got, w)
	}
}

// rotWantAccepts checks the number of connections the server has accepted.
func rotWantAccepts(t testing.TB, what string, l *rotListener, want int64) {
	t.Helper()
	if got := l.accepts.Load(); got != want {
		t.Errorf("%s: the server accepted %d connections, want %d", what, got, want)
	}
}

// RELIABILITY 20: certificates rotated on disk are presented by new handshakes on both sides
// (server certificates as the client verifies them, client certificates as the handler's peer
// identity shows them); connections already open keep taking calls on their old identities and
// are not replaced (the server accepts no new connection for them); a half-written server
// certificate and a client certificate written without its key are never presented, the last
// good pairs are; once complete, the new pairs are.
func TestRotationNewHandshakesUseNewCertificates(t *testing.T) {
	ca := testkit.NewCA(t)
	serverCert := func() tls.Certificate {
		return ca.Issue(t, testkit.CertOptions{CommonName: cmServerName, DNSNames: []string{cmServerName}})
	}
	clientCert := func() tls.Certificate {
		return ca.Issue(t, testkit.CertOptions{CommonName: "weft-client", Client: true})
	}
	for _, tr := range cbTransports("tcp", "unix") {
		for _, v := range cmVersions {
			t.Run(tr.Name+"/"+v.name, func(t *testing.T) {
				ctx := cbCtx(t, 30*time.Second)
				dir := t.TempDir()
				sf := rotFiles{cert: filepath.Join(dir, "server.crt"), key: filepath.Join(dir, "server.key")}
				cf := rotFiles{cert: filepath.Join(dir, "client.crt"), key: filepath.Join(dir, "client.key")}
				s1, c1 := serverCert(), clientCert()
				sf.write(t, s1)
				cf.write(t, c1)
				// Checking the files on every handshake makes the test independent of time.
				ropts := endpoint.ReloadOptions{CheckInterval: -1, Logger: cbQuiet}
				srvRel, err := endpoint.NewCertReloader(sf.cert, sf.key, ropts)
				if err != nil {
					t.Fatalf("NewCertReloader (server): %v", err)
				}
				cliRel, err := endpoint.NewCertReloader(cf.cert, cf.key, ropts)
				if err != nil {
					t.Fatalf("NewCertReloader (client): %v", err)
				}

				raw, ep := tr.Listen(t)
				l := &rotListener{Listener: raw}
				scfg := &tls.Config{
					GetCertificate: srvRel.GetCertificate,
					ClientAuth:     tls.RequireAndVerifyClientCert,
					ClientCAs:      ca.Pool(),
					MinVersion:     v.v,
					MaxVersion:     v.v,
				}
				var hm call.HandlerMap
				hm.Set(cbComponent, "Peer", rotPeer)
				cbServe(t, tls.NewListener(l, scfg), &hm, call.ServerOptions{})

				var seen rotSeen
				ccfg := &tls.Config{
					RootCAs:              ca.Pool(),
					ServerName:           cmServerName,
					GetClientCertificate: cliRel.GetClientCertificate,
					VerifyConnection:     seen.verify,
					MinVersion:           v.v,
					MaxVersion:           v.v,
				}
				mep := endpoint.MTLS(ccfg, ep)
				var copts call.ClientOptions

				conn1 := cmConnect(t, copts, mep)
				rotWantPeer(t, ctx, "first connection", conn1, c1)
				seen.want(t, "first connection", s1)
				rotWantAccepts(t, "first connection", l, 1)

				// Rotate both sides on disk.
				s2, c2 := serverCert(), clientCert()
				sf.write(t, s2)
				cf.write(t, c2)
				for i := range 3 {
					rotWantPeer(t, ctx, fmt.Sprintf("open connection after rotation, call %d", i), conn1, c1)
				}
				rotWantAccepts(t, "calls on the open connection after rotation", l, 1)

				conn2 := cmConnect(t, copts, mep)
				rotWantPeer(t, ctx, "new connection after rotation", conn2, c2)
				seen.want(t, "new connection after rotation", s1, s2)
				rotWantAccepts(t, "new connection after rotation", l, 2)
				rotWantPeer(t, ctx, "first connection after the second opened", conn1, c1)

				// A half-written server certificate; a client certificate written before its key.
				s3, c3 := serverCert(), clientCert()
				s3cert, s3key := rotPEM(t, s3)
				c3cert, _ := rotPEM(t, c3)
				_, c2key := rotPEM(t, c2)
				sf.writeRaw(t, s3cert[:len(s3cert)/2], s3key)
				cf.writeRaw(t, c3cert, c2key)
				conn3 := cmConnect(t, copts, mep)
				rotWantPeer(t, ctx, "new connection with incomplete pairs on disk", conn3, c2)
				seen.want(t, "new connection with incomplete pairs on disk", s1, s2, s2)
				rotWantAccepts(t, "new connection with incomplete pairs on disk", l, 3)
				if err := srvRel.Err(); !errors.Is(err, endpoint.ErrKeyPair) {
					t.Errorf("server reloader Err() = %v, want an error matching ErrKeyPair", err)
				}
				if err := cliRel.Err(); !errors.Is(err, endpoint.ErrKeyPair) {
					t.Errorf("client reloader Err() = %v, want an error matching ErrKeyPair", err)
				}

				// The pairs completed.
				sf.write(t, s3)
				cf.write(t, c3)
				conn4 := cmConnect(t, copts, mep)
				rotWantPeer(t, ctx, "new connection after the pairs completed", conn4, c3)
				seen.want(t, "new connection after the pairs completed", s1, s2, s2, s3)
				rotWantAccepts(t, "new connection after the pairs completed", l, 4)
				if err := errors.Join(srvRel.Err(), cliRel.Err()); err != nil {
					t.Errorf("reloader errors after the pairs completed: %v", err)
				}

				// Every connection still works on the identity it was established with.
				for i, c := range []struct {
					conn call.Connection
					cert tls.Certificate
				}{{conn1, c1}, {conn2, c2}, {conn3, c2}, {conn4, c3}} {
					rotWantPeer(t, ctx, fmt.Sprintf("connection %d at the end", i+1), c.conn, c.cert)
				}
				rotWantAccepts(t, "at the end", l, 4)
				seen.want(t, "at the end", s1, s2, s2, s3)
			})
		}
	}
}
