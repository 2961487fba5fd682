package resolve_test

// Tests of the DNS resolver: time logic under testing/synctest with the Exchange hook, the
// built-in client against a DNS server started by the test, and call.Connect following a
// name end to end. Identifiers of this file start with "dns".

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// dnsBound is the generous bound on anything over real sockets that must not hang.
const dnsBound = 20 * time.Second

// dnsQuery is one query a dnsZone received.
type dnsQuery struct {
	at    time.Time
	name  string // lower case, fully qualified
	qtype uint16
	via   string // "udp", "tcp" or "hook"
}

// dnsZone is the data of a fake recursive DNS server: it answers from its records, following
// CNAME records, with NXDOMAIN for names it has no records of and NOERROR without answers for
// names that have records of other types (both with an SOA record whose TTL is negTTL). The
// test changes its records and faults while it serves.
type dnsZone struct {
	mu sync.Mutex
	// guarded by mu
	rrs      []dns.RR
	negTTL   uint32
	rcode    int                           // if not 0, every reply has this code and no records
	noChase  bool                          // answer CNAME records without following them
	truncUDP bool                          // UDP replies are empty and truncated
	hookErr  error                         // the Exchange hook fails with this error
	hang     bool                          // the Exchange hook waits for its ctx
	gate     chan struct{}                 // if not nil, the Exchange hook waits until it is closed
	mangle   func(reply *dns.Msg) *dns.Msg // replaces replies of the Exchange hook
	log      []dnsQuery
}

// dnsNewZone returns a zone with records rrs, in zone file syntax.
func dnsNewZone(t testing.TB, rrs ...string) *dnsZone {
	t.Helper()
	z := &dnsZone{negTTL: 3600}
	z.set(t, rrs...)
	return z
}

// set replaces the zone's records.
func (z *dnsZone) set(t testing.TB, rrs ...string) {
	t.Helper()
	parsed := make([]dns.RR, 0, len(rrs))
	for _, s := range rrs {
		rr, err := dns.NewRR(s)
		if err != nil || rr == nil {
			t.Fatalf("bad record %q: %v", s, err)
		}
		parsed = append(parsed, rr)
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	z.rrs = parsed
}

// update changes the zone's settings under its lock.
func (z *dnsZone) update(f func(z *dnsZone)) {
	z.mu.Lock()
	defer z.mu.Unlock()
	f(z)
}

// hold makes the Exchange hook wait until release.
func (z *dnsZone) hold() { z.update(func(z *dnsZone) { z.gate = make(chan struct{}) }) }

// release lets waiting and later queries of the Exchange hook through.
func (z *dnsZone) release() {
	z.update(func(z *dnsZone) {
		if z.gate != nil {
			close(z.gate)
			z.gate = nil
		}
	})
}

// queries returns the queries of type qtype received so far (all of them for qtype 0).
func (z *dnsZone) queries(qtype uint16) []dnsQuery {
	z.mu.Lock()
	defer z.mu.Unlock()
	var out []dnsQuery
	for _, q := range z.log {
		if qtype == 0 || q.qtype == qtype {
			out = append(out, q)
		}
	}
	return out
}

// count returns the number of queries of type qtype received so far.
func (z *dnsZone) count(qtype uint16) int { return len(z.queries(qtype)) }

// record logs the arrival of req.
func (z *dnsZone) record(req *dns.Msg, via string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	for _, q := range req.Question {
		z.log = append(z.log, dnsQuery{at: time.Now(), name: strings.ToLower(q.Name), qtype: q.Qtype, via: via})
	}
}

// reply returns the zone's reply to req.
func (z *dnsZone) reply(req *dns.Msg, via string) *dns.Msg {
	z.mu.Lock()
	defer z.mu.Unlock()
	reply := new(dns.Msg).SetReply(req)
	if len(req.Question) != 1 {
		reply.Rcode = dns.RcodeFormatError
		return reply
	}
	q := req.Question[0]
	switch {
	case z.rcode != 0:
		reply.Rcode = z.rcode
		return reply
	case via == "udp" && z.truncUDP:
		reply.Truncated = true
		return reply
	}
	name := q.Name
	for range 20 {
		cnames := z.findLocked(name, dns.TypeCNAME)
		if len(cnames) == 0 {
			break
		}
		reply.Answer = append(reply.Answer, cnames[0])
		if z.noChase {
			return reply
		}
		name = cnames[0].(*dns.CNAME).Target
	}
	rrs := z.findLocked(name, q.Qtype)
	reply.Answer = append(reply.Answer, rrs...)
	if len(rrs) == 0 {
		if len(z.findLocked(name, 0)) == 0 {
			reply.Rcode = dns.RcodeNameError
		}
		reply.Ns = append(reply.Ns, &dns.SOA{
			Hdr: dns.RR_Header{Name: "test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: z.negTTL},
			Ns:  "ns.test.", Mbox: "admin.test.", Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400,
			Minttl: z.negTTL,
		})
	}
	return reply
}

// findLocked returns the records of name with type qtype (any type for 0).
//
// REQUIRES: z.mu is held.
func (z *dnsZone) findLocked(name string, qtype uint16) []dns.RR {
	var out []dns.RR
	for _, rr := range z.rrs {
		h := rr.Header()
		if strings.EqualFold(h.Name, name) && (qtype == 0 || h.Rrtype == qtype) {
			out = append(out, rr)
		}
	}
	return out
}

// exchange is an Exchange hook that answers from the zone, with its faults.
func (z *dnsZone) exchange(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	z.record(m, "hook")
	z.mu.Lock()
	gate, hookErr, hang, mangle := z.gate, z.hookErr, z.hang, z.mangle
	z.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	reply := z.reply(m, "hook")
	switch {
	case hookErr != nil:
		return nil, hookErr
	case hang:
		<-ctx.Done()
		return nil, ctx.Err()
	case mangle != nil:
		reply = mangle(reply)
	}
	return reply, nil
}

// dnsMangle returns a fault that makes the Exchange hook return f(reply) instead of reply.
func dnsMangle(f func(reply *dns.Msg) *dns.Msg) func(z *dnsZone) {
	return func(z *dnsZone) { z.mangle = f }
}

// dnsNew returns a resolver of target whose queries go to z's Exchange hook.
func dnsNew(t testing.TB, target string, z *dnsZone, opts resolve.DNSOptions) *resolve.DNSResolver {
	t.Helper()
	opts.Exchange = z.exchange
	r, err := resolve.DNS(target, opts)
	if err != nil {
		t.Fatalf("DNS(%q): %v", target, err)
	}
	return r
}

// dnsCtx returns a context that ends with the test or after an hour (of the bubble's clock
// inside a synctest bubble).
func dnsCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
	t.Cleanup(cancel)
	return ctx
}

// dnsTCP returns the TCP endpoints of addrs.
func dnsTCP(addrs ...string) []endpoint.Endpoint {
	out := make([]endpoint.Endpoint, len(addrs))
	for i, a := range addrs {
		out[i] = endpoint.TCP(a)
	}
	return out
}

// dnsBlocked fails t if ch has a result.
func dnsBlocked(t *testing.T, what string, ch <-chan result) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("%s: Resolve returned %q, %v, %v; want it still blocked", what, addrs(r.set), r.v, r.err)
	default:
	}
}

