package gen_test

import (
	"testing"

	"github.com/weftrpc/weft/internal/testkit"
)

func TestMain(m *testing.M) { testkit.VerifyNoLeaks(m) }
