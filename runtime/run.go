package runtime

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/call"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Main is the interface of an application's main component. The application's main struct
// embeds Implements[Main] and holds a Ref for every component it calls:
//
//	type app struct {
//		runtime.Implements[runtime.Main]
//		front runtime.Ref[Frontend]
//	}
//
//	func main() {
//		if err := runtime.Run(context.Background(), runtime.Config{}, serve); err != nil {
//			log.Fatal(err)
//		}
//	}
//
//	func serve(ctx context.Context, a *app) error { ... a.front.Get() ... }
type Main interface{}

// Config says how Run deploys an application. The zero value runs every component in the
// calling process.
type Config struct {
	// Multi runs the components in child processes of the calling process, one per replica
	// of each group, on Unix sockets, calling each other over weft's protocol. The main
	// component runs in the calling process.
	Multi bool

	// Distributed runs the application as one of the processes of a deployment spread over
	// machines by an orchestrator (weft starts no processes): with Serve empty, this process
	// runs the main component and reaches every other component at its group's Addresses;
	// with Serve set, it serves that group's components on the group's Listen address until
	// it receives SIGTERM or an interrupt (or ctx is done), then drains and returns nil. Every
	// group needs Addresses. Exclusive with Multi.
	Distributed bool

	// Serve names the group this process serves in a distributed deployment.
	Serve string

	// Listen, if not empty, replaces the served group's Listen address in this process (for
	// replicas of a group that share a machine).
	Listen string

	// Groups places components in processes: each group's components share a process, and
	// the group runs Replicas of them. A component in no group gets a group of its own with
	// one replica. Ignored unless Multi or Distributed is set.
	Groups []Group

	// Logger receives the runtime's logs and is the parent of every component's logger. If
	// nil, slog.Default().
	Logger *slog.Logger

	// Tracer, if not nil, traces calls between components.
	Tracer trace.Tracer

	// MeterProvider, if not nil, receives metrics: for calls between processes, per component
	// method, calls by outcome, duration and request and response sizes, on the client side
	// (weft.client.*) and the server side (weft.server.*), with rpc.service, rpc.method and
	// weft.error attributes; and the pool metrics of every Connection between processes (see
	// call.ClientOptions.MeterProvider). Calls within a process are plain method calls and are
	// not measured. If nil, nothing is recorded.
	MeterProvider metric.MeterProvider

	// Dir holds the Unix sockets of a multi-process deployment. If empty, a new temporary
	// directory, removed when Run returns.
	Dir string

	// DrainTimeout bounds how long replicas finish calls in flight when the application stops.
	// If zero, 10s.
	DrainTimeout time.Duration

	// Diagnostics, if not empty, is the TCP address ("127.0.0.1:0" picks a port) on which the
	// main process serves the diagnostics page at DiagnosticsPath; see [DiagnosticsURL].
	Diagnostics string
}

// Group is a set of components deployed together.
type Group struct {
	// Name names the group in logs; if empty, the first component's name.
	Name string

	// Components are the full names of the group's components ("pkgpath/Interface").
	Components []string

	// Replicas is the number of processes that run the group. If zero, 1.
	Replicas int

	// Sharded makes calls to the group's components that carry a shard key
	// (call.WithShardKey) go to the replica that owns the key.
	Sharded bool

	// Listen is where a process serving the group listens in a distributed deployment, as
	// endpoint.Parse reads it ("tcp://:9000", "unix:///run/app/store.sock").
	Listen string `json:",omitempty"`

	// Addresses are where callers find the group's replicas in a distributed deployment:
	// endpoint addresses ("tcp://10.0.0.5:9000", ...), or a single "dns:" entry resolved
	// through DNS and followed as its records change ("dns:store.app.svc.cluster.local:9000",
	// or an SRV name "dns:_weft._tcp.store.app.svc.cluster.local"). A sharded group's keys
	// are spread over its addresses in order, so they move when the set changes.
	Addresses []string `json:",omitempty"`

	// Sockets are the replicas' Unix sockets, set by the deployment.
	Sockets []string `json:",omitempty"`
}

