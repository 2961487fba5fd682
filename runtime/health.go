package runtime

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
)

// health is the health of one process: healthy unless a local component reported a problem
// ([Implements.ReportHealth]) or a Connection to another group that has been healthy is not
// any more (every replica of that group is down, ejected or failing its health checks). A
// Connection that has never been healthy does not count: it is still starting, and its calls
// wait for it.
type health struct {
	mu sync.Mutex
	// guarded by mu
	comps    map[string]error // component name → the problem it reported
	channels map[string]bool  // group → healthy, for Connections that have been healthy once
	healthy  bool
	reason   string
	onChange func(healthy bool, reason string) // called under mu, so changes arrive in order
}

func newHealth() *health {
	return &health{comps: map[string]error{}, channels: map[string]bool{}, healthy: true}
}

// report installs f, which is called (under the lock, so in order; it must not block for
// long) with every later change of the process's health, and calls it now if the process is
// unhealthy already.
func (h *health) report(f func(healthy bool, reason string)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.onChange = f
	if !h.healthy {
		f(h.healthy, h.reason)
	}
}

// component records the health component name reported; nil means healthy.
func (h *health) component(name string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		delete(h.comps, name)
	} else {
		h.comps[name] = err
	}
	h.updateLocked()
}

// channel records the health of the Connection to group.
func (h *health) channel(group string, healthy bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, seen := h.channels[group]; !seen && !healthy {
		return // never healthy yet: still starting
	}
	h.channels[group] = healthy
	h.updateLocked()
}

// state returns the process's health and, when unhealthy, why.
func (h *health) state() (bool, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.healthy, h.reason
}

// updateLocked recomputes the health and reports a change.
//
// REQUIRES: h.mu is held.
func (h *health) updateLocked() {
	var problems []string
	for _, name := range slices.Sorted(maps.Keys(h.comps)) {
		problems = append(problems, fmt.Sprintf("component %s: %v", shortName(name), h.comps[name]))
	}
	for _, g := range slices.Sorted(maps.Keys(h.channels)) {
		if !h.channels[g] {
			problems = append(problems, fmt.Sprintf("no healthy replica of group %s", g))
		}
	}
	healthy, reason := len(problems) == 0, strings.Join(problems, "; ")
	if healthy == h.healthy && reason == h.reason {
		return
	}
	h.healthy, h.reason = healthy, reason
	if h.onChange != nil {
		h.onChange(healthy, reason)
	}
}

// healthSetter is implemented by *Implements[T].
type healthSetter interface{ setHealth(*health, string) }

// rotation returns the sockets of g's replicas that callers should use: the replicas that
// serve and are healthy. If none is, every replica that serves (an unhealthy replica is better
// than none); if none serves, all of them, so that calls wait for them to come back. A sharded
// group always has all of them: a key has exactly one owner.
func (g *groupState) rotation() []string {
	if g.Sharded {
		return slices.Clone(g.Sockets)
	}
	var healthy, serving []string
	for _, r := range g.replicas {
		r.mu.Lock()
		if r.state == "serving" {
			serving = append(serving, r.sock)
			if r.healthy {
				healthy = append(healthy, r.sock)
			}
		}
		r.mu.Unlock()
	}
	switch {
	case len(healthy) > 0:
		return healthy
	case len(serving) > 0:
		return serving
	}
	return slices.Clone(g.Sockets)
}
