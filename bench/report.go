package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Rows every comparison is relative to.
const (
	refGRPC  = "grpc-go"
	refFloor = "raw-tcp"
	weftRow  = "weft"
)

// GoalResult is one performance goal of BRIEF.md and how the run compares with it.
type GoalResult struct {
	Goal     string `json:"goal"`
	Target   string `json:"target"`
	Measured string `json:"measured"` // the numbers, or why there are none
	Known    bool   `json:"known"`    // whether the run measured what the goal needs
	Met      bool   `json:"met"`
}

// evaluateGoals compares weft's medians with the goals of BRIEF.md.
func (r *Results) evaluateGoals() {
	r.Goals = nil
	ratio := func(id, row, ref string) (float64, bool) {
		m := r.measure(id)
		v, ok1 := m.median(row)
		w, ok2 := m.median(ref)
		if !ok1 || !ok2 || w == 0 {
			return 0, false
		}
		return v / w, true
	}
	add := func(goal, target string, known, met bool, measured string) {
		if !known {
			measured = "not measured in this run"
		}
		r.Goals = append(r.Goals, GoalResult{Goal: goal, Target: target, Measured: measured, Known: known, Met: known && met})
	}

	q, ok := ratio("latency/16B/p50", weftRow, refFloor)
	add("sequential 16 B echo latency vs the raw-TCP floor (median)", "≤ 1.15×", ok, q <= 1.15,
		fmt.Sprintf("%.2f× (%s vs %s)", q, r.valueText("latency/16B/p50", weftRow), r.valueText("latency/16B/p50", refFloor)))

	t16, ok1 := ratio("throughput/16B/calls", weftRow, refGRPC)
	t1k, ok2 := ratio("throughput/1KiB/calls", weftRow, refGRPC)
	add("throughput, 64 callers on one connection, vs grpc-go", "≥ 3×", ok1 && ok2, t16 >= 3 && t1k >= 3,
		fmt.Sprintf("16 B: %.2f×, 1 KiB: %.2f×", t16, t1k))

	c16, ok1 := ratio("throughput/16B/cpu", weftRow, refGRPC)
	c1k, ok2 := ratio("throughput/1KiB/cpu", weftRow, refGRPC)
	add("CPU per call at 64 callers vs grpc-go (client and server)", "≤ 0.35×", ok1 && ok2, c16 <= 0.35 && c1k <= 0.35,
		fmt.Sprintf("16 B: %.2f× (%s), 1 KiB: %.2f× (%s)", c16, r.valueText("throughput/16B/cpu", weftRow), c1k, r.valueText("throughput/1KiB/cpu", weftRow)))

	a16, ok1 := r.measure("allocs/16B").median(weftRow)
	a1k, ok2 := r.measure("allocs/1KiB").median(weftRow)
	add("allocations per call, client and server, ≤ 1 KiB", "≤ 3", ok1 && ok2, a16 <= 3 && a1k <= 3,
		fmt.Sprintf("16 B: %.1f, 1 KiB: %.1f", a16, a1k))

	q, ok = ratio("latency/1MiB/p50", weftRow, refFloor)
	add("1 MiB echo latency vs the raw-TCP floor (median)", "≤ 1.3×", ok, q <= 1.3,
		fmt.Sprintf("%.2f× (%s vs %s)", q, r.valueText("latency/1MiB/p50", weftRow), r.valueText("latency/1MiB/p50", refFloor)))

	q, ok = ratio("stubs/1KiB/p50", stubStubs, stubRawRaw)
	q2, _ := ratio("stubs/1KiB/p50", stubStubs, stubRawStub)
	add("1 KiB call through generated stubs vs raw Connection.Call (median)", "≤ 1.1×", ok, q <= 1.1,
		fmt.Sprintf("%.2f× a raw call to a raw handler; %.2f× a raw call to the server stub", q, q2))

	h, ok := r.measure("hol/ratio").median(weftRow)
	add("small-call p99 while a 16 MiB call runs on the same connection, vs idle p99", "≤ 3×", ok, h <= 3,
		fmt.Sprintf("%.2f× (%s during a %s call, %s idle)", h, r.valueText("hol/loaded-p99", weftRow), sizeTitle(r.Params.HOLSize), r.valueText("hol/idle-p99", weftRow)))

	b, ok := r.measure("idle/bytes").median(weftRow)
	add("heap + goroutine stacks per idle plaintext connection pair", "≤ 32 KiB", ok, b <= 32<<10,
		fmt.Sprintf("%s (%s goroutines)", fmtValue("B/pair", b), r.valueText("idle/goroutines", weftRow)))
}

