// Package bad has structs with unexported fields in arguments and results, directly, nested,
// and from another package.
package bad

import (
	"context"
	"sync"

	"github.com/weftrpc/weft/runtime"
)

type Secret struct {
	Name string
	key  []byte
}

type Outer struct {
	ID    int
	Inner Inner
}

type Inner struct {
	Value  string
	hidden bool
}

type Vault interface {
	Keep(ctx context.Context, s Secret) error
	Nested(ctx context.Context, o Outer) error
	Pointer(ctx context.Context) (*Secret, error)
	Slice(ctx context.Context, ss []Secret, m map[string]Inner) error
	Std(ctx context.Context, mu *sync.Mutex) error
	Anonymous(ctx context.Context, s struct{ a int }) error
}

type vault struct {
	runtime.Implements[Vault]
}

func (*vault) Keep(context.Context, Secret) error                      { return nil }
func (*vault) Nested(context.Context, Outer) error                     { return nil }
func (*vault) Pointer(context.Context) (*Secret, error)                { return nil, nil }
func (*vault) Slice(context.Context, []Secret, map[string]Inner) error { return nil }
func (*vault) Std(context.Context, *sync.Mutex) error                  { return nil }
func (*vault) Anonymous(context.Context, struct{ a int }) error        { return nil }
