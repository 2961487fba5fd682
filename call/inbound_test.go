package call

// Tests of how large messages are received (inbound.go) and of the buffer pools (pool.go):
// unit tests of inbound and of the size classes, then whole calls over real connections, and
// a raw peer on either side that sends large messages in odd-sized frames.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftrpc/weft/internal/testkit"
)

// lgMessage returns n pseudo-random bytes determined by seed and n. A message of 8 bytes or
// more starts with its seed, so that a receiver can check it with lgCheck.
func lgMessage(seed uint64, n int) []byte {
	var key [32]byte
	binary.BigEndian.PutUint64(key[:], seed)
	binary.BigEndian.PutUint64(key[8:], uint64(n))
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	if n >= 8 {
		binary.BigEndian.PutUint64(b, seed)
	}
	return b
}

// lgCheck reports whether b is the message lgMessage makes from the seed b starts with.
func lgCheck(b []byte) error {
	if len(b) < 8 {
		return fmt.Errorf("message of %d bytes is too short to carry its seed", len(b))
	}
	want := lgMessage(binary.BigEndian.Uint64(b), len(b))
	if !bytes.Equal(b, want) {
		return fmt.Errorf("message of %d bytes differs from the one sent at byte %d", len(b), firstDiff(b, want))
	}
	return nil
}

// lgFrames returns frame sizes that add up to total, taking sizes in turn; the last frame is
// cut to fit.
func lgFrames(total int, sizes ...int) []int {
	var fs []int
	for i := 0; total > 0; i++ {
		n := min(sizes[i%len(sizes)], total)
		fs = append(fs, n)
		total -= n
	}
	return fs
}

// lgCheckShape checks the invariants of a message being received after n bytes: a chunked
// message holds ceil(n/chunkBuffer) chunks of chunkBuffer capacity, every one full but the
// last; a flat one holds its n bytes in a buffer with room for all of them.
func lgCheckShape(t *testing.T, in *inbound, n int, chunked bool) {
	t.Helper()
	if in.n != n {
		t.Fatalf("after %d bytes, in.n = %d", n, in.n)
	}
	if !chunked {
		if in.chunks != nil || in.flat == nil {
			t.Fatalf("after %d bytes of a message reserved in full: %d chunks, flat nil = %v", n, len(in.chunks), in.flat == nil)
		}
		if len(in.flat) != n || cap(in.flat) < in.total {
			t.Fatalf("after %d bytes: flat has len %d, cap %d; want len %d, cap at least %d", n, len(in.flat), cap(in.flat), n, in.total)
		}
		return
	}
	if in.flat != nil {
		t.Fatalf("a chunked message has a flat buffer of cap %d", cap(in.flat))
	}
	if got, want := len(in.chunks), (n+chunkBuffer-1)/chunkBuffer; got != want {
		t.Fatalf("after %d bytes: %d chunks, want %d", n, got, want)
	}
	for i, c := range in.chunks {
		want := chunkBuffer
		if i == len(in.chunks)-1 {
			want = n - i*chunkBuffer
		}
		if len(c) != want || cap(c) != chunkBuffer {
			t.Fatalf("after %d bytes: chunk %d of %d has len %d, cap %d; want len %d, cap %d", n, i, len(in.chunks), len(c), cap(c), want, chunkBuffer)
		}
	}
}