// valueText returns the median of measure id for row, formatted, or "n/a".
func (r *Results) valueText(id, row string) string {
	m := r.measure(id)
	v, ok := m.median(row)
	if !ok {
		return "n/a"
	}
	return fmtValue(m.Unit, v)
}

// sig formats v with about three significant digits.
func sig(v float64) string {
	// The bounds are where rounding carries into the next digit: 9.997 prints as 10.0.
	switch a := math.Abs(v); {
	case a >= 99.95:
		return fmt.Sprintf("%.0f", v)
	case a >= 9.995:
		return fmt.Sprintf("%.1f", v)
	case a >= 0.0995 || a == 0:
		return fmt.Sprintf("%.2f", v)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

// fmtValue formats v in unit for a table.
func fmtValue(unit string, v float64) string {
	switch unit {
	case "ns":
		switch {
		case v >= 1e9:
			return sig(v/1e9) + " s"
		case v >= 1e6:
			return sig(v/1e6) + " ms"
		case v >= 1e3:
			return sig(v/1e3) + " µs"
		}
		return sig(v) + " ns"
	case "calls/s":
		switch {
		case v >= 1e6:
			return sig(v/1e6) + "M/s"
		case v >= 1e3:
			return sig(v/1e3) + "k/s"
		}
		return sig(v) + "/s"
	case "B/call", "B/pair":
		switch {
		case v >= 1<<20:
			return sig(v/(1<<20)) + " MiB"
		case v >= 1<<10:
			return sig(v/(1<<10)) + " KiB"
		}
		return sig(v) + " B"
	case "allocs/call":
		return fmt.Sprintf("%.1f", v)
	case "x":
		return sig(v) + "×"
	}
	return sig(v)
}

// fmtRatio formats a ratio.
func fmtRatio(q float64) string { return sig(q) + "×" }

// cell formats the median of m for row with its spread and, if refs is set, its ratios to
// grpc-go and to the floor.
func cell(m *Measure, row string, refs bool) string {
	v, ok := m.median(row)
	if !ok {
		return "—"
	}
	s := m.Values[row]
	var b strings.Builder
	b.WriteString(fmtValue(m.Unit, v))
	if len(s.Rounds) > 1 {
		fmt.Fprintf(&b, " ±%.0f%%", 50*s.Spread)
	}
	if refs {
		if g, ok := m.median(refGRPC); ok && g != 0 {
			fmt.Fprintf(&b, " · %s g", fmtRatio(v/g))
		}
		if f, ok := m.median(refFloor); ok && f != 0 {
			fmt.Fprintf(&b, " · %s f", fmtRatio(v/f))
		}
	}
	return b.String()
}

// column is one column of a table: a measure, and whether its cells show ratios.
type column struct {
	id   string
	refs bool
}

// table writes a markdown table of the columns' measures, one line per row.
func (r *Results) table(b *strings.Builder, first string, rows []string, cols []column) {
	var ms []*Measure
	b.WriteString("| " + first + " |")
	for _, c := range cols {
		m := r.measure(c.id)
		ms = append(ms, m)
		b.WriteString(" " + m.Title + " |")
	}
	b.WriteString("\n|---|")
	for range cols {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, row := range rows {
		present := false
		for _, m := range ms {
			if _, ok := m.median(row); ok {
				present = true
			}
		}
		if !present {
			continue
		}
		b.WriteString("| " + row + " |")
		for i, m := range ms {
			b.WriteString(" " + cell(m, row, cols[i].refs) + " |")
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
}

// hasAny reports whether any of the measures has a value.
func (r *Results) hasAny(ids ...string) bool {
	for _, id := range ids {
		if m := r.measure(id); m != nil && len(m.Values) > 0 {
			return true
		}
	}
	return false
}

// multiplexed names, for the head-of-line table, how each stack carries concurrent calls.
var connectionNote = map[string]string{
	"weft":         "one connection",
	"weft-connect": "one connection",
	"grpc-go":      "one connection",
	"net/rpc":      "one connection",
	"drpc":         "one connection, one call at a time",
	"drpc-pool":    "a connection per concurrent call",
	"raw-tcp":      "a connection per concurrent call",
}

// Markdown returns the run's report: the facts of the run, the goals, and a table per
// workload.
func (r *Results) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# weft bench: %s run\n\n", r.Mode)
	fmt.Fprintf(&b, "- date: %s; took %s\n", r.Date, r.Elapsed)
	fmt.Fprintf(&b, "- command: `%s`\n", r.Command)
	mc := r.Machine
	fmt.Fprintf(&b, "- machine: %d CPUs (%s), GOMAXPROCS %d, %s %s/%s", mc.CPUs, mc.CPUModel, mc.GOMAXPROCS, mc.GoVersion, mc.GOOS, mc.GOARCH)
	if mc.LoadStart != "" {
		fmt.Fprintf(&b, ", load average %s before and %s after", mc.LoadStart, mc.LoadEnd)
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "- stacks: %s over %s loopback", strings.Join(r.Stacks, ", "), r.Network)
	for _, path := range []string{"google.golang.org/grpc", "storj.io/drpc"} {
		if v, ok := mc.Modules[path]; ok {
			fmt.Fprintf(&b, "; %s %s", path, v)
		}
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "- %d rounds, stacks interleaved in every round (in a rotated order); each cell is the median over rounds\n", r.Params.Rounds)
	fmt.Fprintf(&b, "- noise: the interquartile range of a cell's rounds is %.0f%% of its median in the median cell, %.0f%% at the 90th percentile, %.0f%% at most (%s)\n\n",
		100*r.Noise.MedianSpread, 100*r.Noise.P90Spread, 100*r.Noise.MaxSpread, r.Noise.MaxSpreadOf)
	b.WriteString("Reading a cell: the median over rounds; ±: half the interquartile range of the rounds, relative to the median; " +
		"`g`: ratio to grpc-go; `f`: ratio to the raw-TCP floor (a length-prefixed echo over plain sockets, " +
		"a connection per concurrent caller). Client and server run in this one process.\n\n")

	b.WriteString("## Goals (BRIEF.md)\n\n| goal | target | weft | met |\n|---|---|---|---|\n")
	for _, g := range r.Goals {
		met := "no"
		switch {
		case !g.Known:
			met = "—"
		case g.Met:
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.Goal, g.Target, g.Measured, met)
	}
	b.WriteString("\n")

	rows := r.Stacks
	if r.hasAny("latency/16B/p50") {
		b.WriteString("## Sequential latency: one caller, calls back to back (lower is better)\n\n")
		b.WriteString("Median:\n\n")
		var cols []column
		for _, s := range seqSizes {
			cols = append(cols, column{"latency/" + sizeName(s) + "/p50", true})
		}
		r.table(&b, "stack", rows, cols)
		b.WriteString("99th percentile:\n\n")
		cols = nil
		for _, s := range seqSizes {
			cols = append(cols, column{"latency/" + sizeName(s) + "/p99", true})
		}
		r.table(&b, "stack", rows, cols)
	}
	if r.hasAny("throughput/16B/calls") {
		fmt.Fprintf(&b, "## Throughput: %d callers sharing one client\n\n", r.Params.Callers)
		b.WriteString("Calls per second (higher is better), CPU time of the whole process (client and server) " +
			"per call, and allocations per call (lower is better):\n\n")
		var cols []column
		for _, s := range throughputSizes {
			n := sizeName(s)
			cols = append(cols, column{"throughput/" + n + "/calls", true}, column{"throughput/" + n + "/cpu", true})
		}
		r.table(&b, "stack", rows, cols)
		cols = nil
		for _, s := range throughputSizes {
			cols = append(cols, column{"throughput/" + sizeName(s) + "/allocs", true})
		}
		r.table(&b, "stack", rows, cols)
	}
	if r.hasAny("allocs/16B") {
		b.WriteString("## Allocations per call: one caller, client and server together (lower is better)\n\n")
		b.WriteString("Every stack returns a reply its caller owns (the bytes per call include it); " +
			"the handlers allocate nothing of their own.\n\n")
		var cols []column
		for _, s := range allocSizes {
			cols = append(cols, column{"allocs/" + sizeName(s), true}, column{"bytes/" + sizeName(s), true})
		}
		r.table(&b, "stack", rows, cols)
	}
	if r.hasAny("hol/ratio") {
		fmt.Fprintf(&b, "## Head of line: 16 B calls while a %s call runs through the same client (lower is better)\n\n", sizeTitle(r.Params.HOLSize))
		b.WriteString("Limits raised to " + sizeTitle(r.Params.MaxMessage) + " on every stack. A small call counts as " +
			"loaded when a large call was in flight as it started. The last column is itself a ratio.\n\n")
		r.table(&b, "stack", rows, []column{{"hol/idle-p99", true}, {"hol/loaded-p50", true}, {"hol/loaded-p99", true}, {"hol/ratio", false}})
		b.WriteString("How each client carries concurrent calls: ")
		var notes []string
		for _, row := range rows {
			if n, ok := connectionNote[row]; ok {
				notes = append(notes, row+": "+n)
			}
		}
		b.WriteString(strings.Join(notes, "; ") + ".\n\n")
	}
	if r.hasAny("idle/bytes") {
		b.WriteString("## Memory per idle connection pair (lower is better)\n\n")
		fmt.Fprintf(&b, "%d clients, each after one 16 B call; the growth of heap and goroutine stacks in use after "+
			"garbage collection, client and server side together, divided by their number.\n\n", r.Params.IdlePairs)
		r.table(&b, "stack", rows, []column{{"idle/bytes", true}, {"idle/goroutines", true}})
	}
	if r.hasAny("stubs/1KiB/p50") {
		b.WriteString("## weft: generated stubs vs raw Connection.Call (lower is better)\n\n")
		b.WriteString("One connection from call.Dial; the echo component of internal/echo. The three ways alternate " +
			"call by call on the same connection; allocations are counted over a block of calls of each. " +
			"Ratios are to the first row.\n\n")
		b.WriteString("| call | ")
		var ids []string
		for _, s := range stubSizes {
			ids = append(ids, "stubs/"+sizeName(s)+"/p50")
		}
		for _, s := range stubSizes {
			ids = append(ids, "stubs/"+sizeName(s)+"/allocs")
		}
		for _, id := range ids {
			b.WriteString(r.measure(id).Title + " | ")
		}
		b.WriteString("\n|---|")
		for range ids {
			b.WriteString("---|")
		}
		b.WriteString("\n")
		for _, row := range stubRows {
			b.WriteString("| " + row + " |")
			for _, id := range ids {
				m := r.measure(id)
				c := cell(m, row, false)
				if v, ok := m.median(row); ok && row != stubRawRaw {
					if ref, ok := m.median(stubRawRaw); ok && ref != 0 {
						c += " · " + fmtRatio(v/ref)
					}
				}
				b.WriteString(" " + c + " |")
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	return b.String()
}
