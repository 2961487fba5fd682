// Command hello runs three replicas of a "greeter" server — one on TCP, one on a Unix socket,
// one on TCP with mutual TLS — and calls them through one weft Connection that balances calls
// round-robin over the three, printing what happened. It exercises the real protocol end to
// end: calls multiplexed on each connection and spread over the replicas, metadata, deadlines,
// the verified peer identity, a large chunked message, typed errors, shard keys, a replica
// that drains while calls are in flight, and a replica added while the client runs.
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
	"maps"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// The "greeter" component's methods.
var (
	greetKey = call.MakeMethodKey("greeter", "Greet")
	echoKey  = call.MakeMethodKey("greeter", "Echo")
	slowKey  = call.MakeMethodKey("greeter", "Slow")
	whoKey   = call.MakeMethodKey("greeter", "WhoAmI")
)

func handlers(replica string) *call.HandlerMap {
	var hm call.HandlerMap
	hm.Set("greeter", "Greet", func(ctx context.Context, args []byte) ([]byte, error) {
		greeting := "Hello"
		if call.IncomingMetadata(ctx)["lang"] == "fr" {
			greeting = "Bonjour"
		}
		return fmt.Appendf(nil, "%s, %s! (from %s)", greeting, args, replica), nil
	})
	hm.Set("greeter", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
		return bytes.Clone(args), nil
	})
	hm.Set("greeter", "Slow", func(ctx context.Context, args []byte) ([]byte, error) {
		t := time.NewTimer(300 * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
			return []byte(replica), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	hm.Set("greeter", "WhoAmI", func(ctx context.Context, args []byte) ([]byte, error) {
		p, _ := call.PeerFromContext(ctx)
		if p.TLS == nil || len(p.TLS.VerifiedChains) == 0 {
			return fmt.Appendf(nil, "%s sees an unauthenticated peer on %s", replica, p.Addr.Network()), nil
		}
		return fmt.Appendf(nil, "%s sees verified client %q", replica, p.TLS.VerifiedChains[0][0].Subject.CommonName), nil
	})
	return &hm
}

// replica is one running greeter server.
type replica struct {
	name string
	ep   endpoint.Endpoint
	stop context.CancelFunc // drains the server
	done chan struct{}      // closed when Serve has returned
}

// start serves the greeter on l until stop is called.
func start(name string, l net.Listener, ep endpoint.Endpoint, logger *slog.Logger) *replica {
	ctx, stop := context.WithCancel(context.Background())
	r := &replica{name: name, ep: ep, stop: stop, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		err := call.Serve(ctx, call.NetListener(l, handlers(name)), call.ServerOptions{Logger: logger, DrainTimeout: 5 * time.Second})
		fmt.Printf("[%s] server stopped: %v\n", name, err)
	}()
	return r
}

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

	dir, err := os.MkdirTemp("", "weft-hello")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	serverTLS, clientTLS, err := testCertificates()
	if err != nil {
		return err
	}

	// Three replicas of the greeter: TCP, Unix socket, and TCP with mutual TLS.
	tcpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	sock := filepath.Join(dir, "greeter.sock")
	unixL, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	mtlsL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	replicas := []*replica{
		start("replica-1/tcp", tcpL, endpoint.TCP(tcpL.Addr().String()), logger),
		start("replica-2/unix", unixL, endpoint.Unix(sock), logger),
		start("replica-3/mtls", tls.NewListener(mtlsL, serverTLS), endpoint.MTLS(clientTLS, endpoint.TCP(mtlsL.Addr().String())), logger),
	}
	defer func() {
		for _, r := range replicas {
			r.stop()
			<-r.done
		}
	}()

	// One Connection to all of them. A Manual resolver lets us change the set as we go.
	var eps []endpoint.Endpoint
	for _, r := range replicas {
		eps = append(eps, r.ep)
		fmt.Printf("[client] endpoint %s\n", r.ep.Address())
	}
	resolver := resolve.NewManual(eps...)
	conn, err := call.Connect(ctx, resolver, call.ClientOptions{Logger: logger}) // round-robin by default
	if err != nil {
		return err
	}
	defer conn.Close()
	return exercise(ctx, conn, resolver, replicas, logger)
}

func exercise(ctx context.Context, conn call.Connection, resolver *resolve.Manual, replicas []*replica, logger *slog.Logger) error {
	// Calls would wait for the first endpoint to connect; wait for all three, so round-robin
	// has them all to spread calls over.
	if err := waitReady(ctx, conn, 3); err != nil {
		return err
	}
	counts := map[string]int{}
	for i := range 30 {
		out, err := conn.Call(call.WithMetadata(ctx, call.Metadata{"lang": "fr"}), greetKey, []byte("weft"), call.CallOptions{})
		if err != nil {
			return fmt.Errorf("greet: %w", err)
		}
		if i == 0 {
			fmt.Printf("[client] Greet: %s\n", out)
		}
		counts[string(out[strings.LastIndex(string(out), "from ")+5:len(out)-1])]++
	}
	fmt.Printf("[client] 30 Greets over the replicas: %s\n", formatCounts(counts))

	// With the sharded balancer, a shard key routes a call to one replica of the resolved set
	// (ordered by address): here, each in turn.
	for k := range uint64(3) {
		out, err := conn.Call(ctx, whoKey, nil, call.CallOptions{Balancer: balance.Sharded(), Sharded: true, ShardKey: k})
		if err != nil {
			return fmt.Errorf("WhoAmI: %w", err)
		}
		fmt.Printf("[client] WhoAmI with shard key %d: %s\n", k, out)
	}

	// 300 concurrent echoes, multiplexed on the three connections.
	if err := echoes(ctx, conn, 300); err != nil {
		return err
	}
	fmt.Printf("[client] 300 concurrent echoes: all matched\n")

	// A 3 MiB message travels in chunks, interleaved with other calls.
	big := bytes.Repeat([]byte("weft"), 3<<20/4)
	begin := time.Now()
	got, err := conn.Call(ctx, echoKey, big, call.CallOptions{})
	if err != nil || !bytes.Equal(got, big) {
		return fmt.Errorf("3 MiB echo: %v", err)
	}
	fmt.Printf("[client] 3 MiB echo round trip in %v\n", time.Since(begin).Round(time.Millisecond))

	// A deadline shorter than the handler: the caller gets DeadlineExceeded, and the handler
	// sees its context cancelled.
	dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = conn.Call(dctx, slowKey, nil, call.CallOptions{})
	dcancel()
	fmt.Printf("[client] Slow with a 50ms deadline: deadline exceeded=%t\n", errors.Is(err, context.DeadlineExceeded))
	if !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("slow call: got %v, want a deadline error", err)
	}

	// An unknown method: a typed error that proves the call never ran.
	_, err = conn.Call(ctx, call.MakeMethodKey("greeter", "Missing"), nil, call.CallOptions{})
	fmt.Printf("[client] Missing: unknown method=%t never ran=%t\n", errors.Is(err, call.ErrUnknownMethod), call.NeverRan(err))
	if !errors.Is(err, call.ErrUnknownMethod) {
		return fmt.Errorf("unknown method: got %v", err)
	}

	// Drain replica-1 while slow calls run everywhere: it sends a go-away, its admitted calls
	// finish, and new calls go to the other replicas.
	var wg sync.WaitGroup
	slow := make([]error, 9)
	for i := range slow {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, slow[i] = conn.Call(ctx, slowKey, nil, call.CallOptions{})
		}()
	}
	time.Sleep(50 * time.Millisecond) // let the slow calls reach their replicas
	fmt.Printf("[client] draining %s with calls in flight\n", replicas[0].name)
	replicas[0].stop()
	if err := echoes(ctx, conn, 100); err != nil {
		return fmt.Errorf("during the drain: %w", err)
	}
	wg.Wait()
	<-replicas[0].done
	for i, err := range slow {
		if err != nil {
			return fmt.Errorf("slow call %d during the drain: %w", i, err)
		}
	}
	fmt.Printf("[client] all 9 slow calls finished, 100 echoes during the drain all matched\n")

	// Replace replica-1 in the resolver with a new replica-4: the client dials it and
	// balances over it; the stopped replica is forgotten.
	l4, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	r4 := start("replica-4/tcp", l4, endpoint.TCP(l4.Addr().String()), logger)
	replicas[0] = r4
	resolver.Update(replicas[0].ep, replicas[1].ep, replicas[2].ep)
	fmt.Printf("[client] resolver now lists %s instead of replica-1\n", r4.ep.Address())
	if err := waitReady(ctx, conn, 3); err != nil {
		return err
	}
	counts = map[string]int{}
	for range 30 {
		out, err := conn.Call(ctx, greetKey, []byte("again"), call.CallOptions{})
		if err != nil {
			return fmt.Errorf("greet after the update: %w", err)
		}
		counts[string(out[strings.LastIndex(string(out), "from ")+5:len(out)-1])]++
	}
	fmt.Printf("[client] 30 Greets after the update: %s\n", formatCounts(counts))
	if counts["replica-1/tcp"] != 0 {
		return errors.New("a call reached the drained replica")
	}
	return nil
}

// waitReady waits until n endpoints of conn are ready.
func waitReady(ctx context.Context, conn call.Connection, n int) error {
	for {
		st := conn.(call.Inspectable).Status()
		ready := 0
		for _, e := range st.Endpoints {
			if e.State == call.EndpointReady {
				ready++
			}
		}
		if ready >= n {
			return nil
		}
		select {
		case <-st.Changed:
		case <-ctx.Done():
			return fmt.Errorf("waiting for %d ready endpoints: %+v", n, st.Endpoints)
		}
	}
}

// echoes makes n concurrent Echo calls and checks every reply.
func echoes(ctx context.Context, conn call.Connection, n int) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := fmt.Appendf(nil, "message %d", i)
			got, err := conn.Call(ctx, echoKey, msg, call.CallOptions{})
			if err == nil && !bytes.Equal(got, msg) {
				err = fmt.Errorf("echo %d returned %q", i, got)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs // nil if every echo matched
}

func formatCounts(counts map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(counts)) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, counts[k]))
	}
	return strings.Join(parts, " ")
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
