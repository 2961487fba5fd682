package codec_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weftrpc/weft/codec"
)

// The registry is global and registering twice panics: the sentinels and types these tests use
// are registered once, here, each under a name of its own.
var (
	errNotFound  = errors.New("not found")
	errForbidden = errors.New("forbidden")
)

// queryError is an error struct type with a pointer receiver.
type queryError struct {
	Query string
	Code  int32
	Retry time.Duration
}

func (e *queryError) Error() string {
	return fmt.Sprintf("query %q failed with code %d (retry in %v)", e.Query, e.Code, e.Retry)
}

// codeError is an error type with a value receiver.
type codeError struct{ Code uint16 }

func (e codeError) Error() string { return fmt.Sprintf("code %d", e.Code) }

// chainError is a typed error whose cause travels as an error, as rpcgen's marshalling of an
// error struct with an error field would send it. Its decoder measures how deep decoding nests.
type chainError struct{ Cause error }

func (e *chainError) Error() string { return "chain" }
func (e *chainError) Unwrap() error { return e.Cause }

var chainNesting, chainMaxNesting atomic.Int64

// strictError's decoder reads one byte, whatever the encoder wrote.
type strictError struct{ B byte }

func (e *strictError) Error() string { return "strict" }

func init() {
	codec.RegisterSentinel("codec_test.errNotFound", errNotFound)
	codec.RegisterSentinel("codec_test.errForbidden", errForbidden)
	codec.RegisterErrorType("codec_test.queryError",
		func(e *codec.Encoder, err *queryError) {
			e.String(err.Query)
			e.Int32(err.Code)
			e.Duration(err.Retry)
		},
		func(d *codec.Decoder) *queryError {
			err := &queryError{Query: d.String()}
			err.Code = d.Int32()
			err.Retry = d.Duration()
			return err
		})
	codec.RegisterErrorType("codec_test.codeError",
		func(e *codec.Encoder, err codeError) { e.Uint16(err.Code) },
		func(d *codec.Decoder) codeError { return codeError{Code: d.Uint16()} })
	codec.RegisterErrorType("codec_test.chainError",
		func(e *codec.Encoder, err *chainError) { e.Error(err.Cause) },
		func(d *codec.Decoder) *chainError {
			n := chainNesting.Add(1)
			defer chainNesting.Add(-1)
			for {
				m := chainMaxNesting.Load()
				if n <= m || chainMaxNesting.CompareAndSwap(m, n) {
					break
				}
			}
			return &chainError{Cause: d.Error()}
		})
	codec.RegisterErrorType("codec_test.strictError",
		func(e *codec.Encoder, err *strictError) { e.Uint16(uint16(err.B)) }, // one byte too many
		func(d *codec.Decoder) *strictError { return &strictError{B: d.Uint8()} })
}

// sendError encodes err, decodes it, and checks that decoding consumed everything.
func sendError(t *testing.T, err error) error {
	t.Helper()
	e := codec.NewEncoder(nil)
	e.Error(err)
	d := codec.NewDecoder(e.Data())
	got := d.Error()
	if ferr := d.Finish(); ferr != nil {
		t.Fatalf("decoding %v: %v", err, ferr)
	}
	return got
}

func TestErrorNil(t *testing.T) {
	if got := sendError(t, nil); got != nil {
		t.Errorf("got %#v, want nil", got)
	}
}

func TestErrorSentinel(t *testing.T) {
	for _, want := range []error{errNotFound, errForbidden} {
		t.Run(want.Error(), func(t *testing.T) {
			got := sendError(t, want)
			if got != want {
				t.Errorf("got %#v, want the identical value %#v", got, want)
			}
			if !errors.Is(got, want) {
				t.Errorf("errors.Is(got, %v) = false", want)
			}
		})
	}
}