// TestInboundAssemble feeds messages through inbound in several frame-size sequences, as a
// client (begin, then read every frame) and as a server (start with the first frame, then
// read), and checks that the message is reserved in full exactly when the declared size fits
// the connection's allowance, that a chunked message grows one full chunk at a time, that
// assemble returns exactly the bytes sent, and that end gives back the reservation.
func TestInboundAssemble(t *testing.T) {
	tests := []struct {
		name    string
		total   int
		used    int  // the connection's allowance already reserved by other messages
		start   bool // the first frame is given to start, as a server does
		pooled  bool
		first   int // bytes in the first frame, with start
		frames  []int
		chunked bool
	}{
		{name: "flat/whole allowance in chunk-sized frames", total: upfrontAllowance,
			frames: lgFrames(upfrontAllowance, chunkBuffer)},
		{name: "flat/odd frames after a first frame", total: 300_001, start: true, pooled: true, first: 4093,
			frames: lgFrames(300_001-4093, 1, 65535, 7, 65537, 12345)},
		{name: "flat/empty first frame", total: 1000, start: true, pooled: true,
			frames: lgFrames(1000, 999, 1)},
		{name: "flat/one-byte frames", total: 5000, frames: lgFrames(5000, 1)},
		{name: "flat/allowance filled exactly", total: 200_000, used: upfrontAllowance - 200_000,
			frames: lgFrames(200_000, 4096)},
		{name: "chunked/one byte over the allowance", total: upfrontAllowance + 1,
			frames: lgFrames(upfrontAllowance+1, chunkBuffer), chunked: true},
		{name: "chunked/frames of exactly one chunk", total: 17 * chunkBuffer,
			frames: lgFrames(17*chunkBuffer, chunkBuffer), chunked: true},
		{name: "chunked/frames straddling chunks", total: 2<<20 + 17,
			frames: lgFrames(2<<20+17, 65535, 65537, 3, 100_000, 1), chunked: true},
		{name: "chunked/first frame larger than a chunk", total: 2<<20 + 17, start: true, pooled: true, first: 70_000,
			frames: lgFrames(2<<20+17-70_000, 65535, 65537, 3, 100_000), chunked: true},
		{name: "chunked/first frame one byte short of a chunk", total: upfrontAllowance + 5, start: true, first: chunkBuffer - 1,
			frames: lgFrames(upfrontAllowance+5-(chunkBuffer-1), 1, chunkBuffer, 2), chunked: true},
		{name: "chunked/empty first frame", total: upfrontAllowance + 1, start: true, pooled: true,
			frames: lgFrames(upfrontAllowance+1, chunkBuffer-1, 2), chunked: true},
		{name: "chunked/one-byte frames", total: 3*chunkBuffer + 5, used: upfrontAllowance - 100,
			frames: lgFrames(3*chunkBuffer+5, 1), chunked: true},
		{name: "chunked/allowance one byte short", total: 200_000, used: upfrontAllowance - 199_999, start: true, first: 1,
			frames: lgFrames(199_999, 65536, 17), chunked: true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sum := tc.first
			for _, n := range tc.frames {
				sum += n
			}
			if sum != tc.total {
				t.Fatalf("test case: frames add up to %d, want %d", sum, tc.total)
			}
			msg := lgMessage(uint64(i), tc.total)
			base := upfrontInUse.Load()
			upfront := tc.used

			var in inbound
			if tc.start {
				in.start(msg[:tc.first], tc.total, &upfront, tc.pooled)
			} else {
				in.begin(tc.total, &upfront, tc.pooled)
			}
			reserved := tc.total
			if tc.chunked {
				reserved = 0
			}
			if got := upfront - tc.used; got != reserved {
				t.Errorf("the connection reserved %d bytes at the first frame, want %d", got, reserved)
			}
			if got := upfrontInUse.Load() - base; got != int64(reserved) {
				t.Errorf("the process reserved %d bytes at the first frame, want %d", got, reserved)
			}
			if in.total != tc.total {
				t.Errorf("total = %d, want %d", in.total, tc.total)
			}
			lgCheckShape(t, &in, tc.first, tc.chunked)

			br := bufio.NewReaderSize(bytes.NewReader(msg[tc.first:]), readBufferSize)
			off := tc.first
			for _, n := range tc.frames {
				if err := in.read(br, n); err != nil {
					t.Fatalf("read of %d bytes at %d: %v", n, off, err)
				}
				off += n
				lgCheckShape(t, &in, off, tc.chunked)
			}
			if _, err := br.ReadByte(); err != io.EOF {
				t.Errorf("after the last frame the input holds more bytes (err %v), want io.EOF", err)
			}
			if in.chunked() != tc.chunked {
				t.Errorf("chunked() = %v, want %v", in.chunked(), tc.chunked)
			}
			if in.n != tc.total || in.total != tc.total {
				t.Errorf("n, total = %d, %d; want %d, %d", in.n, in.total, tc.total, tc.total)
			}

			in.end(&upfront)
			if upfront != tc.used {
				t.Errorf("after end the connection holds %d bytes, want %d", upfront, tc.used)
			}
			if got := upfrontInUse.Load() - base; got != 0 {
				t.Errorf("after end the process still holds %d bytes, want 0", got)
			}

			allocs := 0
			got := in.assemble(func(n int) []byte {
				allocs++
				if n != tc.total {
					t.Errorf("assemble allocated %d bytes, want %d", n, tc.total)
				}
				return make([]byte, n)
			})
			wantAllocs := 0
			if tc.chunked {
				wantAllocs = 1
			}
			if allocs != wantAllocs {
				t.Errorf("assemble allocated %d times, want %d", allocs, wantAllocs)
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("assemble returned %d bytes differing from the %d sent at byte %d", len(got), len(msg), firstDiff(got, msg))
			}
			if in.chunks != nil || in.flat != nil {
				t.Errorf("after assemble: %d chunks, flat nil = %v; want none", len(in.chunks), in.flat == nil)
			}
			if in.pooled {
				putBuffer(got)
			}
		})
	}
}

