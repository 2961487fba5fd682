// Command bench measures weft side by side with grpc-go, net/rpc, drpc and a raw-TCP floor, in
// one process, and writes the comparison as markdown tables, JSON and SVG charts.
//
//	go run -C bench .           # the full suite (several minutes)
//	go run -C bench . -quick    # fewer calls and rounds
//	go run -C bench . -smoke    # seconds: checks that everything runs (CI)
//
// Workloads: sequential latency at 16 B, 1 KiB, 64 KiB and 1 MiB; throughput of 64 callers
// sharing one client at 16 B and 1 KiB, with the process's CPU time and allocations per call;
// allocations and bytes per sequential call; the p99 of 16 B calls while a 16 MiB call runs
// through the same client; heap and goroutine stacks per idle connection pair; and weft's
// generated stubs against raw Connection.Call. Every workload runs in rounds, the stacks
// interleaved within each round, and reports the median over rounds and their spread.
//
// The output directory (-out, default "results") receives results.md, results.json,
// ratios-grpc.svg and ratios-floor.svg; results.md is also printed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// options are the command line's.
type options struct {
	mode      string
	out       string
	network   string
	stacks    []stack.Stack
	workloads []string
	rounds    int
	from      string // a results.json to render instead of measuring
}

// parseFlags parses the command line.
func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	smoke := fs.Bool("smoke", false, "run a tiny suite in seconds, to check that every stack and workload works")
	quick := fs.Bool("quick", false, "run fewer calls and rounds than the full suite")
	out := fs.String("out", "results", "directory to write results.md, results.json and the charts to")
	network := fs.String("network", "tcp", "loopback network: tcp or unix")
	stacks := fs.String("stacks", "", "comma-separated stacks to run (default all; grpc-go and raw-tcp are the references)")
	workloads := fs.String("workloads", "", "comma-separated workloads to run (default all): "+strings.Join(allWorkloads, ","))
	rounds := fs.Int("rounds", 0, "rounds per workload (default: 2 smoke, 3 quick, 15 full)")
	from := fs.String("from", "", "measure nothing: write the outputs again from the results.json of an earlier run")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("bench: unexpected arguments %q", fs.Args())
	}
	o := options{mode: "full", out: *out, network: *network, rounds: *rounds, from: *from}
	switch {
	case *smoke && *quick:
		return options{}, errors.New("bench: -smoke and -quick exclude each other")
	case *smoke:
		o.mode = "smoke"
	case *quick:
		o.mode = "quick"
	}
	if o.network != "tcp" && o.network != "unix" {
		return options{}, fmt.Errorf("bench: -network must be tcp or unix, not %q", o.network)
	}
	if o.rounds < 0 {
		return options{}, fmt.Errorf("bench: -rounds must not be negative")
	}
	if *stacks == "" {
		o.stacks = stack.All()
	} else {
		for name := range strings.SplitSeq(*stacks, ",") {
			st, ok := stack.ByName(strings.TrimSpace(name))
			if !ok {
				var names []string
				for _, s := range stack.All() {
					names = append(names, s.Name())
				}
				return options{}, fmt.Errorf("bench: unknown stack %q (have %s)", name, strings.Join(names, ", "))
			}
			o.stacks = append(o.stacks, st)
		}
	}
	if *workloads == "" {
		o.workloads = allWorkloads
	} else {
		for w := range strings.SplitSeq(*workloads, ",") {
			w = strings.TrimSpace(w)
			if !slices.Contains(allWorkloads, w) {
				return options{}, fmt.Errorf("bench: unknown workload %q (have %s)", w, strings.Join(allWorkloads, ", "))
			}
			o.workloads = append(o.workloads, w)
		}
	}
	return o, nil
}

// run runs the suite the command line asks for and writes its outputs.
func run(args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var res *Results
	if o.from != "" {
		res, err = load(o.from)
	} else {
		p := paramsFor(o.mode)
		if o.rounds > 0 {
			p.Rounds = o.rounds
		}
		res, err = measure(o, p, "bench "+strings.Join(args, " "), stderr)
	}
	if err != nil {
		return err
	}
	md := res.Markdown()
	if err := write(o.out, res, md); err != nil {
		return err
	}
	fmt.Fprint(stdout, md)
	fmt.Fprintf(stderr, "wrote %s\n", o.out)
	return nil
}

// measure runs the workloads of o with parameters p.
func measure(o options, p Params, command string, progress io.Writer) (*Results, error) {
	dir, err := os.MkdirTemp("", "weft-bench")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	p.Workloads = o.workloads
	p.StubVariants = stubRows
	start := time.Now()
	res := &Results{
		Date:    start.UTC().Format(time.RFC3339),
		Command: strings.TrimSpace(command),
		Mode:    o.mode,
		Network: o.network,
		Machine: machineFacts(),
		Params:  p,
	}
	for _, st := range o.stacks {
		res.Stacks = append(res.Stacks, st.Name())
	}
	r := &runner{p: p, network: o.network, dir: dir, stacks: o.stacks, res: res, log: progress}
	r.defineMeasures()
	fmt.Fprintf(progress, "bench: %s run, %d rounds, stacks %s\n", o.mode, p.Rounds, strings.Join(res.Stacks, ", "))
	for _, w := range o.workloads {
		fmt.Fprintf(progress, "%s\n", w)
		var err error
		switch w {
		case wlSequential:
			err = r.runStacks(w, r.sequential)
		case wlThroughput:
			err = r.runStacks(w, r.throughput)
		case wlHOL:
			err = r.runStacks(w, r.headOfLine)
		case wlIdle:
			err = r.runStacks(w, r.idleMemory)
		case wlStubs:
			err = rounds(r, w, []string{weftRow}, func(s string) string { return s },
				func(ctx context.Context, _ string) error { return r.stubs(ctx) })
		}
		if err != nil {
			return nil, err
		}
	}
	res.Machine.LoadEnd = loadAverage()
	res.Elapsed = time.Since(start).Round(time.Second).String()
	res.summarize()
	res.evaluateGoals()
	return res, nil
}

// load reads the results of an earlier run from a results.json and evaluates them again.
func load(name string) (*Results, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	res := &Results{}
	if err := json.Unmarshal(b, res); err != nil {
		return nil, fmt.Errorf("bench: %s: %w", name, err)
	}
	for _, m := range res.Measures {
		if m.Values == nil {
			m.Values = map[string]*Series{}
		}
	}
	res.summarize()
	res.evaluateGoals()
	return res, nil
}

// write writes the outputs of res into dir.
func write(dir string, res *Results, md string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: encoding results: %w", err)
	}
	files := map[string]string{
		"results.md":       md,
		"results.json":     string(js) + "\n",
		"ratios-grpc.svg":  res.Chart(refGRPC),
		"ratios-floor.svg": res.Chart(refFloor),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}
