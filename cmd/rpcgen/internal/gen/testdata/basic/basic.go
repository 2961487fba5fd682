// Package basic has a component whose methods take and return every basic type: booleans,
// every integer and float kind, strings, []byte, named types of those, time.Time and
// time.Duration; a variadic method; a method with no arguments; several results.
package basic

import (
	"context"
	"strings"
	"time"

	"github.com/weftrpc/weft/runtime"
)

type (
	Flag    bool
	Count   uint16
	Celsius float64
	Name    string
	Blob    []byte
	Level   int8
	Ratio   float32
	Timeout time.Duration
)

// Basic echoes its arguments.
type Basic interface {
	Bools(ctx context.Context, a bool, b Flag) (bool, Flag, error)
	Ints(ctx context.Context, a int, b int8, c int16, d int32, e int64) (int, int8, int16, int32, int64, error)
	Uints(ctx context.Context, a uint, b uint8, c uint16, d uint32, e uint64, f uintptr) (uint, uint8, uint16, uint32, uint64, uintptr, error)
	Floats(ctx context.Context, a float32, b float64) (float32, float64, error)
	Strings(ctx context.Context, s string, b []byte, r rune, c byte) (string, []byte, rune, byte, error)
	Named(ctx context.Context, c Celsius, n Name, k Count, f Flag, b Blob, l Level, r Ratio, t Timeout) (Celsius, Name, Count, Flag, Blob, Level, Ratio, Timeout, error)
	Times(ctx context.Context, t time.Time, d time.Duration, m time.Month) (time.Time, time.Duration, time.Month, error)
	Sum(ctx context.Context, base int64, xs ...int) (int64, []int, error)
	Join(ctx context.Context, sep string, parts ...string) (string, error)
	Ping(ctx context.Context) error
	Split(ctx context.Context, s, sep string) (head string, rest []string, n int, found bool, err error)
}

type basic struct {
	runtime.Implements[Basic]
}

func (*basic) Bools(_ context.Context, a bool, b Flag) (bool, Flag, error) { return a, b, nil }

func (*basic) Ints(_ context.Context, a int, b int8, c int16, d int32, e int64) (int, int8, int16, int32, int64, error) {
	return a, b, c, d, e, nil
}

func (*basic) Uints(_ context.Context, a uint, b uint8, c uint16, d uint32, e uint64, f uintptr) (uint, uint8, uint16, uint32, uint64, uintptr, error) {
	return a, b, c, d, e, f, nil
}

func (*basic) Floats(_ context.Context, a float32, b float64) (float32, float64, error) {
	return a, b, nil
}

func (*basic) Strings(_ context.Context, s string, b []byte, r rune, c byte) (string, []byte, rune, byte, error) {
	return s, b, r, c, nil
}

func (*basic) Named(_ context.Context, c Celsius, n Name, k Count, f Flag, b Blob, l Level, r Ratio, t Timeout) (Celsius, Name, Count, Flag, Blob, Level, Ratio, Timeout, error) {
	return c, n, k, f, b, l, r, t, nil
}

func (*basic) Times(_ context.Context, t time.Time, d time.Duration, m time.Month) (time.Time, time.Duration, time.Month, error) {
	return t, d, m, nil
}

// Sum returns base plus xs, and xs as it arrived (nil when no variadic arguments were given).
func (*basic) Sum(_ context.Context, base int64, xs ...int) (int64, []int, error) {
	for _, x := range xs {
		base += int64(x)
	}
	return base, xs, nil
}

func (*basic) Join(_ context.Context, sep string, parts ...string) (string, error) {
	return strings.Join(parts, sep), nil
}

func (*basic) Ping(context.Context) error { return nil }

func (*basic) Split(_ context.Context, s, sep string) (string, []string, int, bool, error) {
	parts := strings.Split(s, sep)
	if len(parts) == 1 {
		return s, nil, 0, false, nil
	}
	return parts[0], parts[1:], len(parts) - 1, true, nil
}
