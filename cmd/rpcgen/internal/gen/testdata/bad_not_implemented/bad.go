// Package bad has implementations that do not implement their component's interface.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Store interface {
	Get(ctx context.Context, key string) (string, error)
	Put(ctx context.Context, key, value string) error
}

type Clock interface {
	Now(ctx context.Context) (int64, error)
}

// store lacks Put.
type store struct {
	runtime.Implements[Store]
}

func (*store) Get(context.Context, string) (string, error) { return "", nil }

// clock's Now has the wrong signature.
type clock struct {
	runtime.Implements[Clock]
}

func (*clock) Now(context.Context) (int32, error) { return 0, nil }
