// Package embeddedtime has a struct that embeds time.Time. The struct's method set includes
// time.Time's MarshalBinary and (*time.Time).UnmarshalBinary, promoted; but it has fields of
// its own, which must cross the wire too.
package embeddedtime

import (
	"context"
	"time"

	"github.com/weftrpc/weft/runtime"
)

// Event embeds time.Time.
type Event struct {
	time.Time
	Name string
}

// Log echoes its argument.
type Log interface {
	Event(ctx context.Context, e Event) (Event, error)
}

type impl struct {
	runtime.Implements[Log]
}

func (*impl) Event(_ context.Context, e Event) (Event, error) { return e, nil }
