package resolve

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/weftrpc/weft/endpoint"
)

// ErrBadTarget is returned by [DNS] for a target it cannot resolve. Test for it with
// errors.Is.
var ErrBadTarget = errors.New("resolve: bad target")

// ErrBadOptions is returned by [DNS] for invalid options, and when no DNS server is
// configured. Test for it with errors.Is.
var ErrBadOptions = errors.New("resolve: bad options")

// ErrLookup is wrapped by every error a [DNSResolver] returns for a failed lookup (a
// [*DNSError]). Test for it with errors.Is.
var ErrLookup = errors.New("resolve: DNS lookup failed")

// DNSError describes a DNS query that failed: no server gave a usable reply, or the reply
// reported an error. It wraps [ErrLookup] and, if set, Err.
type DNSError struct {
	// Name is the queried name, fully qualified.
	Name string

	// Type is the queried record type: "A", "AAAA" or "SRV".
	Type string

	// Rcode is the response code of the reply that reported the error (for example
	// dns.RcodeServerFailure), or -1 if there was no usable reply.
	Rcode int

	// Err is why there was no usable reply (a timeout, which matches
	// context.DeadlineExceeded; a network error; a malformed or truncated reply; a CNAME
	// loop), or nil if the reply reported Rcode.
	Err error
}

// Error returns a description of the failed query.
func (e *DNSError) Error() string {
	prefix := "resolve: DNS " + e.Type + " query for " + e.Name
	if e.Err != nil {
		return prefix + ": " + e.Err.Error()
	}
	return prefix + ": server replied " + rcodeString(e.Rcode)
}

// Unwrap returns [ErrLookup] and Err, if set.
func (e *DNSError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrLookup, e.Err}
	}
	return []error{ErrLookup}
}

func rcodeString(rcode int) string {
	if s, ok := dns.RcodeToString[rcode]; ok {
		return s
	}
	return "rcode " + strconv.Itoa(rcode)
}

// Backoff is an exponential backoff with jitter: after n consecutive failures the next
// attempt waits Base·Factor^(n-1), capped at Max, spread over ±Jitter of that value. The zero
// value of each field means its default.
type Backoff struct {
	// Base is the delay after the first failure. If zero or negative, 1s.
	Base time.Duration

	// Factor multiplies the delay after every further failure. If less than 1, 1.6.
	Factor float64

	// Jitter spreads each delay uniformly over ±Jitter of its value, so that clients that
	// failed together do not retry together. If zero, 0.2; if negative, no jitter; at most 1.
	Jitter float64

	// Max caps every delay before jitter is applied. If zero or negative, 30s. It is raised
	// to Base if lower.
	Max time.Duration
}

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = time.Second
	}
	if b.Factor < 1 {
		b.Factor = 1.6
	}
	if b.Jitter == 0 {
		b.Jitter = 0.2
	}
	b.Jitter = min(b.Jitter, 1)
	if b.Max <= 0 {
		b.Max = 30 * time.Second
	}
	b.Max = max(b.Max, b.Base)
	return b
}

// delay returns the delay after n ≥ 1 consecutive failures.
//
// REQUIRES: b has its defaults.
func (b Backoff) delay(n int) time.Duration {
	d := min(float64(b.Base)*math.Pow(b.Factor, float64(max(n, 1)-1)), float64(b.Max))
	if b.Jitter > 0 {
		d *= 1 + b.Jitter*(2*rand.Float64()-1)
	}
	return time.Duration(d)
}

