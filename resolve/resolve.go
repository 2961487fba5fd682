// Package resolve provides versioned resolvers: sources of the set of endpoints a client
// connects to, which may change over time.
//
// [Constant] returns a fixed set. [Manual] returns the set its owner last gave it, and is
// what tests and deployers use to move a client between servers. [DNS] resolves a name (A and
// AAAA records, or SRV) and looks it up again when its records' TTL expires. [File] follows a
// file that lists endpoints, applying only complete versions of it.
package resolve

import (
	"context"
	"slices"
	"strconv"
	"sync"

	"github.com/weftrpc/weft/endpoint"
)

// Version identifies one snapshot of a resolver's set of endpoints. Versions are opaque: they
// come from a resolver's Resolve and go back only to the same resolver's Resolve.
type Version struct {
	Opaque string
}

// A Resolver manages a set of endpoints that may change over time. A Resolver is safe for
// concurrent use.
type Resolver interface {
	// IsConstant reports whether the set never changes. A constant resolver needs only one
	// Resolve with a nil version, and returns a nil version.
	IsConstant() bool

	// Resolve returns the set of endpoints and its version.
	//
	// With a nil version it returns the current set at once. With the version of an earlier
	// answer it either blocks until the set has a newer version and returns that, or returns
	// the same version to mean "ask again after a delay" (for resolvers that can only poll).
	// It returns ctx's error if ctx is done first. An error means this attempt failed; the
	// caller keeps its last good set and asks again later.
	//
	// An empty set is a valid answer: there are no servers. A resolver that cannot tell an
	// empty answer from a failure should return an error instead.
	//
	// The caller owns the returned slice.
	Resolve(ctx context.Context, version *Version) ([]endpoint.Endpoint, *Version, error)
}

type constant struct {
	eps []endpoint.Endpoint
}

// Constant returns a resolver whose set is always eps.
func Constant(eps ...endpoint.Endpoint) Resolver {
	return constant{eps: slices.Clone(eps)}
}

func (constant) IsConstant() bool { return true }

func (r constant) Resolve(ctx context.Context, _ *Version) ([]endpoint.Endpoint, *Version, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	return slices.Clone(r.eps), nil, nil
}

// Manual is a resolver whose set its owner replaces with [Manual.Update]. Every Update makes a
// new version, and a Resolve blocked on the previous version returns. The zero value is not
// usable; create one with [NewManual].
type Manual struct {
	mu      sync.Mutex
	eps     []endpoint.Endpoint
	version uint64
	changed chan struct{} // closed and replaced by Update
}

var _ Resolver = (*Manual)(nil)

// NewManual returns a Manual resolver whose first set is eps.
func NewManual(eps ...endpoint.Endpoint) *Manual {
	return &Manual{eps: slices.Clone(eps), version: 1, changed: make(chan struct{})}
}

// Update replaces the set with eps (which may be empty) and wakes blocked Resolves.
func (m *Manual) Update(eps ...endpoint.Endpoint) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.eps = slices.Clone(eps)
	m.version++
	close(m.changed)
	m.changed = make(chan struct{})
}

// Endpoints returns the current set.
func (m *Manual) Endpoints() []endpoint.Endpoint {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.eps)
}

// IsConstant implements [Resolver]; it returns false.
func (m *Manual) IsConstant() bool { return false }

// Resolve implements [Resolver]. With the current version it blocks until the next Update or
// until ctx is done; with nil or any other version it returns the current set at once.
func (m *Manual) Resolve(ctx context.Context, version *Version) ([]endpoint.Endpoint, *Version, error) {
	for {
		m.mu.Lock()
		cur := strconv.FormatUint(m.version, 10)
		if version == nil || version.Opaque != cur {
			eps := slices.Clone(m.eps)
			m.mu.Unlock()
			return eps, &Version{Opaque: cur}, nil
		}
		changed := m.changed
		m.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}
