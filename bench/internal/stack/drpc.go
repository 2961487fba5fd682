package stack

import (
	"context"
	"fmt"
	"net"
	"sync"

	"storj.io/drpc"
	"storj.io/drpc/drpcconn"
	"storj.io/drpc/drpcmanager"
	"storj.io/drpc/drpcmux"
	"storj.io/drpc/drpcpool"
	"storj.io/drpc/drpcserver"
	"storj.io/drpc/drpcwire"
)

// DRPC returns the drpc stack with one connection. drpc runs one call at a time on a
// connection, so concurrent callers of one client wait for each other.
func DRPC() Stack { return drpcStack{} }

// DRPCPool returns the drpc stack through drpc's own connection pool (drpcpool): a call takes
// an idle connection or dials a new one, so concurrent callers get a connection each.
func DRPCPool() Stack { return drpcStack{pooled: true} }

type drpcStack struct{ pooled bool }

var _ Stack = drpcStack{}

func (s drpcStack) Name() string {
	if s.pooled {
		return "drpc-pool"
	}
	return "drpc"
}

// drpcRPC is the name of the echo method.
const drpcRPC = "/bench.Echo/Echo"

// drpcMsg is the message of the echo method: raw bytes.
type drpcMsg struct{ b []byte }

// rawEncoding is a drpc encoding of *drpcMsg: marshalling sends the bytes as they are,
// unmarshalling copies them (drpc reuses its buffer) into a slice the receiver owns.
type rawEncoding struct{}

var _ drpc.Encoding = rawEncoding{}

func (rawEncoding) Marshal(msg drpc.Message) ([]byte, error) {
	m, ok := msg.(*drpcMsg)
	if !ok {
		return nil, fmt.Errorf("stack: drpc raw encoding cannot marshal %T", msg)
	}
	return m.b, nil
}

func (rawEncoding) Unmarshal(buf []byte, msg drpc.Message) error {
	m, ok := msg.(*drpcMsg)
	if !ok {
		return fmt.Errorf("stack: drpc raw encoding cannot unmarshal into %T", msg)
	}
	m.b = append([]byte(nil), buf...)
	return nil
}

// drpcEcho is the echo service; its method expression describes the method's types to drpcmux.
type drpcEcho struct{}

func (drpcEcho) Echo(_ context.Context, in *drpcMsg) (*drpcMsg, error) { return in, nil }

// drpcDescription describes the echo service as drpc's code generator would.
type drpcDescription struct{}

func (drpcDescription) NumMethods() int { return 1 }

func (drpcDescription) Method(n int) (string, drpc.Encoding, drpc.Receiver, any, bool) {
	if n != 0 {
		return "", nil, nil, nil, false
	}
	receive := func(srv any, ctx context.Context, in1, _ any) (drpc.Message, error) {
		return srv.(drpcEcho).Echo(ctx, in1.(*drpcMsg))
	}
	return drpcRPC, rawEncoding{}, receive, drpcEcho.Echo, true
}

// drpcManagerOptions returns the connection options of both sides for cfg.
func drpcManagerOptions(cfg Config) drpcmanager.Options {
	return drpcmanager.Options{Reader: drpcwire.ReaderOptions{MaximumBufferSize: cfg.MaxMessageSize}}
}

func (drpcStack) Serve(l net.Listener, cfg Config) (Server, error) {
	mux := drpcmux.New()
	if err := mux.Register(drpcEcho{}, drpcDescription{}); err != nil {
		return nil, err
	}
	srv := drpcserver.NewWithOptions(mux, drpcserver.Options{Manager: drpcManagerOptions(cfg)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Serve closes l when ctx is done and waits for every connection's goroutine.
		srv.Serve(ctx, l)
	}()
	return &drpcServer{cancel: cancel, done: done}, nil
}

type drpcServer struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (s *drpcServer) Close() error {
	s.cancel()
	<-s.done
	return nil
}

func (s drpcStack) Dial(ctx context.Context, network, addr string, cfg Config) (Client, error) {
	c := &drpcClient{network: network, addr: addr, opts: drpcconn.Options{Manager: drpcManagerOptions(cfg)}}
	if !s.pooled {
		conn, err := c.dial(ctx, struct{}{})
		if err != nil {
			return nil, err
		}
		c.conn = conn
		return c, nil
	}
	c.pool = drpcpool.New[struct{}, *drpcconn.Conn](drpcpool.Options{})
	c.conn = c.pool.Get(ctx, struct{}{}, c.dial)
	return c, nil
}

type drpcClient struct {
	network, addr string
	opts          drpcconn.Options
	conn          drpc.Conn                                // one connection, or the pool's
	pool          *drpcpool.Pool[struct{}, *drpcconn.Conn] // nil without a pool

	// mu guards dialled and closed.
	mu      sync.Mutex
	dialled []*drpcconn.Conn // every connection dialled, closed by Close
	closed  bool
}

// dial opens a connection, recorded so that Close closes it whether or not it is in the pool.
func (c *drpcClient) dial(ctx context.Context, _ struct{}) (*drpcconn.Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, c.network, c.addr)
	if err != nil {
		return nil, err
	}
	conn := drpcconn.NewWithOptions(nc, c.opts)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		return nil, errClosed
	}
	c.dialled = append(c.dialled, conn)
	return conn, nil
}

func (c *drpcClient) Call(ctx context.Context, payload []byte) ([]byte, error) {
	var reply drpcMsg
	if err := c.conn.Invoke(ctx, drpcRPC, rawEncoding{}, &drpcMsg{b: payload}, &reply); err != nil {
		return nil, err
	}
	return reply.b, nil
}

func (c *drpcClient) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	dialled := c.dialled
	c.dialled = nil
	c.mu.Unlock()
	c.conn.Close()
	if c.pool != nil {
		c.pool.Close()
	}
	for _, conn := range dialled {
		conn.Close()
	}
	return nil
}
