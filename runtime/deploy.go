package runtime

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// Environment of a replica process.
const (
	childEnv  = "WEFT_REPLICA" // "group/index"
	socketEnv = "WEFT_SOCKET"  // the Unix socket the replica serves on
	planEnv   = "WEFT_PLAN"    // the deployment's groups, as JSON
)

// A replica reports that it serves by writing readyLine to file descriptor 3, and then every
// change of its health as a line: healthyLine, or unhealthyPrefix and the reason. File
// descriptor 4 is a pipe from the deployer that carries the rotation of every group, one JSON
// line (a rotationUpdate) per change; when it closes, the deployer is gone and the replica
// stops.
//
// A sharded group's rotation is fixed (all its replicas' sockets), so shard keys never move; a
// replica that restarts is reconnected to by its callers, whose calls wait for it. Other
// groups' rotations hold their replicas that serve and are healthy.
const readyLine = "ready\n"

// Health lines a replica writes after readyLine.
const (
	healthyLine     = "healthy\n"
	unhealthyPrefix = "unhealthy: "
)

// rotationUpdate is a line on a replica's lifeline: the sockets of every group's replicas in
// rotation.
type rotationUpdate struct {
	Rotation map[string][]string
}

// failedPrefix starts the line a replica writes instead of readyLine when it cannot start.
const failedPrefix = "failed: "

// interBackoff paces reconnection between a deployment's processes: local sockets come back
// quickly after a restart.
var interBackoff = call.Backoff{Base: 50 * time.Millisecond, Max: time.Second}

// startupTimeout bounds how long the deployer waits for every replica to serve at first.
const startupTimeout = 30 * time.Second

// maxSocketPath is the longest Unix socket path every platform accepts.
const maxSocketPath = 103

// deployment is the parent side of a multi-process deployment.
type deployment struct {
	cfg       Config
	groups    []*groupState
	dir       string
	removeDir bool
	exe       string
	ctx       context.Context // replicas' lifetime: until stop
	runCtx    context.Context // Run's: once done, no restarts
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	health    *health                    // the main process's
	resolvers map[string]*resolve.Manual // the main process's, by group

	conns *groupConns // the main process's Connections to the groups

	rotMu sync.Mutex
	// guarded by rotMu
	rotation map[string][]string // sockets in rotation, by group
	rotating bool                // every replica served once; rotations follow health now
}

type groupState struct {
	Group
	replicas []*replica
}

// replica is one process of a group, restarted when it dies.
type replica struct {
	d         *deployment
	g         *groupState
	index     int
	sock      string
	ready     chan struct{} // closed when the first process serves
	readyOnce sync.Once
	failed    chan string // a process's start failure, before any served (buffer 1)

	mu       sync.Mutex
	pid      int    // the current process, or 0
	state    string // starting, serving, exited
	healthy  bool   // what the current process last reported
	reason   string // why it is unhealthy
	restarts int
	lastExit string   // why the last process exited
	life     *os.File // the current process's lifeline, or nil
}

func (r *replica) name() string { return fmt.Sprintf("%s/%d", r.g.Name, r.index) }