// TestInboundOneByteFramesTakeChunksAsTheyFill: a peer that declares a large message and
// sends it a byte at a time must not make the receiver take a chunk per frame (64 KiB for each
// byte): chunks are taken only as they fill, through read and through write alike. release
// of a partly received message gives every chunk back.
func TestInboundOneByteFramesTakeChunksAsTheyFill(t *testing.T) {
	const n = 2*chunkBuffer + 3
	total := upfrontAllowance + n // declared beyond the allowance: chunked
	msg := lgMessage(7, total)
	upfront := 0

	var in inbound
	in.begin(total, &upfront, false)
	if in.flat != nil || upfront != 0 {
		t.Fatalf("a %d-byte message was reserved up front (%d bytes)", total, upfront)
	}
	br := bufio.NewReaderSize(bytes.NewReader(msg), readBufferSize)
	for i := 1; i <= n; i++ {
		if err := in.read(br, 1); err != nil {
			t.Fatal(err)
		}
		if got, want := len(in.chunks), (i+chunkBuffer-1)/chunkBuffer; got != want {
			t.Fatalf("after %d one-byte reads: %d chunks, want %d", i, got, want)
		}
	}
	lgCheckShape(t, &in, n, true)
	in.release()
	if in.chunks != nil || in.flat != nil {
		t.Errorf("after release: %d chunks, flat nil = %v; want none", len(in.chunks), in.flat == nil)
	}
	in.release() // nothing left to give back
	in.end(&upfront)

	// The same through write: the first frame given to start, and then writes of a byte.
	var in2 inbound
	in2.start(msg[:1], total, &upfront, true)
	for i := 2; i <= n; i++ {
		in2.write(msg[i-1 : i])
		if got, want := len(in2.chunks), (i+chunkBuffer-1)/chunkBuffer; got != want {
			t.Fatalf("after %d one-byte writes: %d chunks, want %d", i, got, want)
		}
	}
	lgCheckShape(t, &in2, n, true)
	if got := in2.assemble(allocResult); !bytes.Equal(got, msg[:n]) {
		t.Errorf("assembled %d bytes differing from those written at byte %d", len(got), firstDiff(got, msg[:n]))
	}
	in2.end(&upfront)
	if upfront != 0 {
		t.Errorf("the connection holds %d bytes, want 0", upfront)
	}
}

// TestInboundReleaseAndEnd: release of a partly received message, flat or chunked, drops its
// buffers; end gives back a reservation once, however often it is called.
func TestInboundReleaseAndEnd(t *testing.T) {
	base := upfrontInUse.Load()
	upfront := 0
	msg := lgMessage(3, 600_000)

	var flat inbound
	flat.start(msg[:1000], len(msg), &upfront, true)
	if err := flat.read(bufio.NewReader(bytes.NewReader(msg[1000:])), 50_000); err != nil {
		t.Fatal(err)
	}
	if flat.chunked() || !flat.pooled || upfront != len(msg) {
		t.Fatalf("chunked %v, pooled %v, reserved %d; want a pooled buffer reserved in full", flat.chunked(), flat.pooled, upfront)
	}
	flat.release()
	if flat.flat != nil {
		t.Error("release left the flat buffer in place")
	}
	flat.end(&upfront)
	flat.end(&upfront)
	if upfront != 0 || upfrontInUse.Load() != base {
		t.Errorf("after end twice: connection holds %d, process %d bytes more than before; want 0, 0", upfront, upfrontInUse.Load()-base)
	}

	var chunked inbound
	chunked.start(msg[:1000], upfrontAllowance+len(msg), &upfront, true)
	if err := chunked.read(bufio.NewReader(bytes.NewReader(msg[1000:])), 3*chunkBuffer); err != nil {
		t.Fatal(err)
	}
	lgCheckShape(t, &chunked, 1000+3*chunkBuffer, true)
	chunked.release()
	if chunked.chunks != nil {
		t.Errorf("release left %d chunks", len(chunked.chunks))
	}
	chunked.end(&upfront)
	if upfront != 0 || upfrontInUse.Load() != base {
		t.Errorf("after a chunked message: connection holds %d, process %d bytes more than before; want 0, 0", upfront, upfrontInUse.Load()-base)
	}
}

// TestInboundProcessLimit: a message that fits its connection's allowance is still chunked
// when the process's up-front reservations would pass upfrontProcessLimit, and the failed
// attempt leaves both counters as they were.
func TestInboundProcessLimit(t *testing.T) {
	base := upfrontInUse.Load()
	// Other connections of the process hold all but 100 bytes of the limit.
	others := upfrontProcessLimit - base - 100
	upfrontInUse.Add(others)
	defer upfrontInUse.Add(-others)

	upfront := 0
	var fits, over inbound
	fits.begin(100, &upfront, false)
	if fits.flat == nil || upfront != 100 || upfrontInUse.Load() != upfrontProcessLimit {
		t.Fatalf("a message filling the process limit exactly: flat %v, connection %d, process %d; want reserved, 100, %d",
			fits.flat != nil, upfront, upfrontInUse.Load(), upfrontProcessLimit)
	}
	over.begin(1, &upfront, false)
	if over.flat != nil {
		t.Error("a message over the process limit was reserved in full")
	}
	if upfront != 100 || upfrontInUse.Load() != upfrontProcessLimit {
		t.Errorf("after a failed reservation: connection %d, process %d; want 100, %d", upfront, upfrontInUse.Load(), upfrontProcessLimit)
	}
	over.write([]byte{42})
	if !over.chunked() || !bytes.Equal(over.assemble(allocResult), []byte{42}) {
		t.Error("the message over the process limit was not collected in chunks")
	}
	over.end(&upfront)
	fits.end(&upfront)
	if upfront != 0 || upfrontInUse.Load() != base+others {
		t.Errorf("after end: connection %d, process %d; want 0, %d", upfront, upfrontInUse.Load(), base+others)
	}
}