// DNSOptions configure a [DNSResolver]. The zero value of each field means its default.
type DNSOptions struct {
	// Servers are the DNS servers to ask, as "ip:port", tried in turn: a server that does
	// not answer within Timeout, answers with an error code other than NXDOMAIN (SERVFAIL,
	// REFUSED, ...) or sends a reply that cannot be parsed is skipped for that query. If empty, the nameservers of ConfigFile;
	// [DNS] fails if there are none.
	Servers []string

	// ConfigFile is the resolv.conf(5) file whose nameservers are used when Servers is
	// empty. Entries that are not IP addresses are skipped. Only its nameservers are used:
	// names are always looked up as given, fully qualified, without search domains. If
	// empty, "/etc/resolv.conf".
	ConfigFile string

	// Net is the transport of queries: "udp" or "tcp". A UDP reply marked truncated is
	// asked again over TCP. If empty, "udp".
	Net string

	// Timeout bounds each query to one server (both attempts, when a truncated UDP reply is
	// asked again over TCP), or each call of Exchange. If zero, 2s. Negative is an error.
	Timeout time.Duration

	// MinTTL and MaxTTL clamp the time until the name is resolved again after a successful
	// lookup, which is otherwise the smallest TTL of the records the lookup used. If zero,
	// MinTTL is 1s and MaxTTL is 5 minutes (or MinTTL, if that is longer). Negative values,
	// and a MinTTL above a MaxTTL that is set, are errors.
	MinTTL, MaxTTL time.Duration

	// Backoff paces lookups after failed ones. The zero value means 1s × 1.6 per failure,
	// ±20 % jitter, at most 30s.
	Backoff Backoff

	// Exchange, if not nil, sends every query instead of the built-in client, and Servers,
	// ConfigFile and Net are not used. It must return the reply to m, or an error; ctx
	// carries Timeout as its deadline. It may be called concurrently.
	Exchange func(ctx context.Context, m *dns.Msg) (*dns.Msg, error)

	// Endpoint makes the endpoint of each resolved "ip:port" address, for example to wrap
	// it with [endpoint.MTLS]. A nil endpoint is left out of the set. If nil, [endpoint.TCP].
	Endpoint func(addr string) endpoint.Endpoint
}

const (
	defaultDNSTimeout = 2 * time.Second
	defaultMinTTL     = time.Second
	defaultMaxTTL     = 5 * time.Minute
	defaultResolvConf = "/etc/resolv.conf"

	// ednsSize is the UDP payload size advertised in queries: large enough for most answers,
	// small enough to avoid IP fragmentation.
	ednsSize = 1232
	// maxCNAMEs bounds the names of one CNAME chain, across queries.
	maxCNAMEs = 16
	// maxSRVTargets bounds the SRV targets of one lookup whose addresses are asked for.
	maxSRVTargets = 64
)

// DNSResolver is a [Resolver] that follows a DNS name as its records change, created by
// [DNS].
//
// # Targets
//
// A "host:port" target resolves to every address of host, its A and AAAA records, each with
// port. A target without a port must name SRV records, "_service._proto.name": it resolves to
// every address of every SRV target, each with that record's port; priorities and weights
// are not used (the balancer spreads the load), and targets "." are left out. CNAME records
// in a reply are followed. A target whose host is an IP address resolves to that address
// alone; its resolver is constant. Names are asked of DNS servers only (not looked up in
// /etc/hosts), fully qualified.
//
// The set is deduplicated and ordered by IP address (IPv4 first) and port, so two lookups
// that find the same addresses give the same set in the same order.
//
// # Refreshing
//
// A DNSResolver has no goroutine of its own and nothing to close: it resolves when asked. The
// first Resolve performs a lookup and returns its answer or its error. A Resolve with the
// current version waits until the answer expires — after the smallest TTL of the records
// the lookup used (for an empty answer, the negative-caching TTL of the zone's SOA record),
// clamped to [DNSOptions.MinTTL, DNSOptions.MaxTTL] — then looks the name up again. A
// changed set (compared without regard to order) gets a new version and is returned; the
// same set keeps its version, and Resolve keeps waiting for the next expiry, until ctx is
// done. A Resolve with a nil version gets the last answer even if it has expired: only
// Resolves with the current version look the name up again. Concurrent Resolves share one
// lookup, whose queries run in the caller that started it; if that caller's ctx ends first,
// another waiting caller starts the lookup again.
//
// # Failures and empty answers
//
// A lookup fails if any of its queries fails: a timeout, a network error, a malformed or
// truncated reply, or a reply with an error code other than NXDOMAIN. The set is kept, every
// Resolve waiting for that lookup returns its error (a [*DNSError]), and no lookup is made
// until [DNSOptions.Backoff] allows. The next lookup that succeeds returns its set even when
// it did not change, with the same version, so that a caller that saw the errors learns that
// the set is good again.
//
// NXDOMAIN, and a reply without records of the type asked for, are answers: the name has no
// addresses. The first lookup's empty answer is returned at once, but an empty answer
// replaces a non-empty set only when it is confirmed by the next lookup, made MinTTL later,
// so that one wrong reply does not take every server away. An empty set means that there are
// no servers: a client fails its calls until the name has addresses again.
type DNSResolver struct {
	target   string
	name     string // fully qualified; "" for an IP literal target
	port     uint16 // the port of a "host:port" target; 0 for SRV
	literal  []endpoint.Endpoint
	opts     DNSOptions
	exchange func(ctx context.Context, m *dns.Msg) (*dns.Msg, error)

	mu sync.Mutex
	// guarded by mu
	have         bool                // a lookup has succeeded
	addrs        []netip.AddrPort    // the current set, sorted
	eps          []endpoint.Endpoint // the current set's endpoints
	version      uint64
	next         time.Time // no lookup starts before
	failures     int       // consecutive failed lookups
	emptyPending bool      // an empty answer waits for confirmation
	flight       *dnsLookup
}

