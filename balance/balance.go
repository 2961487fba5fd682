// Package balance provides the load balancers a weft client uses to choose which server a call
// goes to.
//
// A [Balancer] sees the client's members: one per endpoint of the resolved set, each with its
// state and its load. Balancers never import package call; they see members only through
// [Member] and a call only through [PickInfo], so plug-ins stay small and testable.
package balance

import (
	"errors"
	"math/rand/v2"
	"sync/atomic"

	"github.com/weftrpc/weft/endpoint"
)

// A Member is one endpoint of a client's resolved set, with a connection or without one.
// Its methods are safe for concurrent use and cheap: they read atomics and never block.
type Member interface {
	// Endpoint returns the member's endpoint.
	Endpoint() endpoint.Endpoint

	// Ready reports whether the member has a connection that accepts calls now.
	Ready() bool

	// InFlight returns the number of calls in progress on the member, including calls queued
	// for one of the server's concurrency slots.
	InFlight() int

	// Load returns the load the server last reported with a reply (its in-flight calls, or a
	// utilization its handlers set), or 0 if it has reported none.
	Load() float64
}

// PickInfo is what a balancer sees of a call and of the client's members.
type PickInfo struct {
	// Members is the whole resolved set, ready or not, ordered by endpoint address. It is
	// shared: a balancer must not modify it.
	Members []Member

	// Ready holds the members of Members that are ready, in the same order. It is shared: a
	// balancer must not modify it.
	Ready []Member

	// ShardKey is the call's shard key. It is meaningful only when Sharded is true, so every
	// value, 0 included, is a key.
	ShardKey uint64

	// Sharded reports whether the call has a shard key.
	Sharded bool
}

// A Balancer picks the member a call goes to.
//
// Pick must be safe for concurrent use and must never block. It returns a member of
// info.Members, or an error (such as [ErrNoMember]) that fails the call as unreachable. It
// may return a member that is not ready, as [Sharded] does when a key's owner is down: the
// client then waits for that member while it is still connecting, and otherwise fails the
// call as unreachable without sending it anywhere else.
type Balancer interface {
	Pick(info PickInfo) (Member, error)
}

// ErrNoMember is returned by the balancers of this package when no member is ready.
var ErrNoMember = errors.New("balance: no ready member")

// Func returns a Balancer that calls pick. pick must be safe for concurrent use and must not
// block.
func Func(pick func(PickInfo) (Member, error)) Balancer { return funcBalancer(pick) }

type funcBalancer func(PickInfo) (Member, error)

func (f funcBalancer) Pick(info PickInfo) (Member, error) { return f(info) }

// RoundRobin returns a balancer that cycles through the ready members. It ignores shard keys.
// One RoundRobin may serve several clients; each pick costs one atomic add.
func RoundRobin() Balancer { return &roundRobin{} }

type roundRobin struct {
	next atomic.Uint64
}

func (r *roundRobin) Pick(info PickInfo) (Member, error) {
	n := len(info.Ready)
	if n == 0 {
		return nil, ErrNoMember
	}
	if n == 1 {
		return info.Ready[0], nil
	}
	return info.Ready[(r.next.Add(1)-1)%uint64(n)], nil
}

// Sharded returns a balancer that sends a call with shard key k to member k mod n of the n
// members of the resolved set (ordered by address), whether or not that member is ready, so a
// connection that flaps never moves a key to another owner. When the owner is down the call
// fails as unreachable. A call without a shard key goes to a random ready member.
//
// Adding or removing an endpoint moves most keys; a deployment that resizes often wants
// consistent hashing instead.
func Sharded() Balancer { return sharded{} }

type sharded struct{}

func (sharded) Pick(info PickInfo) (Member, error) {
	if !info.Sharded {
		if len(info.Ready) == 0 {
			return nil, ErrNoMember
		}
		return info.Ready[rand.IntN(len(info.Ready))], nil
	}
	if len(info.Members) == 0 {
		return nil, ErrNoMember
	}
	return info.Members[info.ShardKey%uint64(len(info.Members))], nil
}
