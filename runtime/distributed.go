package runtime

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// dnsPrefix marks a Group.Addresses entry resolved through DNS.
const dnsPrefix = "dns:"

// checkDistributed validates the groups of a distributed deployment: every group needs
// Addresses that parse, and the served one a Listen address.
func checkDistributed(cfg Config, groups []Group) error {
	if cfg.Multi {
		return errors.New("runtime: Config.Multi and Config.Distributed are exclusive")
	}
	served := cfg.Serve == ""
	for _, g := range groups {
		if len(g.Addresses) == 0 {
			return fmt.Errorf("runtime: distributed deployment: group %q (%s) has no Addresses; list its replicas' endpoints or one %q name", g.Name, strings.Join(g.Components, ", "), dnsPrefix+"host:port")
		}
		if _, err := groupResolver(g); err != nil {
			return err
		}
		if g.Name == cfg.Serve {
			served = true
			if cfg.Listen != "" {
				g.Listen = cfg.Listen
			}
			if g.Listen == "" {
				return fmt.Errorf("runtime: distributed deployment: group %q, which this process serves, has no Listen address", g.Name)
			}
			if _, err := endpoint.Parse(g.Listen); err != nil {
				return fmt.Errorf("runtime: group %q: Listen: %w", g.Name, err)
			}
		}
	}
	if !served {
		var names []string
		for _, g := range groups {
			names = append(names, g.Name)
		}
		return fmt.Errorf("runtime: Config.Serve names group %q, but the groups are %s", cfg.Serve, strings.Join(names, ", "))
	}
	return nil
}

// groupResolver returns the resolver of a group's Addresses in a distributed deployment: a DNS
// resolver for one "dns:" entry, else a constant set.
func groupResolver(g Group) (resolve.Resolver, error) {
	if len(g.Addresses) == 1 && strings.HasPrefix(g.Addresses[0], dnsPrefix) {
		r, err := resolve.DNS(strings.TrimPrefix(g.Addresses[0], dnsPrefix), resolve.DNSOptions{})
		if err != nil {
			return nil, fmt.Errorf("runtime: group %q: Addresses: %w", g.Name, err)
		}
		return r, nil
	}
	var eps []endpoint.Endpoint
	for _, a := range g.Addresses {
		if strings.HasPrefix(a, dnsPrefix) {
			return nil, fmt.Errorf("runtime: group %q: Addresses: a %q name must be the only entry", g.Name, dnsPrefix)
		}
		ep, err := endpoint.Parse(a)
		if err != nil {
			return nil, fmt.Errorf("runtime: group %q: Addresses: %w", g.Name, err)
		}
		eps = append(eps, ep)
	}
	return resolve.Constant(eps...), nil
}

// serveDistributed serves the group cfg.Serve of a distributed deployment on its Listen
// address until ctx is done or the process is asked to stop (SIGTERM, interrupt), then drains.
func serveDistributed(ctx context.Context, cfg Config, groups []Group) error {
	ctx, stop := signalContext(ctx)
	defer stop()
	var mine Group
	for _, g := range groups {
		if g.Name == cfg.Serve {
			mine = g
		}
	}
	if cfg.Listen != "" {
		mine.Listen = cfg.Listen
	}
	host, _ := os.Hostname()
	servingName.Store(mine.Name + "@" + host)
	ep, _ := endpoint.Parse(mine.Listen) // checked by checkDistributed
	var l net.Listener
	var err error
	if ep.Net == "unix" {
		l, err = listenUnix(ep.Addr)
	} else {
		l, err = net.Listen(ep.Net, ep.Addr)
	}
	if err != nil {
		return fmt.Errorf("runtime: serving group %s: %w", mine.Name, err)
	}
	connCtx, cancelConns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelConns()
	hs, err := newHost(connCtx, cfg, groups, mine.Name, groupResolver)
	if err != nil {
		l.Close()
		return fmt.Errorf("runtime: serving group %s: %w", mine.Name, err)
	}
	served, stopServing := hs.serve(l)
	var wg sync.WaitGroup
	if cfg.Diagnostics != "" {
		dctx, stopDiag := context.WithCancel(context.Background())
		defer wg.Wait()
		defer stopDiag()
		url, err := serveDiagnostics(dctx, cfg.Diagnostics, &diag{started: time.Now(), mode: "distributed", w: hs.w, host: hs, conns: hs.conns}, &wg)
		if err != nil {
			stopServing()
			<-served
			hs.close()
			return err
		}
		cfg.Logger.Info("weft: diagnostics page", "url", url)
	}
	cfg.Logger.Info("weft: serving", slog.String("group", mine.Name), slog.String("listen", l.Addr().String()))
	select {
	case <-ctx.Done():
	case err := <-served:
		hs.close()
		return fmt.Errorf("runtime: serving group %s: %w", mine.Name, err)
	}
	stopServing() // drains: go-away, calls in flight finish
	<-served
	hs.close()
	return nil
}
