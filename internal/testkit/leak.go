package testkit

import (
	"testing"

	"go.uber.org/goleak"
)

// LeakOptions returns the goleak options [VerifyNoLeaks] and [CheckLeaks] use. They ignore only
// long-lived goroutines of the runtime and standard library that tests do not own (goleak itself
// already ignores the testing package's and os/signal's); none of weft's.
func LeakOptions() []goleak.Option {
	return []goleak.Option{
		// The execution tracer's reader goroutine, when tests run with -trace.
		goleak.IgnoreAnyFunction("runtime/trace.(*traceMultiplexer).startLocked.func1"),
		goleak.IgnoreAnyFunction("runtime/trace.Start.func1"), // before Go 1.25
	}
}

// VerifyNoLeaks runs m's tests and fails the test binary if goroutines are left running after
// them. Call it from TestMain:
//
//	func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }
//
// It does not return.
func VerifyNoLeaks(m *testing.M) {
	goleak.VerifyTestMain(m, LeakOptions()...)
}

// CheckLeaks checks for goroutines leaked by one test. Call it first thing in the test: it
// records the goroutines running then (ignored later, as are other parallel tests' goroutines
// that already exist) and registers a t.Cleanup that fails t if goroutines started since are
// still running once they have had a moment to exit. Registered first, the check runs after every
// cleanup the test registers later (closing listeners, connections, servers).
//
// Goroutines started by parallel tests in the meantime are reported too: do not use it in
// parallel tests.
func CheckLeaks(t testing.TB) {
	t.Helper()
	opts := append(LeakOptions(), goleak.IgnoreCurrent())
	t.Cleanup(func() { goleak.VerifyNone(t, opts...) })
}