// startDeployment starts every replica and waits until each serves.
func startDeployment(ctx context.Context, cfg Config) (*deployment, error) {
	groups, err := plan(cfg)
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("runtime: finding this program to start replicas: %w", err)
	}
	d := &deployment{cfg: cfg, exe: exe, dir: cfg.Dir, health: newHealth(),
		resolvers: map[string]*resolve.Manual{}, rotation: map[string][]string{}}
	if d.dir == "" {
		if d.dir, err = os.MkdirTemp("", "weft-"); err != nil {
			return nil, fmt.Errorf("runtime: %w", err)
		}
		d.removeDir = true
	}
	// Replicas outlive ctx until stop: the application may still be finishing calls. But once
	// ctx is done, replicas that exit are not restarted.
	d.ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	d.runCtx = ctx
	for _, g := range groups {
		gs := &groupState{Group: g}
		for i := range g.Replicas {
			sock := filepath.Join(d.dir, fmt.Sprintf("%s-%d.sock", g.Name, i))
			if len(sock) > maxSocketPath {
				if d.removeDir {
					os.RemoveAll(d.dir)
				}
				return nil, fmt.Errorf("runtime: socket path %q is longer than the %d bytes Unix sockets allow; use a shorter Config.Dir (or TMPDIR) or group name", sock, maxSocketPath)
			}
			gs.replicas = append(gs.replicas, &replica{d: d, g: gs, index: i, ready: make(chan struct{}), failed: make(chan string, 1), sock: sock, healthy: true})
			gs.Sockets = append(gs.Sockets, sock)
		}
		d.groups = append(d.groups, gs)
		d.rotation[gs.Name] = slices.Clone(gs.Sockets)
		d.resolvers[gs.Name] = resolve.NewManual(unixEndpoints(gs.Sockets)...)
	}
	var planned []Group
	for _, gs := range d.groups {
		planned = append(planned, gs.Group)
	}
	d.conns = newGroupConns(d.ctx, cfg, planned, "", func(g Group) (resolve.Resolver, error) { return d.resolvers[g.Name], nil }, d.health)
	for _, g := range d.groups {
		for _, r := range g.replicas {
			d.wg.Add(1)
			go r.supervise()
		}
	}
	timeout := time.NewTimer(startupTimeout)
	defer timeout.Stop()
	for _, g := range d.groups {
		for _, r := range g.replicas {
			select {
			case <-r.ready:
			case msg := <-r.failed:
				d.stop()
				return nil, fmt.Errorf("runtime: replica %s failed to start: %s", r.name(), msg)
			case <-ctx.Done():
				d.stop()
				return nil, ctx.Err()
			case <-timeout.C:
				d.stop()
				return nil, fmt.Errorf("runtime: replica %s did not start serving within %v", r.name(), startupTimeout)
			}
		}
	}
	d.rotMu.Lock()
	d.rotating = true
	d.rotMu.Unlock()
	d.updateRotation() // health reports that arrived during startup
	cfg.Logger.Info("weft: deployment ready", "groups", len(d.groups), "dir", d.dir)
	return d, nil
}

// stop drains and stops every replica and waits for them.
func (d *deployment) stop() {
	d.conns.close()
	d.cancel()
	d.wg.Wait()
	if d.removeDir {
		os.RemoveAll(d.dir)
	}
}

// supervise runs the replica's process, restarting it with backoff when it dies, until the
// deployment stops.
func (r *replica) supervise() {
	defer r.d.wg.Done()
	log := r.d.cfg.Logger.With("replica", r.name())
	backoff := call.Backoff{Base: 200 * time.Millisecond, Max: 10 * time.Second}
	failures := 0
	for {
		started := time.Now()
		err := r.run()
		if r.d.ctx.Err() != nil || r.d.runCtx.Err() != nil {
			return // stopping: a replica that exits now is not restarted
		}
		if time.Since(started) > 10*time.Second {
			failures = 0
		}
		failures++
		delay := backoff.Delay(failures)
		log.Warn("weft: replica exited", "err", err, "restart_in", delay.Round(time.Millisecond))
		// An interrupt sent to the whole process group can stop a replica just before it
		// cancels Run's context: that replica is not restarted either.
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.d.ctx.Done():
			t.Stop()
			return
		case <-r.d.runCtx.Done():
			t.Stop()
			return
		}
		log.Warn("weft: restarting replica", "after_failures", failures)
	}
}

// run starts one process of the replica and waits for it to exit.
func (r *replica) run() error {
	d := r.d
	os.Remove(r.sock)
	plan, _ := json.Marshal(d.planForChild())
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return err
	}
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		readyR.Close()
		readyW.Close()
		return err
	}
	cmd := exec.Command(d.exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), childEnv+"="+r.name(), socketEnv+"="+r.sock, planEnv+"="+string(plan))
	cmd.ExtraFiles = []*os.File{readyW, lifeR}
	stdout, _ := cmd.StdoutPipe()
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		readyR.Close()
		readyW.Close()
		lifeR.Close()
		lifeW.Close()
		return fmt.Errorf("starting %s: %w", r.name(), err)
	}
	readyW.Close()
	lifeR.Close()
	r.mu.Lock()
	r.life = lifeW
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.life = nil
		r.mu.Unlock()
		lifeW.Close()
	}()
	var copies sync.WaitGroup
	copies.Add(2)
	go func() { defer copies.Done(); prefixLines(os.Stdout, stdout, r.name()) }()
	go func() { defer copies.Done(); prefixLines(os.Stderr, stderr, r.name()) }()

	// The status pipe: the ready (or failed) line, then health changes. Its reader ends when
	// the process is gone.
	lines := make(chan string)
	go func() {
		defer close(lines)
		defer readyR.Close()
		br := bufio.NewReader(readyR)
		for {
			line, err := br.ReadString('\n')
			if line != "" {
				lines <- line
			}
			if err != nil {
				return
			}
		}
	}()
	exited := make(chan error, 1)
	go func() {
		copies.Wait() // Wait must not close the pipes before their last lines are copied
		exited <- cmd.Wait()
	}()

	r.setState(cmd.Process.Pid, "starting")
	var exitErr error
	stopping := d.ctx.Done()
	for done := false; !done; {
		select {
		case line, ok := <-lines:
			if !ok {
				lines = nil
				continue
			}
			r.status(cmd.Process.Pid, line)
		case exitErr = <-exited:
			done = true
		case <-stopping:
			exitErr = r.terminate(cmd, exited)
			done = true
		}
	}
	if lines != nil {
		for line := range lines {
			// The pipe reports EOF now that the process is gone; a ready line may come first.
			r.status(cmd.Process.Pid, line)
		}
	}
	if exitErr == nil {
		exitErr = fmt.Errorf("replica %s exited", r.name())
	}
	r.mu.Lock()
	r.pid, r.state, r.lastExit = 0, "exited", exitErr.Error()
	r.mu.Unlock()
	d.updateRotation()
	return exitErr
}

