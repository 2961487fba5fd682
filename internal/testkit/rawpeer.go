package testkit

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"time"
)

// MaxReadPayload is the largest frame payload [RawPeer.ReadFrame] accepts (64 MiB); a header
// declaring more fails the read instead of allocating it.
const MaxReadPayload = 64 << 20

// ErrPayloadTooLarge is returned (wrapped) by [RawPeer.ReadFrame] for a header declaring a payload
// larger than [MaxReadPayload].
var ErrPayloadTooLarge = errors.New("testkit: frame payload too large to read")

// RawPeer speaks the weft wire format over a connection one frame at a time, with nothing
// automatic: it never answers PINGs, never checks ids, flags or limits, and writes exactly the
// bytes it is given. Use it as a client against a real server or as a server against a real
// client.
//
// Its methods take no context: set deadlines on the connection with [RawPeer.SetDeadline]. One
// goroutine may read while another writes; reads must not run concurrently with each other, nor
// writes with each other.
type RawPeer struct {
	conn   net.Conn
	hdr    [HeaderSize]byte
	goAway atomic.Pointer[GoAway]
}

// NewRawPeer returns a raw peer speaking over c. The peer owns c: [RawPeer.Close] closes it.
func NewRawPeer(c net.Conn) *RawPeer { return &RawPeer{conn: c} }

// Conn returns the peer's connection.
func (p *RawPeer) Conn() net.Conn { return p.conn }

// SetDeadline sets the read and write deadlines of the peer's connection.
func (p *RawPeer) SetDeadline(t time.Time) error { return p.conn.SetDeadline(t) }

// SetReadDeadline sets the read deadline of the peer's connection.
func (p *RawPeer) SetReadDeadline(t time.Time) error { return p.conn.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline of the peer's connection.
func (p *RawPeer) SetWriteDeadline(t time.Time) error { return p.conn.SetWriteDeadline(t) }

// Close closes the peer's connection.
func (p *RawPeer) Close() error { return p.conn.Close() }

// Handshake performs the client side of the handshake: it writes h, then reads and parses the
// server's hello. The returned error wraps [ErrMalformed] if the server's hello is malformed, or
// is the read error (io.EOF if the server closed without writing). A server hello with another
// version is returned without error.
func (p *RawPeer) Handshake(h Hello) (Hello, error) {
	if err := p.WriteHello(h); err != nil {
		return Hello{}, err
	}
	return p.ReadHello()
}

// AcceptHandshake performs the server side of the handshake: it reads the client's hello and, if
// it is well-formed (whatever its version), writes h. It returns the client's hello and the first
// error; on a malformed client hello (an error wrapping [ErrMalformed]) nothing is written.
func (p *RawPeer) AcceptHandshake(h Hello) (Hello, error) {
	client, err := p.ReadHello()
	if err != nil {
		return client, err
	}
	return client, p.WriteHello(h)
}

// WriteHello writes h.Encode().
func (p *RawPeer) WriteHello(h Hello) error { return p.WriteRaw(h.Encode()) }

// ReadHello reads a hello: the 8-byte prefix, then the rest length it declares (not read if the
// magic is wrong). It returns what [ParseHello] returns for those bytes, or the read error.
func (p *RawPeer) ReadHello() (Hello, error) {
	var prefix [HelloPrefixSize]byte
	if _, err := io.ReadFull(p.conn, prefix[:]); err != nil {
		return Hello{}, err
	}
	if string(prefix[:4]) != Magic {
		return ParseHello(prefix[:])
	}
	b := make([]byte, HelloPrefixSize+HelloRestLen(prefix[:]))
	copy(b, prefix[:])
	if _, err := io.ReadFull(p.conn, b[HelloPrefixSize:]); err != nil {
		return Hello{}, err
	}
	return ParseHello(b)
}

// WriteRaw writes b as is, in one Write.
func (p *RawPeer) WriteRaw(b []byte) error {
	_, err := p.conn.Write(b)
	return err
}

// WriteFrame writes f, in one Write.
func (p *RawPeer) WriteFrame(f Frame) error { return p.WriteRaw(EncodeFrame(f)) }

// WriteFrames writes fs back to back, in one Write.
func (p *RawPeer) WriteFrames(fs ...Frame) error {
	var b []byte
	for _, f := range fs {
		b = AppendFrame(b, f)
	}
	return p.WriteRaw(b)
}

// ReadFrame reads one frame: a header, then the payload it declares (nil if empty). It returns
// io.EOF if the connection ended cleanly before the frame, io.ErrUnexpectedEOF if it ended inside
// it, and an error wrapping [ErrPayloadTooLarge] without reading the payload if the header
// declares more than [MaxReadPayload] bytes. A GOAWAY read is remembered for
// [RawPeer.LastGoAway]. No field is validated.
func (p *RawPeer) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(p.conn, p.hdr[:]); err != nil {
		return Frame{}, err
	}
	f, n := ParseFrameHeader(p.hdr[:])
	if n > MaxReadPayload {
		return f, fmt.Errorf("%w: %v declares %d bytes", ErrPayloadTooLarge, f, n)
	}
	if n > 0 {
		f.Payload = make([]byte, n)
		if _, err := io.ReadFull(p.conn, f.Payload); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return f, err
		}
	}
	if f.Type == TypeGoAway {
		if g, err := ParseGoAway(f); err == nil {
			p.goAway.Store(&g)
		}
	}
	return f, nil
}

