package stack

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// WeftComponent and WeftMethod name the echo method weft's stacks serve.
const (
	WeftComponent = "bench"
	WeftMethod    = "Echo"
)

var weftKey = call.MakeMethodKey(WeftComponent, WeftMethod)

// quiet discards the logs of weft's servers and clients: a benchmark closes connections on
// purpose, and the other stacks log nothing either.
var quiet = slog.New(slog.DiscardHandler)

// Weft returns the weft stack with one connection from call.Dial: concurrent calls are
// multiplexed on it.
func Weft() Stack { return weftStack{} }

// WeftConnect returns the weft stack through call.Connect over a constant resolver of one
// endpoint: the same connection, plus the pool, the balancer's pick and the health checks.
func WeftConnect() Stack { return weftStack{connect: true} }

type weftStack struct{ connect bool }

var _ Stack = weftStack{}

func (s weftStack) Name() string {
	if s.connect {
		return "weft-connect"
	}
	return "weft"
}

// weftLimits returns the limits of cfg for both sides.
func weftLimits(cfg Config) call.Limits {
	return call.Limits{MaxMessageSize: cfg.MaxMessageSize}
}

func (weftStack) Serve(l net.Listener, cfg Config) (Server, error) {
	var hm call.HandlerMap
	// The reply is the argument itself: the server writes it before it releases the argument.
	hm.Set(WeftComponent, WeftMethod, func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	return ServeWeft(l, &hm, cfg), nil
}

// ServeWeft serves hm on l with weft's default server options (limits from cfg) until the
// returned Server is closed, which stops the server at once.
func ServeWeft(l net.Listener, hm *call.HandlerMap, cfg Config) Server {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		call.Serve(ctx, call.NetListener(l, hm), call.ServerOptions{
			Logger:       quiet,
			Limits:       weftLimits(cfg),
			DrainTimeout: -1,
		})
	}()
	return &weftServer{cancel: cancel, done: done}
}

type weftServer struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (s *weftServer) Close() error {
	s.cancel()
	<-s.done
	return nil
}

// WeftEndpoint returns the weft endpoint of addr on network.
func WeftEndpoint(network, addr string) (endpoint.Endpoint, error) {
	switch network {
	case "tcp":
		return endpoint.TCP(addr), nil
	case "unix":
		return endpoint.Unix(addr), nil
	}
	return nil, fmt.Errorf("stack: weft: unsupported network %q", network)
}

// WeftClientOptions returns the client options of weft's stacks for cfg.
func WeftClientOptions(cfg Config) call.ClientOptions {
	return call.ClientOptions{Logger: quiet, Limits: weftLimits(cfg)}
}

func (s weftStack) Dial(ctx context.Context, network, addr string, cfg Config) (Client, error) {
	ep, err := WeftEndpoint(network, addr)
	if err != nil {
		return nil, err
	}
	var conn call.Connection
	if s.connect {
		conn, err = call.Connect(ctx, resolve.Constant(ep), WeftClientOptions(cfg))
	} else {
		conn, err = call.Dial(ctx, ep, WeftClientOptions(cfg))
	}
	if err != nil {
		return nil, err
	}
	return weftClient{conn}, nil
}

type weftClient struct{ conn call.Connection }

func (c weftClient) Call(ctx context.Context, payload []byte) ([]byte, error) {
	return c.conn.Call(ctx, weftKey, payload, call.CallOptions{})
}

func (c weftClient) Close() error {
	c.conn.Close()
	return nil
}
