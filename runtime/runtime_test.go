package runtime_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/runtime"
	"github.com/weftrpc/weft/runtime/internal/testapp"
)

// The tests run the components of package testapp: a Store sharded over replicas, a Front that
// sends calls to the Store replica of a shard and records them in a Ledger, and CycleA and
// CycleB, which refer to each other.
//
// Single-process tests call runtime.Run in this process. Multi-process tests do too, and the
// runtime starts this test binary again for every replica (TestMain runs testapp.Main then);
// end-to-end tests start this test binary as the program (testapp.Main with a -mode), read
// its output line by line, signal it and its replicas, and check /proc for what is left.

// shopApp is a main component that uses the Front, the Ledger and the Store.
type shopApp struct {
	runtime.Implements[runtime.Main]
	front  runtime.Ref[testapp.Front]
	ledger runtime.Ref[testapp.Ledger]
	store  runtime.Ref[testapp.Store]
}

// fullApp also uses CycleA, which only a multi-process deployment can create.
type fullApp struct {
	runtime.Implements[runtime.Main]
	front  runtime.Ref[testapp.Front]
	ledger runtime.Ref[testapp.Ledger]
	store  runtime.Ref[testapp.Store]
	cycle  runtime.Ref[testapp.CycleA]
}

type cycleApp struct {
	runtime.Implements[runtime.Main]
	Cycle runtime.Ref[testapp.CycleA] // exported: only Run uses it
}

// unregistered is a component interface that no code registers.
type unregistered interface {
	Nothing(context.Context) error
}

type unregisteredApp struct {
	runtime.Implements[runtime.Main]
	U runtime.Ref[unregistered] // exported: only Run uses it
}

// noMarker and wrongMarker are main structs that do not embed Implements[Main].
type noMarker struct {
	Front runtime.Ref[testapp.Front]
}

type wrongMarker struct {
	runtime.Implements[testapp.Front]
}

// resetHooks clears the testapp's recorded events and injected Init errors, now and when t ends.
func resetHooks(t *testing.T) {
	testapp.ResetEvents()
	t.Cleanup(testapp.ResetEvents)
}

// syncBuffer is a bytes.Buffer for a logger shared by goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func count(events []string, e string) int {
	n := 0
	for _, x := range events {
		if x == e {
			n++
		}
	}
	return n
}

