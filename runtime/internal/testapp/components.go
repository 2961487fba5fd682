// Package testapp is a small weft application for the runtime's tests: a key-value Store
// sharded over replicas, a Front that every call of the program goes through, a Ledger that
// counts operations, and two components that refer to each other (CycleA and CycleB).
//
// Its components record their Init and Shutdown calls ([Events]) and can be made to fail
// Init ([SetInitError]), for the single-process tests. [Main] is a program over them that the
// runtime's tests start as a real process tree (see program.go).
package testapp

//go:generate go run github.com/weftrpc/weft/cmd/rpcgen

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/runtime"
)

// Full names of the components, for runtime.Group.
const (
	pkg        = "github.com/weftrpc/weft/runtime/internal/testapp/"
	StoreName  = pkg + "Store"
	FrontName  = pkg + "Front"
	LedgerName = pkg + "Ledger"
	CycleAName = pkg + "CycleA"
	CycleBName = pkg + "CycleB"
	PoolName   = pkg + "Pool"
)

// MetadataKey is the metadata entry whose value the Store fingerprints into Placed.Metadata.
const MetadataKey = "authorization"

// ErrNotFound is returned by Get for a key that was never put.
var ErrNotFound = errors.New("testapp: key not found")

// Store is one shard of a key-value store.
type Store interface {
	Put(ctx context.Context, key, value string) (Placed, error)
	Get(ctx context.Context, key string) (Placed, error)
	// Hold prints "store: hold start …" to its standard output, waits d (or until ctx is
	// done), and prints "store: hold end …". A negative d panics.
	Hold(ctx context.Context, d time.Duration) (Placed, error)
	// Print writes stdout and stderr (if not empty) to the process's standard output and
	// standard error, each followed by a newline.
	Print(ctx context.Context, stdout, stderr string) (Placed, error)
}

// Placed is the answer of a Store: a value and where it lives.
type Placed struct {
	Key, Value string
	Version    int64
	Replica    string // runtime.ReplicaName() of the process that answered
	Pid        int    // its process id
	Metadata   uint64 // Fingerprint of the MetadataKey entry of the call's metadata, or 0
}

// Fingerprint is what Placed.Metadata holds for a metadata value v.
func Fingerprint(v string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(v))
	return h.Sum64() | 1 // never 0
}

// Front is what the program calls: it sends each call to the Store replica that owns shard,
// passing on the call's metadata, and records it in the Ledger.
type Front interface {
	Put(ctx context.Context, shard uint64, key, value string) (Placed, error)
	Get(ctx context.Context, shard uint64, key string) (Placed, error)
	Hold(ctx context.Context, shard uint64, d time.Duration) (Placed, error)
	Print(ctx context.Context, shard uint64, stdout, stderr string) (Placed, error)
}

// Pool is a replicated component without shards: its calls are balanced over the replicas in
// its group's rotation.
type Pool interface {
	// Who returns the replica that answered.
	Who(ctx context.Context) (Placed, error)
	// Sicken makes the replica that answers report itself unhealthy (through
	// Implements.ReportHealth) for d, and healthy again after that.
	Sicken(ctx context.Context, d time.Duration) (Placed, error)
}

// Ledger counts the operations of Front.
type Ledger interface {
	Record(ctx context.Context, op string) error
	Counts(ctx context.Context) (map[string]int64, error)
}

// CycleA and CycleB refer to each other: in one process they cannot be created; in different
// processes they can. A(n) returns "a" followed by B(n-1) if n > 0, and B likewise.
type CycleA interface {
	A(ctx context.Context, n int) (string, error)
}

// CycleB: see CycleA.
type CycleB interface {
	B(ctx context.Context, n int) (string, error)
}

var hooks struct {
	sync.Mutex
	events  []string
	initErr map[string]error
}

func record(event string) {
	hooks.Lock()
	defer hooks.Unlock()
	hooks.events = append(hooks.events, event)
}

// Events returns the Init and Shutdown calls of this process's components so far, in order:
// "init Store", "shutdown Front", ….
func Events() []string {
	hooks.Lock()
	defer hooks.Unlock()
	return append([]string(nil), hooks.events...)
}

// ResetEvents forgets the events recorded so far and every error set by SetInitError.
func ResetEvents() {
	hooks.Lock()
	defer hooks.Unlock()
	hooks.events = nil
	hooks.initErr = nil
}

// SetInitError makes the Init of component name ("Store", "Front" or "Ledger") in this
// process return err, until ResetEvents.
func SetInitError(name string, err error) {
	hooks.Lock()
	defer hooks.Unlock()
	if hooks.initErr == nil {
		hooks.initErr = map[string]error{}
	}
	hooks.initErr[name] = err
}

// shutdownHook records the Shutdown of component name and, in a replica, prints it.
func shutdownHook(name string) {
	record("shutdown " + name)
	if r := runtime.ReplicaName(); r != "main" {
		fmt.Printf("%s: shutdown replica=%s pid=%d\n", strings.ToLower(name), r, os.Getpid())
	}
}

func initHook(name string) error {
	hooks.Lock()
	err := hooks.initErr[name]
	hooks.Unlock()
	if runtime.ReplicaName() != "main" && slices.Contains(strings.Split(os.Getenv(EnvFailInit), ","), name) {
		err = fmt.Errorf("testapp: %s cannot start in %s", name, runtime.ReplicaName())
	}
	if err != nil {
		record("init-failed " + name)
		return err
	}
	record("init " + name)
	return nil
}

func placed(ctx context.Context, p Placed) Placed {
	p.Replica = runtime.ReplicaName()
	p.Pid = os.Getpid()
	if v, ok := call.IncomingMetadata(ctx)[MetadataKey]; ok {
		p.Metadata = Fingerprint(v)
	}
	return p
}

