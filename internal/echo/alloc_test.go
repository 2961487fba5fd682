//go:build !race

package echo

import "runtime"

// measureAlloc returns the bytes f allocates. The race detector changes allocation, so under
// it (alloc_race_test.go) nothing is measured.
func measureAlloc(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}