var _ Resolver = (*DNSResolver)(nil)

// dnsLookup is one lookup, shared by the Resolves that wait for it.
type dnsLookup struct {
	done chan struct{} // closed when the fields below are set
	err  error         // the lookup failed
	// abandoned means the caller that ran the lookup gave up; the state did not change.
	abandoned bool
	// recovered means the lookup succeeded after failed ones and the set did not change.
	recovered bool
}

// DNS returns a resolver that follows target, "host:port" or "_service._proto.name" (see
// [DNSResolver]). It checks target and opts, and reads the resolv.conf file if it needs its
// servers, but makes no query. Errors wrap [ErrBadTarget] or [ErrBadOptions].
func DNS(target string, opts DNSOptions) (*DNSResolver, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	r := &DNSResolver{target: target, opts: opts}
	if host, port, err := net.SplitHostPort(target); err == nil {
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("%w %q: port %q is not a number from 1 to 65535", ErrBadTarget, target, port)
		}
		r.port = uint16(p)
		if ip, err := netip.ParseAddr(host); err == nil {
			if ep := opts.Endpoint(netip.AddrPortFrom(ip, r.port).String()); ep != nil {
				r.literal = []endpoint.Endpoint{ep}
			} else {
				r.literal = []endpoint.Endpoint{}
			}
			return r, nil
		}
		if err := checkDomainName(host); err != nil {
			return nil, fmt.Errorf("%w %q: %v", ErrBadTarget, target, err)
		}
		r.name = dns.Fqdn(host)
	} else {
		if strings.ContainsAny(target, ":[]") {
			return nil, fmt.Errorf("%w %q: want host:port (an IPv6 address in brackets), or _service._proto.name", ErrBadTarget, target)
		}
		if err := checkDomainName(target); err != nil {
			return nil, fmt.Errorf("%w %q: %v", ErrBadTarget, target, err)
		}
		labels := strings.Split(target, ".")
		if len(labels) < 3 || len(labels[0]) < 2 || len(labels[1]) < 2 || labels[0][0] != '_' || labels[1][0] != '_' || labels[2] == "" {
			return nil, fmt.Errorf("%w %q: no port; want host:port, or _service._proto.name for an SRV lookup", ErrBadTarget, target)
		}
		r.name = dns.Fqdn(target)
	}
	if opts.Exchange != nil {
		hook, timeout := opts.Exchange, opts.Timeout
		r.exchange = func(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			return hook(ctx, m)
		}
	} else {
		c := &dnsClient{servers: opts.Servers, net: opts.Net, timeout: opts.Timeout}
		if len(c.servers) == 0 {
			if c.servers, err = resolvConfServers(opts.ConfigFile); err != nil {
				return nil, err
			}
		}
		r.exchange = c.exchange
	}
	return r, nil
}

