package testapp

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/embedded"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/runtime"
)

// Environment of the program and of its replicas (which inherit it).
const (
	// EnvArgs holds the program's arguments when a test binary runs as the program: its
	// TestMain calls Main(strings.Fields(os.Getenv(EnvArgs))) instead of running tests.
	EnvArgs = "WEFT_TESTAPP"
	// EnvSpawnLog names a file to which every replica appends "group/index pid\n" when it
	// starts, if set.
	EnvSpawnLog = "WEFT_TESTAPP_SPAWNLOG"
	// EnvLog is the default of -log: "debug", "info", "warn" (the default) or "error".
	EnvLog = "WEFT_TESTAPP_LOG"
	// EnvSecret is the secret the "secret" mode sends as metadata; the "trace" mode sends it
	// too, if set.
	EnvSecret = "WEFT_TESTAPP_SECRET"
	// EnvFailInit lists, separated by commas, the components ("Store", "Front", "Ledger")
	// whose Init fails in replicas.
	EnvFailInit = "WEFT_TESTAPP_FAILINIT"
)

// Started reports whether this process should run Main rather than tests: it was started as
// the program (EnvArgs is set) or as a replica of a multi-process deployment.
func Started() bool {
	return os.Getenv(EnvArgs) != "" || runtime.ReplicaName() != "main"
}

// Groups is the multi-process layout of the application: the Store in a sharded group of
// replicas, the other components in two single-replica groups, CycleA and CycleB apart (in one
// process they are a cycle), and the Pool in a group of PoolReplicas.
func Groups(replicas int) []runtime.Group {
	return []runtime.Group{
		{Name: "store", Components: []string{StoreName}, Replicas: replicas, Sharded: true},
		{Name: "front", Components: []string{FrontName, CycleAName}},
		{Name: "ledger", Components: []string{LedgerName, CycleBName}},
		{Name: "pool", Components: []string{PoolName}, Replicas: PoolReplicas},
	}
}

// PoolReplicas is the number of replicas of the Pool.
const PoolReplicas = 2

// Processes is how many replica processes Groups(replicas) runs.
func Processes(replicas int) int { return replicas + 2 + PoolReplicas }

type options struct {
	mode     string
	single   bool
	replicas int
	workers  int
	calls    int
	size     int
	deadline time.Duration
	hold     time.Duration
	long     int
}

// app is the program's main component.
type app struct {
	runtime.Implements[runtime.Main]
	pool   runtime.Ref[Pool]
	front  runtime.Ref[Front]
	store  runtime.Ref[Store]
	ledger runtime.Ref[Ledger]
	cycle  runtime.Ref[CycleA]
}

