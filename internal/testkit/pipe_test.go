package testkit_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
)

// echoOnce accepts one connection from l, echoes n bytes back and closes it.
func echoOnce(l net.Listener, n int) <-chan error {
	return goErr(func() error {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, n)
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		_, err = c.Write(buf)
		return err
	})
}

// roundTrip dials ep, writes msg and expects it echoed.
func roundTrip(ctx context.Context, t *testing.T, ep endpoint.Endpoint, msg string) {
	t.Helper()
	c, err := ep.Dial(ctx)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("Write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("Read: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("echo = %q, want %q", buf, msg)
	}
}

func testPipeListener(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	l := testkit.NewPipeListener("kit")
	defer l.Close()
	if l.Address() != "pipe://kit" || l.Addr().Network() != "pipe" || l.Addr().String() != "kit" {
		t.Fatalf("addresses: %q %q %q", l.Address(), l.Addr().Network(), l.Addr())
	}

	done := echoOnce(l, 5)
	roundTrip(ctx, t, l, "hello")
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// Dial waits for Accept and honours its context.
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	if c, err := l.Dial(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial without Accept = %v, %v; want DeadlineExceeded", c, err)
	}
	canceled, cancelNow := context.WithCancel(ctx)
	cancelNow()
	if _, err := l.Dial(canceled); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial with cancelled ctx: %v", err)
	}

	// Close unblocks a waiting Accept and refuses later dials.
	accepted := goErr(func() error {
		c, err := l.Accept()
		if err == nil {
			c.Close()
			return errors.New("Accept succeeded after Close")
		}
		if !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	})
	time.Sleep(10 * time.Millisecond) // let Accept block (inside a bubble: fake time)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
	if _, err := l.Dial(ctx); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("Dial after Close: %v, want ECONNREFUSED", err)
	}
}

func TestPipeListener(t *testing.T) {
	testPipeListener(t)
}

func TestPipeListenerSynctest(t *testing.T) {
	synctest.Test(t, testPipeListener)
}

func TestPipeListenerSynctestDurable(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
		defer cancel()
		l := testkit.NewPipeListener("durable")
		defer l.Close()

		// A Dial waiting for Accept is durably blocked: fake time jumps to its deadline.
		start := time.Now()
		short, cancelShort := context.WithTimeout(ctx, 30*time.Second)
		defer cancelShort()
		if _, err := l.Dial(short); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d != 30*time.Second {
			t.Fatalf("Dial waited %v of fake time, want 30s", d)
		}

		// A blocked Accept lets synctest.Wait return, and a Dial completes it.
		var server net.Conn
		accepted := goErr(func() (err error) {
			server, err = l.Accept()
			return err
		})
		synctest.Wait()
		client, err := l.Dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-accepted; err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		defer server.Close()

		// Pipe deadlines run on the fake clock.
		client.SetReadDeadline(time.Now().Add(time.Minute))
		if _, err := client.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read past deadline: %v", err)
		}
	})
}
