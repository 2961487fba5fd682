package codec

import (
	"fmt"
	"reflect"
	"sync"
)

// Application errors travel inside a method's results, so that they are never confused with
// the transport's own failures (package call's error categories):
//
//   - a sentinel error value registered with [RegisterSentinel] arrives as that same value, so
//     errors.Is works at the caller;
//   - an error whose type is registered with [RegisterErrorType] arrives as a value of that
//     type, with its fields, so errors.As works;
//   - any other error arrives as an error with the same message whose Unwrap returns the
//     wrapped errors, each sent the same way, so a registered sentinel or type anywhere in the
//     chain is still found by errors.Is and errors.As.
//
// rpcgen registers the sentinels and error types that a component's package declares.

// Error tags.
const (
	errNil      = 0
	errSentinel = 1
	errTyped    = 2
	errPlain    = 3
)

const (
	maxErrorDepth = 16 // wrapped-error nesting sent
	maxErrorWraps = 64 // wrapped errors sent in all
)

type typedError struct {
	name string
	enc  func(*Encoder, error)
	dec  func(*Decoder) error
}

var registry struct {
	sync.RWMutex
	sentinelByErr  map[error]string
	sentinelByName map[string]error
	typeByType     map[reflect.Type]*typedError
	typeByName     map[string]*typedError
}

// RegisterSentinel makes err, a comparable sentinel error value such as one made by
// errors.New, travel by name: a decoded error that is (or wraps) it satisfies errors.Is(got,
// err). The name must be the same in the caller's and the server's programs; rpcgen uses the
// variable's package path and name. Registering a name or value twice panics.
func RegisterSentinel(name string, err error) {
	if err == nil || !reflect.ValueOf(err).Comparable() {
		panic(fmt.Sprintf("codec: RegisterSentinel(%q): the error must be a non-nil comparable value", name))
	}
	registry.Lock()
	defer registry.Unlock()
	if registry.sentinelByErr == nil {
		registry.sentinelByErr = map[error]string{}
		registry.sentinelByName = map[string]error{}
	}
	if _, dup := registry.sentinelByName[name]; dup {
		panic(fmt.Sprintf("codec: sentinel error %q registered twice", name))
	}
	if _, dup := registry.sentinelByErr[err]; dup {
		panic(fmt.Sprintf("codec: sentinel error value %q registered twice", name))
	}
	registry.sentinelByErr[err] = name
	registry.sentinelByName[name] = err
}

// RegisterErrorType makes errors of type T travel as T: enc encodes one and dec decodes it.
// A decoded error then satisfies errors.As(got, &t) for a t of type T. The name must be the
// same in the caller's and the server's programs. Registering a name or type twice panics.
func RegisterErrorType[T error](name string, enc func(*Encoder, T), dec func(*Decoder) T) {
	t := reflect.TypeFor[T]()
	te := &typedError{
		name: name,
		enc:  func(e *Encoder, err error) { enc(e, err.(T)) },
		dec:  func(d *Decoder) error { return dec(d) },
	}
	registry.Lock()
	defer registry.Unlock()
	if registry.typeByType == nil {
		registry.typeByType = map[reflect.Type]*typedError{}
		registry.typeByName = map[string]*typedError{}
	}
	if _, dup := registry.typeByName[name]; dup {
		panic(fmt.Sprintf("codec: error type %q registered twice", name))
	}
	if _, dup := registry.typeByType[t]; dup {
		panic(fmt.Sprintf("codec: error type %v registered twice", t))
	}
	registry.typeByType[t] = te
	registry.typeByName[name] = te
}

func lookupSentinel(err error) (string, bool) {
	if !reflect.ValueOf(err).Comparable() { // a comparable type may hold an uncomparable value
		return "", false
	}
	registry.RLock()
	defer registry.RUnlock()
	name, ok := registry.sentinelByErr[err]
	return name, ok
}

func lookupType(err error) *typedError {
	registry.RLock()
	defer registry.RUnlock()
	return registry.typeByType[reflect.TypeOf(err)]
}

