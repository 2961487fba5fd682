// Package bad embeds a pointer to runtime.Implements, which does not declare a component.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Store interface {
	Get(ctx context.Context, key string) (string, error)
}

type store struct {
	*runtime.Implements[Store]
}

func (*store) Get(context.Context, string) (string, error) { return "", nil }
