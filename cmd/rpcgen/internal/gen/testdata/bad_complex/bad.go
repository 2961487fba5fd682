// Package bad has complex numbers in arguments and results, directly and inside other types.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Signal struct {
	Rate    int
	Samples []complex64
}

type Phase complex128

type DSP interface {
	FFT(ctx context.Context, in []float64) ([]complex128, error)
	One(ctx context.Context, c complex64) (complex128, error)
	Struct(ctx context.Context, s Signal, p Phase) error
}

type dsp struct {
	runtime.Implements[DSP]
}

func (*dsp) FFT(context.Context, []float64) ([]complex128, error) { return nil, nil }
func (*dsp) One(context.Context, complex64) (complex128, error)   { return 0, nil }
func (*dsp) Struct(context.Context, Signal, Phase) error          { return nil }