// TestBufferClasses: getBuffer returns n bytes with the capacity of n's size class, from a
// fresh buffer and again after the buffer went back to its pool.
func TestBufferClasses(t *testing.T) {
	tests := []struct{ n, cap int }{
		{0, smallBuffer},
		{1, smallBuffer},
		{smallBuffer, smallBuffer},
		{smallBuffer + 1, mediumBuffer},
		{mediumBuffer, mediumBuffer},
		{mediumBuffer + 1, largeBuffer},
		{chunkBuffer, chunkBuffer},
		{largeBuffer + 1, hugeBuffer},
		{hugeBuffer, hugeBuffer},
		{hugeBuffer + 1, maxClassBuffer},
		{maxClassBuffer, maxClassBuffer},
		{maxClassBuffer + 1, 2 << 20},
		{2 << 20, 2 << 20},
		{2<<20 + 1, 4 << 20},
		{48 << 20, 64 << 20},
		{maxPooledBuffer, maxPooledBuffer},
		{maxPooledBuffer + 1, maxPooledBuffer + 1}, // not pooled: exactly n
	}
	for _, tc := range tests {
		for round := range 2 {
			b := getBuffer(tc.n)
			if len(b) != tc.n || cap(b) != tc.cap {
				t.Errorf("round %d: getBuffer(%d): len %d, cap %d; want len %d, cap %d", round, tc.n, len(b), cap(b), tc.n, tc.cap)
			}
			putBuffer(b)
		}
	}
}

// TestBufferPutIgnoresOtherCapacities: putBuffer drops buffers whose capacity is no size
// class without panicking, and none of them is handed out later by getBuffer.
func TestBufferPutIgnoresOtherCapacities(t *testing.T) {
	foreign := [][]byte{
		nil,
		{},
		make([]byte, 100),
		make([]byte, smallBuffer-1),
		make([]byte, 0, smallBuffer+1),
		make([]byte, mediumBuffer+1),
		make([]byte, maxClassBuffer-1),
		make([]byte, maxClassBuffer+1),
		make([]byte, 3<<20), // between two powers of two
		make([]byte, 6<<20),
	}
	for range 4 { // the race detector drops some puts on purpose
		for _, b := range foreign {
			putBuffer(b)
		}
	}
	for _, tc := range []struct{ n, cap int }{
		{1, smallBuffer}, {smallBuffer + 1, mediumBuffer}, {mediumBuffer + 1, largeBuffer},
		{largeBuffer + 1, hugeBuffer}, {hugeBuffer + 1, maxClassBuffer},
		{maxClassBuffer + 1, 2 << 20}, {3 << 20, 4 << 20}, {5 << 20, 8 << 20},
	} {
		var held [][]byte
		for range 4 {
			b := getBuffer(tc.n)
			if len(b) != tc.n || cap(b) != tc.cap {
				t.Errorf("getBuffer(%d) after foreign puts: len %d, cap %d; want len %d, cap %d", tc.n, len(b), cap(b), tc.n, tc.cap)
			}
			held = append(held, b)
		}
		for _, b := range held {
			putBuffer(b)
		}
	}
}

// TestBufferBigClass: bigClass maps both ends of every power-of-two class above
// maxClassBuffer to its index, and the capacity getBuffer gives such a buffer maps back to the
// same index in putBuffer.
func TestBufferBigClass(t *testing.T) {
	if got, want := len(bigPools), maxPooledShift-maxClassShift; got != want {
		t.Fatalf("%d big pools, want %d", got, want)
	}
	for i := range bigPools {
		lo, hi := maxClassBuffer<<i+1, maxClassBuffer<<(i+1)
		if got := bigClass(lo); got != i {
			t.Errorf("bigClass(%d) = %d, want %d", lo, got, i)
		}
		if got := bigClass(hi); got != i {
			t.Errorf("bigClass(%d) = %d, want %d", hi, got, i)
		}
		if i+1 < len(bigPools) {
			if got := bigClass(hi + 1); got != i+1 {
				t.Errorf("bigClass(%d) = %d, want %d", hi+1, got, i+1)
			}
		}
	}
	if got := bigClass(maxPooledBuffer); got != len(bigPools)-1 {
		t.Errorf("bigClass(maxPooledBuffer) = %d, want %d", got, len(bigPools)-1)
	}
}

// TestBufferGrowScratch: a reader's scratch buffer is kept while it has room and replaced by
// one of the next class when it has not.
func TestBufferGrowScratch(t *testing.T) {
	b := growScratch(nil, 10)
	if len(b) != 10 || cap(b) != smallBuffer {
		t.Fatalf("growScratch(nil, 10): len %d, cap %d; want 10, %d", len(b), cap(b), smallBuffer)
	}
	if b2 := growScratch(b, smallBuffer); &b2[:1][0] != &b[:1][0] {
		t.Error("growScratch replaced a buffer that had room")
	}
	b = growScratch(b, smallBuffer+1)
	if len(b) != smallBuffer+1 || cap(b) != mediumBuffer {
		t.Errorf("growScratch to %d: len %d, cap %d; want %d, %d", smallBuffer+1, len(b), cap(b), smallBuffer+1, mediumBuffer)
	}
	putScratch(b)
	putScratch(nil)
}

