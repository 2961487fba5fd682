// Package errvar declares an exported variable of type error that is nil until the program
// sets it. The generated file must not make the program fail because of it.
package errvar

import (
	"context"
	"errors"

	"github.com/weftrpc/weft/runtime"
)

// ErrDisabled is nil while the feature is enabled; Disable sets it.
var ErrDisabled error

// ErrClosed is a sentinel.
var ErrClosed = errors.New("errvar: closed")

// Disable makes Feature fail with ErrDisabled.
func Disable() { ErrDisabled = errors.New("errvar: disabled") }

// Feature is a component that may be disabled.
type Feature interface {
	Use(ctx context.Context) error
}

type impl struct {
	runtime.Implements[Feature]
}

func (*impl) Use(context.Context) error {
	if ErrDisabled != nil {
		return ErrDisabled
	}
	return ErrClosed
}
