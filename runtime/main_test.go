package runtime_test

import (
	"os"
	"strings"
	"testing"

	"github.com/weftrpc/weft/internal/testkit"
	"github.com/weftrpc/weft/runtime/internal/testapp"
)

// TestMain runs the tests, and checks that they leave no goroutine behind. The multi-process
// tests start this test binary again, as a replica of a deployment (the runtime starts its own
// program, with WEFT_REPLICA set) or as the program itself (with testapp.EnvArgs set): such a
// process runs testapp.Main instead of the tests.
func TestMain(m *testing.M) {
	if testapp.Started() {
		os.Exit(testapp.Main(strings.Fields(os.Getenv(testapp.EnvArgs))))
	}
	testkit.VerifyNoLeaks(m)
}