func (o DNSOptions) withDefaults() (DNSOptions, error) {
	for _, s := range o.Servers {
		if ap, err := netip.ParseAddrPort(s); err != nil || ap.Port() == 0 {
			return o, fmt.Errorf("%w: DNS server %q: want ip:port", ErrBadOptions, s)
		}
	}
	o.Servers = slices.Clone(o.Servers)
	switch o.Net {
	case "":
		o.Net = "udp"
	case "udp", "tcp":
	default:
		return o, fmt.Errorf("%w: Net %q: want \"udp\" or \"tcp\"", ErrBadOptions, o.Net)
	}
	if o.ConfigFile == "" {
		o.ConfigFile = defaultResolvConf
	}
	if o.Timeout < 0 || o.MinTTL < 0 || o.MaxTTL < 0 {
		return o, fmt.Errorf("%w: negative Timeout (%v), MinTTL (%v) or MaxTTL (%v)", ErrBadOptions, o.Timeout, o.MinTTL, o.MaxTTL)
	}
	if o.Timeout == 0 {
		o.Timeout = defaultDNSTimeout
	}
	if o.MinTTL == 0 {
		o.MinTTL = defaultMinTTL
	}
	if o.MaxTTL == 0 {
		o.MaxTTL = max(defaultMaxTTL, o.MinTTL)
	}
	if o.MinTTL > o.MaxTTL {
		return o, fmt.Errorf("%w: MinTTL (%v) is above MaxTTL (%v)", ErrBadOptions, o.MinTTL, o.MaxTTL)
	}
	o.Backoff = o.Backoff.withDefaults()
	if o.Endpoint == nil {
		o.Endpoint = func(addr string) endpoint.Endpoint { return endpoint.TCP(addr) }
	}
	return o, nil
}

// checkDomainName reports why name is not a valid domain name (letters, digits, '-' and '_'
// in labels of at most 63 bytes, at most 253 bytes in all, an optional final dot), or nil.
func checkDomainName(name string) error {
	n := strings.TrimSuffix(name, ".")
	if n == "" {
		return errors.New("empty host")
	}
	if len(n) > 253 {
		return errors.New("name longer than 253 bytes")
	}
	for label := range strings.SplitSeq(n, ".") {
		if label == "" {
			return errors.New("empty label")
		}
		if len(label) > 63 {
			return fmt.Errorf("label %q longer than 63 bytes", label)
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("character %q not allowed in a host name", c)
			}
		}
	}
	return nil
}

// resolvConfServers returns the nameservers of the resolv.conf file at path, as "ip:port".
func resolvConfServers(path string) ([]string, error) {
	cfg, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: no Servers, and reading %s: %w", ErrBadOptions, path, err)
	}
	var servers []string
	for _, s := range cfg.Servers {
		ap, err := netip.ParseAddrPort(net.JoinHostPort(s, cfg.Port))
		if err != nil || ap.Port() == 0 {
			continue
		}
		servers = append(servers, ap.String())
	}
	if len(servers) == 0 {
		return nil, fmt.Errorf("%w: no Servers, and %s names no nameserver", ErrBadOptions, path)
	}
	return servers, nil
}

// String returns "dns:" followed by the target.
func (r *DNSResolver) String() string { return "dns:" + r.target }

// IsConstant implements [Resolver]. It reports whether the target's host is an IP address.
func (r *DNSResolver) IsConstant() bool { return r.name == "" }