// lgLogger drops the logs of the servers and clients of these tests.
var lgLogger = slog.New(slog.DiscardHandler)

var (
	lgEchoKey = MakeMethodKey("large", "Echo")
	lgMakeKey = MakeMethodKey("large", "Make")
)

// lgHandlers serves large/Echo, which checks that its argument is a message of lgMessage and
// returns it, and large/Make, which returns lgMessage(seed, n) for a 16-byte argument holding
// seed and n.
func lgHandlers() *HandlerMap {
	var hm HandlerMap
	hm.Set("large", "Echo", func(_ context.Context, args []byte) ([]byte, error) {
		if err := lgCheck(args); err != nil {
			return nil, fmt.Errorf("request: %w", err)
		}
		return args, nil
	})
	hm.Set("large", "Make", func(_ context.Context, args []byte) ([]byte, error) {
		if len(args) != 16 {
			return nil, fmt.Errorf("request of %d bytes, want 16", len(args))
		}
		return lgMessage(binary.BigEndian.Uint64(args), int(binary.BigEndian.Uint64(args[8:]))), nil
	})
	return &hm
}

// lgMaxMessage is the message size limit of the end-to-end tests.
const lgMaxMessage = 16 << 20

// TestLargeMessagesEndToEnd sends requests and replies beyond the up-front allowance (so both
// sides collect them in chunks) through a real server and client over each transport, alone
// and concurrently with small calls and one within the allowance, and checks every byte on
// both sides and that no reservation outlives the connection.
func TestLargeMessagesEndToEnd(t *testing.T) {
	for _, tr := range testkit.Transports() {
		if tr.Name == "mtls" {
			continue // the same byte stream; TLS only makes the copies slower
		}
		t.Run(tr.Name, func(t *testing.T) {
			base := upfrontInUse.Load()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			l, ep := tr.Listen(t)
			sctx, stop := context.WithCancel(ctx)
			served := make(chan error, 1)
			go func() {
				served <- Serve(sctx, NetListener(l, lgHandlers()), ServerOptions{
					Logger: lgLogger, Limits: Limits{MaxMessageSize: lgMaxMessage}, DrainTimeout: -1,
				})
			}()
			defer func() {
				stop()
				<-served
				if n := upfrontInUse.Load() - base; n != 0 {
					t.Errorf("after the connection closed, %d bytes are still reserved up front, want 0", n)
				}
			}()
			c, err := Dial(ctx, ep, ClientOptions{Logger: lgLogger, Limits: Limits{MaxMessageSize: lgMaxMessage}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()

			t.Run("echo", func(t *testing.T) {
				msg := lgMessage(1, 3<<20+17)
				got, err := c.Call(ctx, lgEchoKey, msg, CallOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, msg) {
					t.Fatalf("echo of %d bytes returned %d bytes differing at byte %d", len(msg), len(got), firstDiff(got, msg))
				}
			})
			t.Run("reply", func(t *testing.T) {
				const n = 5 << 20
				req := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 2), n)
				got, err := c.Call(ctx, lgMakeKey, req, CallOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != n {
					t.Fatalf("reply of %d bytes, want %d", len(got), n)
				}
				if err := lgCheck(got); err != nil {
					t.Fatal(err)
				}
			})
			t.Run("concurrent", func(t *testing.T) {
				var wg sync.WaitGroup
				for i, n := range []int{2 << 20, 2 << 20, 2 << 20, 2 << 20, 700 << 10} {
					wg.Go(func() {
						msg := lgMessage(uint64(100+i), n)
						got, err := c.Call(ctx, lgEchoKey, msg, CallOptions{})
						switch {
						case err != nil:
							t.Errorf("echo %d of %d bytes: %v", i, n, err)
						case !bytes.Equal(got, msg):
							t.Errorf("echo %d of %d bytes returned %d bytes differing at byte %d", i, n, len(got), firstDiff(got, msg))
						}
					})
				}
				for i := range 4 {
					wg.Go(func() {
						for j := range 8 {
							msg := lgMessage(uint64(1000+10*i+j), 8+97*j)
							got, err := c.Call(ctx, lgEchoKey, msg, CallOptions{})
							if err != nil || !bytes.Equal(got, msg) {
								t.Errorf("small echo %d.%d: %d bytes, %v; want the %d sent", i, j, len(got), err, len(msg))
							}
							req := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, uint64(i)), 3000)
							got, err = c.Call(ctx, lgMakeKey, req, CallOptions{})
							if err != nil || len(got) != 3000 || lgCheck(got) != nil {
								t.Errorf("small reply %d.%d: %d bytes, %v", i, j, len(got), err)
							}
						}
					})
				}
				wg.Wait()
			})
		})
	}
}

