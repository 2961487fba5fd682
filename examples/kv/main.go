// Command kv runs a small application of three weft components — a front end, a key-value
// store sharded over three replicas, and an audit log — and uses it, printing what happened
// and where.
//
// By default every component runs in its own child processes (the store in three), calling
// each other over weft's protocol on Unix sockets; with -single they all run in this process
// and call each other directly. With -weft.config and -weft.serve it runs as one process of a
// distributed deployment (see k8s/ for Kubernetes). The application code is the same in every
// mode.
//
//	go run ./examples/kv           # multi-process
//	go run ./examples/kv -single   # one process
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/weftrpc/weft/runtime"
)

// app is the main component.
type app struct {
	runtime.Implements[runtime.Main]
	front runtime.Ref[Frontend]
	audit runtime.Ref[Audit]
}

const pkg = "github.com/weftrpc/weft/examples/kv/"

func main() {
	single := flag.Bool("single", false, "run every component in this process")
	weftFlags := runtime.RegisterFlags(nil)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := weftFlags.Config(runtime.Config{
		Multi:       !*single,
		Diagnostics: "127.0.0.1:0",
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Groups: []runtime.Group{
			{Name: "store", Components: []string{pkg + "Store"}, Replicas: 3, Sharded: true},
			{Name: "frontend", Components: []string{pkg + "Frontend"}},
			{Name: "audit", Components: []string{pkg + "Audit"}},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := runtime.Run(ctx, cfg, run); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, a *app) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	front := a.front.Get()
	fmt.Printf("main runs in %q; diagnostics page: %s\n", runtime.ReplicaName(), runtime.DiagnosticsURL())

	keys := []string{"apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew", "kiwi"}
	for i, k := range keys {
		if _, err := front.Set(ctx, k, fmt.Sprintf("value-%d", i)); err != nil {
			return fmt.Errorf("set %s: %w", k, err)
		}
	}
	where := map[string][]string{}
	for i, k := range keys {
		got, err := front.Get(ctx, k)
		if err != nil {
			return fmt.Errorf("get %s: %w", k, err)
		}
		if want := fmt.Sprintf("value-%d", i); got.Value != want {
			return fmt.Errorf("get %s = %q, want %q", k, got.Value, want)
		}
		where[got.Replica] = append(where[got.Replica], k)
	}
	for _, r := range sortedKeys(where) {
		fmt.Printf("store replica %s holds %v\n", r, where[r])
	}
	// Every key lives on exactly one replica: a second write lands where the first did.
	again, err := front.Set(ctx, "apple", "green")
	if err != nil {
		return err
	}
	fmt.Printf("set apple again: version %d on %s\n", again.Version, again.Replica)

	_, err = front.Get(ctx, "durian")
	fmt.Printf("get durian: not found=%t (%v)\n", errors.Is(err, ErrNotFound), err)
	if !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("get durian: %v, want ErrNotFound", err)
	}

	counts, err := a.audit.Get().Counts(ctx)
	if err != nil {
		return err
	}
	for _, op := range sortedKeys(counts) {
		fmt.Printf("audit: %d %s\n", counts[op], op)
	}
	if err := printDiagnostics(ctx); err != nil {
		return err
	}
	fmt.Println("done")
	return nil
}

// printDiagnostics reads the diagnostics page as JSON and prints what it says about replicas
// and channels.
func printDiagnostics(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, "GET", runtime.DiagnosticsURL()+"?format=json", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var d runtime.Diagnostics
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		return fmt.Errorf("diagnostics page: %w", err)
	}
	fmt.Printf("diagnostics: %d components, %s-process mode\n", len(d.Components), d.Mode)
	for _, g := range d.Groups {
		for _, r := range g.Replicas {
			fmt.Printf("diagnostics: replica %s is %s (pid %d)\n", r.Name, r.State, r.PID)
		}
	}
	for _, ch := range d.Channels {
		for _, e := range ch.Endpoints {
			fmt.Printf("diagnostics: main -> %s: %s %s\n", ch.Group, e.Address, e.State)
		}
	}
	return nil
}