// dnsReturned returns ch's result, failing t if there is none yet.
func dnsReturned(t *testing.T, what string, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	default:
		t.Fatalf("%s: Resolve still blocked", what)
		return result{}
	}
}

// dnsStop cancels the ctx of a blocked Resolve and checks that it returns ctx's error.
func dnsStop(t *testing.T, cancel context.CancelFunc, ch <-chan result) {
	t.Helper()
	cancel()
	if r := <-ch; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Resolve after cancel = %q, %v, %v; want context.Canceled", addrs(r.set), r.v, r.err)
	}
}

func TestDNSBadTargets(t *testing.T) {
	z := dnsNewZone(t)
	for _, target := range []string{
		"",
		"svc.test",       // neither a port nor SRV
		"svc.test:",      // empty port
		"svc.test:0",     // port 0
		"svc.test:65536", // port out of range
		"svc.test:-1",    // negative port
		"svc.test:http",  // named port
		":80",            // empty host
		"bad host:80",    // space
		"a..b:80",        // empty label
		"a/b:80",         // slash
		strings.Repeat("a", 64) + ".test:80",
		strings.Repeat("abcdefgh.", 32) + "test:80", // longer than 253 bytes
		"::1",                 // IPv6 without brackets or port
		"[::1]",               // IP without port
		"svc.test:80:90",      // two ports
		"_svc._tcp",           // SRV without a domain
		"_._tcp.svc.test",     // empty service
		"_svc.tcp.svc.test",   // protocol without underscore
		"_svc._tcp.",          // SRV without a domain, fully qualified
		"_svc._tcp.svc..test", // empty label
	} {
		r, err := resolve.DNS(target, resolve.DNSOptions{Exchange: z.exchange})
		if !errors.Is(err, resolve.ErrBadTarget) {
			t.Errorf("DNS(%q) = %v, %v; want an error wrapping ErrBadTarget", target, r, err)
		}
	}
	if n := z.count(0); n != 0 {
		t.Errorf("checking targets sent %d queries, want none", n)
	}
}

func TestDNSGoodTargets(t *testing.T) {
	z := dnsNewZone(t)
	for _, target := range []string{"svc.test:80", "svc.test.:80", "SVC.Test:65535", "a-b_c.test:1", "_grpc._tcp.svc.test", "_grpc._tcp.svc.test.", "localhost:80"} {
		r, err := resolve.DNS(target, resolve.DNSOptions{Exchange: z.exchange})
		if err != nil {
			t.Errorf("DNS(%q): %v", target, err)
			continue
		}
		if r.IsConstant() {
			t.Errorf("DNS(%q).IsConstant() = true, want false for a name", target)
		}
		if got, want := r.String(), "dns:"+target; got != want {
			t.Errorf("DNS(%q).String() = %q, want %q", target, got, want)
		}
	}
}

func TestDNSBadOptions(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	noServers := write("none.conf", "search example.com\noptions ndots:2\n")
	badServers := write("bad.conf", "nameserver dns.example.com\nnameserver 1.2.3\n")
	cases := []struct {
		name string
		opts resolve.DNSOptions
	}{
		{"server without port", resolve.DNSOptions{Servers: []string{"127.0.0.1"}}},
		{"server by name", resolve.DNSOptions{Servers: []string{"dns.example.com:53"}}},
		{"server port 0", resolve.DNSOptions{Servers: []string{"127.0.0.1:0"}}},
		{"one bad server of two", resolve.DNSOptions{Servers: []string{"127.0.0.1:53", "nope"}}},
		{"bad Net", resolve.DNSOptions{Servers: []string{"127.0.0.1:53"}, Net: "tcp-tls"}},
		{"negative Timeout", resolve.DNSOptions{Servers: []string{"127.0.0.1:53"}, Timeout: -time.Second}},
		{"negative MinTTL", resolve.DNSOptions{Servers: []string{"127.0.0.1:53"}, MinTTL: -time.Second}},
		{"negative MaxTTL", resolve.DNSOptions{Servers: []string{"127.0.0.1:53"}, MaxTTL: -time.Second}},
		{"MinTTL above MaxTTL", resolve.DNSOptions{Servers: []string{"127.0.0.1:53"}, MinTTL: time.Minute, MaxTTL: time.Second}},
		{"missing resolv.conf", resolve.DNSOptions{ConfigFile: filepath.Join(dir, "missing.conf")}},
		{"resolv.conf without nameservers", resolve.DNSOptions{ConfigFile: noServers}},
		{"resolv.conf without IP nameservers", resolve.DNSOptions{ConfigFile: badServers}},
	}
	for _, c := range cases {
		r, err := resolve.DNS("svc.test:80", c.opts)
		if !errors.Is(err, resolve.ErrBadOptions) {
			t.Errorf("%s: DNS = %v, %v; want an error wrapping ErrBadOptions", c.name, r, err)
		}
	}

	// Good options, including a MinTTL above the default MaxTTL (which then follows it) and
	// a resolv.conf with one usable nameserver among bad ones.
	good := write("good.conf", "nameserver dns.example.com\nnameserver 127.0.0.1\nnameserver ::1\n")
	for _, opts := range []resolve.DNSOptions{
		{Servers: []string{"127.0.0.1:53", "[::1]:5353"}, Net: "tcp", Timeout: time.Second},
		{Servers: []string{"127.0.0.1:53"}, MinTTL: time.Hour},
		{ConfigFile: good},
	} {
		if _, err := resolve.DNS("svc.test:80", opts); err != nil {
			t.Errorf("DNS with %+v: %v", opts, err)
		}
	}
}

func TestDNSIPLiteralIsConstant(t *testing.T) {
	z := dnsNewZone(t)
	for _, c := range []struct{ target, want string }{
		{"10.1.2.3:80", "10.1.2.3:80"},
		{"[2001:db8::1]:443", "[2001:db8::1]:443"},
		{"[::ffff:10.1.2.3]:80", "[::ffff:10.1.2.3]:80"},
	} {
		r := dnsNew(t, c.target, z, resolve.DNSOptions{})
		if !r.IsConstant() {
			t.Errorf("DNS(%q).IsConstant() = false, want true", c.target)
		}
		for _, v := range []*resolve.Version{nil, {Opaque: "1"}} {
			set, nv, err := r.Resolve(testCtx(t), v)
			if err != nil || nv != nil {
				t.Fatalf("DNS(%q).Resolve(%v) = %q, %v, %v; want a set and a nil version", c.target, v, addrs(set), nv, err)
			}
			wantSet(t, c.target, set, dnsTCP(c.want))
		}
	}
	if n := z.count(0); n != 0 {
		t.Errorf("IP literals sent %d queries, want none", n)
	}
}

