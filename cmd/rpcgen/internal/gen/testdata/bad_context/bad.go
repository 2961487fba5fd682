// Package bad has methods whose first parameter is not a context.Context.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Clock interface {
	NoArgs() error
	NoContext(name string) error
	Second(name string, ctx context.Context) error
	Fine(ctx context.Context, name string) error
}

type clock struct {
	runtime.Implements[Clock]
}

func (*clock) NoArgs() error                        { return nil }
func (*clock) NoContext(string) error               { return nil }
func (*clock) Second(string, context.Context) error { return nil }
func (*clock) Fine(context.Context, string) error   { return nil }
