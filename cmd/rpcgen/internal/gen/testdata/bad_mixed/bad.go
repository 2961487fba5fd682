// Package bad has many kinds of problems in one component, all reported at once.
package bad

import (
	"context"
	"io"

	"github.com/weftrpc/weft/runtime"
)

type Secret struct {
	Name string
	key  []byte
}

type Store interface {
	Put(ctx context.Context, ch chan int) error
	Get(key string) (string, error)
	Stream(ctx context.Context, r io.Reader) (func(), error)
	Keep(ctx context.Context, s Secret) (complex128, error)
	NoErr(ctx context.Context) string
}

type store struct {
	runtime.Implements[Store]
}

func (*store) Put(context.Context, chan int) error               { return nil }
func (*store) Get(string) (string, error)                        { return "", nil }
func (*store) Stream(context.Context, io.Reader) (func(), error) { return nil, nil }
func (*store) Keep(context.Context, Secret) (complex128, error)  { return 0, nil }
func (*store) NoErr(context.Context) string                      { return "" }