// TestDNSAnswers resolves names of every form through the Exchange hook.
func TestDNSAnswers(t *testing.T) {
	cases := []struct {
		name    string
		target  string
		records []string
		noChase bool
		want    []string
	}{{
		name:   "A and AAAA, ordered and deduplicated",
		target: "svc.test:8000",
		records: []string{
			"svc.test. 60 IN AAAA 2001:db8::2",
			"svc.test. 60 IN A 10.0.0.10",
			"svc.test. 60 IN A 10.0.0.9",
			"svc.test. 60 IN AAAA 2001:db8::1",
			"svc.test. 60 IN A 10.0.0.9",
			"other.test. 60 IN A 10.9.9.9",
		},
		want: []string{"10.0.0.9:8000", "10.0.0.10:8000", "[2001:db8::1]:8000", "[2001:db8::2]:8000"},
	}, {
		name:    "only A",
		target:  "svc.test:1",
		records: []string{"svc.test. 60 IN A 10.0.0.1"},
		want:    []string{"10.0.0.1:1"},
	}, {
		name:    "only AAAA",
		target:  "svc.test:1",
		records: []string{"svc.test. 60 IN AAAA ::1"},
		want:    []string{"[::1]:1"},
	}, {
		name:    "case does not matter",
		target:  "SVC.test:1",
		records: []string{"svc.TEST. 60 IN A 10.0.0.1"},
		want:    []string{"10.0.0.1:1"},
	}, {
		name:   "CNAME chain in the reply",
		target: "www.test:80",
		records: []string{
			"www.test. 60 IN CNAME edge.test.",
			"edge.test. 60 IN CNAME lb.test.",
			"lb.test. 60 IN A 10.0.0.1",
			"lb.test. 60 IN AAAA 2001:db8::1",
			"www.test. 60 IN TXT \"not an address\"",
		},
		want: []string{"10.0.0.1:80", "[2001:db8::1]:80"},
	}, {
		name:   "CNAME chain across replies",
		target: "www.test:80",
		records: []string{
			"www.test. 60 IN CNAME edge.test.",
			"edge.test. 60 IN CNAME lb.test.",
			"lb.test. 60 IN A 10.0.0.1",
		},
		noChase: true,
		want:    []string{"10.0.0.1:80"},
	}, {
		name:   "SRV",
		target: "_weft._tcp.svc.test",
		records: []string{
			"_weft._tcp.svc.test. 60 IN SRV 10 5 7001 b.svc.test.",
			"_weft._tcp.svc.test. 60 IN SRV 0 5 7000 a.svc.test.",
			"_weft._tcp.svc.test. 60 IN SRV 0 0 7002 A.svc.test.",
			"_weft._tcp.svc.test. 60 IN SRV 0 0 7003 .",
			"_weft._tcp.svc.test. 60 IN SRV 0 0 0 c.svc.test.",
			"_weft._tcp.svc.test. 60 IN SRV 0 0 7004 gone.svc.test.",
			"a.svc.test. 60 IN A 10.0.0.1",
			"b.svc.test. 60 IN A 10.0.0.2",
			"b.svc.test. 60 IN AAAA 2001:db8::2",
			"c.svc.test. 60 IN A 10.0.0.3",
		},
		want: []string{"10.0.0.1:7000", "10.0.0.1:7002", "10.0.0.2:7001", "[2001:db8::2]:7001"},
	}, {
		name:   "SRV through CNAME",
		target: "_weft._tcp.svc.test",
		records: []string{
			"_weft._tcp.svc.test. 60 IN CNAME _weft._tcp.real.test.",
			"_weft._tcp.real.test. 60 IN SRV 0 0 9000 t.real.test.",
			"t.real.test. 60 IN CNAME host.real.test.",
			"host.real.test. 60 IN A 10.0.0.7",
		},
		want: []string{"10.0.0.7:9000"},
	}, {
		name:    "NXDOMAIN is an empty set",
		target:  "svc.test:80",
		records: nil,
		want:    nil,
	}, {
		name:    "no addresses is an empty set",
		target:  "svc.test:80",
		records: []string{"svc.test. 60 IN TXT \"hello\""},
		want:    nil,
	}, {
		name:    "SRV NXDOMAIN is an empty set",
		target:  "_weft._tcp.svc.test",
		records: []string{"svc.test. 60 IN A 10.0.0.1"},
		want:    nil,
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			z := dnsNewZone(t, c.records...)
			z.noChase = c.noChase
			r := dnsNew(t, c.target, z, resolve.DNSOptions{})
			set, v, err := r.Resolve(testCtx(t), nil)
			if err != nil {
				t.Fatalf("Resolve(nil): %v", err)
			}
			if v == nil {
				t.Fatal("Resolve(nil) returned a nil version")
			}
			wantSet(t, "Resolve(nil)", set, dnsTCP(c.want...))
		})
	}
}

