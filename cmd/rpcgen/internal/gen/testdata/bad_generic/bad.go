// Package bad has a generic component interface.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Store[T any] interface {
	Get(ctx context.Context, key string) (T, error)
}

type ints struct {
	runtime.Implements[Store[int]]
}

func (*ints) Get(context.Context, string) (int, error) { return 0, nil }
