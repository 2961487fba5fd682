//go:build race

package codec_test

import "testing"

// checkDecodeBudget runs decode. The race detector changes allocation behaviour, so the
// allocation budget is checked only without it (alloc_test.go).
func checkDecodeBudget(t testing.TB, inputLen int, decode func()) {
	t.Helper()
	decode()
}
