// Package bad has runtime.Implements as a named field instead of an embedded one.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Store interface {
	Get(ctx context.Context, key string) (string, error)
}

type store struct {
	impl runtime.Implements[Store]
}

func (*store) Get(context.Context, string) (string, error) { return "", nil }