// Run runs an application: it creates its main component, a *T whose struct embeds
// Implements[Main], fills its Refs, and calls app with it. Run returns app's error, after
// stopping every component it started. With cfg.Multi, a process started by Run as a replica
// serves its components instead and never calls app.
func Run[T any](ctx context.Context, cfg Config, app func(context.Context, *T) error) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 10 * time.Second
	}
	if os.Getenv(childEnv) != "" {
		return runChild(ctx, cfg)
	}
	main := new(T)
	if !embedsMain(reflect.TypeFor[T]()) {
		return fmt.Errorf("runtime: %v does not embed runtime.Implements[runtime.Main]", reflect.TypeFor[T]())
	}
	var w *wiring
	var d *deployment
	var conns *groupConns // Connections to other processes' groups, if any
	var err error
	mode := "single"
	if cfg.Distributed {
		groups, err := plan(cfg)
		if err != nil {
			return err
		}
		if err := checkDistributed(cfg, groups); err != nil {
			return err
		}
		if cfg.Serve != "" {
			return serveDistributed(ctx, cfg, groups)
		}
	} else if cfg.Serve != "" {
		return fmt.Errorf("runtime: Config.Serve (%q) needs Config.Distributed", cfg.Serve)
	}
	switch {
	case cfg.Distributed:
		h := newHealth()
		groups, _ := plan(cfg)
		conns = newGroupConns(context.WithoutCancel(ctx), cfg, groups, "", groupResolver, h)
		defer conns.close()
		w, err = newWiring(cfg, h, conns.remote)
		mode = "distributed"
	case cfg.Multi:
		if d, err = startDeployment(ctx, cfg); err != nil {
			return err
		}
		defer d.stop()
		conns = d.conns
		w, err = newWiring(cfg, d.health, conns.remote)
		mode = "multi"
	default:
		w, err = newWiring(cfg, newHealth(), nil)
	}
	if err != nil {
		return err
	}
	defer w.close()
	if err := Fill(main, cfg.Logger.With("component", "main"), w.get); err != nil {
		return err
	}
	if cfg.Diagnostics != "" {
		dctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		defer wg.Wait()
		defer stop()
		url, err := serveDiagnostics(dctx, cfg.Diagnostics, &diag{started: time.Now(), mode: mode, w: w, d: d, conns: conns}, &wg)
		if err != nil {
			return err
		}
		cfg.Logger.Info("weft: diagnostics page", "url", url)
	}
	return app(ctx, main)
}

func embedsMain(t reflect.Type) bool {
	if t.Kind() != reflect.Struct {
		return false
	}
	for i := range t.NumField() {
		if f := t.Field(i); f.Anonymous && f.Type == reflect.TypeFor[Implements[Main]]() {
			return true
		}
	}
	return false
}

// wiring creates the components a process needs, each once: local components are
// instantiated and called through their local stubs; with remote set, components it returns a
// Connection for are called through their client stubs.
type wiring struct {
	cfg    Config
	remote func(reg *Registration) (call.Connection, bool, error)
	health *health
	client *methodMetrics // nil without Config.MeterProvider

	mu    sync.Mutex
	comps map[reflect.Type]any  // interface -> stub
	local map[reflect.Type]bool // the components created in this process
	impls []any                 // local implementations, in creation order
	busy  map[reflect.Type]bool
}

func newWiring(cfg Config, h *health, remote func(*Registration) (call.Connection, bool, error)) (*wiring, error) {
	client, err := newMethodMetrics(cfg.MeterProvider, "client")
	if err != nil {
		return nil, fmt.Errorf("runtime: creating metrics: %w", err)
	}
	return &wiring{cfg: cfg, remote: remote, health: h, client: client, comps: map[reflect.Type]any{}, local: map[reflect.Type]bool{}, busy: map[reflect.Type]bool{}}, nil
}

// get returns the component with interface iface, creating it if needed.
func (w *wiring) get(iface reflect.Type) (any, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.getLocked(iface)
}

func (w *wiring) getLocked(iface reflect.Type) (any, error) {
	if c, ok := w.comps[iface]; ok {
		return c, nil
	}
	reg, ok := lookupType(iface)
	if !ok {
		return nil, fmt.Errorf("component %v is not registered (run rpcgen on its package)", iface)
	}
	if w.remote != nil {
		conn, ok, err := w.remote(reg)
		if err != nil {
			return nil, err
		}
		if ok {
			c := reg.ClientStub(w.client.meter(conn, reg))
			w.comps[iface] = c
			return c, nil
		}
	}
	impl, err := w.createLocked(reg)
	if err != nil {
		return nil, err
	}
	c := reg.LocalStub(impl, w.cfg.Tracer)
	w.comps[iface] = c
	return c, nil
}