// Resolve implements [Resolver].
//
// With a nil version, or one that is not current, it returns the current set at once; until
// a lookup has succeeded it performs one (after the backoff of a failed one) and returns its
// answer or its error. With the current version it waits for the answer to expire and looks
// the name up again, until the set changes, a lookup fails, a lookup succeeds after failed
// ones, or ctx is done. See [DNSResolver] for the details.
func (r *DNSResolver) Resolve(ctx context.Context, version *Version) ([]endpoint.Endpoint, *Version, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	if r.literal != nil {
		return slices.Clone(r.literal), nil, nil
	}
	for {
		r.mu.Lock()
		cur := r.versionLocked()
		current := version != nil && *version == cur
		if r.have && !current {
			eps := slices.Clone(r.eps)
			r.mu.Unlock()
			return eps, &cur, nil
		}

		// There is no answer yet, or the caller has the current one: wait for the next lookup.
		f := r.flight
		if f == nil {
			if wait := time.Until(r.next); wait > 0 {
				r.mu.Unlock()
				if err := sleepCtx(ctx, wait); err != nil {
					return nil, nil, err
				}
				continue
			}
			f = &dnsLookup{done: make(chan struct{})}
			r.flight = f
			r.mu.Unlock()
			start := time.Now()
			addrs, ttl, err := r.lookup(ctx)
			r.finish(f, start, addrs, ttl, err, ctx.Err() != nil)
		} else {
			r.mu.Unlock()
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		switch {
		case f.abandoned:
		case f.err != nil:
			return nil, nil, f.err
		case f.recovered && current:
			r.mu.Lock()
			if r.versionLocked() == cur {
				eps := slices.Clone(r.eps)
				r.mu.Unlock()
				return eps, &cur, nil
			}
			r.mu.Unlock()
		}
	}
}

// versionLocked returns the current version.
//
// REQUIRES: r.mu is held.
func (r *DNSResolver) versionLocked() Version {
	return Version{Opaque: strconv.FormatUint(r.version, 10)}
}

// finish records the outcome of lookup f, which started at start, and wakes its waiters.
// abandoned means the caller that ran it gave up.
func (r *DNSResolver) finish(f *dnsLookup, start time.Time, addrs []netip.AddrPort, ttl uint32, err error, abandoned bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer close(f.done)
	r.flight = nil
	if err != nil {
		if abandoned {
			f.abandoned = true
			return
		}
		r.failures++
		r.next = time.Now().Add(r.opts.Backoff.delay(r.failures))
		f.err = err
		return
	}
	f.recovered = r.failures > 0
	r.failures = 0
	if len(addrs) == 0 && len(r.addrs) > 0 && !r.emptyPending {
		// Keep the set until the next lookup confirms the empty answer.
		r.emptyPending = true
		r.next = start.Add(r.opts.MinTTL)
		return
	}
	r.emptyPending = false
	refresh := time.Duration(ttl) * time.Second
	r.next = start.Add(min(max(refresh, r.opts.MinTTL), r.opts.MaxTTL))
	if r.have && slices.Equal(addrs, r.addrs) {
		return
	}
	f.recovered = false
	r.have = true
	r.addrs = addrs
	r.eps = r.eps[:0:0]
	seen := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		ep := r.opts.Endpoint(a.String())
		if ep == nil || seen[ep.Address()] {
			continue
		}
		seen[ep.Address()] = true
		r.eps = append(r.eps, ep)
	}
	r.version++
}

