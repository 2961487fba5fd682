package balance

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
)

// DefaultVirtualNodes is the number of points each member has on a [ConsistentHash] ring when
// [ConsistentHashOptions.VirtualNodes] is zero.
const DefaultVirtualNodes = 160

// MaxVirtualNodes is the largest [ConsistentHashOptions.VirtualNodes] accepted.
const MaxVirtualNodes = 4096

// ErrBadOptions is returned, wrapped, by constructors of this package given invalid options.
// Test for it with errors.Is.
var ErrBadOptions = errors.New("balance: bad options")

// ConsistentHashOptions configures [ConsistentHash]. The zero value is a good default.
type ConsistentHashOptions struct {
	// VirtualNodes is the number of points each member has on the ring. More points spread
	// keys more evenly (a member's share of the keys strays from 1/n by about
	// 1/sqrt(VirtualNodes)) and cost more memory (12 bytes a point) and a longer build when
	// the set changes. Clients that must agree on owners must use the same value. If zero,
	// [DefaultVirtualNodes]. Negative values and values above [MaxVirtualNodes] are an error.
	VirtualNodes int
}

// ConsistentHash returns a balancer that sends calls with a shard key to the key's owner on a
// consistent-hash ring, so that adding or removing one of n members moves only about 1/n of
// the keys, all of them to or from that member. It returns an error wrapping [ErrBadOptions]
// if opts is invalid.
//
// Each member of PickInfo.Members with an endpoint has VirtualNodes points on the ring, at the
// xxhash of its endpoint address followed by the point's number (8 bytes, little endian). A
// key's position is the xxhash of its 8 little-endian bytes, and its owner is the member of
// the first point at or after that position, going round. Owners depend only on the set of
// addresses and on VirtualNodes, so every client that sees the same set agrees on them. A
// member whose address repeats an earlier member's has no points.
//
// A call with a shard key goes to the key's owner when the owner is in PickInfo.Ready, and
// otherwise to the next ready member clockwise: the member that would own the key if every
// member that is not ready were removed. A down member's keys thus move only to its
// successors, the keys of every other member stay where they are, and they come back when it
// is ready again. Unlike [Sharded], a call never waits for or fails because of a down owner
// while another member is ready; it trades strict ownership for availability. While members
// are still connecting, the first ones ready take the keys of the others. With no member
// ready, Pick returns [ErrNoMember]. A call without a shard key goes to a ready member chosen
// as [LeastLoaded] chooses.
//
// Pick is safe for concurrent use and never blocks. The balancer caches a view of the last
// PickInfo.Members and PickInfo.Ready slices it saw (compared by identity: the same backing
// array and length), so in steady state a pick makes no allocation and costs one atomic load,
// one hash of 8 bytes, a binary search over the points, and a walk past the points of members
// that are not ready. A pick that sees new slices builds a new view first: a new Ready slice
// costs a table of which members are ready, O(n) endpoint addresses; a new Members slice
// whose addresses are the same as before reuses the ring; other sets build the ring again,
// O(n·v·log(n·v)) for v points per member. Concurrent picks that see new slices may each build
// a view; each uses a complete one, and the last stored stays cached. Build one ConsistentHash
// per client and keep it: a new one builds its ring on its first pick, and one shared by
// clients with different sets rebuilds its view whenever consecutive picks come from
// different clients.
func ConsistentHash(opts ConsistentHashOptions) (Balancer, error) {
	v := opts.VirtualNodes
	switch {
	case v == 0:
		v = DefaultVirtualNodes
	case v < 0 || v > MaxVirtualNodes:
		return nil, fmt.Errorf("%w: VirtualNodes is %d, want 0 (for %d) or 1 to %d", ErrBadOptions, v, DefaultVirtualNodes, MaxVirtualNodes)
	}
	return &consistentHash{vnodes: v}, nil
}

type consistentHash struct {
	vnodes int
	view   atomic.Pointer[hashView] // the view of the last slices seen
}

var _ Balancer = (*consistentHash)(nil)

// hashView is the immutable view of one pair of Members and Ready slices.
type hashView struct {
	members []Member // PickInfo.Members, kept so its array is not reused while cached
	ready   []Member // PickInfo.Ready, likewise
	ring    *ring
	up      []bool // up[i] reports whether members[i] is in ready
}