// lgSync sends a PING and reads its PONG: every frame written before it has then been handled
// by the other side's reader. Any other frame fails t.
func lgSync(t *testing.T, peer *testkit.RawPeer, id uint64) {
	t.Helper()
	if err := peer.WriteFrame(testkit.Frame{Type: testkit.TypePing, ID: id}); err != nil {
		t.Fatal(err)
	}
	f, err := peer.ReadFrame()
	if err != nil || f.Type != testkit.TypePong || f.ID != id {
		t.Fatalf("read %v, %v; want the PONG of %d", f, err, id)
	}
}

// lgWriteData writes msg[from:to] to the call id as DATA frames whose sizes are taken from
// sizes in turn; the frame that ends msg carries END.
func lgWriteData(peer *testkit.RawPeer, id uint64, msg []byte, from, to int, sizes []int) error {
	for i, off := 0, from; off < to; i++ {
		n := min(sizes[i%len(sizes)], to-off)
		f := testkit.Frame{Type: testkit.TypeData, ID: id, Payload: msg[off : off+n]}
		off += n
		if off == len(msg) {
			f.Flags = testkit.FlagEnd
		}
		if err := peer.WriteFrame(f); err != nil {
			return err
		}
	}
	return nil
}

// lgWriteReply writes the first sent bytes of the reply msg to the call id: a REPLY frame
// declaring len(msg) and carrying first bytes, then DATA frames (see lgWriteData).
func lgWriteReply(peer *testkit.RawPeer, id uint64, msg []byte, first, sent int, sizes []int) error {
	f := testkit.Frame{Type: testkit.TypeReply, ID: id, Payload: append(testkit.ReplyHeader{Total: uint32(len(msg))}.Encode(), msg[:first]...)}
	if first == len(msg) {
		f.Flags = testkit.FlagEnd
	}
	if err := peer.WriteFrame(f); err != nil {
		return err
	}
	return lgWriteData(peer, id, msg, first, sent, sizes)
}

// lgWriteCall writes the first sent bytes of the request msg for key as the call id: a CALL
// frame declaring len(msg) and carrying first bytes, then DATA frames (see lgWriteData).
func lgWriteCall(peer *testkit.RawPeer, id uint64, key MethodKey, msg []byte, first, sent int, sizes []int) error {
	h := testkit.CallHeader{Key: key, Total: uint32(len(msg))}
	f := testkit.Frame{Type: testkit.TypeCall, ID: id, Payload: append(h.Encode(), msg[:first]...)}
	if first == len(msg) {
		f.Flags = testkit.FlagEnd
	}
	if err := peer.WriteFrame(f); err != nil {
		return err
	}
	return lgWriteData(peer, id, msg, first, sent, sizes)
}

// lgOddFrames are frame sizes that straddle the receiver's 64 KiB chunks in every way, none
// over the default max frame size.
var lgOddFrames = []int{1, 65536, 3, 40961, 65535, 7, 12345, 65529}