func TestDNSEndpointWrapper(t *testing.T) {
	z := dnsNewZone(t, "svc.test. 60 IN A 10.0.0.1", "svc.test. 60 IN A 10.0.0.2", "svc.test. 60 IN A 10.0.0.3")
	cfg := &tls.Config{ServerName: "svc.test"}
	r := dnsNew(t, "svc.test:443", z, resolve.DNSOptions{Endpoint: func(addr string) endpoint.Endpoint {
		if strings.HasPrefix(addr, "10.0.0.2:") {
			return nil // left out
		}
		return endpoint.MTLS(cfg, endpoint.TCP(addr))
	}})
	set, _, err := r.Resolve(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := addrs(set), []string{"mtls+tcp://10.0.0.1:443", "mtls+tcp://10.0.0.3:443"}; !slices.Equal(got, want) {
		t.Fatalf("set %q, want %q", got, want)
	}
}

func TestDNSMalformedChains(t *testing.T) {
	for _, noChase := range []bool{false, true} {
		z := dnsNewZone(t, "a.test. 60 IN CNAME b.test.", "b.test. 60 IN CNAME a.test.")
		z.noChase = noChase
		r := dnsNew(t, "a.test:80", z, resolve.DNSOptions{})
		_, _, err := r.Resolve(testCtx(t), nil)
		var de *resolve.DNSError
		if !errors.Is(err, resolve.ErrLookup) || !errors.As(err, &de) || !strings.Contains(err.Error(), "CNAME loop") {
			t.Errorf("CNAME loop (server follows: %v): Resolve error = %v, want a DNSError about a CNAME loop", !noChase, err)
		}
	}

	var long []string
	for i := range 40 {
		long = append(long, fmt.Sprintf("c%d.test. 60 IN CNAME c%d.test.", i, i+1))
	}
	z := dnsNewZone(t, append(long, "c40.test. 60 IN A 10.0.0.1")...)
	z.noChase = true
	r := dnsNew(t, "c0.test:80", z, resolve.DNSOptions{})
	if _, _, err := r.Resolve(testCtx(t), nil); !errors.Is(err, resolve.ErrLookup) {
		t.Errorf("a chain of 40 CNAME records: Resolve error = %v, want ErrLookup", err)
	}
	if n := z.count(0); n > 20 {
		t.Errorf("a chain of 40 CNAME records took %d queries; the chain must be bounded", n)
	}
}

// TestDNSRefreshAtClampedTTL checks that a lookup is repeated exactly when the smallest TTL of
// the records it used expires, clamped to [MinTTL, MaxTTL].
func TestDNSRefreshAtClampedTTL(t *testing.T) {
	cases := []struct {
		name    string
		target  string
		records []string
		negTTL  uint32
		opts    resolve.DNSOptions
		want    time.Duration
	}{
		{"TTL 30s", "svc.test:80", []string{"svc.test. 30 IN A 10.0.0.1", "svc.test. 30 IN AAAA ::1"}, 3600, resolve.DNSOptions{}, 30 * time.Second},
		{"TTL 0 is MinTTL", "svc.test:80", []string{"svc.test. 0 IN A 10.0.0.1", "svc.test. 0 IN AAAA ::1"}, 3600, resolve.DNSOptions{}, time.Second},
		{"TTL 0 with MinTTL 5s", "svc.test:80", []string{"svc.test. 0 IN A 10.0.0.1"}, 3600, resolve.DNSOptions{MinTTL: 5 * time.Second}, 5 * time.Second},
		{"TTL 1 day is MaxTTL", "svc.test:80", []string{"svc.test. 86400 IN A 10.0.0.1", "svc.test. 86400 IN AAAA ::1"}, 3600, resolve.DNSOptions{}, 5 * time.Minute},
		{"TTL 1 day with MaxTTL 2h", "svc.test:80", []string{"svc.test. 86400 IN A 10.0.0.1", "svc.test. 86400 IN AAAA ::1"}, 3600, resolve.DNSOptions{MaxTTL: 2 * time.Hour}, 2 * time.Hour},
		{"smallest of A and AAAA", "svc.test:80", []string{"svc.test. 30 IN A 10.0.0.1", "svc.test. 20 IN AAAA ::1", "svc.test. 40 IN A 10.0.0.2"}, 3600, resolve.DNSOptions{}, 20 * time.Second},
		{"no AAAA: the negative TTL counts", "svc.test:80", []string{"svc.test. 300 IN A 10.0.0.1"}, 45, resolve.DNSOptions{}, 45 * time.Second},
		{"NXDOMAIN: the negative TTL", "svc.test:80", nil, 45, resolve.DNSOptions{}, 45 * time.Second},
		{"CNAME TTL counts", "www.test:80", []string{"www.test. 12 IN CNAME svc.test.", "svc.test. 300 IN A 10.0.0.1", "svc.test. 300 IN AAAA ::1"}, 3600, resolve.DNSOptions{}, 12 * time.Second},
		{"SRV: smallest of SRV and targets", "_w._tcp.svc.test", []string{
			"_w._tcp.svc.test. 100 IN SRV 0 0 80 a.svc.test.",
			"_w._tcp.svc.test. 100 IN SRV 0 0 80 b.svc.test.",
			"a.svc.test. 90 IN A 10.0.0.1", "a.svc.test. 90 IN AAAA ::1",
			"b.svc.test. 40 IN A 10.0.0.2", "b.svc.test. 60 IN AAAA ::2",
		}, 3600, resolve.DNSOptions{}, 40 * time.Second},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				z := dnsNewZone(t, c.records...)
				z.negTTL = c.negTTL
				r := dnsNew(t, c.target, z, c.opts)
				t0 := time.Now()
				set, v := resolveAtOnce(t, r, nil)
				first := z.count(0)
				ctx, cancel := context.WithTimeout(t.Context(), 24*time.Hour)
				defer cancel()
				ch := goResolve(ctx, r, v)

				time.Sleep(c.want - time.Millisecond)
				synctest.Wait()
				if n := z.count(0); n != first {
					t.Fatalf("asked again %v after the first lookup, before the refresh at %v", time.Since(t0), c.want)
				}
				time.Sleep(time.Millisecond)
				synctest.Wait()
				again := z.queries(0)[first:]
				if len(again) != first {
					t.Fatalf("%d queries at the refresh time %v, want %d (a repeat of the first lookup)", len(again), c.want, first)
				}
				for _, q := range again {
					if d := q.at.Sub(t0); d != c.want {
						t.Fatalf("query for %s at %v, want at %v", q.name, d, c.want)
					}
				}
				// The answer did not change: Resolve keeps blocking.
				dnsBlocked(t, "after an unchanged refresh", ch)
				set2, v2 := resolveAtOnce(t, r, nil)
				wantSet(t, "Resolve(nil) after an unchanged refresh", set2, set)
				if *v2 != *v {
					t.Fatalf("version %q after an unchanged refresh, want %q", v2.Opaque, v.Opaque)
				}
				dnsStop(t, cancel, ch)
			})
		})
	}
}

// TestDNSChangeWakesResolve follows a name through unchanged and changed answers.
func TestDNSChangeWakesResolve(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t, "svc.test. 10 IN A 10.0.0.1", "svc.test. 10 IN A 10.0.0.2")
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{})
		t0 := time.Now()
		set1, v1 := resolveAtOnce(t, r, nil)
		wantSet(t, "first", set1, dnsTCP("10.0.0.1:80", "10.0.0.2:80"))
		ctx := dnsCtx(t)
		ch := goResolve(ctx, r, v1)

		// The same addresses in another order, and repeated: the same set, still blocked.
		z.set(t, "svc.test. 10 IN A 10.0.0.2", "svc.test. 10 IN A 10.0.0.1", "svc.test. 10 IN A 10.0.0.2")
		for i := range 3 {
			time.Sleep(10 * time.Second)
			synctest.Wait()
			dnsBlocked(t, fmt.Sprintf("unchanged refresh %d", i), ch)
		}
		if n := z.count(dns.TypeA); n != 4 {
			t.Fatalf("%d A queries after 30s with TTL 10s, want 4", n)
		}

		// A changed set wakes it, at the next refresh.
		z.set(t, "svc.test. 10 IN A 10.0.0.3", "svc.test. 10 IN A 10.0.0.1")
		time.Sleep(10 * time.Second)
		synctest.Wait()
		res := dnsReturned(t, "after a change", ch)
		if res.err != nil {
			t.Fatal(res.err)
		}
		wantSet(t, "after a change", res.set, dnsTCP("10.0.0.1:80", "10.0.0.3:80"))
		if res.v == nil || *res.v == *v1 {
			t.Fatalf("version after a change = %v, want one other than %q", res.v, v1.Opaque)
		}
		if d := time.Since(t0); d != 40*time.Second {
			t.Fatalf("returned after %v, want at the refresh at 40s", d)
		}

		// A stale version, and a foreign one, get the current set at once.
		for _, old := range []*resolve.Version{v1, {Opaque: "foreign"}} {
			set, v := resolveAtOnce(t, r, old)
			wantSet(t, "Resolve(old)", set, res.set)
			if *v != *res.v {
				t.Fatalf("Resolve(%q) version = %q, want the current %q", old.Opaque, v.Opaque, res.v.Opaque)
			}
		}
	})
}