func TestErrorWrappedSentinel(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want []error // errors.Is must find each
	}{
		{"fmt.Errorf", fmt.Errorf("ctx: %w", errNotFound), []error{errNotFound}},
		{"twice", fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", errForbidden)), []error{errForbidden}},
		{"errors.Join", errors.Join(errNotFound, errForbidden), []error{errNotFound, errForbidden}},
		{"fmt.Errorf with two %w", fmt.Errorf("both: %w and %w", errNotFound, errForbidden), []error{errNotFound, errForbidden}},
		{"joined and wrapped", fmt.Errorf("ctx: %w", errors.Join(errors.New("plain"), errForbidden)), []error{errForbidden}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := sendError(t, tt.err)
			if got.Error() != tt.err.Error() {
				t.Errorf("message: got %q, want %q", got.Error(), tt.err.Error())
			}
			for _, w := range tt.want {
				if !errors.Is(got, w) {
					t.Errorf("errors.Is(got, %v) = false", w)
				}
			}
			var re *codec.RemoteError
			if !errors.As(got, &re) {
				t.Errorf("got %T, want a *codec.RemoteError", got)
			}
		})
	}
}

func TestErrorType(t *testing.T) {
	want := &queryError{Query: "SELECT 1", Code: -42, Retry: 3 * time.Second}
	t.Run("itself", func(t *testing.T) {
		got := sendError(t, want)
		var qe *queryError
		if !errors.As(got, &qe) {
			t.Fatalf("errors.As(%T, *queryError) = false", got)
		}
		if *qe != *want {
			t.Errorf("got %+v, want %+v", *qe, *want)
		}
		if got.Error() != want.Error() {
			t.Errorf("message: got %q, want %q", got.Error(), want.Error())
		}
	})
	t.Run("wrapped", func(t *testing.T) {
		err := fmt.Errorf("running: %w", want)
		got := sendError(t, err)
		var qe *queryError
		if !errors.As(got, &qe) {
			t.Fatalf("errors.As(%T, *queryError) = false", got)
		}
		if *qe != *want {
			t.Errorf("got %+v, want %+v", *qe, *want)
		}
		if got.Error() != err.Error() {
			t.Errorf("message: got %q, want %q", got.Error(), err.Error())
		}
	})
	t.Run("value receiver, joined with a sentinel", func(t *testing.T) {
		got := sendError(t, errors.Join(codeError{Code: 404}, errNotFound))
		var ce codeError
		if !errors.As(got, &ce) || ce.Code != 404 {
			t.Errorf("errors.As(got, codeError): got %+v, want code 404", ce)
		}
		if !errors.Is(got, errNotFound) {
			t.Errorf("errors.Is(got, errNotFound) = false")
		}
	})
}

// unregisteredError is a type no one registers.
type unregisteredError struct{ A, B string }

func (e *unregisteredError) Error() string { return e.A + " / " + e.B }

func TestErrorUnregistered(t *testing.T) {
	tests := []struct {
		name        string
		err         error
		wantWrapped int
	}{
		{"errors.New", errors.New("boom"), 0},
		{"struct type", &unregisteredError{A: "a", B: "b"}, 0},
		{"os.PathError", &os.PathError{Op: "open", Path: "/no/such", Err: fs.ErrNotExist}, 1},
		{"long message", errors.New(strings.Repeat("very long message ", 5000)), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := sendError(t, tt.err)
			re, ok := got.(*codec.RemoteError)
			if !ok {
				t.Fatalf("got %T, want *codec.RemoteError", got)
			}
			if re.Message != tt.err.Error() || got.Error() != tt.err.Error() {
				t.Errorf("message: got %q, want %q", re.Message, tt.err.Error())
			}
			if len(re.Wrapped) != tt.wantWrapped {
				t.Errorf("wrapped: got %d errors, want %d", len(re.Wrapped), tt.wantWrapped)
			}
		})
	}
	// fs.ErrNotExist is not registered: the wrapped error keeps its message only.
	got := sendError(t, &os.PathError{Op: "open", Path: "/no/such", Err: fs.ErrNotExist})
	if errors.Is(got, fs.ErrNotExist) {
		t.Errorf("errors.Is(got, fs.ErrNotExist) = true for an unregistered sentinel")
	}
	if w := got.(*codec.RemoteError).Wrapped[0]; w.Error() != fs.ErrNotExist.Error() {
		t.Errorf("wrapped message: got %q, want %q", w.Error(), fs.ErrNotExist.Error())
	}
}