// ring holds the points of one set of addresses. It is immutable and shared by every view
// whose Members have the same addresses in the same order.
type ring struct {
	addrs  []string         // addrs[i] is the address of member i, "" if it has no endpoint
	index  map[string]int32 // the index of the first member with each address
	hashes []uint64         // the points, ascending
	owners []int32          // owners[p] is the index of the member at point hashes[p]
}

func (h *consistentHash) Pick(info PickInfo) (Member, error) {
	if !info.Sharded {
		return pickLeastLoaded(info.Ready)
	}
	if len(info.Ready) == 0 || len(info.Members) == 0 {
		return nil, ErrNoMember
	}
	v := h.viewOf(info.Members, info.Ready)
	r := v.ring
	n := len(r.hashes)
	p, _ := slices.BinarySearch(r.hashes, keyHash(info.ShardKey))
	for range n {
		if p == n {
			p = 0
		}
		if o := r.owners[p]; v.up[o] {
			return v.members[o], nil
		}
		p++
	}
	return nil, ErrNoMember
}

// viewOf returns the cached view of members and ready, building and caching it if the cache
// holds another.
func (h *consistentHash) viewOf(members, ready []Member) *hashView {
	old := h.view.Load()
	if old != nil && sameSlice(old.members, members) && sameSlice(old.ready, ready) {
		return old
	}
	var r *ring
	if old != nil && sameSlice(old.members, members) {
		r = old.ring
	} else {
		addrs := make([]string, len(members))
		for i, m := range members {
			addrs[i] = addressOf(m)
		}
		if old != nil && slices.Equal(old.ring.addrs, addrs) {
			r = old.ring
		} else {
			r = buildRing(addrs, h.vnodes)
		}
	}
	v := &hashView{members: members, ready: ready, ring: r, up: make([]bool, len(members))}
	for _, m := range ready {
		if i, ok := r.index[addressOf(m)]; ok {
			v.up[i] = true
		}
	}
	h.view.Store(v)
	return v
}

// buildRing places vnodes points for each distinct address of addrs.
func buildRing(addrs []string, vnodes int) *ring {
	r := &ring{addrs: addrs, index: make(map[string]int32, len(addrs))}
	for i, a := range addrs {
		if _, dup := r.index[a]; a != "" && !dup {
			r.index[a] = int32(i)
		}
	}
	type point struct {
		hash  uint64
		owner int32
	}
	points := make([]point, 0, len(r.index)*vnodes)
	d := xxhash.New()
	var num [8]byte
	for i, a := range addrs {
		if a == "" || r.index[a] != int32(i) {
			continue
		}
		for v := range vnodes {
			d.Reset()
			_, _ = d.WriteString(a)
			binary.LittleEndian.PutUint64(num[:], uint64(v))
			_, _ = d.Write(num[:])
			points = append(points, point{hash: d.Sum64(), owner: int32(i)})
		}
	}
	// Points of different members that collide are ordered by address, so the order of
	// every pair of points depends only on the two members, not on the rest of the set.
	slices.SortFunc(points, func(p, q point) int {
		if c := cmp.Compare(p.hash, q.hash); c != 0 {
			return c
		}
		return strings.Compare(addrs[p.owner], addrs[q.owner])
	})
	r.hashes = make([]uint64, len(points))
	r.owners = make([]int32, len(points))
	for i, p := range points {
		r.hashes[i], r.owners[i] = p.hash, p.owner
	}
	return r
}

// keyHash returns the ring position of shard key k: the xxhash of its 8 little-endian bytes.
func keyHash(k uint64) uint64 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], k)
	return xxhash.Sum64(b[:])
}

// addressOf returns m's endpoint address, or "" if m or its endpoint is nil.
func addressOf(m Member) string {
	if m == nil {
		return ""
	}
	ep := m.Endpoint()
	if ep == nil {
		return ""
	}
	return ep.Address()
}

// sameSlice reports whether a and b are the same slice: the same length and, if not empty,
// the same first element.
func sameSlice(a, b []Member) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}
