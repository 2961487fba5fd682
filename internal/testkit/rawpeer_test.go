package testkit_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// rawPair returns two raw peers over a net.Pipe with a deadline, closed at cleanup.
func rawPair(t *testing.T) (client, server *testkit.RawPeer) {
	t.Helper()
	c, s := net.Pipe()
	client, server = testkit.NewRawPeer(c), testkit.NewRawPeer(s)
	deadline := time.Now().Add(10 * time.Second)
	client.SetDeadline(deadline)
	server.SetDeadline(deadline)
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// goErr runs f in a goroutine and returns a channel with its error.
func goErr(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

func TestRawPeerConversation(t *testing.T) {
	client, server := rawPair(t)
	var key [16]byte
	key[0] = 0x42

	serverHello := testkit.ClientHello()
	serverHello.MaxConcurrent = 1024
	serverHello.IdleTimeoutMillis = 300000
	serverHello.RestLen = 40 // a longer rest must be read and skipped

	done := goErr(func() error {
		got, err := server.AcceptHandshake(serverHello)
		if err != nil {
			return err
		}
		if got.MaxFrame != testkit.DefaultMaxFrame || got.RestLen != 28 {
			return errors.New("server: unexpected client hello")
		}
		f, err := server.ReadFrame()
		if err != nil {
			return err
		}
		h, req, err := testkit.ParseCallHeader(f.Payload)
		if err != nil || f.Type != testkit.TypeCall || !f.End() || f.ID != 1 || h.Key != key || h.Total != 5 || string(req) != "hello" {
			return errors.New("server: unexpected CALL " + f.String())
		}
		// Noise the client must skip, then a chunked reply, then a GOAWAY and close.
		err = server.WriteFrames(
			testkit.Frame{Type: testkit.TypePing, ID: 99},
			testkit.Frame{Type: testkit.TypeData, Flags: testkit.FlagEnd, ID: 2, Payload: []byte("other")},
			testkit.GoAway{LastID: 1, Code: testkit.CloseDrain, Message: "drain"}.Frame(),
			testkit.Frame{Type: testkit.TypeReply, ID: 1, Payload: append(testkit.ReplyHeader{Total: 6}.Encode(), "wor"...)},
			testkit.Frame{Type: testkit.TypeData, Flags: testkit.FlagEnd, ID: 1, Payload: []byte("ld!")},
		)
		if err != nil {
			return err
		}
		if err := server.Reply(3, []byte("x")); err != nil {
			return err
		}
		if err := server.ReplyError(4, testkit.ErrorBody{Code: testkit.CodeUnknownMethod, Flags: testkit.ErrFlagNeverRan}); err != nil {
			return err
		}
		if err := server.WriteFrame(testkit.GoAway{LastID: 4, Code: testkit.CloseStopping}.Frame()); err != nil {
			return err
		}
		return server.Close()
	})

	got, err := client.Handshake(testkit.ClientHello())
	if err != nil {
		t.Fatal(err)
	}
	if got.MaxConcurrent != 1024 || got.IdleTimeoutMillis != 300000 || got.RestLen != 40 {
		t.Fatalf("server hello = %+v", got)
	}
	if err := client.Call(1, key, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	fs, err := client.ReadResponse(1)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 2 || fs[0].Type != testkit.TypeReply || fs[1].Type != testkit.TypeData || !testkit.IsTerminal(fs[1]) {
		t.Fatalf("ReadResponse = %v", fs)
	}
	if g := client.LastGoAway(); g == nil || g.LastID != 1 || g.Message != "drain" {
		t.Fatalf("LastGoAway = %+v", g)
	}
	f, err := client.ReadTerminal(4) // skips the reply to 3
	if err != nil || f.Type != testkit.TypeError {
		t.Fatalf("ReadTerminal = %v, %v", f, err)
	}
	if e, err := testkit.ParseErrorBody(f.Payload); err != nil || e.Code != testkit.CodeUnknownMethod || !e.NeverRan() {
		t.Fatalf("error body = %+v, %v", e, err)
	}
	g, err := client.ReadUntilClose()
	if err != nil || g == nil || g.Code != testkit.CloseStopping || g.LastID != 4 {
		t.Fatalf("ReadUntilClose = %+v, %v", g, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestRawPeerReadUntilCloseWithoutGoAway(t *testing.T) {
	client, server := rawPair(t)
	done := goErr(func() error {
		if err := server.WriteFrame(testkit.Frame{Type: testkit.TypePong, ID: 1}); err != nil {
			return err
		}
		return server.Close()
	})
	g, err := client.ReadUntilClose()
	if g != nil || err != nil {
		t.Fatalf("ReadUntilClose = %+v, %v; want nil, nil", g, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestRawPeerReadErrors(t *testing.T) {
	t.Run("too large", func(t *testing.T) {
		client, server := rawPair(t)
		done := goErr(func() error {
			return server.WriteFrame(testkit.Frame{Type: testkit.TypeData, Length: testkit.Uint32(testkit.MaxReadPayload + 1)})
		})
		if _, err := client.ReadFrame(); !errors.Is(err, testkit.ErrPayloadTooLarge) {
			t.Fatalf("ReadFrame error = %v, want ErrPayloadTooLarge", err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("truncated payload", func(t *testing.T) {
		client, server := rawPair(t)
		done := goErr(func() error {
			if err := server.WriteFrame(testkit.Frame{Type: testkit.TypeData, Payload: []byte("ab"), Length: testkit.Uint32(3)}); err != nil {
				return err
			}
			return server.Close()
		})
		if _, err := client.ReadFrame(); err != io.ErrUnexpectedEOF {
			t.Fatalf("ReadFrame error = %v, want io.ErrUnexpectedEOF", err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("bad magic", func(t *testing.T) {
		client, server := rawPair(t)
		bad := testkit.ClientHello()
		bad.Magic = "HTTP"
		done := goErr(func() error {
			_, err := server.AcceptHandshake(testkit.ClientHello())
			server.Close()
			if !errors.Is(err, testkit.ErrMalformed) {
				return fmt.Errorf("server: AcceptHandshake error = %v, want ErrMalformed", err)
			}
			return nil
		})
		// The server reads the 8-byte prefix and closes without writing.
		if h, err := client.Handshake(bad); err == nil {
			t.Fatalf("client handshake succeeded: %+v", h)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("server closes", func(t *testing.T) {
		client, server := rawPair(t)
		done := goErr(func() error {
			var b [36]byte
			_, err := io.ReadFull(server.Conn(), b[:])
			server.Close()
			return err
		})
		if _, err := client.Handshake(testkit.ClientHello()); err != io.EOF {
			t.Fatalf("Handshake error = %v, want io.EOF", err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}