// Main runs the program with args and returns its exit code. Replicas run the same arguments
// (the runtime starts them with this process's command line), so they compute the same
// Config. The program's output, one fact per line, is what the runtime's tests read; -mode
// selects what it does:
//
//   - idle: prints the replica of every shard, then waits to be stopped;
//   - load: -workers goroutines call Front.Put round the shards (each call with its own
//     -deadline, unaffected by the stop signal) until stopped or -calls calls each, printing
//     every call; then a summary;
//   - hold: a Front.Hold of -hold on shard 1, then a Put on shard 1, then waits to be stopped;
//   - print: every Store replica prints a line to its stdout and its stderr, then, with
//     -long, shard 0 prints a line of -long bytes and then a short one;
//   - secret: calls that carry the secret of EnvSecret as metadata, through the Front and
//     directly, succeeding and failing in various ways;
//   - cycle: calls CycleA, which calls CycleB, which calls CycleA;
//   - health: calls the Pool until both replicas answered, makes one sick for -hold, prints
//     when calls stop reaching it and when they reach it again;
//   - trace: every process traces its calls with a tracer that prints a line per span (see
//     [TraceLine]); the program calls Front.Get, Front.Put and Front.Get on shard 1, each
//     from a fresh context (with the secret of EnvSecret as metadata, if set), printing
//     "trace call=<get-before|put|get-after> …" after each, then "trace done".
func Main(args []string) int {
	var o options
	fs := flag.NewFlagSet("testapp", flag.ContinueOnError)
	fs.StringVar(&o.mode, "mode", "idle", "what to do")
	fs.BoolVar(&o.single, "single", false, "run every component in this process")
	level := fs.String("log", os.Getenv(EnvLog), "log level")
	fs.IntVar(&o.replicas, "replicas", 3, "replicas of the Store")
	fs.IntVar(&o.workers, "workers", 4, "load: concurrent callers")
	fs.IntVar(&o.calls, "calls", 0, "load: calls per worker (0: until stopped)")
	fs.IntVar(&o.size, "size", 16, "load: bytes per value")
	fs.DurationVar(&o.deadline, "deadline", 5*time.Second, "deadline of every call")
	fs.DurationVar(&o.hold, "hold", 2*time.Second, "hold: how long the Store holds the call")
	fs.IntVar(&o.long, "long", 0, "print: length of a long line")
	drain := fs.Duration("drain", 0, "Config.DrainTimeout")
	flags := runtime.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var lvl slog.Level
	if *level == "" {
		*level = "warn"
	}
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		return 2
	}
	if name := runtime.ReplicaName(); name != "main" {
		if path := os.Getenv(EnvSpawnLog); path != "" {
			if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
				fmt.Fprintf(f, "%s %d\n", name, os.Getpid())
				f.Close()
			}
		}
	}
	base := runtime.Config{
		Multi:        !o.single,
		Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})),
		Groups:       Groups(o.replicas),
		DrainTimeout: *drain,
	}
	if o.mode == "trace" {
		base.Tracer = &lineTracer{out: os.Stdout}
	}
	cfg, err := flags.Config(base)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = runtime.Run(ctx, cfg, func(ctx context.Context, a *app) error { return a.run(ctx, o) })
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		return 1
	}
	return 0
}

func (a *app) run(ctx context.Context, o options) error {
	fmt.Printf("main pid=%d\n", os.Getpid())
	switch o.mode {
	case "idle":
		if err := a.shards(ctx, o); err != nil {
			return err
		}
		fmt.Println("ready")
		<-ctx.Done()
	case "load":
		return a.load(ctx, o)
	case "hold":
		return a.holdThenPut(ctx, o)
	case "print":
		return a.print(o)
	case "secret":
		return a.secret(o)
	case "health":
		if err := a.health(ctx, o); err != nil {
			return err
		}
	case "trace":
		return a.traced(ctx, o)
	case "cycle":
		c, cancel := detached(ctx, o.deadline)
		defer cancel()
		s, err := a.cycle.Get().A(c, 3)
		fmt.Printf("cycle %q %v\n", s, err)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown mode %q", o.mode)
	}
	fmt.Println("done")
	return nil
}

// detached is a context for one call: not cancelled when the program is asked to stop, so
// calls in flight then finish, and bounded by d.
func detached(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}

// replicaOf is the replica that owns shard.
func (o options) replicaOf(shard uint64) string {
	if o.single {
		return "main"
	}
	return fmt.Sprintf("store/%d", shard%uint64(o.replicas))
}

// shards prints the replica and process of every shard.
func (a *app) shards(ctx context.Context, o options) error {
	for s := range uint64(o.replicas) {
		c, cancel := detached(ctx, o.deadline)
		p, err := a.front.Get().Put(c, s, "warm", "up")
		cancel()
		if err != nil {
			return fmt.Errorf("shard %d: %w", s, err)
		}
		fmt.Printf("shard=%d replica=%s pid=%d\n", s, p.Replica, p.Pid)
	}
	return nil
}