func TestErrorUnknownNames(t *testing.T) {
	t.Run("sentinel", func(t *testing.T) {
		e := codec.NewEncoder(nil)
		e.Uint8(1) // errSentinel
		e.String("codec_test.noSuchSentinel")
		d := codec.NewDecoder(e.Data())
		got := d.Error()
		if err := d.Finish(); err != nil {
			t.Fatalf("Finish: %v", err)
		}
		re, ok := got.(*codec.RemoteError)
		if !ok || re.Message != "codec_test.noSuchSentinel" {
			t.Errorf("got %#v, want a RemoteError with the sentinel's name as message", got)
		}
	})
	t.Run("type", func(t *testing.T) {
		e := codec.NewEncoder(nil)
		e.Uint8(2) // errTyped
		e.String("codec_test.noSuchType")
		e.String("the message")
		e.Uint32(5)
		e.String("body")
		e.Uint8(7) // a value after the error
		d := codec.NewDecoder(e.Data())
		got := d.Error()
		next := d.Uint8()
		if err := d.Finish(); err != nil {
			t.Fatalf("Finish: %v", err)
		}
		re, ok := got.(*codec.RemoteError)
		if !ok || re.Message != "the message" {
			t.Errorf("got %#v, want a RemoteError with the message", got)
		}
		if next != 7 {
			t.Errorf("value after the skipped body: got %d, want 7", next)
		}
	})
}

func TestErrorDecodeFailures(t *testing.T) {
	typed := func(name string, body []byte, bodyLen uint32) []byte {
		e := codec.NewEncoder(nil)
		e.Uint8(2)
		e.String(name)
		e.String("msg")
		e.Uint32(bodyLen)
		return append(e.Data(), body...)
	}
	strict := codec.NewEncoder(nil)
	strict.Error(&strictError{B: 1})
	tests := []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"unknown tag", []byte{4}},
		{"tag 0xff", []byte{0xff}},
		{"sentinel without a name", []byte{1}},
		{"typed body longer than the input", typed("codec_test.noSuchType", []byte{1, 2}, 3)},
		{"typed body longer than the input, huge", typed("codec_test.queryError", nil, 0xffffffff)},
		{"registered type, body too short", typed("codec_test.queryError", []byte{0, 1, 2}, 3)},
		{"registered type, body not all read", strict.Data()},
		{"plain without wrapped count", []byte{3, 1, 'x'}},
		{"plain with more wrapped than bytes", []byte{3, 1, 'x', 3, 0}},
		{"plain nested beyond the depth limit", append(bytesRepeat([]byte{3, 0, 2}, 17), 3, 0, 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := codec.NewDecoder(tt.in)
			var got error
			mustNotPanic(t, "Error", func() { got = d.Error() })
			if err := d.Finish(); !errors.Is(err, codec.ErrDecode) {
				t.Errorf("Finish: got %v (decoded %v), want ErrDecode", err, got)
			}
		})
	}
	// 16 levels of nesting (17 errors) is the most the encoder sends, and decodes.
	d := codec.NewDecoder(append(bytesRepeat([]byte{3, 0, 2}, 16), 3, 0, 1))
	if got := d.Error(); d.Finish() != nil || got == nil {
		t.Errorf("16 levels of nesting: got %v, %v", got, d.Finish())
	}
}

func bytesRepeat(b []byte, n int) []byte { return []byte(strings.Repeat(string(b), n)) }

// chainDepth counts the errors on the first-wrapped path from err.
func chainDepth(err error) int {
	n := 0
	for err != nil {
		n++
		w := unwrapAll(err)
		if len(w) == 0 {
			break
		}
		err = w[0]
	}
	return n
}