// TestDNSErrorsBackOff checks that failed lookups keep the set, are retried with growing
// delays, and that the first success after them is reported with the same version.
func TestDNSErrorsBackOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t, "svc.test. 10 IN A 10.0.0.1")
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{
			Backoff: resolve.Backoff{Base: time.Second, Factor: 2, Jitter: -1, Max: 5 * time.Second},
		})
		t0 := time.Now()
		set1, v1 := resolveAtOnce(t, r, nil)
		ctx := dnsCtx(t)
		z.update(func(z *dnsZone) { z.rcode = dns.RcodeServerFailure })
		at := t0
		for i, d := range []time.Duration{10 * time.Second, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second} {
			at = at.Add(d)
			before := z.count(dns.TypeA)
			_, v, err := r.Resolve(ctx, v1)
			var de *resolve.DNSError
			if !errors.As(err, &de) || !errors.Is(err, resolve.ErrLookup) || de.Rcode != dns.RcodeServerFailure || v != nil {
				t.Fatalf("failure %d: Resolve = %v, %v; want a DNSError with SERVFAIL", i, v, err)
			}
			if now := time.Now(); !now.Equal(at) {
				t.Fatalf("failure %d at %v, want at %v", i, now.Sub(t0), at.Sub(t0))
			}
			if n := z.count(dns.TypeA) - before; n != 1 {
				t.Fatalf("failure %d took %d queries, want 1", i, n)
			}
			// The set is kept.
			set, v := resolveAtOnce(t, r, nil)
			wantSet(t, "Resolve(nil) while failing", set, set1)
			if *v != *v1 {
				t.Fatalf("version %q while failing, want %q", v.Opaque, v1.Opaque)
			}
		}

		// The next success, unchanged, returns the same version at the next retry.
		z.update(func(z *dnsZone) { z.rcode = 0 })
		set, v, err := r.Resolve(ctx, v1)
		if err != nil || v == nil || *v != *v1 {
			t.Fatalf("first success after failures = %v, %v; want the same version %q", v, err, v1.Opaque)
		}
		wantSet(t, "first success after failures", set, set1)
		at = at.Add(5 * time.Second)
		if now := time.Now(); !now.Equal(at) {
			t.Fatalf("first success at %v, want at %v", now.Sub(t0), at.Sub(t0))
		}

		// Back to normal: the next Resolve blocks until the TTL, then keeps blocking.
		cctx, cancel := context.WithCancel(ctx)
		ch := goResolve(cctx, r, v1)
		time.Sleep(10*time.Second - time.Millisecond)
		synctest.Wait()
		before := z.count(dns.TypeA)
		time.Sleep(time.Millisecond)
		synctest.Wait()
		if n := z.count(dns.TypeA) - before; n != 1 {
			t.Fatalf("%d queries at the TTL after recovering, want 1", n)
		}
		dnsBlocked(t, "after recovering", ch)
		dnsStop(t, cancel, ch)
	})
}

func TestDNSBackoffJitter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t)
		z.update(func(z *dnsZone) { z.rcode = dns.RcodeRefused })
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{})
		ctx := dnsCtx(t)
		var times []time.Time
		for range 6 {
			if _, _, err := r.Resolve(ctx, nil); !errors.Is(err, resolve.ErrLookup) {
				t.Fatalf("Resolve = %v, want ErrLookup", err)
			}
			times = append(times, time.Now())
		}
		// The default backoff: 1s × 1.6 per failure, ±20 %.
		nominal := time.Second
		var prev time.Duration
		for i := 1; i < len(times); i++ {
			d := times[i].Sub(times[i-1])
			lo, hi := time.Duration(float64(nominal)*0.8), time.Duration(float64(nominal)*1.2)
			if d < lo || d > hi || d <= prev {
				t.Fatalf("delay %d = %v, want within [%v, %v] and longer than the previous %v", i, d, lo, hi, prev)
			}
			prev = d
			nominal = time.Duration(float64(nominal) * 1.6)
		}
	})
}

// TestDNSErrorKinds checks that every kind of failed lookup keeps the set and returns a
// DNSError that says what went wrong.
func TestDNSErrorKinds(t *testing.T) {
	errNet := errors.New("network is down")
	cases := []struct {
		name  string
		fault func(z *dnsZone)
		check func(t *testing.T, err error, de *resolve.DNSError)
		after time.Duration // when the error arrives, after the TTL expiry
	}{
		{"SERVFAIL", func(z *dnsZone) { z.rcode = dns.RcodeServerFailure }, func(t *testing.T, _ error, de *resolve.DNSError) {
			if de.Rcode != dns.RcodeServerFailure {
				t.Errorf("Rcode = %d, want SERVFAIL", de.Rcode)
			}
		}, 0},
		{"REFUSED", func(z *dnsZone) { z.rcode = dns.RcodeRefused }, func(t *testing.T, _ error, de *resolve.DNSError) {
			if de.Rcode != dns.RcodeRefused || !strings.Contains(de.Error(), "REFUSED") {
				t.Errorf("error %q, Rcode %d; want REFUSED", de, de.Rcode)
			}
		}, 0},
		{"timeout", func(z *dnsZone) { z.hang = true }, func(t *testing.T, err error, de *resolve.DNSError) {
			if !errors.Is(err, context.DeadlineExceeded) || de.Rcode != -1 {
				t.Errorf("error %v, Rcode %d; want a deadline error without Rcode", err, de.Rcode)
			}
		}, 3 * time.Second},
		{"network error", func(z *dnsZone) { z.hookErr = errNet }, func(t *testing.T, err error, _ *resolve.DNSError) {
			if !errors.Is(err, errNet) {
				t.Errorf("error %v, want one wrapping %v", err, errNet)
			}
		}, 0},
		{"nil reply", dnsMangle(func(*dns.Msg) *dns.Msg { return nil }), nil, 0},
		{"wrong id", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Id++; return m }), nil, 0},
		{"not a response", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Response = false; return m }), nil, 0},
		{"wrong question", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Question[0].Name = "evil.test."; return m }), nil, 0},
		{"wrong type", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Question[0].Qtype = dns.TypeMX; return m }), nil, 0},
		{"no question", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Question = nil; return m }), nil, 0},
		{"truncated", dnsMangle(func(m *dns.Msg) *dns.Msg { m.Truncated = true; return m }), nil, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				z := dnsNewZone(t, "svc.test. 10 IN A 10.0.0.1")
				r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{
					Timeout: 3 * time.Second,
					Backoff: resolve.Backoff{Base: time.Second, Jitter: -1},
				})
				t0 := time.Now()
				set1, v1 := resolveAtOnce(t, r, nil)
				ctx := dnsCtx(t)
				z.update(c.fault)
				_, v, err := r.Resolve(ctx, v1)
				var de *resolve.DNSError
				if !errors.As(err, &de) || !errors.Is(err, resolve.ErrLookup) || v != nil {
					t.Fatalf("Resolve = %v, %v; want a DNSError", v, err)
				}
				if de.Name != "svc.test." || de.Type != "A" {
					t.Errorf("DNSError names %s %s, want A svc.test.", de.Type, de.Name)
				}
				if !strings.HasPrefix(err.Error(), "resolve: ") {
					t.Errorf("error %q does not start with the package name", err)
				}
				if c.check != nil {
					c.check(t, err, de)
				}
				if d := time.Since(t0); d != 10*time.Second+c.after {
					t.Errorf("error after %v, want %v", d, 10*time.Second+c.after)
				}
				set, v := resolveAtOnce(t, r, nil)
				wantSet(t, "after the failure", set, set1)
				if *v != *v1 {
					t.Fatalf("version %q after the failure, want %q", v.Opaque, v1.Opaque)
				}

				z.update(func(z *dnsZone) { z.rcode, z.hookErr, z.hang, z.mangle = 0, nil, false, nil })
				z.set(t, "svc.test. 10 IN A 10.0.0.2")
				set, v, err = r.Resolve(ctx, v1)
				if err != nil {
					t.Fatalf("Resolve after the fault: %v", err)
				}
				wantSet(t, "after the fault", set, dnsTCP("10.0.0.2:80"))
				if *v == *v1 {
					t.Fatalf("version %q after a change, want a new one", v.Opaque)
				}
			})
		})
	}
}

func TestDNSFirstLookupFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t, "svc.test. 10 IN A 10.0.0.1")
		z.update(func(z *dnsZone) { z.rcode = dns.RcodeServerFailure })
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{Backoff: resolve.Backoff{Base: time.Second, Factor: 2, Jitter: -1}})
		t0 := time.Now()
		if set, v, err := r.Resolve(dnsCtx(t), nil); !errors.Is(err, resolve.ErrLookup) || set != nil || v != nil {
			t.Fatalf("first Resolve(nil) = %q, %v, %v; want ErrLookup", addrs(set), v, err)
		}
		if d := time.Since(t0); d != 0 {
			t.Fatalf("first lookup took %v, want none", d)
		}

		// A caller that gives up before the backoff ends gets its ctx's error, without a query.
		short, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		defer cancel()
		if _, _, err := r.Resolve(short, nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Resolve(nil) with a short ctx = %v, want context.DeadlineExceeded", err)
		}
		if n := z.count(dns.TypeA); n != 1 {
			t.Fatalf("%d queries within the backoff, want 1", n)
		}

		// The next Resolve(nil) waits out the backoff and then asks.
		if _, _, err := r.Resolve(dnsCtx(t), nil); !errors.Is(err, resolve.ErrLookup) {
			t.Fatalf("second Resolve(nil) = %v, want ErrLookup", err)
		}
		if d := time.Since(t0); d != time.Second {
			t.Fatalf("second lookup at %v, want at 1s", d)
		}
		z.update(func(z *dnsZone) { z.rcode = 0 })
		set, v, err := r.Resolve(dnsCtx(t), nil)
		if err != nil || v == nil {
			t.Fatalf("third Resolve(nil) = %v, %v; want a set", v, err)
		}
		wantSet(t, "third Resolve(nil)", set, dnsTCP("10.0.0.1:80"))
		if d := time.Since(t0); d != 3*time.Second {
			t.Fatalf("third lookup at %v, want at 3s", d)
		}
	})
}

// TestDNSEmptyAnswers checks that an empty answer is a set of its own, reported at once the
// first time but replacing a non-empty set only when the next lookup confirms it.
func TestDNSEmptyAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t)
		z.negTTL = 30
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{MinTTL: 2 * time.Second})
		t0 := time.Now()
		set, v0 := resolveAtOnce(t, r, nil)
		if len(set) != 0 {
			t.Fatalf("NXDOMAIN: set %q, want empty", addrs(set))
		}
		ctx := dnsCtx(t)

		// The name appears: the Resolve blocked on the empty set wakes at the negative TTL.
		ch := goResolve(ctx, r, v0)
		z.set(t, "svc.test. 10 IN A 10.0.0.1", "svc.test. 10 IN AAAA ::1")
		time.Sleep(30 * time.Second)
		synctest.Wait()
		res := dnsReturned(t, "name appears", ch)
		if res.err != nil {
			t.Fatal(res.err)
		}
		wantSet(t, "name appears", res.set, dnsTCP("10.0.0.1:80", "[::1]:80"))
		v1 := res.v

		// One empty answer, gone by the next lookup: nothing changes.
		ch = goResolve(ctx, r, v1)
		z.set(t)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		dnsBlocked(t, "one empty answer", ch)
		z.set(t, "svc.test. 10 IN A 10.0.0.1", "svc.test. 10 IN AAAA ::1")
		time.Sleep(2 * time.Second) // MinTTL: the confirming lookup finds the name again.
		synctest.Wait()
		dnsBlocked(t, "empty answer not confirmed", ch)
		if n := z.count(dns.TypeA); n != 4 {
			t.Fatalf("%d A queries, want 4 (the confirming lookup after MinTTL)", n)
		}

		// An empty answer that the next lookup confirms empties the set.
		time.Sleep(10 * time.Second)
		synctest.Wait()
		z.set(t, "svc.test. 10 IN TXT \"no addresses\"") // NODATA this time
		time.Sleep(10 * time.Second)
		synctest.Wait()
		dnsBlocked(t, "first empty answer", ch)
		time.Sleep(2*time.Second - time.Millisecond)
		synctest.Wait()
		dnsBlocked(t, "before the confirming lookup", ch)
		time.Sleep(time.Millisecond)
		synctest.Wait()
		res = dnsReturned(t, "confirmed empty answer", ch)
		if res.err != nil || len(res.set) != 0 || res.v == nil || *res.v == *v1 {
			t.Fatalf("confirmed empty answer: Resolve = %q, %v, %v; want an empty set with a new version", addrs(res.set), res.v, res.err)
		}
		if d := time.Since(t0); d != 64*time.Second {
			t.Fatalf("empty set reported at %v, want 64s", d)
		}
	})
}

func TestDNSCancelBlockedResolve(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t, "svc.test. 10 IN A 10.0.0.1")
		r := dnsNew(t, "svc.test:80", z, resolve.DNSOptions{})
		_, v1 := resolveAtOnce(t, r, nil)

		// Waiting for the TTL.
		ctx, cancel := context.WithCancel(dnsCtx(t))
		ch := goResolve(ctx, r, v1)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		start := time.Now()
		cancel()
		synctest.Wait()
		res := dnsReturned(t, "cancelled while waiting", ch)
		if !errors.Is(res.err, context.Canceled) || res.v != nil || res.set != nil {
			t.Fatalf("cancelled Resolve = %q, %v, %v; want context.Canceled", addrs(res.set), res.v, res.err)
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("cancelled Resolve returned after %v, want at once", d)
		}

		// Waiting in a query: the caller that runs the lookup gives up at once, and a caller
		// that shares it runs it again.
		time.Sleep(10 * time.Second) // the refresh is due
		z.hold()
		ctxA, cancelA := context.WithCancel(dnsCtx(t))
		defer cancelA()
		chA := goResolve(ctxA, r, v1)
		synctest.Wait()
		chB := goResolve(dnsCtx(t), r, v1)
		synctest.Wait()
		if n := z.count(dns.TypeA); n != 2 {
			t.Fatalf("%d A queries, want 2 (one in progress)", n)
		}
		cancelA()
		synctest.Wait()
		res = dnsReturned(t, "cancelled in a query", chA)
		if !errors.Is(res.err, context.Canceled) {
			t.Fatalf("Resolve cancelled in a query = %v, want context.Canceled", res.err)
		}
		dnsBlocked(t, "sharing a cancelled lookup", chB)
		if n := z.count(dns.TypeA); n != 3 {
			t.Fatalf("%d A queries, want 3 (the lookup started again)", n)
		}
		z.set(t, "svc.test. 10 IN A 10.0.0.2")
		z.release()
		synctest.Wait()
		res = dnsReturned(t, "after the lookup started again", chB)
		if res.err != nil {
			t.Fatal(res.err)
		}
		wantSet(t, "after the lookup started again", res.set, dnsTCP("10.0.0.2:80"))
		if d := time.Since(start); d != 10*time.Second {
			t.Fatalf("answer at %v after the cancel, want 10s (no backoff for a cancelled lookup)", d)
		}
	})
}