func (a *app) load(ctx context.Context, o options) error {
	if err := a.shards(ctx, o); err != nil {
		return err
	}
	fmt.Println("load start")
	var calls, ok, failed, wrong, late atomic.Int64
	var wg sync.WaitGroup
	for w := range o.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pad := strings.Repeat("x", o.size)
			for n := 0; ctx.Err() == nil && (o.calls == 0 || n < o.calls); n++ {
				shard := uint64(w+n) % uint64(o.replicas)
				key := fmt.Sprintf("w%d-%d", w, n)
				value := key + pad
				c, cancel := detached(ctx, o.deadline)
				start := time.Now()
				p, err := a.front.Get().Put(c, shard, key, value)
				took := time.Since(start)
				cancel()
				calls.Add(1)
				if took > o.deadline+time.Second {
					late.Add(1)
					fmt.Printf("call LATE shard=%d ms=%d\n", shard, took.Milliseconds())
				}
				switch {
				case err != nil:
					failed.Add(1)
					fmt.Printf("call shard=%d err ms=%d: %v\n", shard, took.Milliseconds(), err)
				case p.Key != key || p.Value != value || p.Replica != o.replicaOf(shard):
					wrong.Add(1)
					fmt.Printf("call shard=%d WRONG key=%q replica=%s\n", shard, p.Key, p.Replica)
				default:
					ok.Add(1)
					fmt.Printf("call shard=%d ok replica=%s pid=%d ms=%d\n", shard, p.Replica, p.Pid, took.Milliseconds())
				}
			}
		}()
	}
	wg.Wait()
	c, cancel := detached(ctx, o.deadline)
	defer cancel()
	counts, err := a.ledger.Get().Counts(c)
	if err != nil {
		return err
	}
	fmt.Printf("summary calls=%d ok=%d err=%d wrong=%d late=%d ledger=%d\n",
		calls.Load(), ok.Load(), failed.Load(), wrong.Load(), late.Load(), counts["put"]-int64(o.replicas))
	fmt.Println("done")
	return nil
}

func (a *app) holdThenPut(ctx context.Context, o options) error {
	c, cancel := detached(ctx, o.hold+o.deadline)
	p, err := a.front.Get().Hold(c, 1, o.hold)
	cancel()
	if err != nil {
		fmt.Printf("hold err: %v\n", err)
	} else {
		fmt.Printf("hold ok replica=%s pid=%d\n", p.Replica, p.Pid)
	}
	c, cancel = detached(ctx, o.deadline)
	p, err = a.front.Get().Put(c, 1, "after", "hold")
	cancel()
	if err != nil {
		fmt.Printf("after err: %v\n", err)
	} else {
		fmt.Printf("after ok replica=%s pid=%d\n", p.Replica, p.Pid)
	}
	fmt.Println("waiting")
	<-ctx.Done()
	return nil
}

func (a *app) print(o options) error {
	ctx, cancel := context.WithTimeout(context.Background(), o.deadline)
	defer cancel()
	for s := range uint64(o.replicas) {
		p, err := a.front.Get().Print(ctx, s, fmt.Sprintf("stdout-line shard=%d", s), fmt.Sprintf("stderr-line shard=%d", s))
		if err != nil {
			return err
		}
		fmt.Printf("printed shard=%d replica=%s pid=%d\n", s, p.Replica, p.Pid)
	}
	if o.long > 0 {
		if _, err := a.front.Get().Print(ctx, 0, strings.Repeat("y", o.long), ""); err != nil {
			return err
		}
		if _, err := a.front.Get().Print(ctx, 0, "after-long-line", ""); err != nil {
			return err
		}
		fmt.Println("printed long")
	}
	return nil
}

