package testkit_test

import (
	"fmt"
	"testing"

	"github.com/weftrpc/weft/internal/testkit"
)

// fakeTB records the errors and cleanups of [testkit.CheckLeaks].
type fakeTB struct {
	testing.TB
	errs     []string
	cleanups []func()
}

func (f *fakeTB) Helper()                      {}
func (f *fakeTB) Cleanup(fn func())            { f.cleanups = append(f.cleanups, fn) }
func (f *fakeTB) Error(args ...any)            { f.errs = append(f.errs, fmt.Sprint(args...)) }
func (f *fakeTB) Errorf(s string, args ...any) { f.errs = append(f.errs, fmt.Sprintf(s, args...)) }

func (f *fakeTB) runCleanups() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
}

func TestCheckLeaks(t *testing.T) {
	clean := &fakeTB{TB: t}
	testkit.CheckLeaks(clean)
	clean.runCleanups()
	if len(clean.errs) != 0 {
		t.Fatalf("CheckLeaks reported %q with no leak", clean.errs)
	}

	leaky := &fakeTB{TB: t}
	testkit.CheckLeaks(leaky)
	release := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		<-release
	}()
	leaky.runCleanups()
	close(release)
	<-exited
	if len(leaky.errs) != 1 {
		t.Fatalf("CheckLeaks reported %q for one leaked goroutine, want one error", leaky.errs)
	}
}
