// Package samename uses two packages of the same name, types, whose types Item (of the same
// name) cross the wire only as fields of the package's structs: the generated file must import
// them under distinct names and give their encoding functions distinct names, the same on every
// run.
package samename

import (
	"context"

	ta "github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/samename/a"
	tb "github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/samename/b"
	"github.com/weftrpc/weft/runtime"
)

// A and B hold the two Items.
type (
	A struct{ Item ta.Item }
	B struct{ Item tb.Item }
)

// Same echoes its arguments.
type Same interface {
	Both(ctx context.Context, a A, b B) (A, B, error)
}

type impl struct {
	runtime.Implements[Same]
}

func (*impl) Both(_ context.Context, a A, b B) (A, B, error) { return a, b, nil }
