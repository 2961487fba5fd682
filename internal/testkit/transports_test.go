package testkit_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

func TestTransports(t *testing.T) {
	var names []string
	for _, tr := range testkit.Transports() {
		names = append(names, tr.Name)
		t.Run(tr.Name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			l, ep := tr.Listen(t)
			if !strings.HasPrefix(ep.Address(), map[string]string{
				"pipe": "pipe://", "tcp": "tcp://127.0.0.1:", "unix": "unix:///", "mtls": "mtls+tcp://127.0.0.1:",
			}[tr.Name]) {
				t.Fatalf("Address = %q", ep.Address())
			}
			for i := range 3 {
				msg := fmt.Sprintf("message %d over %s", i, tr.Name)
				done := echoOnce(l, len(msg))
				roundTrip(ctx, t, ep, msg)
				if err := <-done; err != nil {
					t.Fatalf("server: %v", err)
				}
			}
			if tr.Name == "mtls" {
				checkMTLSPeer(ctx, t, tr)
			}
		})
	}
	if got := strings.Join(names, ","); got != "pipe,tcp,unix,mtls" {
		t.Fatalf("transports = %s", got)
	}
}

// checkMTLSPeer checks that the mtls transport's server sees the client certificate.
func checkMTLSPeer(ctx context.Context, t *testing.T, tr testkit.Transport) {
	l, ep := tr.Listen(t)
	cn := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			cn <- err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.HandshakeContext(ctx); err != nil {
			cn <- err.Error()
			return
		}
		cn <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
	}()
	c, err := ep.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := <-cn; got != testkit.MTLSClientName {
		t.Fatalf("server saw client %q, want %q", got, testkit.MTLSClientName)
	}
}
