// Package bad takes a struct of another package whose exported field has a type that package
// does not export: the generated file could not name it.
package bad

import (
	"context"

	"github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/bad_unexported_type/sub"
	"github.com/weftrpc/weft/runtime"
)

type Box interface {
	Put(ctx context.Context, o sub.Outer) error
}

type box struct {
	runtime.Implements[Box]
}

func (*box) Put(context.Context, sub.Outer) error { return nil }