// LastGoAway returns the last well-formed GOAWAY any read of p has seen, or nil.
func (p *RawPeer) LastGoAway() *GoAway { return p.goAway.Load() }

// ReadUntilClose reads and discards frames until the connection ends. If a GOAWAY was read, it
// returns the last one; the reads then go on until the peer closes, so a nil error means the
// connection was closed after the GOAWAY. The end of the connection is io.EOF or, after a GOAWAY,
// a connection reset (a peer that closes with unread input resets TCP); either yields a nil
// error. Any other read error is returned, with the GOAWAY if one was read. A malformed GOAWAY is
// an error wrapping [ErrMalformed].
func (p *RawPeer) ReadUntilClose() (*GoAway, error) {
	var g *GoAway
	for {
		f, err := p.ReadFrame()
		if err != nil {
			switch {
			case errors.Is(err, io.EOF):
				return g, nil
			case g != nil && errors.Is(err, syscall.ECONNRESET):
				return g, nil
			}
			return g, err
		}
		if f.Type == TypeGoAway {
			ga, err := ParseGoAway(f)
			if err != nil {
				return g, err
			}
			g = &ga
		}
	}
}

// Call writes a complete call in one CALL frame with END: a call header with key, no signature,
// no optional section and Total = len(payload), then payload.
func (p *RawPeer) Call(id uint64, key [16]byte, payload []byte) error {
	h := CallHeader{Key: key, Total: uint32(len(payload))}
	b := h.Append(make([]byte, 0, CallHeaderSize+len(payload)))
	return p.WriteFrame(Frame{Type: TypeCall, Flags: FlagEnd, ID: id, Payload: append(b, payload...)})
}

// Reply writes a complete reply in one REPLY frame with END: a reply header with Total =
// len(payload) and load 0, then payload.
func (p *RawPeer) Reply(id uint64, payload []byte) error {
	b := append(ReplyHeader{Total: uint32(len(payload))}.Encode(), payload...)
	return p.WriteFrame(Frame{Type: TypeReply, Flags: FlagEnd, ID: id, Payload: b})
}

// ReplyError writes an ERROR frame for id carrying e.
func (p *RawPeer) ReplyError(id uint64, e ErrorBody) error {
	return p.WriteFrame(Frame{Type: TypeError, ID: id, Payload: e.Encode()})
}

// IsTerminal reports whether f ends the call with its id: a REPLY or DATA with END, or an ERROR.
func IsTerminal(f Frame) bool {
	switch f.Type {
	case TypeReply, TypeData:
		return f.End()
	case TypeError:
		return true
	}
	return false
}

// ReadTerminal reads frames until the terminal frame for id ([IsTerminal]) and returns it. Every
// other frame is discarded, including the non-final REPLY and DATA frames of id (use
// [RawPeer.ReadResponse] to keep them), PINGs, which are not answered, and GOAWAYs, which are
// remembered for [RawPeer.LastGoAway].
func (p *RawPeer) ReadTerminal(id uint64) (Frame, error) {
	for {
		f, err := p.ReadFrame()
		if err != nil {
			return Frame{}, err
		}
		if f.ID == id && IsTerminal(f) {
			return f, nil
		}
	}
}

// ReadResponse reads frames until the terminal frame for id and returns the REPLY, DATA and ERROR
// frames for id in the order read, the terminal one last. Other frames are discarded as by
// [RawPeer.ReadTerminal]. On error it returns the frames read so far.
func (p *RawPeer) ReadResponse(id uint64) ([]Frame, error) {
	var fs []Frame
	for {
		f, err := p.ReadFrame()
		if err != nil {
			return fs, err
		}
		if f.ID != id {
			continue
		}
		switch f.Type {
		case TypeReply, TypeData, TypeError:
			fs = append(fs, f)
			if IsTerminal(f) {
				return fs, nil
			}
		}
	}
}