func TestErrorDeepChainIsCut(t *testing.T) {
	// The encoder sends 16 levels of wrapping (maxErrorDepth in errors.go): 17 errors.
	const sent = 17
	err := errNotFound
	var levels []error
	for i := range 40 {
		err = fmt.Errorf("level %d: %w", i, err)
		levels = append([]error{err}, levels...)
	}
	got := sendError(t, err)
	if got.Error() != err.Error() {
		t.Errorf("message: got %q, want %q", got.Error(), err.Error())
	}
	if n := chainDepth(got); n != sent {
		t.Errorf("decoded chain of %d errors, want %d", n, sent)
	}
	for i, g := 0, got; g != nil && i < len(levels); i++ {
		if g.Error() != levels[i].Error() {
			t.Errorf("level %d message: got %q, want %q", i, g.Error(), levels[i].Error())
		}
		w := unwrapAll(g)
		if len(w) == 0 {
			break
		}
		g = w[0]
	}

	// Wide: the encoder sends 64 wrapped errors in all (maxErrorWraps).
	var many []error
	for i := range 100 {
		many = append(many, fmt.Errorf("e%d", i))
	}
	wide := errors.Join(many...)
	got = sendError(t, wide)
	if got.Error() != wide.Error() {
		t.Errorf("joined message differs")
	}
	if n := len(unwrapAll(got)); n != 64 {
		t.Errorf("decoded %d joined errors, want 64", n)
	}
}

// BUG: a registered error type whose decoder decodes a nested error (a cause field) gets a
// fresh sub-Decoder whose error nesting starts again at 0 (errors.go:208 copies depth, the
// Enter depth, not the error depth), so the decoder recurses once per nested typed error, with
// no limit: 6 bytes plus the type's name each (33 here, 7 with a one-letter name). A 4.5 MiB input nests 524,288 deep and uses 256 MiB of stack; a
// larger one ends the process with a fatal, unrecoverable stack overflow (reliability scenario
// 28: "recursion is depth-limited").
func TestErrorTypedNestingIsBounded(t *testing.T) {
	const levels = 5 * codec.MaxDepth
	var err error
	for range levels {
		err = &chainError{Cause: err}
	}
	e := codec.NewEncoder(nil)
	e.Error(err)
	chainMaxNesting.Store(0)
	d := codec.NewDecoder(e.Data())
	var got error
	checkDecodeBudget(t, len(e.Data()), func() { got = d.Error() })
	ferr := d.Finish()
	if ferr != nil && !errors.Is(ferr, codec.ErrDecode) {
		t.Errorf("Finish: %v does not wrap ErrDecode", ferr)
	}
	if n := chainMaxNesting.Load(); n > codec.MaxDepth {
		t.Errorf("decoding %d nested typed errors (%d bytes) recursed %d deep, want at most MaxDepth (%d); Finish: %v",
			levels, len(e.Data()), n, codec.MaxDepth, ferr)
	}
	_ = got
}

// nonComparableError is an error whose type cannot be compared.
type nonComparableError []string

func (e nonComparableError) Error() string { return strings.Join(e, "; ") }

// valueWrapper is a comparable struct error type holding an error.
type valueWrapper struct{ Err error }

func (w valueWrapper) Error() string { return "wrapper: " + w.Err.Error() }
func (w valueWrapper) Unwrap() error { return w.Err }

