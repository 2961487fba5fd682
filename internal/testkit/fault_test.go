package testkit_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// pipe returns both ends of a net.Pipe with a deadline, closed at cleanup.
func pipe(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	a, b := net.Pipe()
	d := time.Now().Add(10 * time.Second)
	a.SetDeadline(d)
	b.SetDeadline(d)
	t.Cleanup(func() {
		a.Close()
		b.Close()
	})
	return a, b
}

func TestFaultConnWriteBoundary(t *testing.T) {
	a, b := pipe(t)
	fc := testkit.WrapConn(a, testkit.Fault{ReadAfter: -1, WriteAfter: 10})

	received := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(b) // until the fault closes a
		received <- got
	}()

	// Exactly reaching the boundary succeeds.
	if n, err := fc.Write([]byte("0123456")); n != 7 || err != nil {
		t.Fatalf("Write 7 = %d, %v", n, err)
	}
	if n, err := fc.Write([]byte("789")); n != 3 || err != nil {
		t.Fatalf("Write to the boundary = %d, %v", n, err)
	}
	if fc.Triggered() {
		t.Fatal("triggered at the boundary, want at the next write")
	}
	if n, err := fc.Write([]byte("x")); n != 0 || !errors.Is(err, testkit.ErrInjected) {
		t.Fatalf("Write past the boundary = %d, %v; want 0, ErrInjected", n, err)
	}
	if got := <-received; string(got) != "0123456789" {
		t.Fatalf("peer received %q", got)
	}
	if fc.BytesWritten() != 10 || !fc.Triggered() {
		t.Fatalf("BytesWritten = %d, Triggered = %v", fc.BytesWritten(), fc.Triggered())
	}
	// Both directions fail from now on.
	if _, err := fc.Read(make([]byte, 1)); err != testkit.ErrInjected {
		t.Fatalf("Read after fault: %v", err)
	}
}

func TestFaultConnWriteCrossing(t *testing.T) {
	a, b := pipe(t)
	fc := testkit.WrapConn(a, testkit.Fault{ReadAfter: -1, WriteAfter: 4})
	received := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(b)
		received <- got
	}()
	if n, err := fc.Write([]byte("abcdef")); n != 4 || err != testkit.ErrInjected {
		t.Fatalf("crossing Write = %d, %v; want 4, ErrInjected", n, err)
	}
	if got := <-received; string(got) != "abcd" {
		t.Fatalf("peer received %q, want the bytes up to the boundary", got)
	}
}

func TestFaultConnReadBoundary(t *testing.T) {
	a, b := pipe(t)
	custom := errors.New("custom")
	fc := testkit.WrapConn(a, testkit.Fault{ReadAfter: 5, WriteAfter: -1, Err: custom})
	sent := goErr(func() error {
		_, err := b.Write([]byte("abcdefgh"))
		return err // the fault closes a after 5 bytes: the write fails
	})
	got, err := io.ReadAll(fc)
	if string(got) != "abcde" || err != custom {
		t.Fatalf("ReadAll = %q, %v; want \"abcde\", custom", got, err)
	}
	if fc.BytesRead() != 5 {
		t.Fatalf("BytesRead = %d", fc.BytesRead())
	}
	if err := <-sent; err == nil {
		t.Fatal("peer's write succeeded past the fault")
	}
	if _, err := fc.Write([]byte("x")); err != custom {
		t.Fatalf("Write after read fault: %v", err)
	}
}

