package stack

import (
	"context"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
)

// GRPC returns the grpc-go stack: one ClientConn (one HTTP/2 connection) whose calls use a
// codec that passes []byte through, to a server with a hand-written service description of
// one unary method. Everything else is grpc-go's default.
func GRPC() Stack { return grpcStack{} }

type grpcStack struct{}

var _ Stack = grpcStack{}

func (grpcStack) Name() string { return "grpc-go" }

// grpcMethod is the full name of the echo method.
const grpcMethod = "/bench.Echo/Echo"

// rawCodec is a grpc codec whose messages are *[]byte: marshalling sends the bytes as they are,
// unmarshalling copies them into a slice the receiver owns.
type rawCodec struct{}

var _ encoding.CodecV2 = rawCodec{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("stack: grpc raw codec cannot marshal %T", v)
	}
	return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("stack: grpc raw codec cannot unmarshal into %T", v)
	}
	// Materialize copies the buffers (which grpc frees on return) into a new slice.
	*b = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "raw" }

// grpcEchoHandler is the unary handler of the echo method: it returns its argument.
func grpcEchoHandler(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new([]byte)
	if err := dec(in); err != nil {
		return nil, err
	}
	return in, nil
}

// grpcService describes the echo service as protoc would, without protoc.
var grpcService = grpc.ServiceDesc{
	ServiceName: "bench.Echo",
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Echo", Handler: grpcEchoHandler}},
}

func (grpcStack) Serve(l net.Listener, cfg Config) (Server, error) {
	opts := []grpc.ServerOption{grpc.ForceServerCodecV2(rawCodec{})}
	if cfg.MaxMessageSize > 0 {
		opts = append(opts, grpc.MaxRecvMsgSize(cfg.MaxMessageSize), grpc.MaxSendMsgSize(cfg.MaxMessageSize))
	}
	srv := grpc.NewServer(opts...)
	srv.RegisterService(&grpcService, struct{}{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	return &grpcServer{srv: srv, done: done}, nil
}

type grpcServer struct {
	srv  *grpc.Server
	done chan struct{}
	once sync.Once
}

func (s *grpcServer) Close() error {
	s.once.Do(func() {
		s.srv.Stop()
		<-s.done
	})
	return nil
}

func (grpcStack) Dial(_ context.Context, network, addr string, cfg Config) (Client, error) {
	callOpts := []grpc.CallOption{grpc.ForceCodecV2(rawCodec{})}
	if cfg.MaxMessageSize > 0 {
		callOpts = append(callOpts, grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize))
	}
	var d net.Dialer
	cc, err := grpc.NewClient("passthrough:///bench",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}),
		grpc.WithDefaultCallOptions(callOpts...),
	)
	if err != nil {
		return nil, err
	}
	return &grpcClient{cc: cc}, nil
}

type grpcClient struct {
	cc   *grpc.ClientConn
	once sync.Once
	err  error // of the first Close
}

func (c *grpcClient) Call(ctx context.Context, payload []byte) ([]byte, error) {
	var reply []byte
	if err := c.cc.Invoke(ctx, grpcMethod, &payload, &reply); err != nil {
		return nil, err
	}
	return reply, nil
}

func (c *grpcClient) Close() error {
	c.once.Do(func() { c.err = c.cc.Close() })
	return c.err
}