// BUG: lookupSentinel (errors.go:99) checks only that the error's type is comparable, but a
// comparable struct type holding an interface whose dynamic value is not comparable (here a
// slice-based error, like validator.ValidationErrors) panics when hashed as a map key
// ("hash of unhashable type"), so Encoder.Error panics on such an error anywhere in a chain.
// reflect.ValueOf(err).Comparable() checks the dynamic values.
func TestErrorNonComparableValue(t *testing.T) {
	tests := []struct {
		name string
		err  error
	}{
		{"non-comparable type", nonComparableError{"a", "b"}},
		{"comparable type, non-comparable value", valueWrapper{Err: nonComparableError{"a"}}},
		{"wrapped", fmt.Errorf("ctx: %w", valueWrapper{Err: nonComparableError{"a"}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := codec.NewEncoder(nil)
			if !mustNotPanic(t, "Encoder.Error", func() { e.Error(tt.err) }) {
				return
			}
			d := codec.NewDecoder(e.Data())
			got := d.Error()
			if err := d.Finish(); err != nil {
				t.Fatalf("Finish: %v", err)
			}
			if got.Error() != tt.err.Error() {
				t.Errorf("message: got %q, want %q", got.Error(), tt.err.Error())
			}
		})
	}
}

// panicValue runs f and returns what it panicked with, or nil.
func panicValue(f func()) (v any) {
	defer func() { v = recover() }()
	f()
	return nil
}

var registrations atomic.Int64

// uniqueName returns a registration name no other call returns, so that tests can run with
// -count > 1.
func uniqueName(t *testing.T) string {
	return fmt.Sprintf("codec_test.%s.%d", t.Name(), registrations.Add(1))
}

// neverRegistered is a type that no registration accepts.
type neverRegistered struct{}

func (neverRegistered) Error() string { return "never registered" }

func TestRegisterPanics(t *testing.T) {
	noEnc := func(*codec.Encoder, *queryError) {}
	noDec := func(*codec.Decoder) *queryError { return nil }
	tests := []struct {
		name string
		f    func()
		want string // in the panic's message
	}{
		{"sentinel name twice", func() { codec.RegisterSentinel("codec_test.errNotFound", errors.New("another")) }, "twice"},
		{"sentinel value twice", func() { codec.RegisterSentinel(uniqueName(t), errNotFound) }, "twice"},
		{"type name twice", func() {
			codec.RegisterErrorType("codec_test.queryError",
				func(*codec.Encoder, neverRegistered) {}, func(*codec.Decoder) neverRegistered { return neverRegistered{} })
		}, "twice"},
		{"type twice", func() { codec.RegisterErrorType(uniqueName(t), noEnc, noDec) }, "twice"},
		{"nil sentinel", func() { codec.RegisterSentinel(uniqueName(t), nil) }, "comparable"},
		{"non-comparable sentinel", func() { codec.RegisterSentinel(uniqueName(t), nonComparableError{"x"}) }, "comparable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := panicValue(tt.f)
			if v == nil {
				t.Fatalf("did not panic")
			}
			if !strings.Contains(fmt.Sprint(v), tt.want) {
				t.Errorf("panicked with %q, want a message containing %q", v, tt.want)
			}
		})
	}
	// A failed registration registers nothing: neverRegistered still travels as a message.
	got := sendError(t, neverRegistered{})
	if _, ok := got.(*codec.RemoteError); !ok {
		t.Errorf("after failed registrations, neverRegistered arrives as %T, want *codec.RemoteError", got)
	}
}

// TestRegistryConcurrent registers sentinels while other goroutines send errors, for the race
// detector.
func TestRegistryConcurrent(t *testing.T) {
	var wg sync.WaitGroup
	names := make([]string, 50)
	for i := range names {
		names[i] = uniqueName(t)
	}
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				e := codec.NewEncoder(nil)
				e.Error(fmt.Errorf("g%d %d: %w", g, i, errors.Join(errNotFound, &queryError{Code: int32(i)})))
				d := codec.NewDecoder(e.Data())
				if err := d.Error(); d.Finish() != nil || !errors.Is(err, errNotFound) {
					t.Errorf("goroutine %d: got %v, %v", g, err, d.Finish())
					return
				}
			}
		})
	}
	wg.Go(func() {
		for _, name := range names {
			codec.RegisterSentinel(name, errors.New(name))
		}
	})
	wg.Wait()
}

// The typed body's length is a little-endian uint32, as Encoder.Error writes it.
func TestErrorTypedGolden(t *testing.T) {
	e := codec.NewEncoder(nil)
	e.Error(codeError{Code: 0x0102})
	name, msg := "codec_test.codeError", "code 258"
	want := []byte{2, byte(len(name))}
	want = append(want, name...)
	want = append(want, byte(len(msg)))
	want = append(want, msg...)
	want = binary.LittleEndian.AppendUint32(want, 2)
	want = append(want, 2, 1)
	if got := e.Data(); string(got) != string(want) {
		t.Errorf("got %x, want %x", got, want)
	}
}
