package call

import (
	"bufio"
	"io"
)

// inbound collects a multi-frame message as its frames arrive, on a connection's reader.
//
// While the declared sizes of the messages being received stay within the up-front allowances
// (upfrontAllowance per connection, upfrontProcessLimit per process), the whole message is
// reserved at its first frame and every frame is read in place. Beyond them the frames are read
// into pooled chunks of chunkBuffer bytes, so that memory follows the bytes received rather
// than the size a peer declares, and nothing is copied or zeroed on the reader: the receiver
// assembles the message once, off the reader, with assemble.
type inbound struct {
	total    int      // declared size
	n        int      // bytes received
	flat     []byte   // the message, when reserved in full (len n)
	chunks   [][]byte // otherwise its bytes so far, each chunk full but the last
	reserved int      // bytes of the up-front allowances held for flat
	pooled   bool     // flat came from getBuffer
}

// begin starts a message of total bytes. With pooled, a flat buffer comes from the buffer
// pools and its owner gives it back with putBuffer; otherwise it is allocated, for an owner
// that keeps it.
func (in *inbound) begin(total int, upfront *int, pooled bool) {
	*in = inbound{total: total}
	if *upfront+total <= upfrontAllowance {
		if upfrontInUse.Add(int64(total)) <= upfrontProcessLimit {
			*upfront += total
			in.reserved = total
			if pooled {
				in.flat, in.pooled = getBuffer(total)[:0], true
			} else {
				in.flat = make([]byte, 0, total)
			}
			return
		}
		upfrontInUse.Add(-int64(total))
	}
}

// start begins a message of total bytes whose first frame carries first (see begin).
func (in *inbound) start(first []byte, total int, upfront *int, pooled bool) {
	in.begin(total, upfront, pooled)
	if in.flat != nil {
		in.flat = append(in.flat, first...)
		in.n = len(first)
		return
	}
	in.write(first)
}

// write appends p to a chunked message.
func (in *inbound) write(p []byte) {
	for len(p) > 0 {
		c := in.room()
		k := copy(c[len(c):cap(c)], p)
		in.chunks[len(in.chunks)-1] = c[:len(c)+k]
		in.n += k
		p = p[k:]
	}
}

// room returns the last chunk, adding a new one when the last is full.
func (in *inbound) room() []byte {
	if k := len(in.chunks); k > 0 && len(in.chunks[k-1]) < chunkBuffer {
		return in.chunks[k-1]
	}
	c := getBuffer(chunkBuffer)[:0]
	in.chunks = append(in.chunks, c)
	return c
}

// read reads the next n bytes of the message from r.
func (in *inbound) read(r *bufio.Reader, n int) error {
	if in.flat != nil {
		got := len(in.flat)
		in.flat = in.flat[:got+n]
		if _, err := io.ReadFull(r, in.flat[got:]); err != nil {
			in.flat = in.flat[:got]
			return err
		}
		in.n += n
		return nil
	}
	for n > 0 {
		c := in.room()
		k := min(n, chunkBuffer-len(c))
		if _, err := io.ReadFull(r, c[len(c):len(c)+k]); err != nil {
			return err
		}
		in.chunks[len(in.chunks)-1] = c[:len(c)+k]
		in.n += k
		n -= k
	}
	return nil
}

// end gives back the message's up-front reservation, once its last frame has arrived or it
// was abandoned.
func (in *inbound) end(upfront *int) {
	endMessage(upfront, in.reserved)
	in.reserved = 0
}

// chunked reports whether the message was collected in chunks, to be assembled.
func (in *inbound) chunked() bool { return in.chunks != nil }

// assemble returns the complete message: the flat buffer, or a buffer from alloc with the
// chunks copied in (the chunks go back to the pool). The caller calls it once, after the last
// frame, and off the connection's reader when the message is chunked.
func (in *inbound) assemble(alloc func(int) []byte) []byte {
	if in.chunks == nil {
		b := in.flat
		in.flat = nil
		return b
	}
	b := alloc(in.n)
	off := 0
	for i, c := range in.chunks {
		off += copy(b[off:], c)
		putBuffer(c)
		in.chunks[i] = nil
	}
	in.chunks = nil
	return b
}

// release gives back the pooled memory of a message that will not be assembled.
func (in *inbound) release() {
	for i, c := range in.chunks {
		putBuffer(c)
		in.chunks[i] = nil
	}
	in.chunks = nil
	if in.pooled && in.flat != nil {
		putBuffer(in.flat)
	}
	in.flat = nil
}
