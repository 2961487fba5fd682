// Package bad has three implementations of one component.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Store interface {
	Get(ctx context.Context, key string) (string, error)
}

type memStore struct {
	runtime.Implements[Store]
}

func (*memStore) Get(context.Context, string) (string, error) { return "", nil }

type diskStore struct {
	runtime.Implements[Store]
}

func (*diskStore) Get(context.Context, string) (string, error) { return "", nil }

type alsoStore struct {
	runtime.Implements[Store]
}

func (*alsoStore) Get(context.Context, string) (string, error) { return "", nil }
