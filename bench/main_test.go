package main

import (
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
	"github.com/weftrpc/weft/internal/testkit"
)

func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }

// tinyParams returns parameters that run every workload in seconds, even under the race
// detector.
func tinyParams() Params {
	p := paramsFor("smoke")
	p.SeqCalls = []int{6, 6, 3, 2}
	p.Warmup, p.Window = 5*time.Millisecond, 20*time.Millisecond
	p.Callers = 8
	p.HOLCalls, p.HOLMax, p.HOLSize, p.MaxMessage = 4, time.Second, 1<<20, 4<<20
	p.IdlePairs = 2
	p.Timeout = time.Minute
	return p
}

// TestSuite runs every workload on every stack with tiny parameters, writes the outputs, and
// checks that every table has a value for every stack, that the JSON decodes to the same
// results, that every goal was evaluated, and that the charts are well-formed SVG with a bar
// per stack and measure.
func TestSuite(t *testing.T) {
	o := options{mode: "smoke", network: "tcp", stacks: stack.All(), workloads: allWorkloads}
	res, err := measure(o, tinyParams(), "bench -test", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	md := res.Markdown()
	if err := write(dir, res, md); err != nil {
		t.Fatal(err)
	}

	for _, m := range res.Measures {
		rows := res.Stacks
		if strings.HasPrefix(m.ID, "stubs/") {
			rows = stubRows
		}
		for _, row := range rows {
			s := m.Values[row]
			if s == nil || len(s.Rounds) != 2 {
				t.Errorf("%s / %s: got %v, want 2 rounds", m.ID, row, s)
				continue
			}
			if s.Median < 0 || math.IsNaN(s.Median) || s.Min > s.Median || s.Median > s.Max {
				t.Errorf("%s / %s: bad summary %+v", m.ID, row, s)
			}
		}
	}
	for _, g := range res.Goals {
		if !g.Known {
			t.Errorf("goal %q was not evaluated", g.Goal)
		}
	}
	if len(res.Goals) != 8 {
		t.Errorf("got %d goals, want 8", len(res.Goals))
	}

	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var back Results
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	if len(back.Measures) != len(res.Measures) || !slices.Equal(back.Stacks, res.Stacks) || back.Params.Rounds != 2 {
		t.Errorf("results.json does not hold the results: %d measures, stacks %v", len(back.Measures), back.Stacks)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "results.md")); string(got) != md {
		t.Error("results.md is not the report")
	}
	again := filepath.Join(t.TempDir(), "again")
	if err := run([]string{"-from", filepath.Join(dir, "results.json"), "-out", again}, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(again, "results.md")); string(got) != md {
		t.Error("the report rendered again from results.json differs")
	}
	for _, row := range append(slices.Clone(res.Stacks), stubRows...) {
		if !strings.Contains(md, "| "+row+" |") {
			t.Errorf("report has no row for %s", row)
		}
	}

	for _, ref := range []string{refGRPC, refFloor} {
		name := filepath.Join(dir, "ratios-"+map[string]string{refGRPC: "grpc", refFloor: "floor"}[ref]+".svg")
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		// Bars are the rects after the background; the legend has one per stack other than
		// the reference.
		rects := checkSVG(t, b)
		if want := 1 + len(chartGroups)*(len(res.Stacks)-1) + (len(res.Stacks) - 1); rects != want {
			t.Errorf("%s: %d rects, want %d", name, rects, want)
		}
	}
}

// checkSVG checks that b is well-formed XML with an svg root and returns its number of rect
// elements.
func checkSVG(t *testing.T, b []byte) int {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(string(b)))
	rects, root := 0, ""
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			if root == "" {
				root = se.Name.Local
			}
			if se.Name.Local == "rect" {
				rects++
			}
		}
	}
	if root != "svg" {
		t.Fatalf("chart root is %q, want svg", root)
	}
	return rects
}

// results returns results holding one measure per id with the given medians by row.
func results(values map[string]map[string]float64) *Results {
	r := &Results{Stacks: []string{"weft", "grpc-go", "raw-tcp"}}
	(&runner{res: r}).defineMeasures()
	for id, rows := range values {
		for row, v := range rows {
			r.measure(id).add(row, v)
		}
	}
	r.summarize()
	return r
}