// status handles a line of the replica's status pipe.
func (r *replica) status(pid int, line string) {
	switch {
	case line == readyLine:
		r.setState(pid, "serving")
		r.readyOnce.Do(func() { close(r.ready) })
	case strings.HasPrefix(line, failedPrefix):
		select {
		case r.failed <- strings.TrimSpace(strings.TrimPrefix(line, failedPrefix)):
		default:
		}
		return
	case line == healthyLine:
		r.setHealth(true, "")
	case strings.HasPrefix(line, unhealthyPrefix):
		r.setHealth(false, strings.TrimSpace(strings.TrimPrefix(line, unhealthyPrefix)))
	default:
		return
	}
	r.d.updateRotation()
}

// setHealth records the health the replica's process reported.
func (r *replica) setHealth(healthy bool, reason string) {
	r.mu.Lock()
	changed := r.healthy != healthy
	r.healthy, r.reason = healthy, reason
	r.mu.Unlock()
	if changed && r.d.ctx.Err() == nil { // while stopping, replicas lose each other: not news
		lvl := slog.LevelInfo
		if !healthy {
			lvl = slog.LevelWarn
		}
		r.d.cfg.Logger.Log(context.Background(), lvl, "weft: replica health changed", slog.String("replica", r.name()),
			slog.Bool("healthy", healthy), slog.String("reason", reason))
	}
}

// updateRotation recomputes every group's rotation and, if one changed, gives it to the main
// process's resolvers and to every replica.
func (d *deployment) updateRotation() {
	d.rotMu.Lock()
	defer d.rotMu.Unlock()
	if !d.rotating || d.ctx.Err() != nil {
		return // starting (every replica is in rotation) or stopping (nothing changes now)
	}
	changed := false
	for _, g := range d.groups {
		rot := g.rotation()
		if slices.Equal(rot, d.rotation[g.Name]) {
			continue
		}
		changed = true
		d.rotation[g.Name] = rot
		d.resolvers[g.Name].Update(unixEndpoints(rot)...)
		d.cfg.Logger.Info("weft: group rotation changed", slog.String("group", g.Name), slog.Int("replicas", len(rot)), slog.Int("of", len(g.replicas)))
	}
	if !changed {
		return
	}
	line, _ := json.Marshal(rotationUpdate{Rotation: d.rotation})
	line = append(line, '\n')
	for _, g := range d.groups {
		for _, r := range g.replicas {
			r.mu.Lock()
			if r.life != nil {
				// A replica that does not read its lifeline must not stall the deployer; every
				// line holds every rotation, so the next one repairs a lost one.
				r.life.SetWriteDeadline(time.Now().Add(time.Second))
				r.life.Write(line)
			}
			r.mu.Unlock()
		}
	}
}

func unixEndpoints(socks []string) []endpoint.Endpoint {
	eps := make([]endpoint.Endpoint, len(socks))
	for i, s := range socks {
		eps[i] = endpoint.Unix(s)
	}
	return eps
}

// setState records the replica's process and state for the diagnostics page.
func (r *replica) setState(pid int, state string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if state == "starting" && r.pid != 0 || state == "starting" && r.lastExit != "" {
		r.restarts++
	}
	if state == "starting" {
		r.healthy, r.reason = true, ""
	}
	r.pid, r.state = pid, state
}

