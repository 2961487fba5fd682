package testkit_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// tlsHandshake runs both sides of a TLS handshake over a pipe and returns their errors. After a
// successful handshake the server writes one byte and the client reads it: under TLS 1.3 the
// client learns of a rejected certificate only on its first read.
func tlsHandshake(t *testing.T, server, client *tls.Config) (serverErr, clientErr error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	a, b := pipe(t)
	sc, cc := tls.Server(a, server), tls.Client(b, client)
	done := goErr(func() error {
		defer a.Close()
		err := sc.HandshakeContext(ctx)
		if err == nil {
			_, err = sc.Write([]byte{'k'})
		}
		return err
	})
	clientErr = cc.HandshakeContext(ctx)
	if clientErr == nil {
		_, clientErr = io.ReadFull(cc, make([]byte, 1))
	}
	b.Close()
	return <-done, clientErr
}

func TestCertsHandshake(t *testing.T) {
	ca := testkit.NewCA(t)
	serverCert := ca.Issue(t, testkit.CertOptions{CommonName: "server", DNSNames: []string{"server.test"}})
	clientCert := ca.Issue(t, testkit.CertOptions{CommonName: "client", Client: true})

	if clientCert.Leaf == nil || clientCert.Leaf.Subject.CommonName != "client" ||
		clientCert.Leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("client leaf = %+v", clientCert.Leaf)
	}
	if _, err := serverCert.Leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "server.test"}); err != nil {
		t.Fatalf("server certificate does not verify: %v", err)
	}

	t.Run("matching", func(t *testing.T) {
		serr, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, serverCert), testkit.ClientTLS(t, ca, clientCert, "server.test"))
		if serr != nil || cerr != nil {
			t.Fatalf("handshake: server %v, client %v", serr, cerr)
		}
	})
	t.Run("wrong server CA", func(t *testing.T) {
		other := testkit.NewCA(t)
		serr, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, serverCert), testkit.ClientTLS(t, other, clientCert, "server.test"))
		var unknown x509.UnknownAuthorityError
		if !errors.As(cerr, &unknown) {
			t.Fatalf("client error = %v, want x509.UnknownAuthorityError (server err %v)", cerr, serr)
		}
	})
	t.Run("wrong client CA", func(t *testing.T) {
		other := testkit.NewCA(t)
		stranger := other.Issue(t, testkit.CertOptions{CommonName: "stranger", Client: true})
		serr, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, serverCert), testkit.ClientTLS(t, ca, stranger, "server.test"))
		if serr == nil || cerr == nil {
			t.Fatalf("handshake with a client of another CA: server %v, client %v; want both to fail", serr, cerr)
		}
	})
	t.Run("server name", func(t *testing.T) {
		_, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, serverCert), testkit.ClientTLS(t, ca, clientCert, "elsewhere.test"))
		if cerr == nil {
			t.Fatal("client accepted a certificate for another name")
		}
	})
	t.Run("server certificate as client", func(t *testing.T) {
		serr, _ := tlsHandshake(t, testkit.ServerTLS(t, ca, serverCert), testkit.ClientTLS(t, ca, serverCert, "server.test"))
		if serr == nil {
			t.Fatal("server accepted a client certificate without client auth usage")
		}
	})
	t.Run("both usages", func(t *testing.T) {
		both := ca.Issue(t, testkit.CertOptions{CommonName: "both", DNSNames: []string{"both.test"}, Both: true})
		serr, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, both), testkit.ClientTLS(t, ca, both, "both.test"))
		if serr != nil || cerr != nil {
			t.Fatalf("handshake: server %v, client %v", serr, cerr)
		}
	})
	t.Run("expired", func(t *testing.T) {
		old := ca.Issue(t, testkit.CertOptions{
			CommonName: "old", DNSNames: []string{"old.test"},
			NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour),
		})
		_, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, old), testkit.ClientTLS(t, ca, clientCert, "old.test"))
		if cerr == nil {
			t.Fatal("client accepted an expired certificate")
		}
	})
}

func TestCertsWriteFiles(t *testing.T) {
	ca := testkit.NewCA(t)
	cert := ca.Issue(t, testkit.CertOptions{CommonName: "files", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	dir := t.TempDir()
	certFile, keyFile := ca.WriteFiles(t, dir, cert)
	loaded, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Leaf == nil || !loaded.Leaf.Equal(cert.Leaf) {
		t.Fatal("loaded certificate differs")
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.CertPEM()) {
		t.Fatal("CertPEM not parseable")
	}
	if _, err := loaded.Leaf.Verify(x509.VerifyOptions{Roots: pool}); err != nil {
		t.Fatal(err)
	}
	if ca.WriteCAFile(t, dir) == "" {
		t.Fatal("WriteCAFile returned no path")
	}
}

func TestCertsSynctest(t *testing.T) {
	ca := testkit.NewCA(t) // outside the bubble, on the real clock
	synctest.Test(t, func(t *testing.T) {
		if !time.Now().Before(time.Date(2000, 1, 2, 0, 0, 0, 0, time.UTC)) {
			t.Skip("bubble clock does not start at 2000-01-01")
		}
		// Issued inside the bubble, leaves are valid on its clock; so is the CA.
		server := ca.Issue(t, testkit.CertOptions{CommonName: "s", DNSNames: []string{"s.test"}})
		client := ca.Issue(t, testkit.CertOptions{CommonName: "c", Client: true})
		serr, cerr := tlsHandshake(t, testkit.ServerTLS(t, ca, server), testkit.ClientTLS(t, ca, client, "s.test"))
		if serr != nil || cerr != nil {
			t.Fatalf("handshake in a bubble: server %v, client %v", serr, cerr)
		}
	})
}
