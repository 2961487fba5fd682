// Package echo is a small component used to measure generated stubs against raw calls and to
// keep CI's check of generated code meaningful.
package echo

//go:generate go run github.com/weftrpc/weft/cmd/rpcgen

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

// Echoer returns what it is given.
type Echoer interface {
	// Echo returns b.
	Echo(ctx context.Context, b []byte) ([]byte, error)
	// EchoRecord returns r.
	EchoRecord(ctx context.Context, r Record) (Record, error)
}

// Record is a struct-heavy value.
type Record struct {
	ID     int64
	Name   string
	Tags   []string
	Scores []float64
	Parts  []Part
}

// Part is an element of a Record.
type Part struct {
	Key   string
	Value []byte
}

type echoer struct {
	runtime.Implements[Echoer]
}

func (*echoer) Echo(_ context.Context, b []byte) ([]byte, error)       { return b, nil }
func (*echoer) EchoRecord(_ context.Context, r Record) (Record, error) { return r, nil }

// New returns an implementation of Echoer, for tests and benchmarks.
func New() Echoer { return &echoer{} }