func TestFaultConnImmediateAndNever(t *testing.T) {
	a, _ := pipe(t)
	fc := testkit.WrapConn(a, testkit.Fault{}) // zero: fails at once
	if _, err := fc.Read(make([]byte, 1)); err != testkit.ErrInjected {
		t.Fatalf("Read = %v", err)
	}
	var ne net.Error
	if !errors.As(testkit.ErrInjected, &ne) || ne.Timeout() {
		t.Fatal("ErrInjected is not a non-timeout net.Error")
	}

	c, d := pipe(t)
	nf := testkit.WrapConn(c, testkit.NoFault())
	done := goErr(func() error {
		_, err := io.Copy(d, d) // echo
		return err
	})
	msg := bytes.Repeat([]byte("z"), 1000)
	wrote := goErr(func() error {
		_, err := nf.Write(msg)
		return err
	})
	if _, err := io.ReadFull(nf, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	// The write's byte count is recorded when Write returns, which may be after the echo.
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if nf.BytesRead() != 1000 || nf.BytesWritten() != 1000 || nf.Triggered() {
		t.Fatalf("NoFault counts: %d %d %v", nf.BytesRead(), nf.BytesWritten(), nf.Triggered())
	}
	nf.Trigger()
	if _, err := nf.Write(msg); err != testkit.ErrInjected {
		t.Fatalf("Write after Trigger: %v", err)
	}
	if err := <-done; err != nil && err != io.EOF {
		t.Logf("echo ended: %v", err)
	}
}

func TestFaultListenerAndEndpoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	pl := testkit.NewPipeListener("fault")
	defer pl.Close()
	l := testkit.FaultListener(pl, func(i int) testkit.Fault {
		return testkit.Fault{ReadAfter: int64(i + 1), WriteAfter: -1}
	})
	ep := testkit.FaultEndpoint(pl, testkit.Fault{ReadAfter: -1, WriteAfter: 2})
	if ep.Address() != pl.Address() {
		t.Fatalf("Address = %q", ep.Address())
	}
	for i := range 2 {
		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				t.Error(err)
			}
			accepted <- c
		}()
		c, err := ep.Dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		s := <-accepted
		if s == nil {
			t.FailNow()
		}
		go c.Write([]byte("abc")) // passes 2 bytes, then fails
		got, err := io.ReadAll(s)
		if want := "ab"[:i+1]; string(got) != want || err != testkit.ErrInjected {
			t.Fatalf("conn %d: server read %q, %v; want %q, ErrInjected", i, got, err, want)
		}
		c.Close()
		s.Close()
	}
}

func TestRecorderAndSplitFrames(t *testing.T) {
	a, b := pipe(t)
	rec := testkit.NewRecorder(a)
	p := testkit.NewRawPeer(rec)
	var key [16]byte
	frames := []testkit.Frame{
		{Type: testkit.TypePing, ID: 1},
		{Type: testkit.TypeCancel, ID: 2},
	}
	go func() {
		p.WriteHello(testkit.ClientHello())
		p.Call(2, key, []byte("req"))
		p.WriteFrames(frames...)
		p.Close()
	}()
	stream, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	writes := rec.Writes()
	if len(writes) != 3 || !bytes.Equal(bytes.Join(writes, nil), stream) || !bytes.Equal(rec.Bytes(), stream) {
		t.Fatalf("recorded %d writes, %d bytes; stream %d bytes", len(writes), len(rec.Bytes()), len(stream))
	}
	h, rest, err := testkit.SplitHello(stream)
	if err != nil || h.MaxFrame != testkit.DefaultMaxFrame {
		t.Fatalf("SplitHello: %+v, %v", h, err)
	}
	fs, err := testkit.SplitFrames(rest)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 3 || fs[0].Type != testkit.TypeCall || fs[1].Type != testkit.TypePing || fs[2].Type != testkit.TypeCancel || fs[2].ID != 2 {
		t.Fatalf("SplitFrames = %v", fs)
	}
	fs, err = testkit.SplitFrames(rest[:len(rest)-1])
	if len(fs) != 2 || !errors.Is(err, testkit.ErrMalformed) {
		t.Fatalf("SplitFrames of a cut stream = %v, %v", fs, err)
	}
}

func TestDelayConn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		dc := testkit.DelayConn(a, 3*time.Second)
		go b.Write([]byte("x"))
		start := time.Now()
		if _, err := io.ReadFull(dc, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d != 3*time.Second {
			t.Fatalf("Read took %v of fake time, want 3s", d)
		}
	})
}
