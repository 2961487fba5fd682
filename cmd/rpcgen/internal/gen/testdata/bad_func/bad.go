// Package bad has functions in arguments and results, directly and inside other types.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Callback func(int) error

type Hook struct {
	Name string
	Run  func()
}

type Hooks interface {
	Register(ctx context.Context, f func(string)) error
	Named(ctx context.Context, cb Callback) (func() error, error)
	Struct(ctx context.Context, h *Hook, hs map[string][]Hook) error
}

type hooks struct {
	runtime.Implements[Hooks]
}

func (*hooks) Register(context.Context, func(string)) error           { return nil }
func (*hooks) Named(context.Context, Callback) (func() error, error)  { return nil, nil }
func (*hooks) Struct(context.Context, *Hook, map[string][]Hook) error { return nil }
