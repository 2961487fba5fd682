package runtime_test

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftrpc/weft/runtime/internal/testapp"
)

// traced is a span as the "trace" mode's tracer printed it (testapp.TraceLine).
type traced struct {
	name, kind, trace, span, parent, replica string
	line                                     outLine
}

func (s traced) String() string {
	return fmt.Sprintf("%s span %s (%s, %s) of trace %s, parent %s", s.replica, s.span, s.kind, s.name, s.trace, s.parent)
}

// spanLine matches a span line, with the "[group/i] " prefix of a replica's output if it came
// from one.
var spanLine = regexp.MustCompile(`^(?:\[([^\]]+)\] )?span name=(\S+) kind=(client|server|internal) trace=([0-9a-f]{32}) span=([0-9a-f]{16}) parent=([0-9a-f]{16}|0) replica=(\S+)$`)

// parseSpans returns the spans in the program's output. It fails t on a span line that does
// not parse, whose prefix is not the process it names, or whose span id is not unique.
func parseSpans(t *testing.T, out []outLine) []traced {
	t.Helper()
	var spans []traced
	ids := map[string]traced{}
	for _, l := range out {
		if !strings.Contains(l.text, "span name=") {
			continue
		}
		m := spanLine.FindStringSubmatch(l.text)
		if m == nil || l.stderr {
			t.Errorf("malformed span line: %v", l)
			continue
		}
		s := traced{name: m[2], kind: m[3], trace: m[4], span: m[5], parent: m[6], replica: m[7], line: l}
		if from := m[1]; from != s.replica && (from != "" || s.replica != "main") {
			t.Errorf("span line of %q printed by %q: %v", s.replica, from, l)
		}
		if other, dup := ids[s.span]; dup {
			t.Errorf("span id %s given twice: %v and %v", s.span, other, s)
		}
		ids[s.span] = s
		spans = append(spans, s)
	}
	return spans
}

