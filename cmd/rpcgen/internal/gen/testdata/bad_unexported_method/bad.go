// Package bad has a component with unexported methods.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Cache interface {
	Get(ctx context.Context, key string) (string, error)
	evict(ctx context.Context, key string) error
	reset()
}

type cache struct {
	runtime.Implements[Cache]
}

func (*cache) Get(context.Context, string) (string, error) { return "", nil }
func (*cache) evict(context.Context, string) error         { return nil }
func (*cache) reset()                                      {}