// terminate asks the process to drain and stop, and kills it if it does not in time.
func (r *replica) terminate(cmd *exec.Cmd, exited <-chan error) error {
	cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(r.d.cfg.DrainTimeout + 5*time.Second)
	defer t.Stop()
	select {
	case err := <-exited:
		return err
	case <-t.C:
		cmd.Process.Kill()
		return <-exited
	}
}

// connectGroup returns the connection to the replicas of g in its rotation, as r resolves
// them, with a client span per call when cfg has a tracer. Its health counts in h.
func connectGroup(ctx context.Context, g Group, cfg Config, r resolve.Resolver, h *health) *groupConn {
	opts := call.ClientOptions{
		Name: "group " + g.Name, Balancer: groupBalancer(g), Logger: cfg.Logger, Tracer: cfg.Tracer, Backoff: interBackoff,
		MeterProvider:  cfg.MeterProvider,
		OnHealthChange: func(healthy bool) { h.channel(g.Name, healthy) },
	}
	return &groupConn{connect: func() (call.Connection, error) {
		return call.Connect(ctx, r, opts)
	}}
}

// groupConn is a Connection between components. It connects on its first call, so that
// replicas that start together do not dial each other before they listen; and its calls wait
// for a replica of the callee's group to be ready (while one restarts, or before the first
// one serves), up to the caller's deadline, instead of failing at once.
type groupConn struct {
	connect func() (call.Connection, error)

	mu     sync.Mutex
	conn   call.Connection
	err    error
	closed bool
}

func (l *groupConn) get() (call.Connection, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, call.ErrClosed
	}
	if l.conn == nil && l.err == nil {
		l.conn, l.err = l.connect()
	}
	return l.conn, l.err
}

func (l *groupConn) Call(ctx context.Context, key call.MethodKey, args []byte, opts call.CallOptions) ([]byte, error) {
	c, err := l.get()
	if err != nil {
		return nil, err
	}
	opts.WaitForReady = true
	return c.Call(ctx, key, args, opts)
}

// CallAll implements [call.FanOut] through the group's Connection, connecting first.
func (l *groupConn) CallAll(ctx context.Context, key call.MethodKey, args []byte, opts call.CallOptions) iter.Seq[call.Reply] {
	c, err := l.get()
	if err == nil {
		if f, ok := c.(call.FanOut); ok {
			return f.CallAll(ctx, key, args, opts)
		}
		err = errors.New("runtime: the group's connection cannot call every replica")
	}
	return func(yield func(call.Reply) bool) { yield(call.Reply{Err: err}) }
}

// status returns the connection's status, or false before its first call.
func (l *groupConn) status() (call.ConnectionStatus, bool) {
	l.mu.Lock()
	c := l.conn
	l.mu.Unlock()
	in, ok := c.(call.Inspectable)
	if !ok {
		return call.ConnectionStatus{}, false
	}
	return in.Status(), true
}