// TestGoals checks the evaluation of each goal on both sides of its target.
func TestGoals(t *testing.T) {
	base := func() map[string]map[string]float64 {
		return map[string]map[string]float64{
			"latency/16B/p50":       {"weft": 110, "raw-tcp": 100},
			"throughput/16B/calls":  {"weft": 310, "grpc-go": 100},
			"throughput/1KiB/calls": {"weft": 300, "grpc-go": 100},
			"throughput/16B/cpu":    {"weft": 30, "grpc-go": 100},
			"throughput/1KiB/cpu":   {"weft": 35, "grpc-go": 100},
			"allocs/16B":            {"weft": 3},
			"allocs/1KiB":           {"weft": 2},
			"latency/1MiB/p50":      {"weft": 129, "raw-tcp": 100},
			"stubs/1KiB/p50":        {stubStubs: 109, stubRawRaw: 100, stubRawStub: 105},
			"hol/ratio":             {"weft": 2.9},
			"idle/bytes":            {"weft": 32 << 10},
			"idle/goroutines":       {"weft": 2},
		}
	}
	r := results(base())
	r.evaluateGoals()
	for _, g := range r.Goals {
		if !g.Known || !g.Met {
			t.Errorf("goal %q: known %t, met %t (%s), want met", g.Goal, g.Known, g.Met, g.Measured)
		}
	}
	// One change per goal that misses it, in the order of the goals.
	misses := []func(v map[string]map[string]float64){
		func(v map[string]map[string]float64) { v["latency/16B/p50"]["weft"] = 116 },
		func(v map[string]map[string]float64) { v["throughput/1KiB/calls"]["weft"] = 299 },
		func(v map[string]map[string]float64) { v["throughput/16B/cpu"]["weft"] = 36 },
		func(v map[string]map[string]float64) { v["allocs/1KiB"]["weft"] = 3.5 },
		func(v map[string]map[string]float64) { v["latency/1MiB/p50"]["weft"] = 131 },
		func(v map[string]map[string]float64) { v["stubs/1KiB/p50"][stubStubs] = 111 },
		func(v map[string]map[string]float64) { v["hol/ratio"]["weft"] = 3.1 },
		func(v map[string]map[string]float64) { v["idle/bytes"]["weft"] = 33 << 10 },
	}
	for i, miss := range misses {
		v := base()
		miss(v)
		r := results(v)
		r.evaluateGoals()
		for j, g := range r.Goals {
			if want := j != i; g.Met != want || !g.Known {
				t.Errorf("miss %d: goal %q: known %t, met %t, want met %t", i, g.Goal, g.Known, g.Met, want)
			}
		}
	}
	// Without a reference the goal is unknown, not missed or met.
	v := base()
	delete(v["latency/16B/p50"], "raw-tcp")
	r = results(v)
	r.evaluateGoals()
	if g := r.Goals[0]; g.Known || g.Met {
		t.Errorf("goal without its reference: known %t, met %t, want neither", g.Known, g.Met)
	}
}

