package main

import (
	"math"
	"slices"
)

// Results is everything one run measured, as written to results.json.
type Results struct {
	Date     string       `json:"date"`    // when the run started, UTC, RFC 3339
	Command  string       `json:"command"` // the command line
	Mode     string       `json:"mode"`    // smoke, quick or full
	Network  string       `json:"network"` // tcp or unix
	Elapsed  string       `json:"elapsed"`
	Machine  Machine      `json:"machine"`
	Params   Params       `json:"params"`
	Stacks   []string     `json:"stacks"` // rows of the comparison tables, in order
	Measures []*Measure   `json:"measures"`
	Goals    []GoalResult `json:"goals"`
	Noise    NoiseSummary `json:"noise"`
}

// Measure is one quantity measured for several rows (stacks, or variants of one stack).
type Measure struct {
	ID     string             `json:"id"`     // such as "latency/16B/p50"
	Title  string             `json:"title"`  // column title
	Unit   string             `json:"unit"`   // ns, calls/s, allocs/call, B/call, B/pair, goroutines/pair, x
	Better string             `json:"better"` // lower or higher
	Values map[string]*Series `json:"values"` // by row name
}

// Series is the value of a measure for one row in every round, and its summary.
type Series struct {
	Rounds []float64 `json:"rounds"`
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	Q1     float64   `json:"q1"` // the first and third quartiles of the rounds
	Q3     float64   `json:"q3"`
	// Spread is (Q3-Q1)/Median, the interquartile range relative to the median: how much the
	// rounds disagree, unmoved by a single round that a burst of other work hit.
	Spread float64 `json:"spread"`
}

// NoiseSummary says how much rounds disagreed over the whole run.
type NoiseSummary struct {
	MedianSpread float64 `json:"median_spread"` // the median of every series' Spread
	P90Spread    float64 `json:"p90_spread"`
	MaxSpread    float64 `json:"max_spread"`
	MaxSpreadOf  string  `json:"max_spread_of"` // "measure id / row"
}

// measure returns the measure of r with id, or nil.
func (r *Results) measure(id string) *Measure {
	for _, m := range r.Measures {
		if m.ID == id {
			return m
		}
	}
	return nil
}

// define adds a measure unless one with its id exists, and returns the one r holds.
func (r *Results) define(id, title, unit, better string) *Measure {
	if m := r.measure(id); m != nil {
		return m
	}
	m := &Measure{ID: id, Title: title, Unit: unit, Better: better, Values: map[string]*Series{}}
	r.Measures = append(r.Measures, m)
	return m
}

// add records one round's value of m for row.
func (m *Measure) add(row string, v float64) {
	s := m.Values[row]
	if s == nil {
		s = &Series{}
		m.Values[row] = s
	}
	s.Rounds = append(s.Rounds, v)
}

// median returns the median over rounds of m for row, and whether there is one.
func (m *Measure) median(row string) (float64, bool) {
	if m == nil {
		return 0, false
	}
	s := m.Values[row]
	if s == nil || len(s.Rounds) == 0 || math.IsNaN(s.Median) {
		return 0, false
	}
	return s.Median, true
}

// summarize fills every series' summary and the noise summary.
func (r *Results) summarize() {
	var spreads []float64
	r.Noise = NoiseSummary{}
	for _, m := range r.Measures {
		for row, s := range m.Values {
			s.Median = median(s.Rounds)
			s.Min = slices.Min(s.Rounds)
			s.Max = slices.Max(s.Rounds)
			s.Q1, s.Q3 = quantile(s.Rounds, 0.25), quantile(s.Rounds, 0.75)
			s.Spread = 0
			if s.Median != 0 && len(s.Rounds) > 1 {
				s.Spread = (s.Q3 - s.Q1) / math.Abs(s.Median)
			}
			if len(s.Rounds) > 1 {
				spreads = append(spreads, s.Spread)
				if s.Spread > r.Noise.MaxSpread {
					r.Noise.MaxSpread = s.Spread
					r.Noise.MaxSpreadOf = m.ID + " / " + row
				}
			}
		}
	}
	if len(spreads) > 0 {
		r.Noise.MedianSpread = median(spreads)
		r.Noise.P90Spread = percentile(spreads, 0.90)
	}
}

// median returns the median of v (the mean of the middle two for an even count), or NaN for
// none. v is not modified.
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// quantile returns the p-th quantile of v interpolated linearly between the closest ranks, or
// NaN for none. v is not modified.
func quantile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	h := p * float64(len(s)-1)
	lo := int(math.Floor(h))
	if lo+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[lo] + (h-float64(lo))*(s[lo+1]-s[lo])
}

// percentile returns the p-th quantile of v by the nearest-rank method (the smallest value
// with at least p of the values at or below it), or NaN for none. v is not modified.
func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return sortedPercentile(s, p)
}

// sortedPercentile is percentile of sorted values.
func sortedPercentile(s []float64, p float64) float64 {
	rank := int(math.Ceil(p * float64(len(s))))
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}
