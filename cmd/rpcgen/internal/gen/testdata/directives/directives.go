// Package directives has a component whose methods carry //weft: directives: idempotence,
// retries, hedging, fan-out and affinity.
package directives

import (
	"context"
	"sync"

	"github.com/weftrpc/weft/runtime"
)

// Counter counts named things.
type Counter interface {
	// Get returns a count.
	//
	//weft:idempotent
	//weft:retry attempts=3 base=10ms max=100ms
	Get(ctx context.Context, name string) (int64, error)

	// Peek returns a count, hedged.
	//
	//weft:idempotent
	//weft:hedge delay=20ms max=2
	Peek(ctx context.Context, name string) (int64, error)

	// Stats returns every count of a replica.
	//
	//weft:multi
	Stats(ctx context.Context) (map[string]int64, error)

	// Reset forgets counts on every replica.
	//
	//weft:multi
	Reset(ctx context.Context, names ...string) error

	// Add adds n to a count, on the replica with the best affinity.
	//
	//weft:affinity min=0.5 first timeout=100ms short=10ms
	Add(ctx context.Context, name string, n int64) (int64, error)
}

type counter struct {
	runtime.Implements[Counter]
	Score float32 // its affinity to every Add

	mu     sync.Mutex
	counts map[string]int64
}

func (c *counter) Get(_ context.Context, name string) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts[name], nil
}

func (c *counter) Peek(ctx context.Context, name string) (int64, error) { return c.Get(ctx, name) }

func (c *counter) Stats(context.Context) (map[string]int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int64{}
	for k, v := range c.counts {
		out[k] = v
	}
	return out, nil
}

func (c *counter) Reset(_ context.Context, names ...string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range names {
		delete(c.counts, n)
	}
	return nil
}

func (c *counter) Add(_ context.Context, name string, n int64) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts == nil {
		c.counts = map[string]int64{}
	}
	c.counts[name] += n
	return c.counts[name], nil
}

// AddAffinity is Add's affinity function: the replica's Score, or 0 for a negative n.
func (c *counter) AddAffinity(_ context.Context, name string, n int64) float32 {
	if n < 0 || name == "" {
		return 0
	}
	return c.Score
}