// secret makes calls that carry the secret as metadata values, and prints what happened,
// errors included.
func (a *app) secret(o options) error {
	secret := os.Getenv(EnvSecret)
	if secret == "" {
		return errors.New("no secret")
	}
	bearer := "Bearer " + secret
	md := call.Metadata{MetadataKey: bearer, "x-api-key": secret}
	base, cancel := context.WithTimeout(call.WithMetadata(context.Background(), md), 4*o.deadline)
	defer cancel()
	report := func(step string, p Placed, err error) {
		fmt.Printf("secret step=%s metadata-arrived=%t err=%v\n", step, err == nil && p.Metadata == Fingerprint(bearer), err)
	}

	p, err := a.front.Get().Put(base, 0, "k", "v")
	report("front", p, err)
	p, err = a.store.Get().Put(call.WithShardKey(base, 1), "k", "v")
	report("direct", p, err)

	short, cancelShort := context.WithTimeout(base, 50*time.Millisecond)
	p, err = a.front.Get().Hold(short, 2, time.Second)
	cancelShort()
	report("deadline", p, err)

	p, err = a.store.Get().Hold(call.WithShardKey(base, 2), -time.Second)
	report("panic", p, err)

	big := call.Metadata{MetadataKey: strings.Repeat(secret, 9<<10/len(secret)+1)}
	p, err = a.front.Get().Put(call.WithMetadata(base, big), 0, "k", "v")
	report("too-large", p, err)

	many := call.Metadata{}
	for i := range 100 {
		many[fmt.Sprintf("k%d", i)] = fmt.Sprintf("%s-%d", secret, i)
	}
	p, err = a.store.Get().Put(call.WithMetadata(call.WithShardKey(base, 0), many), "k", "v")
	report("too-many", p, err)

	p, err = a.front.Get().Get(base, 1, "missing")
	report("not-found", p, err)
	fmt.Println("done")
	return nil
}