// Error encodes an application error (nil included).
func (e *Encoder) Error(err error) {
	budget := maxErrorWraps
	e.error(err, 0, &budget)
}

func (e *Encoder) error(err error, depth int, budget *int) {
	if err == nil {
		e.Uint8(errNil)
		return
	}
	if name, ok := lookupSentinel(err); ok {
		e.Uint8(errSentinel)
		e.String(name)
		return
	}
	if te := lookupType(err); te != nil {
		e.Uint8(errTyped)
		e.String(te.name)
		e.String(err.Error())
		// The value is length-prefixed, so a decoder that does not know the type can skip
		// it and fall back to the message. It is encoded apart: handing e to a registered
		// function would make every Encoder that encodes an error escape to the heap.
		sub := GetEncoder()
		te.enc(sub, err)
		e.Uint32(uint32(len(sub.buf)))
		e.buf = append(e.buf, sub.buf...)
		if sub.err != nil && e.err == nil {
			e.err = sub.err
		}
		PutEncoder(sub)
		return
	}
	e.Uint8(errPlain)
	e.String(err.Error())
	var wrapped []error
	if depth < maxErrorDepth {
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			if w := u.Unwrap(); w != nil {
				wrapped = []error{w}
			}
		case interface{ Unwrap() []error }:
			wrapped = u.Unwrap()
		}
	}
	wrapped = wrapped[:min(len(wrapped), *budget)]
	*budget -= len(wrapped)
	e.Len(len(wrapped))
	for _, w := range wrapped {
		e.error(w, depth+1, budget)
	}
}

// Error decodes an application error encoded by [Encoder.Error]. Errors nested in errors
// count toward [MaxDepth] like other nested values.
func (d *Decoder) Error() error {
	if !d.Enter() {
		return nil
	}
	defer d.Leave()
	return d.error()
}

func (d *Decoder) error() error {
	if d.errDepth > maxErrorDepth {
		d.fail("error chain deeper than %d", maxErrorDepth)
		return nil
	}
	switch tag := d.Uint8(); tag {
	case errNil:
		return nil
	case errSentinel:
		name := d.String()
		if d.err != nil {
			return nil
		}
		registry.RLock()
		err, ok := registry.sentinelByName[name]
		registry.RUnlock()
		if !ok {
			// The caller's program does not know it: keep its name as the message.
			return &RemoteError{Message: name}
		}
		return err
	case errTyped:
		name, msg := d.String(), d.String()
		n := d.Uint32()
		if d.err != nil {
			return nil
		}
		if uint64(n) > uint64(len(d.data)) {
			d.fail("error value of %d bytes, have %d", n, len(d.data))
			return nil
		}
		body := d.next(int(n))
		registry.RLock()
		te := registry.typeByName[name]
		registry.RUnlock()
		if te == nil {
			return &RemoteError{Message: msg}
		}
		// The value's own errors nest inside this one: the sub-decoder inherits both depths.
		sub := Decoder{data: body, budget: d.budget, depth: d.depth, errDepth: d.errDepth + 1}
		err := te.dec(&sub)
		if ferr := sub.Finish(); ferr != nil {
			d.Fail(fmt.Errorf("error of type %s: %w", name, ferr))
			return nil
		}
		d.budget = sub.budget
		return err
	case errPlain:
		re := &RemoteError{Message: d.String()}
		n := d.Len(1, 16)
		if n > 0 {
			re.Wrapped = make([]error, 0, n)
		}
		d.errDepth++
		for range max(n, 0) {
			re.Wrapped = append(re.Wrapped, d.error())
		}
		d.errDepth--
		if d.err != nil {
			return nil
		}
		return re
	default:
		d.fail("error tag %d", tag)
		return nil
	}
}

// RemoteError is an application error of a type the caller's program does not know, as it
// crossed the wire: its message, and the errors it wrapped.
type RemoteError struct {
	Message string
	Wrapped []error
}

// Error returns the original error's message.
func (e *RemoteError) Error() string { return e.Message }

// Unwrap returns the errors the original error wrapped, as they crossed the wire.
func (e *RemoteError) Unwrap() []error { return e.Wrapped }