// TestLargeReplyFromRawServer: a server that sends a reply beyond the up-front allowance in
// odd-sized frames gets it to the caller byte for byte, collected in chunks (nothing reserved
// up front, one chunk per 64 KiB received); a reply of that size cut short by an ERROR frame
// fails its call with the error; a reply within the allowance is reserved in full at its
// first frame; and every reservation is given back when its call ends.
func TestLargeReplyFromRawServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	base := upfrontInUse.Load()
	c, peer := rawServerConn(t, ctx, ClientOptions{Logger: lgLogger, Limits: Limits{MaxMessageSize: 4 << 20}, KeepaliveInterval: -1})
	var calls sync.WaitGroup
	defer func() {
		c.Close()
		calls.Wait()
	}()

	type result struct {
		b   []byte
		err error
	}
	// call starts a call and returns its request id (read from its CALL) and its outcome.
	call := func() (uint64, <-chan result) {
		t.Helper()
		ch := make(chan result, 1)
		calls.Go(func() {
			b, err := c.Call(ctx, lgEchoKey, []byte("request"), CallOptions{})
			ch <- result{b, err}
		})
		f, err := peer.ReadFrame()
		if err != nil || f.Type != testkit.TypeCall {
			t.Fatalf("read %v, %v; want a CALL", f, err)
		}
		return f.ID, ch
	}
	// inFlight returns the progress of the reply to id. Call it after lgSync: the reader, which
	// owns cc.in, has then handled every frame sent and waits for the next.
	inFlight := func(id uint64) (n, chunks int, flat bool) {
		t.Helper()
		cc := c.lookup(id)
		if cc == nil {
			t.Fatalf("call %d is not in flight", id)
		}
		return cc.in.n, len(cc.in.chunks), cc.in.flat != nil
	}

	// A chunked reply, whole.
	id, done := call()
	msg := lgMessage(1, 3<<19+11)
	const part = 700_001
	if err := lgWriteReply(peer, id, msg, 4093, part, lgOddFrames); err != nil {
		t.Fatal(err)
	}
	lgSync(t, peer, 1)
	if n, chunks, flat := inFlight(id); n != part || chunks != (part+chunkBuffer-1)/chunkBuffer || flat {
		t.Errorf("after %d bytes of a %d-byte reply: n %d, %d chunks, flat %v; want %d, %d, false",
			part, len(msg), n, chunks, flat, part, (part+chunkBuffer-1)/chunkBuffer)
	}
	if d := upfrontInUse.Load() - base; d != 0 {
		t.Errorf("a %d-byte reply reserved %d bytes up front, want 0", len(msg), d)
	}
	if err := lgWriteData(peer, id, msg, part, len(msg), lgOddFrames); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || !bytes.Equal(r.b, msg) {
		t.Fatalf("call: %d bytes, %v; want the %d sent (first difference at %d)", len(r.b), r.err, len(msg), firstDiff(r.b, msg))
	}

	// A chunked reply cut short by an ERROR.
	id, done = call()
	msg = lgMessage(2, 3<<19+11)
	if err := lgWriteReply(peer, id, msg, 1, 300_000, lgOddFrames); err != nil {
		t.Fatal(err)
	}
	lgSync(t, peer, 2)
	if n, chunks, _ := inFlight(id); n != 300_000 || chunks != 5 {
		t.Errorf("after 300000 bytes of a %d-byte reply: n %d, %d chunks; want 300000, 5", len(msg), n, chunks)
	}
	if err := peer.ReplyError(id, testkit.ErrorBody{Code: testkit.CodeHandlerFailed, Message: "gave up"}); err != nil {
		t.Fatal(err)
	}
	if r := <-done; !errors.Is(r.err, ErrRemote) || !strings.Contains(fmt.Sprint(r.err), "gave up") {
		t.Errorf("call: %d bytes, %v; want ErrRemote saying \"gave up\"", len(r.b), r.err)
	}
	if d := upfrontInUse.Load() - base; d != 0 {
		t.Errorf("after a reply ended by an error, %d bytes are reserved up front, want 0", d)
	}

	// A reply within the allowance: reserved in full at its first frame, read in place.
	id, done = call()
	msg = lgMessage(3, 700<<10)
	if err := lgWriteReply(peer, id, msg, 65528, 100_003, lgOddFrames); err != nil {
		t.Fatal(err)
	}
	lgSync(t, peer, 3)
	if n, chunks, flat := inFlight(id); n != 100_003 || chunks != 0 || !flat {
		t.Errorf("after 100003 bytes of a %d-byte reply: n %d, %d chunks, flat %v; want 100003, 0, true", len(msg), n, chunks, flat)
	}
	if d := upfrontInUse.Load() - base; d != int64(len(msg)) {
		t.Errorf("a %d-byte reply reserved %d bytes up front, want all of them", len(msg), d)
	}
	if err := lgWriteData(peer, id, msg, 100_003, len(msg), lgOddFrames); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || !bytes.Equal(r.b, msg) {
		t.Fatalf("call: %d bytes, %v; want the %d sent (first difference at %d)", len(r.b), r.err, len(msg), firstDiff(r.b, msg))
	}
	if d := upfrontInUse.Load() - base; d != 0 {
		t.Errorf("after the replies, %d bytes are reserved up front, want 0", d)
	}
}

// lgReadReplies reads frames until each call in ids has its terminal frame and returns the
// replies by id. An ERROR, a reply whose length is not the one it declared, or a frame of
// another call fails t.
func lgReadReplies(t *testing.T, peer *testkit.RawPeer, ids ...uint64) map[uint64][]byte {
	t.Helper()
	open := map[uint64]bool{}
	for _, id := range ids {
		open[id] = true
	}
	got := map[uint64][]byte{}
	declared := map[uint64]int{}
	for len(open) > 0 {
		f, err := peer.ReadFrame()
		if err != nil {
			t.Fatalf("reading replies: %v", err)
		}
		if !open[f.ID] {
			t.Fatalf("read %v; want a frame of calls %v", f, ids)
		}
		switch f.Type {
		case testkit.TypeReply:
			h, rest, err := testkit.ParseReplyHeader(f.Payload)
			if err != nil {
				t.Fatal(err)
			}
			declared[f.ID] = int(h.Total)
			got[f.ID] = append([]byte{}, rest...)
		case testkit.TypeData:
			got[f.ID] = append(got[f.ID], f.Payload...)
		case testkit.TypeError:
			body, err := testkit.ParseErrorBody(f.Payload)
			t.Fatalf("call %d failed: code %d, %q (%v)", f.ID, body.Code, body.Message, err)
		default:
			t.Fatalf("read %v; want a reply", f)
		}
		if testkit.IsTerminal(f) {
			delete(open, f.ID)
			if len(got[f.ID]) != declared[f.ID] {
				t.Fatalf("reply %d carries %d bytes but declares %d", f.ID, len(got[f.ID]), declared[f.ID])
			}
		}
	}
	return got
}