type store struct {
	runtime.Implements[Store]
	mu   sync.Mutex
	data map[string]Placed
}

func (s *store) Init(context.Context) error {
	if err := initHook("Store"); err != nil {
		return err
	}
	s.Logger().Info("testapp: store init", "pid", os.Getpid())
	return nil
}

func (s *store) Shutdown(context.Context) error {
	shutdownHook("Store")
	return nil
}

func (s *store) Put(ctx context.Context, key, value string) (Placed, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.data == nil {
		s.data = map[string]Placed{}
	}
	p := Placed{Key: key, Value: value, Version: s.data[key].Version + 1}
	s.data[key] = p
	return placed(ctx, p), nil
}

func (s *store) Get(ctx context.Context, key string) (Placed, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.data[key]
	if !ok {
		return placed(ctx, Placed{Key: key}), ErrNotFound
	}
	return placed(ctx, p), nil
}

func (s *store) Hold(ctx context.Context, d time.Duration) (Placed, error) {
	if d < 0 {
		panic(fmt.Sprintf("testapp: Hold(%v)", d))
	}
	p := placed(ctx, Placed{})
	fmt.Printf("store: hold start replica=%s pid=%d\n", p.Replica, p.Pid)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		fmt.Printf("store: hold cancelled replica=%s pid=%d\n", p.Replica, p.Pid)
		return p, ctx.Err()
	}
	fmt.Printf("store: hold end replica=%s pid=%d\n", p.Replica, p.Pid)
	return p, nil
}

func (s *store) Print(ctx context.Context, stdout, stderr string) (Placed, error) {
	if stdout != "" {
		fmt.Fprintln(os.Stdout, stdout)
	}
	if stderr != "" {
		fmt.Fprintln(os.Stderr, stderr)
	}
	return placed(ctx, Placed{}), nil
}

type front struct {
	runtime.Implements[Front]
	store  runtime.Ref[Store]
	ledger runtime.Ref[Ledger]
}

func (f *front) Init(context.Context) error { return initHook("Front") }

func (f *front) Shutdown(context.Context) error {
	shutdownHook("Front")
	return nil
}

// to is ctx for the call to the Store replica that owns shard, carrying ctx's incoming
// metadata on.
func to(ctx context.Context, shard uint64) context.Context {
	if md := call.IncomingMetadata(ctx); md != nil {
		ctx = call.WithMetadata(ctx, md)
	}
	return call.WithShardKey(ctx, shard)
}

func (f *front) Put(ctx context.Context, shard uint64, key, value string) (Placed, error) {
	f.Logger().Debug("testapp: front put", "shard", shard, "key", key)
	if err := f.ledger.Get().Record(ctx, "put"); err != nil {
		return Placed{}, err
	}
	return f.store.Get().Put(to(ctx, shard), key, value)
}

func (f *front) Get(ctx context.Context, shard uint64, key string) (Placed, error) {
	f.Logger().Debug("testapp: front get", "shard", shard, "key", key)
	if err := f.ledger.Get().Record(ctx, "get"); err != nil {
		return Placed{}, err
	}
	return f.store.Get().Get(to(ctx, shard), key)
}

func (f *front) Hold(ctx context.Context, shard uint64, d time.Duration) (Placed, error) {
	return f.store.Get().Hold(to(ctx, shard), d)
}

func (f *front) Print(ctx context.Context, shard uint64, stdout, stderr string) (Placed, error) {
	return f.store.Get().Print(to(ctx, shard), stdout, stderr)
}

type ledger struct {
	runtime.Implements[Ledger]
	mu     sync.Mutex
	counts map[string]int64
}

func (l *ledger) Init(context.Context) error { return initHook("Ledger") }

func (l *ledger) Shutdown(context.Context) error {
	shutdownHook("Ledger")
	return nil
}

func (l *ledger) Record(_ context.Context, op string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.counts == nil {
		l.counts = map[string]int64{}
	}
	l.counts[op]++
	return nil
}

func (l *ledger) Counts(context.Context) (map[string]int64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]int64, len(l.counts))
	for k, v := range l.counts {
		out[k] = v
	}
	return out, nil
}

type cycleA struct {
	runtime.Implements[CycleA]
	b runtime.Ref[CycleB]
}

func (c *cycleA) A(ctx context.Context, n int) (string, error) {
	if n <= 0 {
		return "a", nil
	}
	s, err := c.b.Get().B(ctx, n-1)
	return "a" + s, err
}

type cycleB struct {
	runtime.Implements[CycleB]
	a runtime.Ref[CycleA]
}

func (c *cycleB) B(ctx context.Context, n int) (string, error) {
	if n <= 0 {
		return "b", nil
	}
	s, err := c.a.Get().A(ctx, n-1)
	return "b" + s, err
}

type pool struct {
	runtime.Implements[Pool]
	mu    sync.Mutex
	timer *time.Timer
}

func (p *pool) Who(context.Context) (Placed, error) {
	return Placed{Replica: runtime.ReplicaName(), Pid: os.Getpid()}, nil
}

func (p *pool) Sicken(_ context.Context, d time.Duration) (Placed, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ReportHealth(errors.New("testapp: told to be sick"))
	if p.timer != nil {
		p.timer.Stop()
	}
	p.timer = time.AfterFunc(d, func() { p.ReportHealth(nil) })
	return Placed{Replica: runtime.ReplicaName(), Pid: os.Getpid()}, nil
}

func (p *pool) Init(context.Context) error { return initHook("Pool") }

func (p *pool) Shutdown(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.timer != nil {
		p.timer.Stop()
	}
	shutdownHook("Pool")
	return nil
}
