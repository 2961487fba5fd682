// Package endpoint names the places a weft client can connect to.
//
// An [Endpoint] is something that can be dialled and has an address:
//
//	endpoint.TCP("localhost:8000")
//	endpoint.Unix("/run/weft/cache.sock")
//	endpoint.MTLS(cfg, endpoint.TCP("cache.internal:8000"))
//	ep, err := endpoint.Parse("unix:///run/weft/cache.sock")
package endpoint

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
)

// An Endpoint is a dialable entity with an address.
//
// Dial and Address may be called concurrently. Dial blocks until the connection is established,
// ctx is done, or dialling fails.
type Endpoint interface {
	// Dial returns a new network connection to the endpoint.
	Dial(ctx context.Context) (net.Conn, error)

	// Address returns the address of the endpoint: "tcp://host:port" or "unix://path" (the
	// forms [Parse] accepts), or such an address prefixed with "mtls+" for [MTLS]. Two
	// endpoints with the same address represent the same server; two endpoints with different
	// addresses may still represent the same server (for example "tcp://localhost:80" and
	// "tcp://127.0.0.1:80").
	Address() string
}

// ErrBadAddress is returned by [Parse] for a string that is not a valid endpoint address.
// Test for it with errors.Is.
var ErrBadAddress = errors.New("endpoint: bad address")

// NetEndpoint is an [Endpoint] that dials with a [net.Dialer].
type NetEndpoint struct {
	Net  string // "tcp" or "unix"
	Addr string // "host:port" or a socket path
}

var _ Endpoint = NetEndpoint{}

// TCP returns an endpoint that dials the TCP server at addr ("host:port", as for [net.Dial]).
func TCP(addr string) NetEndpoint { return NetEndpoint{Net: "tcp", Addr: addr} }

// Unix returns an endpoint that dials the Unix stream socket at path.
func Unix(path string) NetEndpoint { return NetEndpoint{Net: "unix", Addr: path} }

// Dial implements [Endpoint].
func (ne NetEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, ne.Net, ne.Addr)
}

// Address implements [Endpoint]. It returns "tcp://host:port" or "unix://path".
func (ne NetEndpoint) Address() string { return ne.Net + "://" + ne.Addr }

// String returns the address of the endpoint.
func (ne NetEndpoint) String() string { return ne.Address() }

// Parse parses an endpoint address of the form "tcp://host:port" or "unix:///path/to/socket"
// (an absolute path) or "unix://relative/path". Any other form returns an error that wraps
// [ErrBadAddress].
func Parse(addr string) (NetEndpoint, error) {
	if i := strings.IndexFunc(addr, func(r rune) bool { return r < 0x20 || r == 0x7f }); i >= 0 {
		return NetEndpoint{}, fmt.Errorf("%w %q: control character at byte %d", ErrBadAddress, addr, i)
	}
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		return NetEndpoint{}, fmt.Errorf("%w %q: want scheme://address", ErrBadAddress, addr)
	}
	switch scheme {
	case "tcp":
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return NetEndpoint{}, fmt.Errorf("%w %q: %v", ErrBadAddress, addr, err)
		}
		if port == "" || strings.ContainsAny(host, "/ ") {
			return NetEndpoint{}, fmt.Errorf("%w %q: want tcp://host:port", ErrBadAddress, addr)
		}
		return TCP(rest), nil
	case "unix":
		if rest == "" || strings.ContainsRune(rest, 0) {
			return NetEndpoint{}, fmt.Errorf("%w %q: want unix:///path", ErrBadAddress, addr)
		}
		return Unix(rest), nil
	default:
		return NetEndpoint{}, fmt.Errorf("%w %q: unknown scheme %q (want tcp or unix)", ErrBadAddress, addr, scheme)
	}
}
