package testkit

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/weftrpc/weft/endpoint"
)

// MTLSServerName is the name the "mtls" transport's server certificate is issued for (with the
// IP address 127.0.0.1) and its client verifies.
const MTLSServerName = "localhost"

// MTLSClientName is the common name of the "mtls" transport's client certificate.
const MTLSClientName = "weft-test-client"

// Transport is one way of connecting a client to a server in tests.
type Transport struct {
	// Name is the transport's name: "pipe", "tcp", "unix" or "mtls".
	Name string
	// Listen returns a new listener and the endpoint that dials it. The listener is closed by
	// t.Cleanup; closing it earlier is fine. It fails t on error.
	Listen func(t testing.TB) (net.Listener, endpoint.Endpoint)
}

// Transports returns the matrix of transports tests run over:
//
//   - "pipe": a [PipeListener], which is its own endpoint;
//   - "tcp": a TCP listener on 127.0.0.1 and an ephemeral port;
//   - "unix": a Unix socket in a fresh short directory under os.TempDir (removed by t.Cleanup),
//     since socket paths are limited to about 100 bytes;
//   - "mtls": TCP wrapped by tls.NewListener with [ServerTLS], dialled by [endpoint.MTLS] with
//     [ClientTLS], with certificates of a new [CA] for [MTLSServerName] and [MTLSClientName].
func Transports() []Transport {
	return []Transport{
		{Name: "pipe", Listen: listenPipe},
		{Name: "tcp", Listen: listenTCP},
		{Name: "unix", Listen: listenUnix},
		{Name: "mtls", Listen: listenMTLS},
	}
}

// pipeSeq makes the names of pipe listeners unique, so one test can listen more than once.
var pipeSeq atomic.Uint64

func listenPipe(t testing.TB) (net.Listener, endpoint.Endpoint) {
	t.Helper()
	l := NewPipeListener(fmt.Sprintf("%s#%d", t.Name(), pipeSeq.Add(1)))
	t.Cleanup(func() { l.Close() })
	return l, l
}

func tcpListener(t testing.TB) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testkit: listening on TCP: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func listenTCP(t testing.TB) (net.Listener, endpoint.Endpoint) {
	t.Helper()
	l := tcpListener(t)
	return l, endpoint.TCP(l.Addr().String())
}

func listenUnix(t testing.TB) (net.Listener, endpoint.Endpoint) {
	t.Helper()
	// t.TempDir() is named after the test and can exceed the socket path limit.
	dir, err := os.MkdirTemp("", "weft")
	if err != nil {
		t.Fatalf("testkit: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("testkit: listening on %s: %v", path, err)
	}
	t.Cleanup(func() { l.Close() }) // runs before the RemoveAll above
	return l, endpoint.Unix(path)
}

func listenMTLS(t testing.TB) (net.Listener, endpoint.Endpoint) {
	t.Helper()
	ca := NewCA(t)
	server := ca.Issue(t, CertOptions{
		CommonName: MTLSServerName,
		DNSNames:   []string{MTLSServerName},
		IPs:        []net.IP{net.IPv4(127, 0, 0, 1)},
	})
	client := ca.Issue(t, CertOptions{CommonName: MTLSClientName, Client: true})
	l := tcpListener(t)
	tl := tls.NewListener(l, ServerTLS(t, ca, server))
	ep := endpoint.MTLS(ClientTLS(t, ca, client, MTLSServerName), endpoint.TCP(l.Addr().String()))
	return tl, ep
}
