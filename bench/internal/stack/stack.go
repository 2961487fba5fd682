// Package stack puts the RPC implementations that bench/ compares behind one small interface:
// serve an echo method on a listener, dial a client, make a call, close.
//
// Every stack echoes raw bytes with no serialisation of its own beyond what its protocol needs,
// so the comparison is of the transports: weft ([Weft], [WeftConnect]), grpc-go with a raw-bytes
// codec and a hand-written service description ([GRPC]), the standard library's net/rpc
// ([NetRPC]), drpc with a raw-bytes encoding on one connection ([DRPC]) and through its
// connection pool ([DRPCPool]), and a length-prefixed echo over plain sockets ([RawTCP]), the
// floor that no RPC stack can beat.
//
// Every client returns a reply its caller owns (no stack may hand back a buffer it reuses),
// and every server's handler returns its argument, allocating nothing itself.
package stack

import (
	"context"
	"errors"
	"net"
)

// Stack is one RPC implementation under test. Its methods may be called concurrently.
type Stack interface {
	// Name names the stack in tables and benchmark names, such as "grpc-go".
	Name() string

	// Serve serves an echo method on l until the returned Server is closed. It takes
	// ownership of l.
	Serve(l net.Listener, cfg Config) (Server, error)

	// Dial returns a client of the server listening on addr of network ("tcp" or "unix").
	// ctx bounds only what Dial itself waits for; some stacks connect on the first call.
	Dial(ctx context.Context, network, addr string, cfg Config) (Client, error)
}

// Server is a running echo server.
type Server interface {
	// Close stops the server at once: it closes the listener and every connection, and waits
	// for the goroutines it started. It can be called more than once.
	Close() error
}

// Client calls the echo method of one server. It is safe for concurrent use.
type Client interface {
	// Call sends payload and returns the server's reply, which the caller owns. payload is not
	// retained after Call returns. A call whose ctx is done before it starts fails.
	Call(ctx context.Context, payload []byte) ([]byte, error)

	// Close closes the client's connections; calls in progress fail. It waits for the
	// goroutines the client started where the library allows (net/rpc's and grpc-go's exit
	// shortly after). It can be called more than once.
	Close() error
}

// Config adjusts a server and a client alike.
type Config struct {
	// MaxMessageSize raises (or lowers) the largest request and reply the stack accepts, for
	// stacks that have such a limit. If zero, each stack keeps its own default (4 MiB for weft,
	// grpc-go and drpc).
	MaxMessageSize int
}

// All returns every stack, in the order tables list them.
func All() []Stack {
	return []Stack{Weft(), WeftConnect(), GRPC(), NetRPC(), DRPC(), DRPCPool(), RawTCP()}
}

// ByName returns the stack of All named name.
func ByName(name string) (Stack, bool) {
	for _, s := range All() {
		if s.Name() == name {
			return s, true
		}
	}
	return nil, false
}

// errClosed is returned by calls of a closed client of the stacks that need their own.
var errClosed = errors.New("stack: client closed")

// acceptLoop accepts connections from l and runs serve on each in its own goroutine, tracking
// them in conns so that they can be closed. It returns when Accept fails (l was closed).
func acceptLoop(l net.Listener, conns *connSet, serve func(net.Conn)) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		if !conns.add(c) {
			c.Close()
			return
		}
		conns.wg.Go(func() {
			defer conns.remove(c)
			serve(c)
		})
	}
}