// sleepCtx waits for d or until ctx is done, and returns ctx's error in that case.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lookup resolves the target once. It returns its addresses, sorted and deduplicated, and
// the smallest TTL of the records it used, in seconds.
func (r *DNSResolver) lookup(ctx context.Context) ([]netip.AddrPort, uint32, error) {
	ttl := uint32(math.MaxUint32)
	var out []netip.AddrPort
	if r.port != 0 {
		ips, t, err := r.lookupIPs(ctx, r.name)
		if err != nil {
			return nil, 0, err
		}
		ttl = min(ttl, t)
		for _, ip := range ips {
			out = append(out, netip.AddrPortFrom(ip, r.port))
		}
	} else {
		rrs, t, err := r.query(ctx, r.name, dns.TypeSRV)
		if err != nil {
			return nil, 0, err
		}
		ttl = min(ttl, t)
		ports := map[string][]uint16{} // by target, lower case
		var order []*dns.SRV           // the first record of each target
		for _, rr := range rrs {
			srv := rr.(*dns.SRV)
			if srv.Target == "." || srv.Port == 0 {
				continue
			}
			target := strings.ToLower(dns.Fqdn(srv.Target))
			if _, ok := ports[target]; !ok {
				order = append(order, srv)
			}
			ports[target] = append(ports[target], srv.Port)
		}
		slices.SortFunc(order, func(a, b *dns.SRV) int {
			return cmp.Or(cmp.Compare(a.Priority, b.Priority), cmp.Compare(strings.ToLower(a.Target), strings.ToLower(b.Target)))
		})
		for _, srv := range order[:min(len(order), maxSRVTargets)] {
			target := strings.ToLower(dns.Fqdn(srv.Target))
			ips, t, err := r.lookupIPs(ctx, target)
			if err != nil {
				return nil, 0, err
			}
			ttl = min(ttl, t)
			for _, ip := range ips {
				for _, port := range ports[target] {
					out = append(out, netip.AddrPortFrom(ip, port))
				}
			}
		}
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return slices.Compact(out), ttl, nil
}

// lookupIPs returns the addresses of name (A and AAAA records) and their smallest TTL.
func (r *DNSResolver) lookupIPs(ctx context.Context, name string) ([]netip.Addr, uint32, error) {
	var ips []netip.Addr
	ttl := uint32(math.MaxUint32)
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		rrs, t, err := r.query(ctx, name, qtype)
		if err != nil {
			return nil, 0, err
		}
		ttl = min(ttl, t)
		for _, rr := range rrs {
			var ip netip.Addr
			var ok bool
			switch rr := rr.(type) {
			case *dns.A:
				ip, ok = netip.AddrFromSlice(rr.A)
				ip = ip.Unmap()
				ok = ok && ip.Is4()
			case *dns.AAAA:
				ip, ok = netip.AddrFromSlice(rr.AAAA)
				ok = ok && ip.Is6()
			}
			if ok {
				ips = append(ips, ip)
			}
		}
	}
	return ips, ttl, nil
}

// query asks for the records of type qtype of name, following CNAME records (within a reply,
// and with a new query when a reply ends its chain without the records). It returns the
// records and the smallest TTL of those and of the CNAME records, or, for an authoritative
// empty answer (NXDOMAIN or no records of the type), no records and the negative-caching TTL.
func (r *DNSResolver) query(ctx context.Context, name string, qtype uint16) ([]dns.RR, uint32, error) {
	ttl := uint32(math.MaxUint32)
	seen := map[string]bool{}
	fail := func(name string, err error) ([]dns.RR, uint32, error) {
		return nil, 0, &DNSError{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: err}
	}
	for {
		reply, err := r.exchangeOne(ctx, name, qtype)
		if err != nil {
			return nil, 0, err
		}
		owner := name
		for {
			key := strings.ToLower(owner)
			if seen[key] {
				return fail(name, fmt.Errorf("CNAME loop at %s", owner))
			}
			seen[key] = true
			if len(seen) > maxCNAMEs {
				return fail(name, fmt.Errorf("more than %d CNAME records", maxCNAMEs))
			}
			var cname *dns.CNAME
			for _, rr := range reply.Answer {
				if c, ok := rr.(*dns.CNAME); ok && c.Hdr.Class == dns.ClassINET && strings.EqualFold(c.Hdr.Name, owner) {
					cname = c
					break
				}
			}
			if cname == nil {
				break
			}
			ttl = min(ttl, cname.Hdr.Ttl)
			owner = dns.Fqdn(cname.Target)
		}
		var rrs []dns.RR
		for _, rr := range reply.Answer {
			h := rr.Header()
			if h.Rrtype == qtype && h.Class == dns.ClassINET && strings.EqualFold(h.Name, owner) {
				rrs = append(rrs, rr)
				ttl = min(ttl, h.Ttl)
			}
		}
		if len(rrs) > 0 {
			return rrs, ttl, nil
		}
		if reply.Rcode == dns.RcodeNameError || strings.EqualFold(owner, name) {
			return nil, min(ttl, negativeTTL(reply)), nil
		}
		// The chain ends at a name this reply has no records for: ask for it.
		name = owner
		delete(seen, strings.ToLower(owner))
	}
}

