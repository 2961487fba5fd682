// Package errs has a component whose methods return the package's sentinel errors and error
// types (plain, wrapped, joined), errors the package does not declare, and errors as values.
package errs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/weftrpc/weft/runtime"
)

// Sentinel errors.
var (
	ErrNotFound = errors.New("errs: not found")
	ErrConflict = errors.New("errs: conflict")
)

// ErrBadDefault is a sentinel whose type is one of the package's error types.
var ErrBadDefault = &ValidationError{Field: "default", Reason: "always bad"}

// ValidationError is an error type with a pointer receiver.
type ValidationError struct {
	Field  string
	Reason string
	Codes  []int
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("errs: invalid %s: %s", e.Field, e.Reason)
}

// RateError is an error type with a value receiver.
type RateError struct {
	RetryAfter time.Duration
}

func (e RateError) Error() string { return fmt.Sprintf("errs: retry after %v", e.RetryAfter) }

// opaqueError cannot cross the wire as itself (it has an unexported field): it crosses as its
// message.
type opaqueError struct{ code int }

func (e opaqueError) Error() string { return fmt.Sprintf("errs: opaque %d", e.code) }

// Errs returns the error its argument selects.
type Errs interface {
	Find(ctx context.Context, key string) (string, error)
	Validate(ctx context.Context, field string, wrap bool) error
	Limit(ctx context.Context, d time.Duration) error
	Plain(ctx context.Context, which int) error
	Echo(ctx context.Context, err error, errs []error) (error, []error, error)
}

type impl struct {
	runtime.Implements[Errs]
}

func (*impl) Find(_ context.Context, key string) (string, error) {
	switch key {
	case "missing":
		return "", ErrNotFound
	case "wrapped":
		return "partial", fmt.Errorf("errs: find %q: %w", key, ErrNotFound)
	case "default":
		return "", ErrBadDefault
	}
	return "value of " + key, nil
}

func (*impl) Validate(_ context.Context, field string, wrap bool) error {
	err := &ValidationError{Field: field, Reason: "empty", Codes: []int{1, 2}}
	if wrap {
		return fmt.Errorf("errs: validating: %w", err)
	}
	return err
}

func (*impl) Limit(_ context.Context, d time.Duration) error {
	return RateError{RetryAfter: d}
}

func (*impl) Plain(_ context.Context, which int) error {
	switch which {
	case 0:
		return nil
	case 1:
		return errors.New("errs: plain")
	case 2:
		return errors.Join(ErrNotFound, fmt.Errorf("errs: and %w", ErrConflict))
	case 3:
		return fmt.Errorf("errs: eof: %w", io.EOF) // io.EOF is not declared here
	case 4:
		return opaqueError{code: 7}
	}
	return fmt.Errorf("errs: two: %w, %w", ErrConflict, &ValidationError{Field: "x"})
}

func (*impl) Echo(_ context.Context, err error, errs []error) (error, []error, error) {
	return err, errs, nil
}