// health shows the deployer taking a sick replica out of rotation and back: it prints
// "pool replicas=a,b", "sick=r", "avoided=r calls=n" once 50 calls in a row went elsewhere,
// and "back=r" once a call reaches r again. Each stage gives up after 20 seconds.
func (a *app) health(ctx context.Context, o options) error {
	who := func() (string, error) {
		c, cancel := detached(ctx, o.deadline)
		defer cancel()
		p, err := a.pool.Get().Who(c)
		return p.Replica, err
	}
	seen := map[string]bool{}
	for i := 0; len(seen) < PoolReplicas || o.single && len(seen) < 1; i++ {
		if i > 1000 {
			return fmt.Errorf("only %v answered in %d calls", seen, i)
		}
		r, err := who()
		if err != nil {
			return err
		}
		seen[r] = true
	}
	fmt.Printf("pool replicas=%s\n", strings.Join(slices.Sorted(maps.Keys(seen)), ","))
	c, cancel := detached(ctx, o.deadline)
	p, err := a.pool.Get().Sicken(c, o.hold)
	cancel()
	if err != nil {
		return err
	}
	fmt.Printf("sick=%s\n", p.Replica)
	stage := func(what string, done func(string) bool) (int, error) {
		give := time.Now().Add(20 * time.Second)
		for n := 1; ; n++ {
			r, err := who()
			if err != nil {
				return n, err
			}
			if done(r) {
				return n, nil
			}
			if time.Now().After(give) {
				return n, fmt.Errorf("%s: not after %d calls", what, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	run := 0
	n, err := stage("avoiding "+p.Replica, func(r string) bool {
		if r == p.Replica {
			run = 0
		} else {
			run++
		}
		return run >= 50
	})
	if err != nil {
		return err
	}
	fmt.Printf("avoided=%s calls=%d\n", p.Replica, n)
	if _, err := stage("back to "+p.Replica, func(r string) bool { return r == p.Replica }); err != nil {
		return err
	}
	fmt.Printf("back=%s\n", p.Replica)
	return nil
}

// traceShard is the shard the "trace" mode calls.
const traceShard = 1

// traced makes the calls of the "trace" mode: Front.Get, Front.Put and Front.Get of one key
// on traceShard, each from a context without a span, so that each starts a trace of its own.
// It fails if the Put fails.
func (a *app) traced(ctx context.Context, o options) error {
	var md call.Metadata
	if secret := os.Getenv(EnvSecret); secret != "" {
		md = call.Metadata{MetadataKey: "Bearer " + secret}
	}
	do := func(step string, f func(context.Context) (Placed, error)) error {
		c, cancel := detached(ctx, o.deadline)
		defer cancel()
		if md != nil {
			c = call.WithMetadata(c, md)
		}
		p, err := f(c)
		arrived := err == nil && md != nil && p.Metadata == Fingerprint(md[MetadataKey])
		fmt.Printf("trace call=%s replica=%s metadata-arrived=%t err=%v\n", step, p.Replica, arrived, err)
		return err
	}
	front := a.front.Get()
	get := func(c context.Context) (Placed, error) { return front.Get(c, traceShard, "traced") }
	do("get-before", get) // not found yet: an application error, which is fine
	if err := do("put", func(c context.Context) (Placed, error) { return front.Put(c, traceShard, "traced", "value") }); err != nil {
		return err
	}
	do("get-after", get)
	fmt.Println("trace done")
	return nil
}

// TraceLine is the format of the line the "trace" mode's tracer prints when a span ends: the
// span's name, its kind (client, server or internal), its trace id, its own span id, its
// parent's span id (0 for a root span), and the runtime.ReplicaName of the process. Span ids
// are drawn at random, so that they are unique across processes.
const TraceLine = "span name=%s kind=%s trace=%s span=%s parent=%s replica=%s\n"

// lineTracer is the tracer of the "trace" mode: every span gets a fresh span id and its
// parent's trace id (a fresh one if it has no parent), and prints a TraceLine to out when it
// ends.
type lineTracer struct {
	embedded.Tracer

	mu  sync.Mutex // serializes lines
	out io.Writer
}

var _ trace.Tracer = (*lineTracer)(nil)

// Start implements trace.Tracer.
func (t *lineTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	cfg := trace.NewSpanStartConfig(opts...)
	parent := trace.SpanContextFromContext(ctx)
	if cfg.NewRoot() {
		parent = trace.SpanContext{}
	}
	sc := trace.SpanContextConfig{TraceID: parent.TraceID(), TraceFlags: parent.TraceFlags() | trace.FlagsSampled, TraceState: parent.TraceState()}
	if !parent.IsValid() {
		sc.TraceID = trace.TraceID{}
		for !sc.TraceID.IsValid() {
			rand.Read(sc.TraceID[:])
		}
	}
	for !sc.SpanID.IsValid() {
		rand.Read(sc.SpanID[:])
	}
	s := &lineSpan{t: t, sc: trace.NewSpanContext(sc), parent: parent, kind: cfg.SpanKind(), name: name}
	return trace.ContextWithSpan(ctx, s), s
}

// lineSpan is a span of a lineTracer. Methods it does not override are the no-op span's.
type lineSpan struct {
	noop.Span
	t      *lineTracer
	sc     trace.SpanContext
	parent trace.SpanContext // invalid for a root span
	kind   trace.SpanKind

	mu sync.Mutex
	// guarded by mu
	name  string
	ended bool
}

var _ trace.Span = (*lineSpan)(nil)

// SpanContext implements trace.Span.
func (s *lineSpan) SpanContext() trace.SpanContext { return s.sc }

// IsRecording implements trace.Span: a span records until it ends.
func (s *lineSpan) IsRecording() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.ended
}

// SetName implements trace.Span.
func (s *lineSpan) SetName(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ended {
		s.name = name
	}
}

// End implements trace.Span: the first call prints the span's line; later calls do nothing.
func (s *lineSpan) End(...trace.SpanEndOption) {
	s.mu.Lock()
	ended, name := s.ended, s.name
	s.ended = true
	s.mu.Unlock()
	if ended {
		return
	}
	kind := s.kind.String()
	if s.kind == trace.SpanKindUnspecified {
		kind = trace.SpanKindInternal.String()
	}
	parent := "0"
	if s.parent.IsValid() {
		parent = s.parent.SpanID().String()
	}
	s.t.mu.Lock()
	defer s.t.mu.Unlock()
	fmt.Fprintf(s.t.out, TraceLine, name, kind, s.sc.TraceID(), s.sc.SpanID(), parent, runtime.ReplicaName())
}