// TestStatistics checks the summaries of rounds and the percentiles of latencies.
func TestStatistics(t *testing.T) {
	tests := []struct {
		name   string
		v      []float64
		median float64
		p99    float64
	}{
		{"one", []float64{5}, 5, 5},
		{"odd", []float64{3, 1, 2}, 2, 3},
		{"even", []float64{4, 1, 3, 2}, 2.5, 4},
		{"hundred", func() []float64 {
			var v []float64
			for i := 100; i >= 1; i-- {
				v = append(v, float64(i))
			}
			return v
		}(), 50.5, 99},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			orig := slices.Clone(tt.v)
			if got := median(tt.v); got != tt.median {
				t.Errorf("median = %v, want %v", got, tt.median)
			}
			if got := percentile(tt.v, 0.99); got != tt.p99 {
				t.Errorf("p99 = %v, want %v", got, tt.p99)
			}
			if !slices.Equal(tt.v, orig) {
				t.Error("the values were modified")
			}
		})
	}
	if !math.IsNaN(median(nil)) || !math.IsNaN(percentile(nil, 0.5)) {
		t.Error("median or percentile of nothing is not NaN")
	}

	r := &Results{}
	m := r.define("x", "x", "ns", "lower")
	for _, v := range []float64{120, 80, 100} {
		m.add("a", v)
	}
	m.add("b", 7)
	r.summarize()
	s := m.Values["a"]
	if s.Median != 100 || s.Min != 80 || s.Max != 120 || s.Q1 != 90 || s.Q3 != 110 || math.Abs(s.Spread-0.2) > 1e-9 {
		t.Errorf("summary %+v, want median 100, min 80, max 120, quartiles 90 and 110, spread 0.2", s)
	}
	if m.Values["b"].Spread != 0 || r.Noise.MaxSpreadOf != "x / a" {
		t.Errorf("a single round has spread %v; noise %+v", m.Values["b"].Spread, r.Noise)
	}
	if got := cell(m, "a", false); got != "100 ns ±10%" {
		t.Errorf("cell = %q", got)
	}
	for _, tt := range []struct{ p, want float64 }{{0, 1}, {0.25, 1.75}, {0.5, 2.5}, {1, 4}} {
		if got := quantile([]float64{4, 1, 3, 2}, tt.p); got != tt.want {
			t.Errorf("quantile(1..4, %v) = %v, want %v", tt.p, got, tt.want)
		}
	}
}

// TestFormat checks the formatting of values and sizes.
func TestFormat(t *testing.T) {
	tests := []struct {
		unit string
		v    float64
		want string
	}{
		{"ns", 950, "950 ns"},
		{"ns", 47_500, "47.5 µs"},
		{"ns", 2_950_000, "2.95 ms"},
		{"calls/s", 40_012, "40.0k/s"},
		{"calls/s", 1_234_000, "1.23M/s"},
		{"B/pair", 32 << 10, "32.0 KiB"},
		{"B/call", 304, "304 B"},
		{"allocs/call", 2.04, "2.0"},
		{"x", 3.14159, "3.14×"},
		{"x", 0.0067, "0.0067×"},
		{"x", 9.999, "10.0×"},
		{"x", 99.97, "100×"},
	}
	for _, tt := range tests {
		if got := fmtValue(tt.unit, tt.v); got != tt.want {
			t.Errorf("fmtValue(%q, %v) = %q, want %q", tt.unit, tt.v, got, tt.want)
		}
	}
	for n, want := range map[int]string{16: "16B", 1 << 10: "1KiB", 64 << 10: "64KiB", 1 << 20: "1MiB", 5000: "5000B"} {
		if got := sizeName(n); got != want {
			t.Errorf("sizeName(%d) = %q, want %q", n, got, want)
		}
	}
	if got := sizeTitle(64 << 10); got != "64 KiB" {
		t.Errorf("sizeTitle(64 KiB) = %q", got)
	}
	if got := rotated([]int{1, 2, 3}, 4); !slices.Equal(got, []int{2, 3, 1}) {
		t.Errorf("rotated by 4 = %v, want [2 3 1]", got)
	}
}

// TestFlags checks the command line's parsing and its errors.
func TestFlags(t *testing.T) {
	o, err := parseFlags([]string{"-quick", "-network", "unix", "-stacks", "weft, raw-tcp", "-workloads", "idle", "-out", "x"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.mode != "quick" || o.network != "unix" || o.out != "x" || len(o.stacks) != 2 || o.stacks[1].Name() != "raw-tcp" || !slices.Equal(o.workloads, []string{"idle"}) {
		t.Errorf("got %+v", o)
	}
	if o, err := parseFlags(nil, io.Discard); err != nil || o.mode != "full" || len(o.stacks) != len(stack.All()) || len(o.workloads) != len(allWorkloads) {
		t.Errorf("defaults: %+v, %v", o, err)
	}
	for _, args := range [][]string{
		{"-smoke", "-quick"},
		{"-network", "udp"},
		{"-stacks", "weft,nope"},
		{"-workloads", "nope"},
		{"-rounds", "-1"},
		{"extra"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded", args)
		}
	}
}
