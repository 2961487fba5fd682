//go:build !race

package call

// The race detector allocates on its own account, so the fuzz targets' allocation budgets
// (see allocChecks in fuzz_test.go) are checked only without it.
func init() { allocChecks = true }
