// Package bad has interfaces other than error in arguments and results, directly and inside
// other types.
package bad

import (
	"context"
	"fmt"
	"io"

	"github.com/weftrpc/weft/runtime"
)

type Shape interface{ Area() float64 }

type Doc struct {
	Title string
	Body  any
}

type Docs interface {
	Read(ctx context.Context, r io.Reader) error
	Any(ctx context.Context, v any, vs []interface{}) error
	Stringer(ctx context.Context) (fmt.Stringer, error)
	Local(ctx context.Context, s Shape) error
	Field(ctx context.Context, d Doc) error
	Errors(ctx context.Context, err error, errs []error) (error, error)
}

type docs struct {
	runtime.Implements[Docs]
}

func (*docs) Read(context.Context, io.Reader) error                 { return nil }
func (*docs) Any(context.Context, any, []interface{}) error         { return nil }
func (*docs) Stringer(context.Context) (fmt.Stringer, error)        { return nil, nil }
func (*docs) Local(context.Context, Shape) error                    { return nil }
func (*docs) Field(context.Context, Doc) error                      { return nil }
func (*docs) Errors(context.Context, error, []error) (error, error) { return nil, nil }