func TestDNSConcurrentResolvesShareLookup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		z := dnsNewZone(t, "_w._tcp.svc.test. 10 IN SRV 0 0 80 a.svc.test.", "a.svc.test. 10 IN A 10.0.0.1")
		r := dnsNew(t, "_w._tcp.svc.test", z, resolve.DNSOptions{})
		set1, v1 := resolveAtOnce(t, r, nil)
		ctx := dnsCtx(t)
		const n = 8
		chs := make([]<-chan result, n)
		for i := range chs {
			chs[i] = goResolve(ctx, r, v1)
		}
		z.hold()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if got := z.count(dns.TypeSRV); got != 2 {
			t.Fatalf("%d SRV queries with %d Resolves waiting, want 2 (one shared lookup in progress)", got, n)
		}
		// A Resolve without a version does not wait for the lookup.
		set, v := resolveAtOnce(t, r, nil)
		wantSet(t, "Resolve(nil) during a lookup", set, set1)
		if *v != *v1 {
			t.Fatalf("Resolve(nil) during a lookup: version %q, want %q", v.Opaque, v1.Opaque)
		}

		z.set(t, "_w._tcp.svc.test. 10 IN SRV 0 0 80 a.svc.test.", "_w._tcp.svc.test. 10 IN SRV 0 0 81 a.svc.test.", "a.svc.test. 10 IN A 10.0.0.1")
		z.release()
		synctest.Wait()
		var v2 *resolve.Version
		for i, ch := range chs {
			res := dnsReturned(t, fmt.Sprintf("Resolve %d", i), ch)
			if res.err != nil {
				t.Fatal(res.err)
			}
			wantSet(t, fmt.Sprintf("Resolve %d", i), res.set, dnsTCP("10.0.0.1:80", "10.0.0.1:81"))
			if v2 == nil {
				v2 = res.v
			}
			if *res.v != *v2 || *res.v == *v1 {
				t.Fatalf("Resolve %d: version %q, want %q like the others and not %q", i, res.v.Opaque, v2.Opaque, v1.Opaque)
			}
		}
		for _, qt := range []uint16{dns.TypeSRV, dns.TypeA, dns.TypeAAAA} {
			if got := z.count(qt); got != 2 {
				t.Errorf("%d %s queries for two lookups, want 2", got, dns.TypeToString[qt])
			}
		}
	})
}

// dnsServe serves z over UDP and TCP on one port of 127.0.0.1 until the test ends, and
// returns its address.
func dnsServe(t *testing.T, z *dnsZone) string {
	t.Helper()
	var (
		pc net.PacketConn
		l  net.Listener
	)
	for attempt := 0; ; attempt++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if attempt == 10 {
			t.Fatalf("no port free for both UDP and TCP: %v", err)
		}
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		z.record(req, w.LocalAddr().Network())
		_ = w.WriteMsg(z.reply(req, w.LocalAddr().Network()))
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: l, Handler: handler}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		done := make(chan error, 1)
		go func() { done <- srv.ActivateAndServe() }()
		select {
		case <-started:
		case err := <-done:
			t.Fatalf("DNS server did not start: %v", err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), dnsBound)
			defer cancel()
			if err := srv.ShutdownContext(ctx); err != nil {
				t.Errorf("DNS server shutdown: %v", err)
			}
			select {
			case <-done:
			case <-ctx.Done():
				t.Errorf("DNS server did not stop within %v", dnsBound)
			}
		})
	}
	return pc.LocalAddr().String()
}

// dnsBlackHole returns the address of a UDP socket that never answers.
func dnsBlackHole(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

// dnsBoundCtx returns a context for work over real sockets that must not hang.
func dnsBoundCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), dnsBound)
	t.Cleanup(cancel)
	return ctx
}

// TestDNSOverNetwork resolves names of every form from a DNS server over UDP and TCP.
func TestDNSOverNetwork(t *testing.T) {
	z := dnsNewZone(t,
		"svc.test. 60 IN A 127.0.0.2",
		"svc.test. 60 IN A 127.0.0.1",
		"svc.test. 60 IN AAAA ::1",
		"svc.test. 60 IN A 127.0.0.1",
		"www.test. 60 IN CNAME svc.test.",
		"_weft._tcp.svc.test. 60 IN SRV 0 0 7000 www.test.",
		"_weft._tcp.svc.test. 60 IN SRV 0 0 7001 v4.test.",
		"v4.test. 60 IN A 127.0.0.3",
	)
	server := dnsServe(t, z)
	for _, network := range []string{"udp", "tcp"} {
		for _, c := range []struct {
			target string
			want   []string
		}{
			{"svc.test:8000", []string{"127.0.0.1:8000", "127.0.0.2:8000", "[::1]:8000"}},
			{"www.test:8000", []string{"127.0.0.1:8000", "127.0.0.2:8000", "[::1]:8000"}},
			{"_weft._tcp.svc.test", []string{"127.0.0.1:7000", "127.0.0.2:7000", "127.0.0.3:7001", "[::1]:7000"}},
			{"missing.test:80", nil},
		} {
			before := len(z.queries(0))
			r, err := resolve.DNS(c.target, resolve.DNSOptions{Servers: []string{server}, Net: network})
			if err != nil {
				t.Fatal(err)
			}
			set, v, err := r.Resolve(dnsBoundCtx(t), nil)
			if err != nil || v == nil {
				t.Fatalf("%s over %s: Resolve(nil) = %v, %v", c.target, network, v, err)
			}
			wantSet(t, c.target+" over "+network, set, dnsTCP(c.want...))
			for _, q := range z.queries(0)[before:] {
				if q.via != network {
					t.Fatalf("%s over %s: a query arrived over %s", c.target, network, q.via)
				}
			}
		}
	}
}