// TestSingleProcessWiring checks that Run fills the main component's Refs with components
// created in this process, once each, shared by every component that refers to them, with
// loggers labelled with the component.
func TestSingleProcessWiring(t *testing.T) {
	resetHooks(t)
	var logs syncBuffer
	cfg := runtime.Config{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	called := false
	err := runtime.Run(context.Background(), cfg, func(ctx context.Context, a *shopApp) error {
		called = true
		if got := runtime.ReplicaName(); got != "main" {
			t.Errorf("ReplicaName() = %q, want main", got)
		}
		p, err := a.front.Get().Put(ctx, 1, "k", "v1")
		if err != nil {
			return err
		}
		if p.Replica != "main" || p.Pid != os.Getpid() {
			t.Errorf("Put ran in %s (pid %d), want main (pid %d): not a local component", p.Replica, p.Pid, os.Getpid())
		}
		if p.Key != "k" || p.Value != "v1" || p.Version != 1 {
			t.Errorf("Put = %+v", p)
		}
		if _, err := a.front.Get().Put(ctx, 2, "k", "v2"); err != nil {
			return err
		}
		// The Store the main component holds is the one the Front wrote to.
		got, err := a.store.Get().Get(ctx, "k")
		if err != nil || got.Value != "v2" || got.Version != 2 {
			t.Errorf("Store.Get(k) = %+v, %v; want v2 version 2 (the Store the Front used)", got, err)
		}
		// So is the Ledger.
		counts, err := a.ledger.Get().Counts(ctx)
		if err != nil {
			return err
		}
		if counts["put"] != 2 {
			t.Errorf("Ledger counts = %v, want put=2 (the Ledger the Front used)", counts)
		}
		events := testapp.Events()
		for _, c := range []string{"Store", "Front", "Ledger"} {
			if n := count(events, "init "+c); n != 1 {
				t.Errorf("%s initialized %d times, want once; events %q", c, n, events)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !called {
		t.Fatal("Run returned without calling app")
	}
	out := logs.String()
	for _, want := range []string{
		`msg="testapp: store init" component=testapp/Store`,
		`msg="testapp: front put" component=testapp/Front`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("logs lack %q:\n%s", want, out)
		}
	}
}

// TestSingleProcessShutdownOrder checks that components are initialized before app runs, and
// shut down after it returns, in the reverse order: a component after those that use it.
func TestSingleProcessShutdownOrder(t *testing.T) {
	resetHooks(t)
	appErr := errors.New("app failed")
	var during []string
	err := runtime.Run(context.Background(), runtime.Config{}, func(ctx context.Context, a *shopApp) error {
		during = testapp.Events()
		return appErr
	})
	if !errors.Is(err, appErr) {
		t.Fatalf("Run = %v, want app's error", err)
	}
	wantInit := []string{"init Store", "init Ledger", "init Front"} // Front's Refs first
	if !slices.Equal(during, wantInit) {
		t.Fatalf("events while app ran = %q, want %q", during, wantInit)
	}
	after := testapp.Events()
	want := append(slices.Clone(wantInit), "shutdown Front", "shutdown Ledger", "shutdown Store")
	if !slices.Equal(after, want) {
		t.Fatalf("events = %q, want %q (shutdown in reverse order of creation)", after, want)
	}
}

// TestSingleProcessInitError checks that a failing Init fails Run with an error that names the
// component and wraps Init's, that app is not called, and that the components created before
// are shut down.
func TestSingleProcessInitError(t *testing.T) {
	resetHooks(t)
	boom := errors.New("boom: ledger database unavailable")
	testapp.SetInitError("Ledger", boom)
	err := runtime.Run(context.Background(), runtime.Config{}, func(ctx context.Context, a *shopApp) error {
		t.Error("app called although a component failed to initialize")
		return nil
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Run = %v, want an error wrapping Init's", err)
	}
	for _, want := range []string{testapp.LedgerName, "initializing", boom.Error()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Run's error %q does not mention %q", err, want)
		}
	}
	want := []string{"init Store", "init-failed Ledger", "shutdown Store"}
	if got := testapp.Events(); !slices.Equal(got, want) {
		t.Errorf("events = %q, want %q (the Store, created first, shut down)", got, want)
	}
}

// TestSingleProcessRefCycle checks that components referring to each other in a cycle are
// reported, not created forever.
func TestSingleProcessRefCycle(t *testing.T) {
	err := runtime.Run(context.Background(), runtime.Config{}, func(ctx context.Context, a *cycleApp) error {
		t.Error("app called although its components form a cycle")
		return nil
	})
	if err == nil {
		t.Fatal("Run succeeded with a Ref cycle")
	}
	if !strings.Contains(err.Error(), "cycle") || !(strings.Contains(err.Error(), testapp.CycleAName) || strings.Contains(err.Error(), testapp.CycleBName)) {
		t.Errorf("Run = %v, want an error about a cycle naming CycleA or CycleB", err)
	}
}

// TestUnregisteredComponent checks that a Ref to a component nobody registered gets an error
// that names it and says what to do.
func TestUnregisteredComponent(t *testing.T) {
	err := runtime.Run(context.Background(), runtime.Config{}, func(ctx context.Context, a *unregisteredApp) error {
		t.Error("app called with an unregistered component")
		return nil
	})
	checkUnregisteredErr(t, err)
}

func checkUnregisteredErr(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		t.Fatal("Run succeeded with a Ref to an unregistered component")
	}
	for _, want := range []string{"runtime_test.unregistered", "not registered", "rpcgen"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Run = %v; want it to mention %q", err, want)
		}
	}
}

// TestMainMarkerRequired checks that Run rejects a main type that does not embed
// Implements[Main], in both modes, before starting anything.
func TestMainMarkerRequired(t *testing.T) {
	for _, multi := range []bool{false, true} {
		t.Run(fmt.Sprintf("multi=%t", multi), func(t *testing.T) {
			kids := trackChildren(t)
			cfg := runtime.Config{Multi: multi, Groups: testapp.Groups(1)}
			check := func(err error, typ string) {
				t.Helper()
				if err == nil {
					t.Errorf("Run[%s] succeeded", typ)
					return
				}
				if !strings.Contains(err.Error(), typ) || !strings.Contains(err.Error(), "Implements[runtime.Main]") {
					t.Errorf("Run[%s] = %v; want it to name the type and Implements[runtime.Main]", typ, err)
				}
			}
			ctx := context.Background()
			called := func() { t.Error("app called") }
			check(runtime.Run(ctx, cfg, func(context.Context, *noMarker) error { called(); return nil }), "runtime_test.noMarker")
			check(runtime.Run(ctx, cfg, func(context.Context, *wrongMarker) error { called(); return nil }), "runtime_test.wrongMarker")
			check(runtime.Run(ctx, cfg, func(context.Context, *int) error { called(); return nil }), "int")
			check(runtime.Run(ctx, cfg, func(context.Context, **shopApp) error { called(); return nil }), "*runtime_test.shopApp")
			kids.requireNoneStarted()
		})
	}
}

// TestBadConfig checks that every kind of bad multi-process configuration fails Run at once,
// before any process starts, with an error that quotes the offending value.
func TestBadConfig(t *testing.T) {
	store, front, ledger := testapp.StoreName, testapp.FrontName, testapp.LedgerName
	type group = runtime.Group
	for _, tc := range []struct {
		name   string
		groups []group
		want   []string
	}{
		{"unknown component", []group{{Name: "g", Components: []string{"example.com/nope/Nope"}}}, []string{`"example.com/nope/Nope"`, `"g"`}},
		{"empty component name", []group{{Name: "g", Components: []string{""}}}, []string{`""`, `"g"`}},
		{"component in two groups", []group{{Name: "a", Components: []string{store}}, {Name: "b", Components: []string{front, store}}}, []string{strconv.Quote(store), `"a"`, `"b"`}},
		{"component twice in a group", []group{{Name: "a", Components: []string{store, store}}}, []string{strconv.Quote(store)}},
		{"negative replicas", []group{{Name: "s", Components: []string{store}, Replicas: -2}}, []string{`"s"`, "-2"}},
		{"empty group", []group{{Name: "empty"}, {Name: "l", Components: []string{ledger}}}, []string{`"empty"`}},
		{"slash in group name", []group{{Name: "a/b", Components: []string{store}}}, []string{`"a/b"`}},
		{"space in group name", []group{{Name: "a b", Components: []string{store}}}, []string{`"a b"`}},
		{"newline in group name", []group{{Name: "a\nb", Components: []string{store}}}, []string{strconv.Quote("a\nb")}},
		{"repeated group name", []group{{Name: "x", Components: []string{store}}, {Name: "x", Components: []string{front}}}, []string{`"x"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kids := trackChildren(t)
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			start := time.Now()
			err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: tc.groups, Dir: dir}, func(ctx context.Context, a *shopApp) error {
				t.Error("app called with a bad configuration")
				return nil
			})
			took := time.Since(start)
			if err == nil {
				t.Fatal("Run succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Run = %v; want it to mention %s", err, w)
				}
			}
			if took > 2*time.Second {
				t.Errorf("Run took %v to reject the configuration", took)
			}
			kids.requireNoneStarted()
			if ents, _ := os.ReadDir(dir); len(ents) > 0 {
				t.Errorf("Run left %d files in Config.Dir", len(ents))
			}
		})
	}
}

// TestGroupWithoutName checks what Group.Name documents: "if empty, the first component's
// name".
func TestGroupWithoutName(t *testing.T) {
	requireOnlyTestapp(t)
	kids := trackChildren(t)
	groups := testapp.Groups(1)
	groups[0].Name = ""
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	called := false
	err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: groups}, func(ctx context.Context, a *shopApp) error {
		called = true
		_, err := a.front.Get().Put(ctx, 0, "k", "v")
		return err
	})
	if err != nil || !called {
		t.Errorf("Run with a group without a name = %v (app called: %t); want the group named after its first component", err, called)
	}
	kids.requireNoneLeft()
}

// TestComponentsInNoGroup checks what Config.Groups documents: "A component in no group gets
// a group of its own with one replica".
func TestComponentsInNoGroup(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	kids := trackChildren(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	called := false
	err := runtime.Run(ctx, runtime.Config{Multi: true}, func(ctx context.Context, a *shopApp) error {
		called = true
		p, err := a.front.Get().Put(ctx, 0, "k", "v")
		if err == nil && p.Pid == os.Getpid() {
			t.Errorf("Put ran in this process")
		}
		return err
	})
	if err != nil || !called {
		t.Errorf("Run with no Groups = %v (app called: %t); want every component in a group of its own", err, called)
	}
	kids.requireNoneLeft()
}

// TestGroupNameTooLong checks that a group name too long for the Unix socket paths built from
// it is reported as bad configuration, quickly, rather than making every replica of the group
// fail to listen, forever.
func TestGroupNameTooLong(t *testing.T) {
	requireOnlyTestapp(t)
	kids := trackChildren(t)
	groups := testapp.Groups(1)
	groups[0].Name = strings.Repeat("g", 120)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: groups}, func(ctx context.Context, a *shopApp) error {
		t.Error("app called")
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), groups[0].Name) {
		t.Errorf("Run with a %d-byte group name = %v; want an error naming the group", len(groups[0].Name), err)
	}
	kids.requireNoneLeft()
}

// transcript runs the same operations in either mode and returns what they returned, without
// where they ran, and where each shard's calls ran.
func transcript(t *testing.T, ctx context.Context, front testapp.Front, store testapp.Store, ledger testapp.Ledger) ([]string, map[uint64]testapp.Placed) {
	t.Helper()
	var out []string
	where := map[uint64]testapp.Placed{}
	add := func(op string, shard uint64, p testapp.Placed, err error) {
		out = append(out, fmt.Sprintf("%s: key=%q value=%q version=%d err=%v notfound=%t", op, p.Key, p.Value, p.Version, err, errors.Is(err, testapp.ErrNotFound)))
		if prev, ok := where[shard]; ok && (prev.Pid != p.Pid || prev.Replica != p.Replica) {
			t.Errorf("shard %d: %s ran in %s (pid %d), earlier calls in %s (pid %d)", shard, op, p.Replica, p.Pid, prev.Replica, prev.Pid)
		}
		where[shard] = p
	}
	for s := range uint64(6) {
		p, err := front.Put(ctx, s, fmt.Sprintf("key%d", s), fmt.Sprintf("value%d", s))
		add("put", s, p, err)
	}
	for s := range uint64(6) {
		p, err := front.Get(ctx, s, fmt.Sprintf("key%d", s))
		add("get", s, p, err)
	}
	p, err := front.Put(ctx, 0, "key0", "again")
	add("put again", 0, p, err)
	p, err = front.Get(ctx, 1, "missing")
	add("get missing", 1, p, err)
	p, err = store.Get(call.WithShardKey(ctx, 2), "key2")
	add("store get", 2, p, err)
	counts, err := ledger.Counts(ctx)
	out = append(out, fmt.Sprintf("ledger: %v %v", counts, err))
	return out, where
}

// TestModesAgree runs the same calls in a single process and over child processes: their
// results are the same; in multi-process mode each shard's calls run in the Store replica
// that owns it, in a process of its own, and calls carry their metadata to the component.
func TestModesAgree(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	resetHooks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var single []string
	err := runtime.Run(ctx, runtime.Config{}, func(ctx context.Context, a *shopApp) error {
		var where map[uint64]testapp.Placed
		single, where = transcript(t, ctx, a.front.Get(), a.store.Get(), a.ledger.Get())
		for s, p := range where {
			if p.Replica != "main" || p.Pid != os.Getpid() {
				t.Errorf("single process: shard %d ran in %s (pid %d)", s, p.Replica, p.Pid)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("single process: %v", err)
	}

	kids := trackChildren(t)
	testapp.ResetEvents()
	var multi []string
	err = runtime.Run(ctx, runtime.Config{Multi: true, Groups: testapp.Groups(3)}, func(ctx context.Context, a *fullApp) error {
		var where map[uint64]testapp.Placed
		multi, where = transcript(t, ctx, a.front.Get(), a.store.Get(), a.ledger.Get())
		pids := map[int]string{}
		for s, p := range where {
			if want := fmt.Sprintf("store/%d", s%3); p.Replica != want {
				t.Errorf("multi-process: shard %d ran in %s, want %s", s, p.Replica, want)
			}
			if p.Pid == os.Getpid() {
				t.Errorf("multi-process: shard %d ran in this process", s)
			}
			if other, ok := pids[p.Pid]; ok && other != p.Replica {
				t.Errorf("replicas %s and %s share pid %d", other, p.Replica, p.Pid)
			}
			pids[p.Pid] = p.Replica
			if !kids.has(p.Replica, p.Pid) {
				t.Errorf("replica %s (pid %d) is not a process this deployment started", p.Replica, p.Pid)
			}
		}
		if len(pids) != 3 {
			t.Errorf("calls ran in %d Store processes, want 3", len(pids))
		}
		// A cycle of components is fine across processes.
		s, err := a.cycle.Get().A(ctx, 3)
		if err != nil || s != "abab" {
			t.Errorf("CycleA.A(3) = %q, %v; want abab", s, err)
		}
		// Metadata travels with calls, through the Front to the Store.
		const token = "Bearer abc"
		p, err := a.front.Get().Put(call.WithMetadata(ctx, call.Metadata{testapp.MetadataKey: token}), 1, "md", "x")
		if err != nil || p.Metadata != testapp.Fingerprint(token) {
			t.Errorf("Put with metadata = %+v, %v; want the metadata to reach the Store", p, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("multi-process: %v", err)
	}
	kids.requireNoneLeft()
	if !slices.Equal(single, multi) {
		t.Errorf("results differ between modes:\nsingle: %q\nmulti:  %q", single, multi)
	}
	// The main process created no component of its own.
	if e := testapp.Events(); len(e) > 0 {
		t.Errorf("components created in the main process of a multi-process deployment: %q", e)
	}
}

// TestMetadataInSingleProcess checks that a component sees its caller's metadata in a single
// process as it does across processes (TestModesAgree): application code must not behave
// differently in the two modes.
func TestMetadataInSingleProcess(t *testing.T) {
	const token = "Bearer abc"
	err := runtime.Run(context.Background(), runtime.Config{}, func(ctx context.Context, a *shopApp) error {
		p, err := a.front.Get().Put(call.WithMetadata(ctx, call.Metadata{testapp.MetadataKey: token}), 1, "md", "x")
		if err != nil {
			return err
		}
		if p.Metadata != testapp.Fingerprint(token) {
			t.Errorf("single process: the Store saw metadata fingerprint %#x, want %#x: call.IncomingMetadata in a "+
				"component returns nil when its caller is in the same process, but the caller's metadata in "+
				"multi-process mode", p.Metadata, testapp.Fingerprint(token))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestMultiProcessUnregisteredComponent checks that a Fill error after the deployment started
// stops it: the error is reported and no process or goroutine is left.
func TestMultiProcessUnregisteredComponent(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	kids := trackChildren(t)
	err := runtime.Run(context.Background(), runtime.Config{Multi: true, Groups: testapp.Groups(1)}, func(ctx context.Context, a *unregisteredApp) error {
		t.Error("app called with an unregistered component")
		return nil
	})
	checkUnregisteredErr(t, err)
	kids.requireNoneLeft()
}

// TestMultiProcessInitError checks that a component whose Init fails in its replica fails
// Run, as it does in a single process, with an error that says which component and why, and
// without waiting for long: the replica will not get better by being restarted.
func TestMultiProcessInitError(t *testing.T) {
	requireOnlyTestapp(t)
	kids := trackChildren(t)
	t.Setenv(testapp.EnvFailInit, "Ledger")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	start := time.Now()
	err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: testapp.Groups(1)}, func(ctx context.Context, a *shopApp) error {
		t.Error("app called although a component failed to initialize")
		return nil
	})
	t.Logf("Run returned after %v: %v", time.Since(start), err)
	if err == nil || !strings.Contains(err.Error(), testapp.LedgerName) || !strings.Contains(err.Error(), "cannot start") {
		t.Errorf("Run = %v; want an error naming %s and its Init error", err, testapp.LedgerName)
	}
	kids.requireNoneLeft()
}

// TestMultiProcessCancelledStartup checks that Run with a cancelled context stops the replicas
// it started and returns the context's error.
func TestMultiProcessCancelledStartup(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	kids := trackChildren(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: testapp.Groups(3)}, func(ctx context.Context, a *shopApp) error {
		t.Error("app called with a cancelled context")
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Run took %v", took)
	}
	kids.requireNoneLeft()
}

// TestMultiProcessReplicaRestart kills a Store replica: calls to other shards go on; a call to
// its shard with a short deadline fails within it; with a longer one it waits for the replica,
// which the deployer restarts, in a new process that owns the same shard.
func TestMultiProcessReplicaRestart(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	kids := trackChildren(t)
	err := runtime.Run(context.Background(), runtime.Config{Multi: true, Groups: testapp.Groups(3)}, func(ctx context.Context, a *shopApp) error {
		put := func(d time.Duration, shard uint64, key string) (testapp.Placed, time.Duration, error) {
			ctx, cancel := context.WithTimeout(ctx, d)
			defer cancel()
			start := time.Now()
			p, err := a.front.Get().Put(ctx, shard, key, "v")
			return p, time.Since(start), err
		}
		before, _, err := put(10*time.Second, 1, "before")
		if err != nil {
			return err
		}
		kids.kill(before.Replica, before.Pid, syscall.SIGKILL)
		waitGone(t, before.Pid)

		if p, _, err := put(10*time.Second, 0, "other"); err != nil || p.Replica != "store/0" {
			t.Errorf("shard 0 while store/1 is down: %+v, %v", p, err)
		}
		p, took, err := put(100*time.Millisecond, 1, "short")
		if took > 2*time.Second {
			t.Errorf("a call with a 100ms deadline returned after %v", took)
		}
		if err == nil && p.Pid == before.Pid {
			t.Errorf("a call reached the killed process %d", before.Pid)
		}
		t.Logf("call to the killed replica with a 100ms deadline: %v after %v", err, took)

		after, took, err := put(15*time.Second, 1, "after")
		if err != nil {
			t.Errorf("call after the restart: %v (after %v)", err, took)
			return nil
		}
		if after.Replica != "store/1" || after.Pid == before.Pid || !kids.has("store/1", after.Pid) {
			t.Errorf("after the kill, shard 1 ran in %s pid %d (killed: pid %d)", after.Replica, after.Pid, before.Pid)
		}
		// The main process's own connection to the Store reconnects too.
		direct, err := a.store.Get().Get(call.WithShardKey(ctx, 1), "after")
		if err != nil || direct.Pid != after.Pid {
			t.Errorf("main -> store/1 directly: %+v, %v; want the restarted process %d", direct, err, after.Pid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	kids.requireNoneLeft()
}

// ---------------------------------------------------------------------------------------------
// Processes.

// tokenEnv marks every process a test starts, and their children, which inherit it.
const tokenEnv = "WEFT_RUNTIME_TEST_TOKEN"

// quickExit is the GORACE setting for processes the tests start: a program built with -race
// otherwise sleeps a second in os.Exit, which would make every replica's shutdown look slow.
func quickExit() string {
	return strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
}

func newToken() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// requireOnlyTestapp fails t if components other than testapp's are registered: replicas
// are this test binary started again, and only components registered by init functions exist
// in them, while the deployer starts a group for every component registered in this process.
func requireOnlyTestapp(t *testing.T) {
	t.Helper()
	for _, r := range runtime.Registered() {
		if !strings.HasPrefix(r.Name, "github.com/weftrpc/weft/runtime/internal/testapp/") {
			t.Fatalf("component %q is registered in this test process: a multi-process deployment would start a "+
				"replica for it, in which it is not registered (register test components from init functions)", r.Name)
		}
	}
}

// procInfo is what /proc says of a process.
type procInfo struct {
	exists bool
	state  byte // R, S, Z, …
	ppid   int
	env    map[string]string
}

func proc(pid int) procInfo {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procInfo{}
	}
	info := procInfo{exists: true, env: map[string]string{}}
	// pid (comm) state ppid …; comm may hold spaces and parentheses.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 {
		f := strings.Fields(string(stat[i+1:]))
		if len(f) >= 2 {
			info.state = f[0][0]
			info.ppid, _ = strconv.Atoi(f[1])
		}
	}
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	for _, kv := range bytes.Split(env, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			info.env[k] = v
		}
	}
	return info
}

// tokenProcs returns the processes, other than this one, whose environment holds token.
func tokenProcs(token string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if p := proc(pid); p.exists && p.env[tokenEnv] == token {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitGone waits until process pid has exited and been reaped.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for proc(pid).exists {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still exists 10s after it was killed", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// children tracks the replicas started by deployments: every replica of the testapp appends
// its name and pid to a spawn log (testapp.EnvSpawnLog), and carries a token in its
// environment.
type children struct {
	t     *testing.T
	token string
	log   string
}

type spawn struct {
	name string
	pid  int
}

// trackChildren sets up tracking for deployments in this process (through the environment
// that replicas inherit), and kills what is left of them when t ends.
func trackChildren(t *testing.T) *children {
	c := &children{t: t, token: newToken(), log: filepath.Join(t.TempDir(), "spawned")}
	t.Setenv(tokenEnv, c.token)
	t.Setenv(testapp.EnvSpawnLog, c.log)
	t.Setenv("GORACE", quickExit())
	t.Cleanup(c.killLeft)
	return c
}

func (c *children) spawned() []spawn { return readSpawnLog(c.t, c.log) }

func readSpawnLog(t *testing.T, path string) []spawn {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []spawn
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		name, pid, _ := strings.Cut(line, " ")
		n, err := strconv.Atoi(pid)
		if err != nil {
			t.Fatalf("spawn log line %q", line)
		}
		out = append(out, spawn{name, n})
	}
	return out
}

func (c *children) has(name string, pid int) bool {
	return slices.Contains(c.spawned(), spawn{name, pid})
}

// left returns the processes of the deployment still running, or exited and not reaped.
func (c *children) left() []string {
	var out []string
	for _, s := range c.spawned() {
		p := proc(s.pid)
		if p.exists && (p.env[tokenEnv] == c.token || (p.state == 'Z' && p.ppid == os.Getpid())) {
			out = append(out, fmt.Sprintf("%s (pid %d, state %c)", s.name, s.pid, p.state))
		}
	}
	for _, pid := range tokenProcs(c.token) {
		if !slices.ContainsFunc(c.spawned(), func(s spawn) bool { return s.pid == pid }) {
			out = append(out, fmt.Sprintf("unknown process %d", pid))
		}
	}
	return out
}

func (c *children) requireNoneLeft() {
	c.t.Helper()
	if left := c.left(); len(left) > 0 {
		c.t.Errorf("processes left after Run returned: %v", left)
	}
}

func (c *children) requireNoneStarted() {
	c.t.Helper()
	if s := c.spawned(); len(s) > 0 {
		c.t.Errorf("Run started processes: %v", s)
	}
}

// kill sends sig to the replica called name with pid, after checking it is one of ours.
func (c *children) kill(name string, pid int, sig syscall.Signal) {
	c.t.Helper()
	killReplica(c.t, c.token, name, pid, sig)
}

func killReplica(t *testing.T, token, name string, pid int, sig syscall.Signal) {
	t.Helper()
	p := proc(pid)
	if !p.exists || p.env[tokenEnv] != token || p.env["WEFT_REPLICA"] != name {
		t.Fatalf("process %d is not replica %s of this test (WEFT_REPLICA=%q)", pid, name, p.env["WEFT_REPLICA"])
	}
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatal(err)
	}
	t.Logf("%v to %s (pid %d)", sig, name, pid)
}

func (c *children) killLeft() {
	for _, pid := range tokenProcs(c.token) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// ---------------------------------------------------------------------------------------------
// End-to-end: this test binary as the program.

// program is this test binary running testapp.Main, in a process group of its own.
type program struct {
	t     *testing.T
	cmd   *exec.Cmd
	token string
	spawn string
	start time.Time

	mu     sync.Mutex
	lines  []outLine
	more   chan struct{} // closed when lines grow or the process exits
	exited bool
	err    error // cmd.Wait's
	done   chan struct{}
	next   int // lines before next were consumed by expect
}

type outLine struct {
	stderr bool
	text   string
	at     time.Duration // since the program started
}

func (l outLine) String() string {
	if l.stderr {
		return fmt.Sprintf("%6.3fs stderr: %s", l.at.Seconds(), l.text)
	}
	return fmt.Sprintf("%6.3fs stdout: %s", l.at.Seconds(), l.text)
}

// startProgram starts the program with args (testapp.Main's flags) and extra environment.
func startProgram(t *testing.T, args string, env ...string) *program {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := &program{t: t, token: newToken(), spawn: filepath.Join(t.TempDir(), "spawned"), more: make(chan struct{}), done: make(chan struct{})}
	p.cmd = exec.Command(exe)
	p.cmd.Env = append(os.Environ(), testapp.EnvArgs+"="+args, tokenEnv+"="+p.token, testapp.EnvSpawnLog+"="+p.spawn, "GORACE="+quickExit())
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.start = time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var readers sync.WaitGroup
	readers.Add(2)
	go func() { defer readers.Done(); p.read(stdout, false) }()
	go func() { defer readers.Done(); p.read(stderr, true) }()
	go func() {
		readers.Wait()
		err := p.cmd.Wait()
		p.mu.Lock()
		p.exited, p.err = true, err
		close(p.more)
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		// Whatever happened, nothing of the program survives the test.
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		for _, pid := range tokenProcs(p.token) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		<-p.done
		// A program that was killed leaves its deployment's directory.
		for _, dir := range p.dirs() {
			os.RemoveAll(dir)
		}
		if t.Failed() || os.Getenv("WEFT_TEST_DUMP") != "" {
			p.mu.Lock()
			lines := p.lines
			p.mu.Unlock()
			if len(lines) > 300 {
				t.Logf("... %d lines of output omitted", len(lines)-300)
				lines = lines[len(lines)-300:]
			}
			var b strings.Builder
			for _, l := range lines {
				fmt.Fprintf(&b, "%s\n", clip(l.String(), 300))
			}
			t.Logf("program output:\n%s", b.String())
		}
	})
	return p
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + fmt.Sprintf("… (%d bytes)", len(s))
	}
	return s
}

func (p *program) read(r io.Reader, stderr bool) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		s, err := br.ReadString('\n')
		if s != "" {
			p.mu.Lock()
			p.lines = append(p.lines, outLine{stderr, strings.TrimSuffix(s, "\n"), time.Since(p.start)})
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// expect consumes output lines until one satisfies match, and returns it. It fails the test
// if none does within timeout, or before the program exits.
func (p *program) expect(what string, timeout time.Duration, match func(outLine) bool) outLine {
	p.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		for p.next < len(p.lines) {
			l := p.lines[p.next]
			p.next++
			if match(l) {
				p.mu.Unlock()
				return l
			}
		}
		exited, more := p.exited, p.more
		p.mu.Unlock()
		if exited {
			p.t.Fatalf("program exited (%v) before printing %s", p.err, what)
		}
		select {
		case <-more:
		case <-deadline.C:
			p.t.Fatalf("program did not print %s within %v", what, timeout)
		}
	}
}

// await waits until some line of the output, consumed or not, satisfies match: for lines of
// different processes, whose order in the output is not that of the events they report. It
// does not consume lines.
func (p *program) await(what string, timeout time.Duration, match func(outLine) bool) outLine {
	p.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for seen := 0; ; {
		p.mu.Lock()
		for ; seen < len(p.lines); seen++ {
			if l := p.lines[seen]; match(l) {
				p.mu.Unlock()
				return l
			}
		}
		exited, more := p.exited, p.more
		p.mu.Unlock()
		if exited {
			p.t.Fatalf("program exited (%v) without printing %s", p.err, what)
		}
		select {
		case <-more:
		case <-deadline.C:
			p.t.Fatalf("program did not print %s within %v", what, timeout)
		}
	}
}

// expectRe is expect for a line of stdout (without a replica's prefix when re has none) that
// matches re; it returns the submatches.
func (p *program) expectRe(re string, timeout time.Duration) []string {
	p.t.Helper()
	rx := regexp.MustCompile(re)
	var m []string
	p.expect(fmt.Sprintf("a line matching %q", re), timeout, func(l outLine) bool {
		m = rx.FindStringSubmatch(l.text)
		return m != nil
	})
	return m
}

func (p *program) signal(sig syscall.Signal) {
	p.t.Helper()
	p.t.Logf("%6.3fs: %v to the program", time.Since(p.start).Seconds(), sig)
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signalling the program: %v", err)
	}
}

// wait waits for the program to exit and returns cmd.Wait's error.
func (p *program) wait(timeout time.Duration) error {
	p.t.Helper()
	select {
	case <-p.done:
		p.t.Logf("%6.3fs: the program exited: %v", time.Since(p.start).Seconds(), p.err)
		return p.err
	case <-time.After(timeout):
		p.t.Fatalf("program did not exit within %v", timeout)
		return nil
	}
}

var deploymentDir = regexp.MustCompile(regexp.QuoteMeta(os.TempDir()) + `/weft-[0-9]+`)

// dirs returns the deployment directories (Config.Dir's default) the output mentions.
func (p *program) dirs() []string {
	var dirs []string
	for _, l := range p.output() {
		for _, d := range deploymentDir.FindAllString(l.text, -1) {
			if !slices.Contains(dirs, d) {
				dirs = append(dirs, d)
			}
		}
	}
	return dirs
}

func (p *program) output() []outLine {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.lines)
}

func (p *program) requireNoneLeft() {
	p.t.Helper()
	if left := tokenProcs(p.token); len(left) > 0 {
		var desc []string
		for _, pid := range left {
			desc = append(desc, fmt.Sprintf("%d (%s)", pid, proc(pid).env["WEFT_REPLICA"]))
		}
		p.t.Errorf("processes left after the program exited: %v", desc)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

var callLine = regexp.MustCompile(`^call shard=(\d+) (ok|err|WRONG)(?: replica=(\S+) pid=(\d+))? ms=(\d+)`)

// TestProcessKillReplicaUnderLoad runs a load through the Front to three Store replicas and
// kills one with SIGKILL: every call either succeeds with the right answer or returns an error
// to its caller, within its deadline; only calls to the killed replica's shard fail; the
// replica comes back in a new process and calls reach it again; SIGTERM to the program then
// stops it and every replica.
func TestProcessKillReplicaUnderLoad(t *testing.T) {
	p := startProgram(t, "-mode=load -workers=4 -deadline=5s")
	p1 := atoi(t, p.expectRe(`^shard=1 replica=store/1 pid=(\d+)$`, 30*time.Second)[1])
	p.expectRe(`^load start$`, 10*time.Second)
	okOn := func(pid int) func(outLine) bool {
		return func(l outLine) bool {
			m := callLine.FindStringSubmatch(l.text)
			return m != nil && m[1] == "1" && m[2] == "ok" && m[4] == strconv.Itoa(pid)
		}
	}
	for range 100 {
		p.expect("calls served by store/1", 10*time.Second, okOn(p1))
	}
	killReplica(t, p.token, "store/1", p1, syscall.SIGKILL)
	restarted := p.expect("a call served by a new store/1", 30*time.Second, func(l outLine) bool {
		m := callLine.FindStringSubmatch(l.text)
		return m != nil && m[1] == "1" && m[2] == "ok" && m[4] != strconv.Itoa(p1)
	})
	p2 := atoi(t, callLine.FindStringSubmatch(restarted.text)[4])
	for range 100 {
		p.expect("calls served by the restarted store/1", 10*time.Second, okOn(p2))
	}
	p.signal(syscall.SIGTERM)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v after SIGTERM", err)
	}
	p.requireNoneLeft()

	var calls, ok, failed int
	errs := map[string]int{}
	var summary []string
	for _, l := range p.output() {
		if l.stderr {
			continue
		}
		if strings.HasPrefix(l.text, "summary ") {
			summary = regexp.MustCompile(`^summary calls=(\d+) ok=(\d+) err=(\d+) wrong=(\d+) late=(\d+) ledger=(\d+)$`).FindStringSubmatch(l.text)
		}
		if !strings.HasPrefix(l.text, "call ") {
			continue
		}
		calls++
		m := callLine.FindStringSubmatch(l.text)
		if m == nil {
			t.Errorf("unexpected call line %q", l.text)
			continue
		}
		if ms := atoi(t, m[5]); ms > 6000 {
			t.Errorf("a call took %dms with a 5s deadline: %q", ms, l.text)
		}
		switch m[2] {
		case "ok":
			ok++
		case "err":
			failed++
			if m[1] != "1" {
				t.Errorf("a call to shard %s, whose replica was not killed, failed: %q", m[1], l.text)
			}
			_, msg, _ := strings.Cut(l.text, ": ")
			errs[msg]++
		default:
			t.Errorf("wrong answer: %q", l.text)
		}
	}
	if summary == nil {
		t.Fatal("no summary")
	}
	if got := summary[1:]; got[0] != strconv.Itoa(calls) || got[1] != strconv.Itoa(ok) || got[2] != strconv.Itoa(failed) || got[3] != "0" || got[4] != "0" {
		t.Errorf("summary %q; counted %d calls, %d ok, %d failed", summary[0], calls, ok, failed)
	}
	if summary[6] != strconv.Itoa(calls) {
		t.Errorf("the Ledger recorded %s Front.Put calls, the program made %d", summary[6], calls)
	}
	t.Logf("%d calls: %d ok, %d failed with errors %v; store/1 pid %d then %d", calls, ok, failed, errs, p1, p2)
	if s := readSpawnLog(t, p.spawn); !slices.Contains(s, spawn{"store/1", p1}) || !slices.Contains(s, spawn{"store/1", p2}) {
		t.Errorf("spawn log %v lacks store/1 %d or %d", s, p1, p2)
	}
}

var holdStart = `^\[store/1\] store: hold start replica=store/1 pid=(\d+)$`

// TestProcessReplicaDrainsOnSIGTERM sends SIGTERM to a Store replica while it holds a call:
// the call completes, from that process; the replica is restarted and serves the next call.
func TestProcessReplicaDrainsOnSIGTERM(t *testing.T) {
	p := startProgram(t, "-mode=hold -hold=2s")
	pid := atoi(t, p.expectRe(holdStart, 30*time.Second)[1])
	killReplica(t, p.token, "store/1", pid, syscall.SIGTERM)
	p.expectRe(`^hold ok replica=store/1 pid=`+strconv.Itoa(pid)+`$`, 10*time.Second)
	holdEnd := fmt.Sprintf("[store/1] store: hold end replica=store/1 pid=%d", pid)
	p.await(strconv.Quote(holdEnd), 10*time.Second, func(l outLine) bool { return l.text == holdEnd })
	m := p.expectRe(`^after (ok|err).*$`, 20*time.Second)
	if m[1] != "ok" {
		t.Fatalf("the call after the drained replica exited: %s", m[0])
	}
	if m := regexp.MustCompile(`pid=(\d+)`).FindStringSubmatch(m[0]); m == nil || m[1] == strconv.Itoa(pid) {
		t.Errorf("the call after the drain was served by %v, want a new store/1 process", m)
	}
	p.expectRe(`^waiting$`, 10*time.Second)
	p.signal(syscall.SIGTERM)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
}

// TestProcessParentSIGTERMWithCallInFlight sends SIGTERM to the program while a call is in
// flight through two replicas: the call completes, and the program then stops every replica,
// whose components are shut down, and exits cleanly, without restarting any, removing the
// deployment's directory.
func TestProcessParentSIGTERMWithCallInFlight(t *testing.T) {
	p := startProgram(t, "-mode=hold -hold=2s -log=info")
	pid := atoi(t, p.expectRe(holdStart, 30*time.Second)[1])
	p.signal(syscall.SIGTERM)
	p.expectRe(`^hold ok replica=store/1 pid=`+strconv.Itoa(pid)+`$`, 10*time.Second)
	p.expectRe(`^after ok replica=store/1 pid=`+strconv.Itoa(pid)+`$`, 10*time.Second)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
	if dirs := p.dirs(); len(dirs) != 1 {
		t.Errorf("the output mentions deployment directories %q, want one", dirs)
	}
	for _, dir := range p.dirs() {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the deployment's directory %s is left behind (%v)", dir, err)
		}
	}
	out := p.output()
	for _, l := range out {
		if strings.Contains(l.text, "restarting") {
			t.Errorf("a replica was restarted during a clean shutdown: %s", l.text)
		}
	}
	for _, s := range readSpawnLog(t, p.spawn) {
		comp, _, _ := strings.Cut(s.name, "/")
		want := fmt.Sprintf("[%s] %s: shutdown replica=%s pid=%d", s.name, comp, s.name, s.pid)
		if !slices.ContainsFunc(out, func(l outLine) bool { return l.text == want }) {
			t.Errorf("no line %q: the component was not shut down", want)
		}
	}
}

// TestProcessDrainTimeout sends SIGTERM to a Store replica holding a call longer than
// Config.DrainTimeout: the replica stops when the drain time is up, the call fails with an
// error instead of hanging, and the replica is restarted.
func TestProcessDrainTimeout(t *testing.T) {
	p := startProgram(t, "-mode=hold -hold=20s -deadline=30s -drain=500ms")
	pid := atoi(t, p.expectRe(holdStart, 30*time.Second)[1])
	killReplica(t, p.token, "store/1", pid, syscall.SIGTERM)
	sent := time.Now()
	m := p.expectRe(`^hold (ok|err)(.*)$`, 15*time.Second)
	if m[1] != "err" {
		t.Errorf("the call outlived its replica's drain: %s", m[0])
	}
	if took := time.Since(sent); took > 6*time.Second {
		t.Errorf("the call ended %v after SIGTERM, with a drain timeout of 500ms", took)
	}
	waitGone(t, pid)
	if m := p.expectRe(`^after (ok|err)(?:.*pid=(\d+))?.*$`, 20*time.Second); m[1] != "ok" || m[2] == strconv.Itoa(pid) {
		t.Errorf("after the drain: %s, want a new store/1", m[0])
	}
	p.expectRe(`^waiting$`, 10*time.Second)
	p.signal(syscall.SIGTERM)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
}

// TestProcessInterruptDrains sends SIGINT to the program's process group, as Ctrl-C in a
// terminal does, while a call is in flight: every process gets it, the call completes, and
// the program exits cleanly with no process left, without restarting the replicas that
// stopped because they were interrupted.
func TestProcessInterruptDrains(t *testing.T) {
	p := startProgram(t, "-mode=hold -hold=2s")
	pid := atoi(t, p.expectRe(holdStart, 30*time.Second)[1])
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	p.expectRe(`^hold ok replica=store/1 pid=`+strconv.Itoa(pid)+`$`, 10*time.Second)
	after := p.expectRe(`^after .*`, 20*time.Second)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
	var noise, restarts []string
	for _, l := range p.output() {
		if strings.Contains(l.text, "level=WARN") || strings.Contains(l.text, "level=ERROR") {
			noise = append(noise, l.text)
		}
		if strings.Contains(l.text, "restarting") {
			restarts = append(restarts, l.text)
		}
	}
	t.Logf("the call started after the interrupt: %s; %d warnings or errors logged during the shutdown: %q", after[0], len(noise), noise)
	if len(restarts) > 0 {
		t.Errorf("the deployer restarted %d replicas that stopped on the interrupt, while the application "+
			"(whose context the interrupt cancelled) was stopping:\n%s", len(restarts), strings.Join(restarts, "\n"))
	}
}

// TestProcessLifeline kills the program with SIGKILL: its replicas, whose lifeline pipe
// closes, exit by themselves.
func TestProcessLifeline(t *testing.T) {
	p := startProgram(t, "-mode=idle -log=info")
	dir := p.expectRe(`msg="weft: deployment ready" .*dir=(\S+)`, 30*time.Second)[1]
	if !strings.HasPrefix(dir, os.TempDir()) {
		t.Fatalf("deployment directory %q", dir)
	}
	p.expectRe(`^ready$`, 30*time.Second)
	if n := len(tokenProcs(p.token)); n != 1+testapp.Processes(3) {
		t.Fatalf("%d processes run, want the program and %d replicas", n, testapp.Processes(3))
	}
	p.signal(syscall.SIGKILL)
	p.wait(10 * time.Second)
	deadline := time.Now().Add(20 * time.Second)
	for len(tokenProcs(p.token)) > 0 {
		if time.Now().After(deadline) {
			p.requireNoneLeft()
			t.Fatal("replicas outlived their parent by 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The deployment's directory is left behind; its sockets usually are not (a replica killed
	// by SIGPIPE, writing to its dead parent, leaves its own).
	if ents, _ := os.ReadDir(dir); len(ents) > 0 {
		t.Logf("the replicas left %d files in %s", len(ents), dir)
	}
}

// TestProcessChildLogsPrefixed checks that every line a replica writes, to its standard output
// or error, logs of the runtime and of components alike, reaches the program's same stream
// prefixed with "[group/index] " of the replica that wrote it.
func TestProcessChildLogsPrefixed(t *testing.T) {
	p := startProgram(t, "-mode=print -log=info")
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	out := p.output()
	has := func(stderr bool, text string) bool {
		return slices.ContainsFunc(out, func(l outLine) bool { return l.stderr == stderr && l.text == text })
	}
	for s := range 3 {
		name := fmt.Sprintf("store/%d", s)
		if !has(false, fmt.Sprintf("[%s] stdout-line shard=%d", name, s)) {
			t.Errorf("no stdout line from %s", name)
		}
		if !has(true, fmt.Sprintf("[%s] stderr-line shard=%d", name, s)) {
			t.Errorf("no stderr line from %s", name)
		}
	}
	spawned := readSpawnLog(t, p.spawn)
	if len(spawned) != testapp.Processes(3) {
		t.Fatalf("spawn log %v", spawned)
	}
	for _, s := range spawned {
		prefix := "[" + s.name + "] "
		serving := false
		for _, l := range out {
			switch {
			case strings.Contains(l.text, `msg="weft: replica serving" replica=`+s.name+" "):
				serving = true
				if !l.stderr || !strings.HasPrefix(l.text, prefix) {
					t.Errorf("%s's log line arrived as %v", s.name, l)
				}
			case strings.Contains(l.text, "testapp: store init") && strings.Contains(l.text, fmt.Sprintf("pid=%d", s.pid)):
				if !l.stderr || !strings.HasPrefix(l.text, prefix) {
					t.Errorf("%s's component log line arrived as %v", s.name, l)
				}
			}
		}
		if !serving {
			t.Errorf("no \"replica serving\" log line from %s", s.name)
		}
	}
	// Lines of the program itself are not prefixed; every other line is a replica's.
	for _, l := range out {
		if strings.HasPrefix(l.text, "[") && !regexp.MustCompile(`^\[(store/[0-2]|front/0|ledger/0|pool/[01])\] `).MatchString(l.text) {
			t.Errorf("line with an unknown prefix: %v", l)
		}
	}
}

// TestProcessLongLogLine has a replica print lines longer than the 64 KiB a line is usually
// read into, then a short line: each arrives, prefixed, and so do the lines after it.
func TestProcessLongLogLine(t *testing.T) {
	for _, n := range []int{200 << 10, 2 << 20} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			p := startProgram(t, fmt.Sprintf("-mode=print -long=%d", n))
			p.expectRe(`^printed long$`, 30*time.Second)
			if err := p.wait(30 * time.Second); err != nil {
				t.Fatalf("program exited with %v", err)
			}
			var long, after bool
			for _, l := range p.output() {
				if strings.HasPrefix(l.text, "[store/0] yyyy") {
					long = true
					if len(l.text) != len("[store/0] ")+n {
						t.Logf("the long line arrived with %d bytes, not %d", len(l.text)-len("[store/0] "), n)
					}
				}
				if l.text == "[store/0] after-long-line" {
					after = true
				}
			}
			if !long {
				t.Errorf("the %d-byte line of store/0 never arrived", n)
			}
			if !after {
				t.Errorf("the line store/0 printed after a %d-byte line never arrived: the replica's output is lost", n)
			}
		})
	}
}

// TestProcessSecretsNotLogged (RELIABILITY.md scenario 29) makes calls that carry a secret as
// metadata, directly and through a replica that passes it on, succeeding, timing out, hitting
// a panic and metadata limits, with every process logging at debug level: the secret reaches
// the component, and appears nowhere in the output of any process or in any error.
func TestProcessSecretsNotLogged(t *testing.T) {
	secret := "s3cr3t-" + newToken()
	p := startProgram(t, "-mode=secret -log=debug", testapp.EnvSecret+"="+secret)
	if err := p.wait(60 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	out := p.output()
	steps := map[string]string{}
	var infoMain, debugChild bool
	for _, l := range out {
		if strings.Contains(l.text, secret) || strings.Contains(l.text, secret[len("s3cr3t-"):]) {
			t.Errorf("secret in the output: %s", clip(l.String(), 400))
		}
		if m := regexp.MustCompile(`^secret step=(\S+) (.*)$`).FindStringSubmatch(l.text); m != nil {
			steps[m[1]] = m[2]
		}
		if strings.HasPrefix(l.text, "[") && strings.Contains(l.text, "level=DEBUG") {
			debugChild = true
		}
		if strings.HasPrefix(l.text, "time=") && strings.Contains(l.text, "level=INFO") {
			infoMain = true
		}
	}
	if !infoMain || !debugChild {
		t.Errorf("logs of the program (%t) or debug logs of replicas (%t) are missing", infoMain, debugChild)
	}
	for step, want := range map[string]string{
		"front":     "metadata-arrived=true err=<nil>",
		"direct":    "metadata-arrived=true err=<nil>",
		"deadline":  "metadata-arrived=false err=",
		"panic":     "metadata-arrived=false err=",
		"too-large": "metadata-arrived=false err=",
		"too-many":  "metadata-arrived=false err=",
		"not-found": "metadata-arrived=false err=",
	} {
		got, ok := steps[step]
		switch {
		case !ok:
			t.Errorf("step %s did not run", step)
		case !strings.HasPrefix(got, want) || (strings.HasSuffix(want, "err=") && strings.HasSuffix(got, "err=<nil>")):
			t.Errorf("step %s: %s, want %s…", step, got, want)
		}
	}
}

// TestSoak (RELIABILITY.md scenario 24) runs only with WEFT_SOAK=1 and without -short:
// thousands of calls of 256 KiB through the Front to the Store replicas with no failure, then
// a load stopped by SIGTERM while calls are in flight: every call resolves, nothing panics.
// WEFT_SOAK_CALLS sets the calls per worker (default 250, with 8 workers).
func TestSoak(t *testing.T) {
	if testing.Short() || os.Getenv("WEFT_SOAK") != "1" {
		t.Skip("set WEFT_SOAK=1 (without -short) to run the soak")
	}
	calls := 250
	if s := os.Getenv("WEFT_SOAK_CALLS"); s != "" {
		calls = atoi(t, s)
	}
	p := startProgram(t, fmt.Sprintf("-mode=load -workers=8 -size=%d -calls=%d -deadline=30s", 256<<10, calls))
	m := p.expectRe(`^summary calls=(\d+) ok=(\d+) err=(\d+) wrong=(\d+) late=(\d+) ledger=(\d+)$`, 30*time.Minute)
	if m[1] != strconv.Itoa(8*calls) || m[2] != m[1] || m[6] != m[1] {
		t.Errorf("soak: %s, want %d calls, all ok", m[0], 8*calls)
	}
	if err := p.wait(time.Minute); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()

	// Shutdown racing calls in flight.
	for round := range 5 {
		p := startProgram(t, fmt.Sprintf("-mode=load -workers=16 -size=%d -deadline=30s", 64<<10))
		p.expectRe(`^load start$`, time.Minute)
		for range 50 * (round + 1) {
			p.expectRe(`^call `, time.Minute)
		}
		p.signal(syscall.SIGTERM)
		if err := p.wait(time.Minute); err != nil {
			t.Fatalf("round %d: program exited with %v", round, err)
		}
		p.requireNoneLeft()
		n := 0
		var summary string
		for _, l := range p.output() {
			if strings.Contains(l.text, "panic") {
				t.Errorf("round %d: %s", round, l.text)
			}
			if !l.stderr && strings.HasPrefix(l.text, "call ") {
				n++
			}
			if strings.HasPrefix(l.text, "summary ") {
				summary = l.text
			}
		}
		if want := fmt.Sprintf("summary calls=%d ok=%d err=0 wrong=0 late=0 ledger=%d", n, n, n); summary != want {
			t.Errorf("round %d: %q, want %q", round, summary, want)
		}
	}
}

// TestProcessUnhealthyReplicaLeavesRotation makes one replica of the Pool report itself
// unhealthy for 3s: the deployer takes it out of the group's rotation (calls stop reaching
// it), logs why, and puts it back when it reports healthy again.
func TestProcessUnhealthyReplicaLeavesRotation(t *testing.T) {
	p := startProgram(t, "-mode=health -hold=3s -log=info")
	p.expectRe(`^pool replicas=pool/0,pool/1$`, 30*time.Second)
	sick := p.expectRe(`^sick=(pool/\d)$`, 10*time.Second)[1]
	logged := func(re string) {
		t.Helper()
		rx := regexp.MustCompile(re)
		p.await(re, 10*time.Second, func(l outLine) bool { return l.stderr && rx.MatchString(l.text) })
	}
	logged(`msg="weft: replica health changed" replica=` + sick + ` healthy=false reason="component testapp/Pool: testapp: told to be sick"`)
	logged(`msg="weft: group rotation changed" group=pool replicas=1 of=2`)
	p.expectRe(`^avoided=`+sick+` calls=\d+$`, 30*time.Second)
	p.expectRe(`^back=`+sick+`$`, 30*time.Second)
	logged(`msg="weft: replica health changed" replica=` + sick + ` healthy=true`)
	logged(`msg="weft: group rotation changed" group=pool replicas=2 of=2`)
	p.expectRe(`^done$`, 10*time.Second)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
}

// freePorts returns n TCP ports of 127.0.0.1 that were free a moment ago.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// TestDistributedDeployment runs the application as separate programs, as an orchestrator
// would: one per replica of every group, each serving on its own TCP port as the shared
// configuration file says, and a main program that reaches them at the listed addresses.
// Calls work across them, shards go to both store replicas, and every program stops cleanly
// on SIGTERM.
func TestDistributedDeployment(t *testing.T) {
	ports := freePorts(t, 6)
	addr := func(i int) string { return fmt.Sprintf("tcp://127.0.0.1:%d", ports[i]) }
	conf := fmt.Sprintf(`{
  "mode": "distributed",
  "drain_timeout": "2s",
  "groups": [
    {"name": "store", "components": [%q], "sharded": true, "addresses": [%q, %q]},
    {"name": "front", "components": [%q, %q], "listen": %q, "addresses": [%q]},
    {"name": "ledger", "components": [%q, %q], "listen": %q, "addresses": [%q]},
    {"name": "pool", "components": [%q], "addresses": [%q]}
  ]
}`, testapp.StoreName, addr(0), addr(1),
		testapp.FrontName, testapp.CycleAName, addr(2), addr(2),
		testapp.LedgerName, testapp.CycleBName, addr(3), addr(3),
		testapp.PoolName, addr(4))
	path := filepath.Join(t.TempDir(), "weft.json")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	type server struct {
		group string
		port  int
		p     *program
		pid   int
	}
	servers := []*server{{"store", ports[0], nil, 0}, {"store", ports[1], nil, 0}, {"front", ports[2], nil, 0}, {"ledger", ports[3], nil, 0}, {"pool", ports[4], nil, 0}}
	for _, s := range servers {
		args := fmt.Sprintf("-weft.config=%s -weft.serve=%s -log=info", path, s.group)
		if s.group == "store" {
			args += fmt.Sprintf(" -weft.listen=tcp://127.0.0.1:%d", s.port)
		}
		if s.group == "pool" {
			args += fmt.Sprintf(" -weft.listen=tcp://127.0.0.1:%d -weft.diagnostics=127.0.0.1:%d", s.port, ports[5])
		}
		s.p = startProgram(t, args)
	}
	for _, s := range servers {
		re := regexp.MustCompile(fmt.Sprintf(`msg="weft: serving" group=%s listen=127\.0\.0\.1:%d$`, s.group, s.port))
		s.p.await(re.String(), 30*time.Second, func(l outLine) bool { return l.stderr && re.MatchString(l.text) })
		s.pid = s.p.cmd.Process.Pid
	}
	// A process serving a group answers health probes on its diagnostics page.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s/health", ports[5], runtime.DiagnosticsPath))
	if err != nil {
		t.Fatalf("health probe of the pool's process: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "healthy" {
		t.Errorf("health probe: %d %q, want 200 \"healthy\"", resp.StatusCode, body)
	}

	main := startProgram(t, fmt.Sprintf("-weft.config=%s -mode=idle -replicas=2", path))
	pids := map[int]bool{}
	for shard := range 2 {
		m := main.expectRe(fmt.Sprintf(`^shard=%d replica=store@\S+ pid=(\d+)$`, shard), 30*time.Second)
		pids[atoi(t, m[1])] = true
	}
	if !pids[servers[0].pid] || !pids[servers[1].pid] {
		t.Errorf("shards 0 and 1 ran in processes %v, want the two store servers %d and %d", pids, servers[0].pid, servers[1].pid)
	}
	main.expectRe(`^ready$`, 30*time.Second)
	main.signal(syscall.SIGTERM)
	if err := main.wait(30 * time.Second); err != nil {
		t.Fatalf("main program exited with %v", err)
	}
	main.requireNoneLeft()
	for _, s := range servers {
		s.p.signal(syscall.SIGTERM)
	}
	for _, s := range servers {
		if err := s.p.wait(30 * time.Second); err != nil {
			t.Errorf("%s server on port %d exited with %v", s.group, s.port, err)
		}
		want := fmt.Sprintf("%s: shutdown replica=%s@", s.group, s.group)
		s.p.await(strconv.Quote(want), time.Second, func(l outLine) bool { return strings.HasPrefix(l.text, want) })
		s.p.requireNoneLeft()
	}
}

// TestDistributedBadConfig checks Run's errors for distributed configurations it cannot
// run.
func TestDistributedBadConfig(t *testing.T) {
	groups := func(mod func([]runtime.Group)) []runtime.Group {
		gs := testapp.Groups(1)
		for i := range gs {
			gs[i].Addresses = []string{fmt.Sprintf("tcp://127.0.0.1:%d", 1+i)}
			gs[i].Listen = gs[i].Addresses[0]
		}
		if mod != nil {
			mod(gs)
		}
		return gs
	}
	for _, tt := range []struct {
		name string
		cfg  runtime.Config
		want string
	}{
		{"no addresses", runtime.Config{Distributed: true, Groups: groups(func(gs []runtime.Group) { gs[1].Addresses = nil })}, `group "front" (` + testapp.FrontName},
		{"bad address", runtime.Config{Distributed: true, Groups: groups(func(gs []runtime.Group) { gs[0].Addresses = []string{"udp://x:1"} })}, `group "store": Addresses: endpoint: bad address`},
		{"dns among others", runtime.Config{Distributed: true, Groups: groups(func(gs []runtime.Group) { gs[0].Addresses = []string{"tcp://a:1", "dns:b:1"} })}, `must be the only entry`},
		{"bad dns", runtime.Config{Distributed: true, Groups: groups(func(gs []runtime.Group) { gs[0].Addresses = []string{"dns:no port here"} })}, `group "store": Addresses:`},
		{"unknown group served", runtime.Config{Distributed: true, Serve: "nope", Groups: groups(nil)}, `Config.Serve names group "nope", but the groups are store, front, ledger, pool`},
		{"no listen", runtime.Config{Distributed: true, Serve: "front", Groups: groups(func(gs []runtime.Group) { gs[1].Listen = "" })}, `group "front", which this process serves, has no Listen address`},
		{"bad listen", runtime.Config{Distributed: true, Serve: "front", Groups: groups(func(gs []runtime.Group) { gs[1].Listen = "front:80" })}, `group "front": Listen: endpoint: bad address`},
		{"multi too", runtime.Config{Distributed: true, Multi: true, Groups: groups(nil)}, `Config.Multi and Config.Distributed are exclusive`},
		{"serve without distributed", runtime.Config{Serve: "front", Groups: groups(nil)}, `Config.Serve ("front") needs Config.Distributed`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ran := false
			err := runtime.Run(context.Background(), tt.cfg, func(context.Context, *shopApp) error { ran = true; return nil })
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Run: %v; want an error containing %q", err, tt.want)
			}
			if ran {
				t.Error("the application ran")
			}
		})
	}
}

// TestMultiProcessDiagnosticsDetail reads the main process's diagnostics page: every serving
// replica's own view is there (its name, its health, calls it is serving, its channels), a
// Hold in progress shows as a call the store replica is serving, and the HTML page shows it.
func TestMultiProcessDiagnosticsDetail(t *testing.T) {
	requireOnlyTestapp(t)
	testkit.CheckLeaks(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := runtime.Run(ctx, runtime.Config{Multi: true, Groups: testapp.Groups(2), Diagnostics: "127.0.0.1:0"}, func(ctx context.Context, a *shopApp) error {
		if _, err := a.front.Get().Put(ctx, 1, "k", "v"); err != nil {
			return err
		}
		held := make(chan error, 1)
		go func() {
			_, err := a.store.Get().Hold(call.WithShardKey(ctx, 0), 3*time.Second)
			held <- err
		}()
		get := func(query string) []byte {
			req, _ := http.NewRequestWithContext(ctx, "GET", runtime.DiagnosticsURL()+query, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return b
		}
		var d runtime.Diagnostics
		deadline := time.Now().Add(10 * time.Second)
		for {
			if err := json.Unmarshal(get("?format=json"), &d); err != nil {
				t.Fatal(err)
			}
			if r := replicaInfo(d, "store/0"); r != nil && r.Detail != nil && r.Detail.InFlight == 1 || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		for _, g := range d.Groups {
			for _, r := range g.Replicas {
				if r.Detail == nil {
					t.Errorf("replica %s has no detail: %s", r.Name, r.DetailError)
					continue
				}
				if r.Detail.Process != r.Name || r.Detail.PID != r.PID || !r.Detail.Healthy {
					t.Errorf("replica %s's detail: process %q pid %d healthy %v (want pid %d)", r.Name, r.Detail.Process, r.Detail.PID, r.Detail.Healthy, r.PID)
				}
			}
		}
		if r := replicaInfo(d, "store/0"); r == nil || r.Detail == nil || r.Detail.InFlight != 1 {
			t.Errorf("store/0 while it holds a call: %+v; want 1 call in flight", r)
		}
		if r := replicaInfo(d, "front/0"); r == nil || r.Detail == nil || !slices.ContainsFunc(r.Detail.Channels, func(c runtime.ChannelDiagnostic) bool {
			return c.Group == "store" && c.Connected && c.Healthy && len(c.Endpoints) == 2
		}) {
			t.Errorf("front/0's detail does not show its healthy channel to the 2 store replicas: %+v", r)
		}
		if html := string(get("")); !strings.Contains(html, "1 calls") || !strings.Contains(html, "store: healthy, 2 endpoints") {
			t.Errorf("the HTML page does not show the replicas' detail:\n%s", html)
		}
		return <-held
	})
	if err != nil {
		t.Fatal(err)
	}
}

func replicaInfo(d runtime.Diagnostics, name string) *runtime.ReplicaInfo {
	for _, g := range d.Groups {
		for i := range g.Replicas {
			if g.Replicas[i].Name == name {
				return &g.Replicas[i]
			}
		}
	}
	return nil
}
