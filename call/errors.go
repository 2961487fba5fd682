package call

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Error categories. Every error returned by a call matches exactly one category with
// errors.Is, and [NeverRan] reports whether it proves that no handler ran.
var (
	// ErrUnreachable means the call was never sent in full: there was no usable connection,
	// the connection broke before the request's last byte left, or the client refused it
	// before sending. The call provably never reached a handler.
	ErrUnreachable = errors.New("call: unreachable")

	// ErrRefused means the server received the call and refused it without running it: it was
	// over its concurrency limit, draining (the call arrived after its go-away), or shutting
	// down. The call provably never reached a handler.
	ErrRefused = errors.New("call: refused")

	// ErrCommunication means the connection failed after the request was sent: the handler may
	// or may not have run.
	ErrCommunication = errors.New("call: communication error")

	// ErrUnknownMethod means the server has no handler for the method key. It never ran.
	ErrUnknownMethod = errors.New("call: unknown method")

	// ErrSignatureMismatch means the server's handler was built from a different method
	// signature than the caller's stub. It never ran.
	ErrSignatureMismatch = errors.New("call: method signature mismatch")

	// ErrMessageTooLarge means a request, reply, or its metadata exceeded a negotiated limit.
	// A request that was too large never ran; a reply that was too large was produced by a
	// handler that ran.
	ErrMessageTooLarge = errors.New("call: message too large")

	// ErrRemote means the handler ran and failed: it returned an error or panicked. The error's
	// message is the handler's; a panic's value is logged by the server, never sent.
	ErrRemote = errors.New("call: remote handler failed")

	// ErrAuthentication means the TLS handshake or peer verification failed. It is never
	// worth retrying on the same endpoint with the same credentials.
	ErrAuthentication = errors.New("call: authentication failed")

	// ErrProtocol means the peer violated the protocol (bad magic, unsupported version,
	// malformed or oversized frame, flood). The connection is closed; calls on it fail with
	// ErrCommunication or ErrUnreachable wrapping the ErrProtocol reason.
	ErrProtocol = errors.New("call: protocol error")

	// ErrClosed means the connection or server was closed by its owner.
	ErrClosed = errors.New("call: closed")
)

// Deadline and cancellation errors wrap [context.DeadlineExceeded] and [context.Canceled]:
// test for them with errors.Is on those.

// callError is the concrete type of every error a call returns.
type callError struct {
	category   error         // one of the Err… sentinels, or a context error
	neverRan   bool          // the call provably never reached a handler
	retryAfter time.Duration // server-requested delay before a retry, 0 if none
	msg        string        // detail, without the category's text
	cause      error         // underlying error, may be nil

	// unsent means that the server never took the call in: its connection was draining or
	// closed, broke before the request left, or refused it with a go-away. A Connection sends
	// such a call to another member.
	unsent bool

	// local means that the client rejected the call before sending anything (its context was
	// done, or the request broke a limit of the server's): it says nothing about the server.
	local bool
}

func (e *callError) Error() string {
	s := e.category.Error()
	if e.msg != "" {
		s += ": " + e.msg
	}
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *callError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.category}
	}
	return []error{e.category, e.cause}
}

// NeverRan reports whether err proves that the call never reached a handler, so that it is safe
// to retry on any method, idempotent or not.
func NeverRan(err error) bool {
	var ce *callError
	return errors.As(err, &ce) && ce.neverRan
}

// RetryAfter returns the delay the server asked the caller to wait before retrying, if any.
func RetryAfter(err error) (time.Duration, bool) {
	var ce *callError
	if errors.As(err, &ce) && ce.retryAfter > 0 {
		return ce.retryAfter, true
	}
	return 0, false
}

func newError(category error, neverRan bool, msg string, cause error) error {
	return &callError{category: category, neverRan: neverRan, msg: msg, cause: cause}
}

// unsentError returns an error for a call the server never took in; see callError.unsent.
func unsentError(category error, msg string, cause error) error {
	return &callError{category: category, neverRan: true, msg: msg, cause: cause, unsent: true}
}

// markLocal marks err, a *callError, as a call the client rejected before sending it.
func markLocal(err error) error {
	if ce, ok := err.(*callError); ok {
		ce.local = true
	}
	return err
}

// wasSent reports whether a call that returned err reached its server.
func wasSent(err error) bool {
	ce, ok := err.(*callError)
	return !ok || !ce.unsent && !ce.local
}

// isUnsent reports whether err is an unsent error of a call.
func isUnsent(err error) bool {
	ce, ok := err.(*callError)
	return ok && ce.unsent
}

// ctxError converts a context error into a call error.
func ctxError(ctx context.Context, neverRan bool) error {
	err := ctx.Err()
	if err == nil {
		err = context.Canceled
	}
	cause := context.Cause(ctx)
	if cause == err {
		cause = nil
	}
	return &callError{category: err, neverRan: neverRan, cause: cause}
}

// HandlerError is returned by a [Handler] to attach a retry-after delay to its failure. Any
// other error a handler returns reaches the caller as [ErrRemote] with the error's message.
type HandlerError struct {
	Err        error         // the failure; its message is sent to the caller
	RetryAfter time.Duration // if positive, the caller is asked to wait this long before retrying
}

// Error returns the message of the wrapped error.
func (e *HandlerError) Error() string { return e.Err.Error() }

// Unwrap returns the wrapped error.
func (e *HandlerError) Unwrap() error { return e.Err }

// Wire error codes; see DESIGN.md.
const (
	codeRefused           = 1
	codeUnknownMethod     = 2
	codeSignatureMismatch = 3
	codeTooLarge          = 4
	codeDeadline          = 5
	codeCanceled          = 6
	codeHandlerFailed     = 7
	codePanic             = 8
)

// errorFromWire builds the caller's error for an ERROR frame.
func errorFromWire(b errorBody) error {
	var cat error
	switch b.code {
	case codeRefused:
		cat = ErrRefused
	case codeUnknownMethod:
		cat = ErrUnknownMethod
	case codeSignatureMismatch:
		cat = ErrSignatureMismatch
	case codeTooLarge:
		cat = ErrMessageTooLarge
	case codeDeadline:
		cat = context.DeadlineExceeded
	case codeCanceled:
		cat = context.Canceled
	case codeHandlerFailed, codePanic:
		cat = ErrRemote
	default:
		cat = ErrCommunication
		b.msg = fmt.Sprintf("unknown error code %d: %s", b.code, b.msg)
		b.neverRan = false
	}
	return &callError{category: cat, neverRan: b.neverRan, retryAfter: b.retryAfter, msg: b.msg}
}
