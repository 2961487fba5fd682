package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/codec"
	"github.com/weftrpc/weft/internal/echo"
	weftruntime "github.com/weftrpc/weft/runtime"
)

// Rows of the stub workload: how a weft call is made and served.
const (
	stubRawRaw  = "raw Call, raw handler"   // Connection.Call to a handler that returns its argument
	stubRawStub = "raw Call, server stub"   // Connection.Call of the stub's bytes to the generated server stub
	stubStubs   = "client and server stubs" // the generated client stub to the generated server stub
)

var stubRows = []string{stubRawRaw, stubRawStub, stubStubs}

// stubServer is a weft server of both a raw echo handler and the generated handlers of the
// echo component, with a client of it.
type stubServer struct {
	srv  stack.Server
	conn *call.Conn
	stub echo.Echoer
	key  call.MethodKey // of the component's Echo method
}

func (r *runner) startStubServer(ctx context.Context) (*stubServer, error) {
	reg, ok := weftruntime.Find[echo.Echoer]()
	if !ok {
		return nil, fmt.Errorf("the echo component is not registered")
	}
	var hm call.HandlerMap
	hm.Set(stack.WeftComponent, stack.WeftMethod, func(_ context.Context, args []byte) ([]byte, error) { return args, nil })
	reg.AddHandlers(echo.New(), &hm)
	l, err := r.listen()
	if err != nil {
		return nil, err
	}
	ep, err := stack.WeftEndpoint(r.network, l.Addr().String())
	if err != nil {
		l.Close()
		return nil, err
	}
	srv := stack.ServeWeft(l, &hm, stack.Config{})
	conn, err := call.Dial(ctx, ep, stack.WeftClientOptions(stack.Config{}))
	if err != nil {
		srv.Close()
		return nil, err
	}
	return &stubServer{
		srv:  srv,
		conn: conn,
		stub: reg.ClientStub(conn).(echo.Echoer),
		key:  call.MakeMethodKey(reg.Name, "Echo"),
	}, nil
}

func (s *stubServer) close() {
	s.conn.Close()
	s.srv.Close()
}

// stubCall returns a function making one call of size bytes the way row says.
func (s *stubServer) stubCall(ctx context.Context, row string, size int) func() error {
	payload := make([]byte, size)
	check := func(reply []byte, err error, want int) error {
		if err != nil {
			return err
		}
		if len(reply) != want {
			return fmt.Errorf("sent %d bytes, got %d back", want, len(reply))
		}
		return nil
	}
	switch row {
	case stubRawRaw:
		key := call.MakeMethodKey(stack.WeftComponent, stack.WeftMethod)
		return func() error {
			reply, err := s.conn.Call(ctx, key, payload, call.CallOptions{})
			return check(reply, err, size)
		}
	case stubRawStub:
		// Exactly the bytes the client stub sends, so that the server stub answers them.
		enc := codec.NewEncoder(nil)
		codec.AppendFixed(enc, payload)
		args := enc.Data()
		return func() error {
			reply, err := s.conn.Call(ctx, s.key, args, call.CallOptions{})
			if err == nil && len(reply) < size {
				return fmt.Errorf("sent %d bytes, got %d back", size, len(reply))
			}
			return err
		}
	default:
		return func() error {
			reply, err := s.stub.Echo(ctx, payload)
			return check(reply, err, size)
		}
	}
}

// stubs compares calls through weft's generated stubs with raw Connection.Call on one
// connection, at each size. The rows alternate call by call (the first row rotating), so that
// noise from the rest of the machine falls on all of them alike; then each row makes a block of
// calls alone to count its allocations.
func (r *runner) stubs(ctx context.Context) error {
	s, err := r.startStubServer(ctx)
	if err != nil {
		return err
	}
	defer s.close()
	for _, size := range stubSizes {
		n := r.p.SeqCalls[slices.Index(seqSizes, size)]
		calls := make([]func() error, len(stubRows))
		for i, row := range stubRows {
			calls[i] = s.stubCall(ctx, row, size)
			for range r.warmCalls(n) {
				if err := calls[i](); err != nil {
					return fmt.Errorf("%s, %s: %w", row, sizeName(size), err)
				}
			}
		}
		lat := make([][]float64, len(stubRows))
		for i := range lat {
			lat[i] = make([]float64, n)
		}
		for j := range n {
			for k := range stubRows {
				i := (j + k) % len(stubRows)
				t0 := time.Now()
				err := calls[i]()
				lat[i][j] = float64(time.Since(t0))
				if err != nil {
					return fmt.Errorf("%s, %s: %w", stubRows[i], sizeName(size), err)
				}
			}
		}
		for i, row := range stubRows {
			_, allocs, _, err := r.timed(ctx, calls[i], max(n/2, 1))
			if err != nil {
				return fmt.Errorf("%s, %s: %w", row, sizeName(size), err)
			}
			slices.Sort(lat[i])
			r.record("stubs/"+sizeName(size)+"/p50", row, sortedPercentile(lat[i], 0.5))
			r.record("stubs/"+sizeName(size)+"/allocs", row, allocs)
		}
	}
	return ctx.Err()
}
