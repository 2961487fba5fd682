// Package bad has methods whose last result is not an error.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Counter interface {
	NoResults(ctx context.Context)
	NoError(ctx context.Context) int
	ErrorFirst(ctx context.Context) (error, int)
	Fine(ctx context.Context) (int, error)
}

type counter struct {
	runtime.Implements[Counter]
}

func (*counter) NoResults(context.Context)               {}
func (*counter) NoError(context.Context) int             { return 0 }
func (*counter) ErrorFirst(context.Context) (error, int) { return nil, 0 }
func (*counter) Fine(context.Context) (int, error)       { return 0, nil }
