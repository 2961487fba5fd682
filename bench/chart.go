package main

import (
	"fmt"
	"html"
	"math"
	"strconv"
	"strings"
)

// chartGroup is one measure of the chart.
type chartGroup struct {
	id, label string
}

// chartGroups are the measures the charts show, in order.
var chartGroups = []chartGroup{
	{"latency/16B/p50", "latency, 16 B, median"},
	{"latency/1KiB/p50", "latency, 1 KiB, median"},
	{"latency/1MiB/p50", "latency, 1 MiB, median"},
	{"throughput/16B/calls", "calls/s, 16 B, 64 callers"},
	{"throughput/1KiB/calls", "calls/s, 1 KiB, 64 callers"},
	{"throughput/1KiB/cpu", "CPU per call, 1 KiB, 64 callers"},
	{"allocs/1KiB", "allocations per call, 1 KiB"},
	{"hol/loaded-p99", "p99 of 16 B beside a 16 MiB call"},
	{"idle/bytes", "memory per idle connection pair"},
}

// stackColors colour the stacks' bars, by position in the results' stacks.
var stackColors = []string{"#1b6ac9", "#6aa5ef", "#d9480f", "#2b8a3e", "#862e9c", "#c77dd9", "#495057", "#e8590c"}

// Chart returns an SVG bar chart of every stack's ratio to the row ref on the measures of
// chartGroups, on a logarithmic scale centred on 1× (the reference), with a note per measure
// saying which direction is better.
func (r *Results) Chart(ref string) string {
	const (
		width   = 980
		left    = 300 // labels
		right   = 70
		top     = 56
		barH    = 11
		barGap  = 3
		headH   = 20
		groupGp = 12
	)
	var rows []string
	for _, s := range r.Stacks {
		if s != ref {
			rows = append(rows, s)
		}
	}
	type bar struct {
		row string
		q   float64
	}
	type group struct {
		chartGroup
		better string
		bars   []bar
	}
	var groups []group
	lo, hi := 1.0, 1.0
	for _, cg := range chartGroups {
		m := r.measure(cg.id)
		refV, ok := m.median(ref)
		if !ok || refV <= 0 {
			continue
		}
		g := group{chartGroup: cg, better: m.Better}
		if cg.id == "hol/loaded-p99" {
			g.label = "p99 of 16 B beside a " + sizeTitle(r.Params.HOLSize) + " call"
		}
		for _, row := range rows {
			v, ok := m.median(row)
			if !ok || v <= 0 {
				continue
			}
			q := v / refV
			g.bars = append(g.bars, bar{row, q})
			lo, hi = math.Min(lo, q), math.Max(hi, q)
		}
		if len(g.bars) > 0 {
			groups = append(groups, g)
		}
	}
	// The axis spans whole powers of ten around every ratio.
	loExp, hiExp := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if loExp == hiExp {
		loExp, hiExp = loExp-1, hiExp+1
	}
	plotW := float64(width - left - right)
	x := func(q float64) float64 {
		return float64(left) + (math.Log10(q)-loExp)/(hiExp-loExp)*plotW
	}
	height := top + 40
	for _, g := range groups {
		height += headH + len(g.bars)*(barH+barGap) + groupGp
	}
	height += 20 * ((len(rows) + 3) / 4) // legend

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", width, height)
	title := fmt.Sprintf("Ratio to %s (logarithmic; %s = 1×)", ref, ref)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">%s run of %s; medians over %d rounds</text>`+"\n", left, html.EscapeString(r.Mode), html.EscapeString(r.Date), r.Params.Rounds)
	bottom := height - 30 - 20*((len(rows)+3)/4)
	// Grid lines at powers of ten, and at 2× and 5× between them.
	for e := loExp; e <= hiExp; e++ {
		for _, k := range []float64{1, 2, 5} {
			q := k * math.Pow(10, e)
			if math.Log10(q) > hiExp+1e-9 {
				break
			}
			gx := x(q)
			stroke, w := "#e2e2e2", 1.0
			if k == 1 {
				stroke = "#bbbbbb"
			}
			if math.Abs(q-1) < 1e-9 {
				stroke, w = "#222222", 1.5
			}
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="%.1f"/>`+"\n", gx, top, gx, bottom, stroke, w)
			if k == 1 || hiExp-loExp <= 2 {
				fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s×</text>`+"\n", gx, top-4, strconv.FormatFloat(q, 'g', 3, 64))
			}
		}
	}
	y := top + 4
	for _, g := range groups {
		note := "lower is better"
		if g.better == "higher" {
			note = "higher is better"
		}
		fmt.Fprintf(&b, `<text x="8" y="%d" font-weight="bold">%s</text>`, y+14, html.EscapeString(g.label))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#777">%s</text>`+"\n", left+6, y+14, note)
		y += headH
		for _, br := range g.bars {
			i := 0
			for j, s := range r.Stacks {
				if s == br.row {
					i = j
				}
			}
			color := stackColors[i%len(stackColors)]
			x0, x1 := x(1), x(br.q)
			if x1 < x0 {
				x0, x1 = x1, x0
			}
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end" font-size="11">%s</text>`, left-8, y+barH-1, html.EscapeString(br.row))
			fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`, x0, y, math.Max(x1-x0, 1), barH, color)
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="11" fill="#333">%s</text>`+"\n", x1+4, y+barH-1, fmtRatio(br.q))
			y += barH + barGap
		}
		y += groupGp
	}
	// Legend.
	ly := bottom + 24
	for i, row := range rows {
		lx := left + (i%4)*160
		if i > 0 && i%4 == 0 {
			ly += 20
		}
		j := 0
		for k, s := range r.Stacks {
			if s == row {
				j = k
			}
		}
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/>`, lx, ly-10, stackColors[j%len(stackColors)])
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", lx+16, ly, html.EscapeString(row))
	}
	b.WriteString("</svg>\n")
	return b.String()
}
