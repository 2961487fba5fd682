// Package bad has channels in arguments and results, directly and inside other types.
package bad

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type Job struct {
	Name string
	Done chan struct{}
}

type Queue interface {
	Send(ctx context.Context, ch chan int) error
	Recv(ctx context.Context) (<-chan string, error)
	Submit(ctx context.Context, j Job) error
	Batch(ctx context.Context, jobs []Job, byName map[string]*Job) error
	Fine(ctx context.Context, s string) error
}

type queue struct {
	runtime.Implements[Queue]
}

func (*queue) Send(context.Context, chan int) error                { return nil }
func (*queue) Recv(context.Context) (<-chan string, error)         { return nil, nil }
func (*queue) Submit(context.Context, Job) error                   { return nil }
func (*queue) Batch(context.Context, []Job, map[string]*Job) error { return nil }
func (*queue) Fine(context.Context, string) error                  { return nil }
