package call

import (
	"crypto/tls"
	"net"
	"syscall"
)

// tcpNotSentLowat is TCP_NOTSENT_LOWAT from linux/tcp.h.
const tcpNotSentLowat = 25

// notSentLowat bounds the bytes a TCP socket holds unsent. Without it a loopback socket buffer
// of several megabytes would queue chunks of a large message ahead of a small call's frames.
const notSentLowat = 128 << 10

// setNotSentLowat limits the unsent bytes the kernel queues for c, when c is TCP (possibly
// under TLS). Failure is harmless: chunks still interleave, with more kernel queueing.
func setNotSentLowat(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, notSentLowat)
	})
}
