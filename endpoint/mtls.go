package endpoint

import (
	"context"
	"crypto/tls"
	"net"
)

type mtlsEndpoint struct {
	config *tls.Config
	ep     Endpoint
}

var _ Endpoint = (*mtlsEndpoint)(nil)

// MTLS returns an endpoint that dials ep and then runs a TLS handshake with config, for example
//
//	MTLS(&tls.Config{...}, TCP("cache.internal:8000"))
//	MTLS(&tls.Config{...}, Unix("/run/cache.sock"))
//
// config should hold the client's certificate (or a GetClientCertificate callback, so a rotated
// certificate is used by the next dial without touching open connections) and the roots that
// verify the server. If config.ServerName is empty, the host part of a TCP address is used.
//
// Under TLS 1.3 a server that rejects the client's certificate reports it only on the client's
// first read, after Dial has returned; weft's handshake performs that read before a connection is
// used.
//
// REQUIRES: config is not nil.
func MTLS(config *tls.Config, ep Endpoint) Endpoint {
	if config == nil {
		panic("endpoint: MTLS with a nil tls.Config")
	}
	return &mtlsEndpoint{config: config, ep: ep}
}

// Dial implements [Endpoint].
func (m *mtlsEndpoint) Dial(ctx context.Context) (net.Conn, error) {
	raw, err := m.ep.Dial(ctx)
	if err != nil {
		return nil, err
	}
	cfg := m.config
	if cfg.ServerName == "" {
		if ne, ok := m.ep.(NetEndpoint); ok && ne.Net == "tcp" {
			if host, _, err := net.SplitHostPort(ne.Addr); err == nil {
				cfg = cfg.Clone()
				cfg.ServerName = host
			}
		}
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

// Address implements [Endpoint]. It is the address of the wrapped endpoint prefixed with "mtls+".
func (m *mtlsEndpoint) Address() string { return "mtls+" + m.ep.Address() }

// String returns the address of the endpoint.
func (m *mtlsEndpoint) String() string { return m.Address() }
