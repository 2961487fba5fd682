package endpoint_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
)

func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }

func TestParse(t *testing.T) {
	tests := []struct {
		in   string
		want endpoint.NetEndpoint
	}{
		{"tcp://localhost:8000", endpoint.TCP("localhost:8000")},
		{"tcp://127.0.0.1:0", endpoint.TCP("127.0.0.1:0")},
		{"tcp://[::1]:53", endpoint.TCP("[::1]:53")},
		{"tcp://:80", endpoint.TCP(":80")},
		{"unix:///run/weft/a.sock", endpoint.Unix("/run/weft/a.sock")},
		{"unix://relative.sock", endpoint.Unix("relative.sock")},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := endpoint.Parse(tt.in)
			if err != nil || got != tt.want {
				t.Fatalf("Parse(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
			if got.Address() != tt.in {
				t.Errorf("Address() = %q, want %q (round trip)", got.Address(), tt.in)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for _, in := range []string{
		"", "localhost:80", "tcp://", "tcp://localhost", "tcp://localhost:", "tcp://a b:80",
		"unix://", "udp://localhost:53", "http://example.com:80", "tcp//localhost:80", "unix://a\x00b",
		"tcp://[\r]:0", "unix:///run/a\nb.sock", "tcp://host\t:80", "unix:///x\x7f",
	} {
		t.Run(in, func(t *testing.T) {
			if got, err := endpoint.Parse(in); !errors.Is(err, endpoint.ErrBadAddress) {
				t.Errorf("Parse(%q) = %v, %v; want ErrBadAddress", in, got, err)
			}
		})
	}
}

// echoOnce accepts one connection on l and echoes what it reads until EOF.
func echoOnce(t *testing.T, l net.Listener) <-chan error {
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = io.Copy(c, c)
		done <- err
	}()
	return done
}

func TestDial(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	tcpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpL.Close()
	sock := filepath.Join(t.TempDir(), "e.sock")
	unixL, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer unixL.Close()
	ca := testkit.NewCA(t)
	serverCert := ca.Issue(t, testkit.CertOptions{CommonName: "localhost", DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	clientCert := ca.Issue(t, testkit.CertOptions{CommonName: "client", Client: true})
	mtlsRaw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mtlsL := tls.NewListener(mtlsRaw, testkit.ServerTLS(t, ca, serverCert))
	defer mtlsL.Close()

	tests := []struct {
		name string
		l    net.Listener
		ep   endpoint.Endpoint
		addr string
	}{
		{"tcp", tcpL, endpoint.TCP(tcpL.Addr().String()), "tcp://" + tcpL.Addr().String()},
		{"unix", unixL, endpoint.Unix(sock), "unix://" + sock},
		// No ServerName: MTLS takes the host of the TCP address (127.0.0.1, an IP SAN).
		{"mtls", mtlsL, endpoint.MTLS(testkit.ClientTLS(t, ca, clientCert, ""), endpoint.TCP(mtlsRaw.Addr().String())), "mtls+tcp://" + mtlsRaw.Addr().String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.ep.Address(); got != tt.addr {
				t.Errorf("Address() = %q, want %q", got, tt.addr)
			}
			done := echoOnce(t, tt.l)
			c, err := tt.ep.Dial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("read %q, %v; want ping", buf, err)
			}
			c.Close()
			<-done
		})
	}
}

func TestMTLSRejectsWrongCA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, other := testkit.NewCA(t), testkit.NewCA(t)
	serverCert := ca.Issue(t, testkit.CertOptions{CommonName: "localhost", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := tls.NewListener(raw, testkit.ServerTLS(t, ca, serverCert))
	defer l.Close()
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		if c, err := l.Accept(); err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	// The client trusts another CA, so it rejects the server's certificate.
	clientCert := other.Issue(t, testkit.CertOptions{CommonName: "client", Client: true})
	ep := endpoint.MTLS(testkit.ClientTLS(t, other, clientCert, ""), endpoint.TCP(raw.Addr().String()))
	c, err := ep.Dial(ctx)
	if err == nil {
		c.Close()
		t.Fatal("Dial succeeded with a server certificate from an untrusted CA")
	}
	var verr *tls.CertificateVerificationError
	if !errors.As(err, &verr) {
		t.Errorf("Dial error = %v, want a certificate verification error", err)
	}
	<-accepted
}

func TestMTLSNilConfigPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("MTLS(nil, ...) did not panic")
		}
	}()
	endpoint.MTLS(nil, endpoint.TCP("localhost:1"))
}
