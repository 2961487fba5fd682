// Package collide declares package-level names that the generated file imports packages by
// (trace, reflect, unsafe, call) and imports a package named codec: the generated file must
// import under other names.
package collide

import (
	"context"

	"github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/collide/codec"
	"github.com/weftrpc/weft/runtime"
)

var trace = "not the otel package"

const call = 1

func unsafe() int { return len(trace) + call }

// reflect is a type that crosses the wire.
type reflect struct {
	N      int
	Frames []codec.Frame
}

// Collide echoes its arguments.
type Collide interface {
	Frame(ctx context.Context, f codec.Frame, fs []codec.Frame, r reflect) (codec.Frame, []codec.Frame, reflect, error)
	Unsafe(ctx context.Context) (int, error)
}

type impl struct {
	runtime.Implements[Collide]
}

func (*impl) Frame(_ context.Context, f codec.Frame, fs []codec.Frame, r reflect) (codec.Frame, []codec.Frame, reflect, error) {
	return f, fs, r, nil
}

func (*impl) Unsafe(context.Context) (int, error) { return unsafe(), nil }
