package call

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// TestUpfrontReleasedWhenErrorEndsPartialReply: a server that starts a large reply (reserved
// in full up front) and then ends the call with an ERROR frame must not leave the reservation
// pinned: the connection's and the process's allowances come back when the call ends, not when
// the connection closes.
func TestUpfrontReleasedWhenErrorEndsPartialReply(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	base := upfrontInUse.Load()
	c, peer := rawServerConn(t, ctx, ClientOptions{})

	const total = 512 << 10
	got := make(chan error, 1)
	go func() {
		_, err := c.Call(ctx, MakeMethodKey("c", "m"), []byte("x"), CallOptions{})
		got <- err
	}()
	f, err := peer.ReadFrame()
	if err != nil || f.Type != testkit.TypeCall {
		t.Fatalf("read %v, %v; want the CALL", f, err)
	}
	reply := append(testkit.ReplyHeader{Total: total}.Encode(), make([]byte, 1024)...)
	if err := peer.WriteFrame(testkit.Frame{Type: testkit.TypeReply, ID: f.ID, Payload: reply}); err != nil {
		t.Fatal(err)
	}
	if err := peer.ReplyError(f.ID, testkit.ErrorBody{Code: testkit.CodeHandlerFailed, Message: "gave up"}); err != nil {
		t.Fatal(err)
	}
	if err := <-got; !errors.Is(err, ErrRemote) {
		t.Fatalf("call: %v, want ErrRemote", err)
	}
	if n := upfrontInUse.Load() - base; n != 0 {
		t.Errorf("after the call ended, %d bytes are still reserved up front, want 0", n)
	}
}

// rawServerConn returns a Conn with opts whose server is a raw peer over a pipe, after the
// handshake (the peer allows 16 concurrent calls). Both are closed by t.Cleanup.
func rawServerConn(t *testing.T, ctx context.Context, opts ClientOptions) (*Conn, *testkit.RawPeer) {
	t.Helper()
	cli, srv := net.Pipe()
	peer := testkit.NewRawPeer(srv)
	t.Cleanup(func() { peer.Close() })
	peer.SetDeadline(time.Now().Add(10 * time.Second))
	hs := make(chan error, 1)
	go func() {
		h := testkit.ClientHello()
		h.MaxConcurrent = 16
		_, err := peer.AcceptHandshake(h)
		hs <- err
	}()
	c, err := NewConn(ctx, cli, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if err := <-hs; err != nil {
		t.Fatal(err)
	}
	return c, peer
}