// lgReadError reads the next frame, which must be an ERROR for id, and returns its body.
func lgReadError(t *testing.T, peer *testkit.RawPeer, id uint64) testkit.ErrorBody {
	t.Helper()
	f, err := peer.ReadFrame()
	if err != nil || f.Type != testkit.TypeError || f.ID != id {
		t.Fatalf("read %v, %v; want the ERROR of %d", f, err, id)
	}
	body, err := testkit.ParseErrorBody(f.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// TestLargeRequestFromRawClient: a client that sends a request beyond the up-front allowance
// in odd-sized frames has it echoed byte for byte; partly sent requests it cancels, one
// chunked and one reserved in full, are answered as cancelled and never run, and give back
// their reservation and their share of the buffered-bytes budget, so that the connection goes
// on serving large and small calls (the budget is one large request: any bytes left counted
// would make the next one a protocol error).
func TestLargeRequestFromRawClient(t *testing.T) {
	base := upfrontInUse.Load()
	cli, srv := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		ServeOn(ctx, srv, lgHandlers(), ServerOptions{
			Logger: lgLogger,
			Limits: Limits{MaxMessageSize: 2 << 20, MaxBufferedBytes: 2 << 20},
		})
	}()
	peer := testkit.NewRawPeer(cli)
	defer func() {
		peer.Close()
		<-served
		if d := upfrontInUse.Load() - base; d != 0 {
			t.Errorf("after the connection closed, %d bytes are reserved up front, want 0", d)
		}
	}()
	peer.SetDeadline(time.Now().Add(10 * time.Second))
	h := testkit.ClientHello()
	h.MaxMessage = 4 << 20
	sh, err := peer.Handshake(h)
	if err != nil {
		t.Fatal(err)
	}
	if sh.MaxFrame < 65536 {
		t.Fatalf("server's max frame %d, want at least 65536", sh.MaxFrame)
	}
	first := 65536 - testkit.CallHeaderSize

	// A chunked request, whole.
	msg := lgMessage(1, 3<<19+7)
	if err := lgWriteCall(peer, 1, lgEchoKey, msg, first, len(msg), lgOddFrames); err != nil {
		t.Fatal(err)
	}
	if got := lgReadReplies(t, peer, 1)[1]; !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes returned %d bytes differing at byte %d", len(msg), len(got), firstDiff(got, msg))
	}

	// A chunked request cancelled part way.
	msg = lgMessage(2, 3<<19+7)
	if err := lgWriteCall(peer, 2, lgEchoKey, msg, 1, 800_000, lgOddFrames); err != nil {
		t.Fatal(err)
	}
	lgSync(t, peer, 1)
	if d := upfrontInUse.Load() - base; d != 0 {
		t.Errorf("a %d-byte request reserved %d bytes up front, want 0", len(msg), d)
	}
	if err := peer.WriteFrame(testkit.Frame{Type: testkit.TypeCancel, ID: 2}); err != nil {
		t.Fatal(err)
	}
	if body := lgReadError(t, peer, 2); body.Code != testkit.CodeCanceled || !body.NeverRan() {
		t.Errorf("cancelled request: code %d, never ran %v; want %d, true", body.Code, body.NeverRan(), testkit.CodeCanceled)
	}

	// A request within the allowance, reserved in full, cancelled part way.
	msg = lgMessage(3, 600<<10)
	if err := lgWriteCall(peer, 3, lgEchoKey, msg, 4093, 100_003, lgOddFrames); err != nil {
		t.Fatal(err)
	}
	lgSync(t, peer, 2)
	if d := upfrontInUse.Load() - base; d != int64(len(msg)) {
		t.Errorf("a %d-byte request reserved %d bytes up front, want all of them", len(msg), d)
	}
	if err := peer.WriteFrame(testkit.Frame{Type: testkit.TypeCancel, ID: 3}); err != nil {
		t.Fatal(err)
	}
	if body := lgReadError(t, peer, 3); body.Code != testkit.CodeCanceled || !body.NeverRan() {
		t.Errorf("cancelled request: code %d, never ran %v; want %d, true", body.Code, body.NeverRan(), testkit.CodeCanceled)
	}
	if d := upfrontInUse.Load() - base; d != 0 {
		t.Errorf("after the cancel, %d bytes are reserved up front, want 0", d)
	}

	// The connection still serves a large request, and a small one sent behind it.
	large, small := lgMessage(4, 3<<19+7), lgMessage(5, 100)
	if err := lgWriteCall(peer, 4, lgEchoKey, large, 7, len(large), lgOddFrames); err != nil {
		t.Fatal(err)
	}
	if err := peer.Call(5, lgEchoKey, small); err != nil {
		t.Fatal(err)
	}
	got := lgReadReplies(t, peer, 4, 5)
	if !bytes.Equal(got[4], large) {
		t.Errorf("echo of %d bytes after the cancels returned %d bytes differing at byte %d", len(large), len(got[4]), firstDiff(got[4], large))
	}
	if !bytes.Equal(got[5], small) {
		t.Errorf("small echo after the cancels returned %d bytes differing at byte %d", len(got[5]), firstDiff(got[5], small))
	}
}