// TestTraceAcrossProcesses runs three calls (Front.Get, Front.Put, Front.Get) through a
// multi-process deployment in which every process traces with a tracer that prints its
// spans: the Put's trace crosses the processes main → front → store (and the ledger) as one
// trace, a chain of client and server spans whose parents are the spans that made the calls;
// every call has a trace of its own; and no span line holds the metadata the calls carry.
func TestTraceAcrossProcesses(t *testing.T) {
	const replicas = 2
	secret := "trace-secret-" + newToken()
	p := startProgram(t, fmt.Sprintf("-mode=trace -replicas=%d", replicas), testapp.EnvSecret+"="+secret)
	p.expectRe(`^trace done$`, 60*time.Second)
	if err := p.wait(30 * time.Second); err != nil {
		t.Fatalf("program exited with %v", err)
	}
	p.requireNoneLeft()
	out := p.output()

	// The calls went where they should, with their metadata.
	storeReplica := fmt.Sprintf("store/%d", 1%replicas) // the "trace" mode calls shard 1
	calls := map[string]string{}
	for _, l := range out {
		if m := regexp.MustCompile(`^trace call=(\S+) (.*)$`).FindStringSubmatch(l.text); m != nil {
			calls[m[1]] = m[2]
		}
	}
	if got, want := calls["put"], "replica="+storeReplica+" metadata-arrived=true err=<nil>"; got != want {
		t.Errorf("the Put: %q, want %q", got, want)
	}
	if got, want := calls["get-after"], "replica="+storeReplica+" metadata-arrived=true err=<nil>"; got != want {
		t.Errorf("the Get after the Put: %q, want %q", got, want)
	}
	if _, ok := calls["get-before"]; !ok {
		t.Error("the Get before the Put did not run")
	}

	spans := parseSpans(t, out)
	for _, s := range spans {
		if strings.Contains(s.line.text, secret) || strings.Contains(s.line.text, secret[len("trace-secret-"):]) {
			t.Errorf("a span line holds the calls' metadata value: %v", s.line)
		}
	}
	for _, l := range out {
		if strings.Contains(l.text, secret[len("trace-secret-"):]) {
			t.Errorf("the calls' metadata value is in the output: %v", l)
		}
	}
	byID := map[string]traced{}
	for _, s := range spans {
		byID[s.span] = s
	}
	where := func(replica, kind, nameSuffix string) []traced {
		var out []traced
		for _, s := range spans {
			if s.replica == replica && s.kind == kind && strings.HasSuffix(s.name, nameSuffix) {
				out = append(out, s)
			}
		}
		return out
	}
	list := func(ss []traced) string {
		var b strings.Builder
		for _, s := range ss {
			fmt.Fprintf(&b, "\n\t%v", s)
		}
		return b.String()
	}

	// main: one root client span per call, each with a trace of its own.
	roots := where("main", "client", "")
	if len(roots) != len(calls) {
		t.Fatalf("main has %d client spans, want one per call (%d): main's calls to other processes are not traced as they should be:%s",
			len(roots), len(calls), list(spans))
	}
	traces := map[string]bool{}
	for _, r := range roots {
		if r.parent != "0" {
			t.Errorf("main's client span of a call from a context without a span has a parent: %v", r)
		}
		if traces[r.trace] {
			t.Errorf("two of main's calls share trace %s: every call must start a trace of its own:%s", r.trace, list(roots))
		}
		traces[r.trace] = true
	}

	// front: the server span of the Put, child of one of main's client spans.
	fronts := where("front/0", "server", "/Front.Put")
	if len(fronts) != 1 {
		t.Fatalf("front/0 has %d server spans for Front.Put, want 1; main → front does not start a server span in the callee:%s", len(fronts), list(spans))
	}
	front := fronts[0]
	root, ok := byID[front.parent]
	if !ok || root.replica != "main" || root.kind != "client" {
		t.Fatalf("the parent of front/0's server span (%v) is not one of main's client spans: the span context does not cross main → front:%s",
			front, list(roots))
	}
	if front.trace != root.trace {
		t.Errorf("front/0's server span %v is in another trace than its parent, main's client span %v", front, root)
	}

	// store: the server span of the Put, child of a client span in front/0 that descends from
	// front's server span, directly or through internal spans of front/0.
	stores := where(storeReplica, "server", "/Store.Put")
	if len(stores) != 1 {
		t.Fatalf("%s has %d server spans for Store.Put, want 1:%s", storeReplica, len(stores), list(spans))
	}
	store := stores[0]
	fc, ok := byID[store.parent]
	if !ok || fc.replica != "front/0" || fc.kind != "client" {
		t.Fatalf("the parent of %s's server span (%v) is not a client span of front/0: the span context does not cross front → store:%s",
			storeReplica, store, list(where("front/0", "client", "")))
	}
	for s, n := fc, 0; s.span != front.span; n++ {
		up, ok := byID[s.parent]
		if !ok || n > len(spans) || up.replica != "front/0" || (up.kind != "internal" && up.span != front.span) {
			t.Fatalf("front/0's client span %v, parent of the store's server span, does not descend from front's server span %v "+
				"(its chain stops at %v): the handler's context is lost between the server span and the call to the store", fc, front, s)
		}
		s = up
	}

	// The Put's trace is the tree under main's client span, and nothing else: every span of
	// the tree has its trace id, and no span outside it has. Every span descends from one of
	// main's client spans, in that span's trace.
	rootOf := func(s traced) (traced, bool) {
		for range len(spans) + 1 {
			if s.parent == "0" {
				return s, true
			}
			up, ok := byID[s.parent]
			if !ok {
				return s, false
			}
			s = up
		}
		return s, false // a cycle
	}
	var tree []traced
	for _, s := range spans {
		r, ok := rootOf(s)
		switch {
		case !ok:
			t.Errorf("span %v descends from no root span (its chain stops at %v)", s, r)
		case r.replica != "main" || r.kind != "client":
			t.Errorf("span %v descends from %v, not from one of main's client spans", s, r)
		case s.trace != r.trace:
			t.Errorf("span %v is in trace %s, but descends from main's client span %v: it took the trace id of another call", s, s.trace, r)
		}
		switch {
		case ok && r.span == root.span:
			tree = append(tree, s)
		case s.trace == root.trace:
			t.Errorf("span %v has the trace id of the Put but is not part of its call", s)
		}
	}
	// The Put's tree holds one server span per component method the Put ran, in the process
	// that serves it.
	var servers []string
	for _, s := range tree {
		if s.kind == "server" {
			servers = append(servers, s.replica+" "+s.name[strings.LastIndex(s.name, "/")+1:])
		}
	}
	slices.Sort(servers)
	if want := []string{"front/0 Front.Put", "ledger/0 Ledger.Record", storeReplica + " Store.Put"}; !slices.Equal(servers, want) {
		t.Errorf("server spans of the Put's trace = %q, want %q:%s", servers, want, list(tree))
	}
}
