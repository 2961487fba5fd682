// Package bad implements component interfaces declared in other packages.
package bad

import (
	"context"
	"io"

	"github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/bad_other_package/sub"
	"github.com/weftrpc/weft/runtime"
)

type store struct {
	runtime.Implements[sub.Store]
}

func (*store) Get(context.Context, string) (string, error) { return "", nil }

type closer struct {
	runtime.Implements[io.Closer]
}

func (*closer) Close() error { return nil }
