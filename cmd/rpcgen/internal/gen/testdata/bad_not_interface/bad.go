// Package bad embeds runtime.Implements of types that are not named interfaces.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Point struct{ X, Y int }

type Count int

type ofStruct struct {
	runtime.Implements[Point]
}

type ofNamedInt struct {
	runtime.Implements[Count]
}

type ofInt struct {
	runtime.Implements[int]
}

type ofLiteral struct {
	runtime.Implements[interface {
		Get(ctx context.Context) error
	}]
}

func (*ofLiteral) Get(context.Context) error { return nil }