func (l *groupConn) Close() {
	l.mu.Lock()
	c := l.conn
	l.closed = true
	l.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// childPlan is what a replica is told about the deployment.
type childPlan struct {
	Groups   []Group
	Rotation map[string][]string // the sockets in rotation, by group
}

func (d *deployment) planForChild() childPlan {
	var p childPlan
	for _, g := range d.groups {
		p.Groups = append(p.Groups, g.Group)
	}
	d.rotMu.Lock()
	p.Rotation = maps.Clone(d.rotation)
	d.rotMu.Unlock()
	return p
}

// prefixLines copies lines from r to w, each prefixed with "[name] ". A line longer than the
// buffer is copied in pieces (other writers' lines may come between them), never dropped.
func prefixLines(w io.Writer, r io.Reader, name string) {
	br := bufio.NewReaderSize(r, 64<<10)
	prefix := []byte("[" + name + "] ")
	start := true
	for {
		chunk, err := br.ReadSlice('\n')
		if len(chunk) > 0 {
			if start {
				w.Write(append(prefix[:len(prefix):len(prefix)], chunk...))
			} else {
				w.Write(chunk)
			}
			start = chunk[len(chunk)-1] == '\n'
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			if !start {
				w.Write([]byte("\n"))
			}
			return
		}
	}
}

// followRotation applies the rotation updates the deployer writes to the lifeline to the
// replica's resolvers, until the lifeline closes.
func followRotation(lifeline io.Reader, resolvers map[string]*resolve.Manual, logger *slog.Logger) {
	sc := bufio.NewScanner(lifeline)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	last := map[string][]string{}
	for sc.Scan() {
		var u rotationUpdate
		if err := json.Unmarshal(sc.Bytes(), &u); err != nil {
			logger.Warn("weft: bad rotation update from the deployer", slog.Any("err", err))
			continue
		}
		for g, socks := range u.Rotation {
			if r, ok := resolvers[g]; ok && !slices.Equal(last[g], socks) {
				last[g] = socks
				r.Update(unixEndpoints(socks)...)
			}
		}
	}
	io.Copy(io.Discard, lifeline) // a line too long for the scanner: keep waiting for EOF
}

// runChild serves the components of this process's group until it is told to stop, then
// exits the process.
func runChild(ctx context.Context, cfg Config) error {
	name, sock := os.Getenv(childEnv), os.Getenv(socketEnv)
	ready := os.NewFile(3, "weft-ready")
	lifeline := os.NewFile(4, "weft-lifeline")
	if ready == nil || lifeline == nil {
		return fmt.Errorf("runtime: replica %s started without its pipes", name)
	}
	// A replica that cannot start tells the deployer why, which fails Run at startup.
	fail := func(err error) error {
		err = fmt.Errorf("runtime: replica %s: %w", name, err)
		ready.WriteString(failedPrefix + strings.ReplaceAll(err.Error(), "\n", " ") + "\n")
		ready.Close()
		return err
	}
	var p childPlan
	if err := json.Unmarshal([]byte(os.Getenv(planEnv)), &p); err != nil {
		return fail(fmt.Errorf("bad plan: %w", err))
	}
	group, _, _ := strings.Cut(name, "/")
	logger := cfg.Logger
	ctx, stop := signalContext(ctx)
	defer stop()
	resolvers := map[string]*resolve.Manual{}
	for _, g := range p.Groups {
		rot, ok := p.Rotation[g.Name]
		if !ok {
			rot = g.Sockets
		}
		resolvers[g.Name] = resolve.NewManual(unixEndpoints(rot)...)
	}
	parentGone := make(chan struct{})
	go func() {
		defer close(parentGone)
		followRotation(lifeline, resolvers, logger) // returns when the deployer's end closes
	}()
	hs, err := newHost(ctx, cfg, p.Groups, group, func(g Group) (resolve.Resolver, error) { return resolvers[g.Name], nil })
	if err != nil {
		return fail(err)
	}
	l, err := listenUnix(sock)
	if err != nil {
		hs.close()
		return fail(err)
	}
	served, stopServing := hs.serve(l)
	ready.WriteString(readyLine)
	defer ready.Close()
	hs.health.report(func(healthy bool, reason string) {
		if healthy {
			ready.WriteString(healthyLine)
		} else {
			ready.WriteString(unhealthyPrefix + strings.ReplaceAll(reason, "\n", " ") + "\n")
		}
	})
	logger.Info("weft: replica serving", slog.String("replica", name), slog.String("socket", sock))

	select {
	case <-ctx.Done():
	case <-parentGone:
	case err := <-served:
		return fmt.Errorf("runtime: replica %s: %w", name, err)
	}
	stopServing() // drains: go-away, calls in flight finish
	<-served
	hs.close()
	os.Exit(0)
	return nil
}

// host is a process that serves the components of one group, and reaches the other groups'
// components through Connections.
type host struct {
	cfg      Config
	w        *wiring
	health   *health
	hm       call.HandlerMap
	inFlight atomic.Int64 // calls of the group's components being served

	conns *groupConns
}

// newHost creates the components of the group named mine, out of groups. Their references
// to components of other groups reach them through resolverOf(group).
func newHost(ctx context.Context, cfg Config, groups []Group, mine string, resolverOf func(Group) (resolve.Resolver, error)) (*host, error) {
	hs := &host{cfg: cfg, health: newHealth()}
	var me *Group
	for i := range groups {
		if groups[i].Name == mine {
			me = &groups[i]
		}
	}
	if me == nil {
		return nil, fmt.Errorf("no group is named %q", mine)
	}
	hs.conns = newGroupConns(ctx, cfg, groups, mine, resolverOf, hs.health)
	w, err := newWiring(cfg, hs.health, hs.conns.remote)
	if err != nil {
		return nil, err
	}
	hs.w = w
	server, err := newMethodMetrics(cfg.MeterProvider, "server")
	if err != nil {
		return nil, err
	}
	for _, c := range me.Components {
		reg, ok := lookupName(c)
		if !ok {
			hs.close()
			return nil, fmt.Errorf("component %s is not registered in this program", c)
		}
		w.mu.Lock()
		impl, err := w.createLocked(reg)
		if err == nil {
			w.comps[reg.Iface] = reg.LocalStub(impl, cfg.Tracer)
		}
		w.mu.Unlock()
		if err != nil {
			hs.close()
			return nil, err
		}
		reg.AddHandlers(impl, &hs.hm)
	}
	server.meterHandlers(&hs.hm)
	hs.hm.Wrap(func(_, _ string, h call.Handler) call.Handler {
		return func(ctx context.Context, args []byte) ([]byte, error) {
			hs.inFlight.Add(1)
			defer hs.inFlight.Add(-1)
			return h(ctx, args)
		}
	})
	// The runtime's own method, after the wrapping: not counted, not measured.
	started := time.Now()
	hs.hm.Set(diagnosticsComponent, "Diagnostics", func(context.Context, []byte) ([]byte, error) {
		return json.Marshal((&diag{started: started, mode: "multi", w: hs.w, host: hs, conns: hs.conns}).snapshot())
	})
	return hs, nil
}

// serve serves the group's components on l. It returns a channel that receives Serve's result,
// and a function that drains the server (go-away, then the calls in flight finish, for at
// most Config.DrainTimeout).
func (hs *host) serve(l net.Listener) (<-chan error, context.CancelFunc) {
	serveCtx, stopServing := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- call.Serve(serveCtx, call.NetListener(l, &hs.hm), call.ServerOptions{Logger: hs.cfg.Logger, DrainTimeout: hs.cfg.DrainTimeout, Tracer: hs.cfg.Tracer})
	}()
	return served, stopServing
}

