// Package bad has methods with directives rpcgen rejects.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Svc interface {
	//weft:frobnicate
	Unknown(ctx context.Context) error

	//weft:hedge delay=10ms
	HedgedNotIdempotent(ctx context.Context) error

	//weft:retry
	RetryWithoutAttempts(ctx context.Context) error

	//weft:retry attempts=1 base=soon
	BadValues(ctx context.Context) error

	//weft:multi
	MultiTwoResults(ctx context.Context) (int, string, error)

	//weft:affinity
	AffinityWithoutMethod(ctx context.Context, n int) error

	//weft:affinity min=x
	AffinityWrongMethod(ctx context.Context, n int) error

	//weft:idempotent please
	IdempotentWithArgs(ctx context.Context) error

	//weft:multi
	Taken(ctx context.Context) error
}

// SvcTakenAll is a name rpcgen would generate for the multi method Taken.
func SvcTakenAll() {}

type svc struct {
	runtime.Implements[Svc]
}

func (*svc) Unknown(context.Context) error                            { return nil }
func (*svc) HedgedNotIdempotent(context.Context) error                { return nil }
func (*svc) RetryWithoutAttempts(context.Context) error               { return nil }
func (*svc) BadValues(context.Context) error                          { return nil }
func (*svc) MultiTwoResults(context.Context) (int, string, error)     { return 0, "", nil }
func (*svc) AffinityWithoutMethod(context.Context, int) error         { return nil }
func (*svc) AffinityWrongMethod(context.Context, int) error           { return nil }
func (*svc) AffinityWrongMethodAffinity(context.Context, int) float64 { return 0 }
func (*svc) IdempotentWithArgs(context.Context) error                 { return nil }
func (*svc) Taken(context.Context) error                              { return nil }
