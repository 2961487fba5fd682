// Package lname has two components whose interface names differ only in the case of their
// first letter, Store and store.
package lname

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

// Store is exported.
type Store interface {
	Get(ctx context.Context, key string) (string, error)
}

// store is an unexported component.
type store interface {
	Put(ctx context.Context, key string) error
}

type bigStore struct {
	runtime.Implements[Store]
}

func (*bigStore) Get(_ context.Context, key string) (string, error) { return "got " + key, nil }

type smallStore struct {
	runtime.Implements[store]
}

func (*smallStore) Put(context.Context, string) error { return nil }