// negativeTTL returns how long an empty answer may be cached (RFC 2308): the smaller of the
// TTL and the MINIMUM field of the SOA record in the authority section, or 0 without one.
func negativeTTL(reply *dns.Msg) uint32 {
	for _, rr := range reply.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return min(soa.Hdr.Ttl, soa.Minttl)
		}
	}
	return 0
}

// exchangeOne sends one query and checks its reply. A reply with an error code other than
// NXDOMAIN is an error.
func (r *DNSResolver) exchangeOne(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(ednsSize, false)
	fail := func(err error) (*dns.Msg, error) {
		return nil, &DNSError{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: err}
	}
	reply, err := r.exchange(ctx, m)
	switch {
	case err != nil:
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, ctxErr
		}
		return fail(err)
	case reply == nil:
		return fail(errors.New("no reply"))
	case !reply.Response || reply.Id != m.Id:
		return fail(errors.New("malformed reply: not a response to the query"))
	case len(reply.Question) != 1 || reply.Question[0].Qtype != qtype || !strings.EqualFold(reply.Question[0].Name, name):
		return fail(errors.New("malformed reply: question does not match the query"))
	case reply.Truncated:
		return fail(errors.New("truncated reply"))
	case reply.Rcode != dns.RcodeSuccess && reply.Rcode != dns.RcodeNameError:
		return nil, &DNSError{Name: name, Type: dns.TypeToString[qtype], Rcode: reply.Rcode}
	}
	return reply, nil
}

// dnsClient sends queries to DNS servers over the network.
type dnsClient struct {
	servers []string
	net     string // "udp" or "tcp"
	timeout time.Duration
}

// exchange sends m to each server in turn until one replies with NOERROR or NXDOMAIN. If
// none does, it returns the last reply with another code, or else every server's error.
func (c *dnsClient) exchange(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	var last *dns.Msg
	var errs []error
	for _, server := range c.servers {
		reply, err := c.exchangeWith(ctx, server, m)
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, ctxErr
		}
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("server %s: %w", server, err))
		case reply.Rcode == dns.RcodeSuccess || reply.Rcode == dns.RcodeNameError:
			return reply, nil
		default:
			last = reply
		}
	}
	if last != nil {
		return last, nil
	}
	return nil, errors.Join(errs...)
}

// exchangeWith sends m to server over c.net, and again over TCP if a UDP reply is truncated.
func (c *dnsClient) exchangeWith(ctx context.Context, server string, m *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	reply, err := c.exchangeOver(ctx, c.net, server, m)
	if err == nil && reply.Truncated && c.net == "udp" {
		reply, err = c.exchangeOver(ctx, "tcp", server, m)
	}
	var ne net.Error
	if err != nil && (errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()) {
		err = fmt.Errorf("no reply within %v: %w", c.timeout, context.DeadlineExceeded)
	}
	return reply, err
}

// exchangeOver sends m to server over network and returns the reply. The connection is closed
// when ctx is done, so that a cancelled query returns at once.
func (c *dnsClient) exchangeOver(ctx context.Context, network, server string, m *dns.Msg) (*dns.Msg, error) {
	client := &dns.Client{Net: network, Timeout: c.timeout}
	conn, err := client.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	reply, _, err := client.ExchangeWithConnContext(ctx, m, conn)
	if err != nil {
		return nil, err
	}
	return reply, nil
}