// close shuts the components down and closes the Connections to other groups.
func (hs *host) close() {
	if hs.w != nil {
		hs.w.close()
	}
	hs.conns.close()
}

// groupConns are a process's Connections to the groups of components it does not host, made
// on first use.
type groupConns struct {
	ctx      context.Context
	cfg      Config
	groups   []Group
	local    string // the group this process hosts, or ""
	resolver func(Group) (resolve.Resolver, error)
	health   *health

	mu sync.Mutex
	// guarded by mu
	conns map[string]*groupConn // by group
}

func newGroupConns(ctx context.Context, cfg Config, groups []Group, local string, resolver func(Group) (resolve.Resolver, error), h *health) *groupConns {
	return &groupConns{ctx: ctx, cfg: cfg, groups: groups, local: local, resolver: resolver, health: h, conns: map[string]*groupConn{}}
}

// remote is the wiring's way to reach the component of reg: through the Connection to its
// group, or, for the local group, not at all (it is created here).
func (gc *groupConns) remote(reg *Registration) (call.Connection, bool, error) {
	for _, g := range gc.groups {
		if !slices.Contains(g.Components, reg.Name) {
			continue
		}
		if g.Name == gc.local {
			return nil, false, nil
		}
		gc.mu.Lock()
		defer gc.mu.Unlock()
		c, ok := gc.conns[g.Name]
		if !ok {
			r, err := gc.resolver(g)
			if err != nil {
				return nil, false, fmt.Errorf("runtime: group %s: %w", g.Name, err)
			}
			c = connectGroup(gc.ctx, g, gc.cfg, r, gc.health)
			gc.conns[g.Name] = c
		}
		return c, true, nil
	}
	return nil, false, fmt.Errorf("runtime: component %s is in no group", reg.Name)
}

// channels describes the Connection to every other group, in the groups' order.
func (gc *groupConns) channels() []ChannelDiagnostic {
	gc.mu.Lock()
	defer gc.mu.Unlock()
	var out []ChannelDiagnostic
	for _, g := range gc.groups {
		if g.Name != gc.local {
			out = append(out, channelDiagnostic(g.Name, gc.conns[g.Name]))
		}
	}
	return out
}

// close closes the Connections; later ones are made anew.
func (gc *groupConns) close() {
	gc.mu.Lock()
	defer gc.mu.Unlock()
	for _, c := range gc.conns {
		c.Close()
	}
	gc.conns = map[string]*groupConn{}
}
