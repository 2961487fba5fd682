// Package skewb is one of two versions of the same component, skewa and skewb, that differ
// only in the type of a struct field (Item.Count is int32 in skewa and int64 in skewb). A client
// built from one must not call a server built from the other with misread bytes.
package skewb

import (
	"context"
	"sync/atomic"

	"github.com/weftrpc/weft/runtime"
)

// Item is the struct that differs.
type Item struct {
	Name  string
	Count int64
}

// PutCalls counts the calls of Put.
var PutCalls atomic.Int64

// Store has a method whose signature differs between the versions (Put) and one whose does
// not (Get).
type Store interface {
	Put(ctx context.Context, it Item) (Item, error)
	Get(ctx context.Context, name string) (string, error)
}

type store struct {
	runtime.Implements[Store]
}

func (*store) Put(_ context.Context, it Item) (Item, error) {
	PutCalls.Add(1)
	it.Count++
	return it, nil
}

func (*store) Get(_ context.Context, name string) (string, error) { return "skewb " + name, nil }
