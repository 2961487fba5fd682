package echo

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/resolve"
	"github.com/weftrpc/weft/runtime"
)

func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }

// serve serves an echoer's handlers on a Unix socket until the test ends and returns a
// Connection to it and the registration.
func serve(tb testing.TB) (call.Connection, runtime.Registration) {
	tb.Helper()
	reg, ok := runtime.Find[Echoer]()
	if !ok {
		tb.Fatal("Echoer is not registered")
	}
	var hm call.HandlerMap
	reg.AddHandlers(New(), &hm)
	path := filepath.Join(tb.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{DrainTimeout: -1})
	}()
	conn, err := call.Connect(ctx, resolve.Constant(endpoint.Unix(path)), call.ClientOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		conn.Close()
		cancel()
		<-done
	})
	return conn, reg
}

func record(n int) Record {
	r := Record{ID: 7, Name: "record", Tags: []string{"a", "b"}}
	for i := range n {
		r.Scores = append(r.Scores, float64(i)/3)
		r.Parts = append(r.Parts, Part{Key: fmt.Sprint("k", i), Value: bytes.Repeat([]byte{byte(i)}, 16)})
	}
	return r
}

// TestStubs calls the component through its local stub and through its client stub over a
// Unix socket and checks that both give the same results.
func TestStubs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, reg := serve(t)
	local := reg.LocalStub(New(), nil).(Echoer)
	remote := reg.ClientStub(conn).(Echoer)
	for _, b := range [][]byte{nil, {}, []byte("hello"), bytes.Repeat([]byte{1}, 1<<20)} {
		l, lerr := local.Echo(ctx, b)
		r, rerr := remote.Echo(ctx, b)
		if lerr != nil || rerr != nil || !bytes.Equal(l, r) || (l == nil) != (r == nil) {
			t.Errorf("Echo(%d bytes): local %d bytes (nil %t), %v; remote %d bytes (nil %t), %v", len(b), len(l), l == nil, lerr, len(r), r == nil, rerr)
		}
	}
	for _, n := range []int{0, 1, 1000} {
		in := record(n)
		l, lerr := local.EchoRecord(ctx, in)
		r, rerr := remote.EchoRecord(ctx, in)
		if lerr != nil || rerr != nil || !reflect.DeepEqual(l, r) {
			t.Errorf("EchoRecord(%d parts): local and remote differ: %v, %v", n, lerr, rerr)
		}
	}
}

// BenchmarkStubVsRaw compares a call through the generated client stub with a raw
// Connection.Call of the same bytes (the stub's encoding of a []byte adds 2 bytes of length).
func BenchmarkStubVsRaw(b *testing.B) {
	for _, size := range []int{16, 1 << 10, 64 << 10} {
		conn, reg := serve(b)
		stub := reg.ClientStub(conn).(Echoer)
		ctx := context.Background()
		payload := make([]byte, size)
		key := call.MakeMethodKey("github.com/weftrpc/weft/internal/echo/Echoer", "Echo")
		// The raw call sends exactly the stub's bytes, so the server stub answers both.
		var enc = newEncoded(payload)
		b.Run(fmt.Sprintf("%d/raw", size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := conn.Call(ctx, key, enc, call.CallOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("%d/stub", size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := stub.Echo(ctx, payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRecord measures a struct-heavy argument and result through the client stub.
func BenchmarkRecord(b *testing.B) {
	conn, reg := serve(b)
	stub := reg.ClientStub(conn).(Echoer)
	ctx := context.Background()
	for _, n := range []int{1, 100, 10000} {
		r := record(n)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := stub.EchoRecord(ctx, r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
