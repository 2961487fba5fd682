// Command hello starts three weft servers — on TCP, on a Unix socket, and on TCP with mutual
// TLS — and calls each over its own connection, printing what happened. It exercises the real
// protocol end to end: concurrent calls multiplexed on one connection, metadata, deadlines, the
// verified peer identity, a large chunked message, and typed errors.
//
//	go run ./examples/hello
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
)

// The "greeter" component's methods.
var (
	greetKey = call.MakeMethodKey("greeter", "Greet")
	echoKey  = call.MakeMethodKey("greeter", "Echo")
	slowKey  = call.MakeMethodKey("greeter", "Slow")
	whoKey   = call.MakeMethodKey("greeter", "WhoAmI")
)

func handlers(server string) *call.HandlerMap {
	var hm call.HandlerMap
	hm.Set("greeter", "Greet", func(ctx context.Context, args []byte) ([]byte, error) {
		lang := call.IncomingMetadata(ctx)["lang"]
		greeting := "Hello"
		if lang == "fr" {
			greeting = "Bonjour"
		}
		return fmt.Appendf(nil, "%s, %s! (from the %s server)", greeting, args, server), nil
	})
	hm.Set("greeter", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
		return bytes.Clone(args), nil
	})
	hm.Set("greeter", "Slow", func(ctx context.Context, args []byte) ([]byte, error) {
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-t.C:
			return []byte("done"), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	hm.Set("greeter", "WhoAmI", func(ctx context.Context, args []byte) ([]byte, error) {
		p, _ := call.PeerFromContext(ctx)
		if p.TLS == nil || len(p.TLS.VerifiedChains) == 0 {
			return []byte("an unauthenticated peer at " + p.Addr.String()), nil
		}
		return []byte("verified client " + p.TLS.VerifiedChains[0][0].Subject.CommonName), nil
	})
	return &hm
}

type server struct {
	name string
	ep   endpoint.Endpoint
}

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	dir, err := os.MkdirTemp("", "weft-hello")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	serverTLS, clientTLS, err := testCertificates()
	if err != nil {
		return err
	}

	// Three listeners, three servers.
	tcpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	sock := filepath.Join(dir, "greeter.sock")
	unixL, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	mtlsRaw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	servers := []server{
		{"tcp", endpoint.TCP(tcpL.Addr().String())},
		{"unix", endpoint.Unix(sock)},
		{"mtls", endpoint.MTLS(clientTLS, endpoint.TCP(mtlsRaw.Addr().String()))},
	}
	serveCtx, stopServing := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i, l := range []net.Listener{tcpL, unixL, tls.NewListener(mtlsRaw, serverTLS)} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := call.Serve(serveCtx, call.NetListener(l, handlers(servers[i].name)), call.ServerOptions{Logger: logger})
			fmt.Printf("[%s] server stopped: %v\n", servers[i].name, err)
		}()
	}

	for _, s := range servers {
		if err := exercise(ctx, s, logger); err != nil {
			stopServing()
			wg.Wait()
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}

	// Cancelling the servers' context drains them: go-away, in-flight calls finish, close.
	stopServing()
	wg.Wait()
	return nil
}

func exercise(ctx context.Context, s server, logger *slog.Logger) error {
	fmt.Printf("[%s] dialling %s\n", s.name, s.ep.Address())
	c, err := call.Dial(ctx, s.ep, call.ClientOptions{Logger: logger})
	if err != nil {
		return err
	}
	defer c.Close()

	// A call with metadata.
	out, err := c.Call(call.WithMetadata(ctx, call.Metadata{"lang": "fr"}), greetKey, []byte("weft"), call.CallOptions{})
	if err != nil {
		return err
	}
	fmt.Printf("[%s] Greet: %s\n", s.name, out)

	// The peer identity the server verified.
	out, err = c.Call(ctx, whoKey, nil, call.CallOptions{})
	if err != nil {
		return err
	}
	fmt.Printf("[%s] WhoAmI: the server sees %s\n", s.name, out)

	// 100 concurrent calls multiplexed on this one connection.
	var wg sync.WaitGroup
	var mu sync.Mutex
	failures := 0
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := fmt.Appendf(nil, "message %d", i)
			got, err := c.Call(ctx, echoKey, msg, call.CallOptions{})
			if err != nil || !bytes.Equal(got, msg) {
				mu.Lock()
				failures++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("[%s] 100 concurrent echoes on one connection: %d failed\n", s.name, failures)
	if failures > 0 {
		return errors.New("concurrent echoes failed")
	}

	// A 3 MiB message travels in chunks, interleaved with other calls.
	big := bytes.Repeat([]byte("weft"), 3<<20/4)
	start := time.Now()
	got, err := c.Call(ctx, echoKey, big, call.CallOptions{})
	if err != nil || !bytes.Equal(got, big) {
		return fmt.Errorf("3 MiB echo: %v", err)
	}
	fmt.Printf("[%s] 3 MiB echo round trip in %v\n", s.name, time.Since(start).Round(time.Millisecond))

	// A deadline shorter than the handler: the caller gets DeadlineExceeded, and the handler
	// sees its context cancelled.
	dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = c.Call(dctx, slowKey, nil, call.CallOptions{})
	dcancel()
	fmt.Printf("[%s] Slow with a 50ms deadline: deadline exceeded=%t (%v)\n", s.name, errors.Is(err, context.DeadlineExceeded), err)

	// An unknown method: a typed error that proves the call never ran.
	_, err = c.Call(ctx, call.MakeMethodKey("greeter", "Missing"), nil, call.CallOptions{})
	fmt.Printf("[%s] Missing: unknown method=%t never ran=%t\n", s.name, errors.Is(err, call.ErrUnknownMethod), call.NeverRan(err))
	if !errors.Is(err, call.ErrUnknownMethod) {
		return fmt.Errorf("unknown method: got %v", err)
	}
	return nil
}

// testCertificates makes a throwaway CA, a server certificate for 127.0.0.1 and a client
// certificate, and returns TLS configurations that require and verify both sides.
func testCertificates() (server, client *tls.Config, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "hello example CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	issue := func(serial int64, name string, usage x509.ExtKeyUsage) (tls.Certificate, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return tls.Certificate{}, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		if strings.HasPrefix(name, "127.") {
			tmpl.IPAddresses = []net.IP{net.ParseIP(name)}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return tls.Certificate{}, err
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
	}
	serverCert, err := issue(2, "127.0.0.1", x509.ExtKeyUsageServerAuth)
	if err != nil {
		return nil, nil, err
	}
	clientCert, err := issue(3, "hello-client", x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, nil, err
	}
	server = &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}
	client = &tls.Config{
		Certificates: []tls.Certificate{clientCert},
		RootCAs:      pool,
		MinVersion:   tls.VersionTLS12,
	}
	return server, client, nil
}