// createLocked instantiates reg's implementation, fills its Refs (creating what they refer to),
// and calls its Init method if it has one.
func (w *wiring) createLocked(reg *Registration) (any, error) {
	if w.busy[reg.Iface] {
		return nil, fmt.Errorf("components refer to each other in a cycle through %s", reg.Name)
	}
	w.busy[reg.Iface] = true
	defer delete(w.busy, reg.Iface)
	impl := reflect.New(reg.Impl).Interface()
	logger := w.cfg.Logger.With("component", shortName(reg.Name))
	if r := ReplicaName(); r != "main" {
		logger = logger.With("replica", r)
	}
	if err := Fill(impl, logger, w.getLocked); err != nil {
		return nil, err
	}
	if hs, ok := impl.(healthSetter); ok {
		hs.setHealth(w.health, reg.Name)
	}
	if in, ok := impl.(interface{ Init(context.Context) error }); ok {
		if err := in.Init(context.Background()); err != nil {
			return nil, fmt.Errorf("runtime: initializing %s: %w", reg.Name, err)
		}
	}
	w.impls = append(w.impls, impl)
	w.local[reg.Iface] = true
	return impl, nil
}

// close shuts down local components that have a Shutdown method, in reverse creation order.
func (w *wiring) close() {
	w.mu.Lock()
	impls := w.impls
	w.impls = nil
	w.mu.Unlock()
	for i := len(impls) - 1; i >= 0; i-- {
		if s, ok := impls[i].(interface{ Shutdown(context.Context) error }); ok {
			ctx, cancel := context.WithTimeout(context.Background(), w.cfg.DrainTimeout)
			if err := s.Shutdown(ctx); err != nil {
				w.cfg.Logger.Warn("weft: component shutdown failed", "err", err)
			}
			cancel()
		}
	}
}

// shortName is a component's name without its package path's directories.
func shortName(name string) string {
	if i := strings.LastIndex(name, "/"); i >= 0 {
		if j := strings.LastIndex(name[:i], "/"); j >= 0 {
			return name[j+1:]
		}
	}
	return name
}

// groupName is the default name of a group whose first component is named name: the
// interface's name, lower-cased ("pkgpath/Store" gives "store").
func groupName(name string) string {
	return strings.ToLower(name[strings.LastIndex(name, "/")+1:])
}

// plan is the groups of a multi-process deployment, with every registered component other than
// Main in exactly one.
func plan(cfg Config) ([]Group, error) {
	seen := map[string]string{}
	var groups []Group
	names := map[string]bool{}
	for _, g := range cfg.Groups {
		if len(g.Components) == 0 {
			return nil, fmt.Errorf("runtime: group %q has no components", g.Name)
		}
		if g.Replicas < 0 {
			return nil, fmt.Errorf("runtime: group %q has %d replicas", g.Name, g.Replicas)
		}
		if g.Replicas == 0 {
			g.Replicas = 1
		}
		if g.Name == "" {
			g.Name = groupName(g.Components[0])
		}
		if strings.ContainsAny(g.Name, "/ \n") || names[g.Name] {
			return nil, fmt.Errorf("runtime: bad or repeated group name %q", g.Name)
		}
		names[g.Name] = true
		for _, c := range g.Components {
			if _, ok := lookupName(c); !ok {
				return nil, fmt.Errorf("runtime: group %q: no component named %q is registered (known: %s)", g.Name, c, strings.Join(registeredNames(), ", "))
			}
			if other, dup := seen[c]; dup {
				return nil, fmt.Errorf("runtime: component %q is in groups %q and %q", c, other, g.Name)
			}
			seen[c] = g.Name
		}
		groups = append(groups, g)
	}
	for _, name := range registeredNames() {
		if _, ok := seen[name]; !ok {
			g := Group{Name: groupName(name), Components: []string{name}, Replicas: 1}
			for base, i := g.Name, 2; names[g.Name]; i++ {
				g.Name = fmt.Sprintf("%s%d", base, i)
			}
			names[g.Name] = true
			groups = append(groups, g)
		}
	}
	return groups, nil
}

func registeredNames() []string {
	var out []string
	for _, r := range Registered() {
		out = append(out, r.Name)
	}
	return out
}

// groupBalancer returns the balancer for calls to a group.
func groupBalancer(g Group) balance.Balancer {
	if g.Sharded {
		return balance.Sharded()
	}
	return balance.RoundRobin()
}