func TestDNSOverNetworkFollowsChanges(t *testing.T) {
	z := dnsNewZone(t, "svc.test. 0 IN A 127.0.0.1")
	server := dnsServe(t, z)
	r, err := resolve.DNS("svc.test:80", resolve.DNSOptions{
		Servers: []string{server},
		MinTTL:  20 * time.Millisecond,
		Backoff: resolve.Backoff{Base: 20 * time.Millisecond, Max: 20 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := dnsBoundCtx(t)
	set, v1, err := r.Resolve(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "first", set, dnsTCP("127.0.0.1:80"))

	// A change is picked up.
	z.set(t, "svc.test. 0 IN A 127.0.0.1", "svc.test. 0 IN A 127.0.0.2")
	set, v2, err := r.Resolve(ctx, v1)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after a change", set, dnsTCP("127.0.0.1:80", "127.0.0.2:80"))
	if *v2 == *v1 {
		t.Fatalf("version %q after a change, want a new one", v2.Opaque)
	}

	// SERVFAIL keeps the set; the next success is reported; a change after it is picked up.
	z.update(func(z *dnsZone) { z.rcode = dns.RcodeServerFailure })
	_, _, err = r.Resolve(ctx, v2)
	var de *resolve.DNSError
	if !errors.As(err, &de) || de.Rcode != dns.RcodeServerFailure {
		t.Fatalf("Resolve during SERVFAIL = %v, want a DNSError with SERVFAIL", err)
	}
	set, v, err := r.Resolve(ctx, nil)
	if err != nil || *v != *v2 {
		t.Fatalf("Resolve(nil) during SERVFAIL = %v, %v; want the last good set", v, err)
	}
	wantSet(t, "during SERVFAIL", set, dnsTCP("127.0.0.1:80", "127.0.0.2:80"))
	z.update(func(z *dnsZone) { z.rcode = 0 })
	for {
		// More failures may be reported until a lookup sees the server answer again.
		set, v, err = r.Resolve(ctx, v2)
		if !errors.Is(err, resolve.ErrLookup) {
			break
		}
	}
	if err != nil || *v != *v2 {
		t.Fatalf("Resolve after SERVFAIL = %v, %v; want the same version %q", v, err, v2.Opaque)
	}
	wantSet(t, "after SERVFAIL", set, dnsTCP("127.0.0.1:80", "127.0.0.2:80"))
	z.set(t, "svc.test. 0 IN A 127.0.0.3")
	set, v3, err := r.Resolve(ctx, v2)
	if err != nil || *v3 == *v2 {
		t.Fatalf("Resolve after a change = %v, %v; want a new version", v3, err)
	}
	wantSet(t, "after a change", set, dnsTCP("127.0.0.3:80"))
}

func TestDNSOverNetworkTruncatedFallsBackToTCP(t *testing.T) {
	z := dnsNewZone(t, "svc.test. 60 IN A 127.0.0.1", "svc.test. 60 IN A 127.0.0.2")
	z.truncUDP = true
	server := dnsServe(t, z)
	r, err := resolve.DNS("svc.test:80", resolve.DNSOptions{Servers: []string{server}})
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := r.Resolve(dnsBoundCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "after truncation", set, dnsTCP("127.0.0.1:80", "127.0.0.2:80"))
	var vias []string
	for _, q := range z.queries(dns.TypeA) {
		vias = append(vias, q.via)
	}
	if want := []string{"udp", "tcp"}; !slices.Equal(vias, want) {
		t.Fatalf("A queries arrived over %q, want %q", vias, want)
	}
}

func TestDNSOverNetworkServersInTurn(t *testing.T) {
	good := dnsNewZone(t, "svc.test. 60 IN A 127.0.0.1")
	refusing := dnsNewZone(t)
	refusing.rcode = dns.RcodeRefused
	goodAddr, refusingAddr, hole := dnsServe(t, good), dnsServe(t, refusing), dnsBlackHole(t)

	r, err := resolve.DNS("svc.test:80", resolve.DNSOptions{
		Servers: []string{hole, refusingAddr, goodAddr},
		Timeout: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := r.Resolve(dnsBoundCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	wantSet(t, "from the third server", set, dnsTCP("127.0.0.1:80"))
	if refusing.count(dns.TypeA) != 1 || good.count(dns.TypeA) != 1 {
		t.Fatalf("A queries: %d to the refusing server, %d to the good one; want 1 each", refusing.count(dns.TypeA), good.count(dns.TypeA))
	}

	// When no server answers, the error says why.
	r, err = resolve.DNS("svc.test:80", resolve.DNSOptions{Servers: []string{hole, dnsBlackHole(t)}, Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = r.Resolve(dnsBoundCtx(t), nil)
	if !errors.Is(err, resolve.ErrLookup) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), hole) {
		t.Fatalf("no server answers: Resolve error = %v, want ErrLookup with a timeout naming %s", err, hole)
	}
	r, err = resolve.DNS("svc.test:80", resolve.DNSOptions{Servers: []string{hole, refusingAddr}, Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = r.Resolve(dnsBoundCtx(t), nil)
	var de *resolve.DNSError
	if !errors.As(err, &de) || de.Rcode != dns.RcodeRefused {
		t.Fatalf("only a refusing server answers: Resolve error = %v, want a DNSError with REFUSED", err)
	}
}

// TestDNSOverNetworkCancel cancels a Resolve whose query a server received and will never
// answer, with a Timeout that would wait an hour.
func TestDNSOverNetworkCancel(t *testing.T) {
	for _, network := range []string{"udp", "tcp"} {
		var (
			server  string
			arrived func() error // returns when the query has arrived
		)
		if network == "udp" {
			pc, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { pc.Close() })
			server = pc.LocalAddr().String()
			arrived = func() error {
				_ = pc.SetReadDeadline(time.Now().Add(dnsBound))
				_, _, err := pc.ReadFrom(make([]byte, 2048))
				return err
			}
		} else {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			server = l.Addr().String()
			arrived = func() error {
				c, err := l.Accept()
				if err != nil {
					return err
				}
				t.Cleanup(func() { c.Close() })
				_ = c.SetReadDeadline(time.Now().Add(dnsBound))
				_, err = c.Read(make([]byte, 2))
				return err
			}
		}
		r, err := resolve.DNS("svc.test:80", resolve.DNSOptions{Servers: []string{server}, Net: network, Timeout: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(dnsBoundCtx(t))
		ch := goResolve(ctx, r, nil)
		if err := arrived(); err != nil {
			cancel()
			<-ch
			t.Fatalf("over %s: the query did not arrive: %v", network, err)
		}
		cancel()
		select {
		case res := <-ch:
			if !errors.Is(res.err, context.Canceled) {
				t.Fatalf("over %s: cancelled Resolve = %v, want context.Canceled", network, res.err)
			}
		case <-time.After(dnsBound):
			t.Fatalf("over %s: cancelled Resolve did not return within %v", network, dnsBound)
		}
	}
}

// dnsCallServer serves a "Name" method that returns name on a TCP port of 127.0.0.1 until the
// test ends, and returns the port.
func dnsCallServer(t *testing.T, name string) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hm := &call.HandlerMap{}
	hm.Set("dnstest", "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	done := make(chan error, 1)
	opts := call.ServerOptions{Logger: slog.New(slog.DiscardHandler), DrainTimeout: -1}
	go func() { done <- call.Serve(ctx, call.NetListener(l, hm), opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(dnsBound):
			t.Errorf("server %s did not stop within %v", name, dnsBound)
		}
	})
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// TestDNSConnectFollowsRecords connects through a DNS resolver to the server an SRV record
// names, then moves the record to a second server.
func TestDNSConnectFollowsRecords(t *testing.T) {
	one, two := dnsCallServer(t, "one"), dnsCallServer(t, "two")
	srv := func(port uint16) string {
		return "_weft._tcp.e2e.test. 0 IN SRV 0 0 " + strconv.Itoa(int(port)) + " host.e2e.test."
	}
	z := dnsNewZone(t, srv(one), "host.e2e.test. 0 IN A 127.0.0.1")
	server := dnsServe(t, z)
	r, err := resolve.DNS("_weft._tcp.e2e.test", resolve.DNSOptions{Servers: []string{server}, MinTTL: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := dnsBoundCtx(t)
	conn, err := call.Connect(ctx, r, call.ClientOptions{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key := call.MakeMethodKey("dnstest", "Name")
	out, err := conn.Call(ctx, key, nil, call.CallOptions{})
	if err != nil || string(out) != "one" {
		t.Fatalf("first call = %q, %v; want the reply of server one", out, err)
	}

	z.set(t, srv(two), "host.e2e.test. 0 IN A 127.0.0.1")
	addrTwo := "tcp://127.0.0.1:" + strconv.Itoa(int(two))
	insp, ok := conn.(call.Inspectable)
	if !ok {
		t.Fatal("the Connection of call.Connect is not Inspectable")
	}
	for {
		st := insp.Status()
		var resolved []string
		ready := false
		for _, e := range st.Endpoints {
			if e.State != call.EndpointDraining {
				resolved = append(resolved, e.Address)
			}
			ready = ready || e.Address == addrTwo && e.State == call.EndpointReady
		}
		if ready && slices.Equal(resolved, []string{addrTwo}) {
			break
		}
		select {
		case <-st.Changed:
		case <-ctx.Done():
			t.Fatalf("the Connection did not move to server two within %v: %+v", dnsBound, st.Endpoints)
		}
	}
	for i := range 5 {
		out, err := conn.Call(ctx, key, nil, call.CallOptions{})
		if err != nil || string(out) != "two" {
			t.Fatalf("call %d after the move = %q, %v; want the reply of server two", i, out, err)
		}
	}
}
