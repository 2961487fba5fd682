package stack

import (
	"context"
	"net"
	"net/rpc"
)

// NetRPC returns the standard library's net/rpc stack (gob encoding) with one connection on
// which concurrent calls are multiplexed.
func NetRPC() Stack { return netRPCStack{} }

type netRPCStack struct{}

var _ Stack = netRPCStack{}

func (netRPCStack) Name() string { return "net/rpc" }

// NetRPCEcho is the net/rpc receiver of the echo method. net/rpc finds methods by reflection,
// so it is exported.
type NetRPCEcho struct{}

// Echo sets reply to args.
func (NetRPCEcho) Echo(args []byte, reply *[]byte) error {
	*reply = args
	return nil
}

func (netRPCStack) Serve(l net.Listener, _ Config) (Server, error) {
	srv := rpc.NewServer()
	if err := srv.RegisterName("Bench", NetRPCEcho{}); err != nil {
		return nil, err
	}
	return startServer(l, func(c net.Conn) { srv.ServeConn(c) }), nil
}

func (netRPCStack) Dial(ctx context.Context, network, addr string, _ Config) (Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return netRPCClient{rpc.NewClient(nc)}, nil
}

type netRPCClient struct{ c *rpc.Client }

// Call sends the call and waits for its reply or for ctx: net/rpc has no cancellation, so a call
// whose ctx ends is abandoned (its reply, if it comes, is dropped).
func (c netRPCClient) Call(ctx context.Context, payload []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var reply []byte
	pending := c.c.Go("Bench.Echo", payload, &reply, make(chan *rpc.Call, 1))
	select {
	case <-pending.Done:
		if pending.Error != nil {
			return nil, pending.Error
		}
		return reply, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c netRPCClient) Close() error {
	err := c.c.Close()
	if err == rpc.ErrShutdown {
		return nil
	}
	return err
}
