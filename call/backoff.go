package call

import (
	"math"
	"math/rand/v2"
	"time"
)

// Backoff is an exponential backoff with jitter. The zero value of each field means its
// default.
type Backoff struct {
	// Base is the delay before the second retry. If zero, 1s.
	Base time.Duration

	// Factor multiplies the delay after every further failure. If less than 1, 1.6.
	Factor float64

	// Jitter spreads each delay uniformly over ±Jitter of its value, so that clients that
	// failed together do not retry together. If zero, 0.2; if negative, no jitter.
	Jitter float64

	// Max caps every delay before jitter is applied. If zero, 2 minutes.
	Max time.Duration
}

const (
	defaultBackoffBase   = time.Second
	defaultBackoffFactor = 1.6
	defaultBackoffJitter = 0.2
	defaultBackoffMax    = 2 * time.Minute
)

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = defaultBackoffBase
	}
	if b.Factor < 1 {
		b.Factor = defaultBackoffFactor
	}
	// A negative Jitter stays negative, so applying the defaults twice keeps "no jitter".
	if b.Jitter == 0 {
		b.Jitter = defaultBackoffJitter
	}
	b.Jitter = min(b.Jitter, 1)
	if b.Max <= 0 {
		b.Max = defaultBackoffMax
	}
	b.Max = max(b.Max, b.Base)
	return b
}

// Delay returns the delay before retry n, counting from 0, after n+1 consecutive failures:
// 0 for the first retry (it is immediate), then Base, Base·Factor, Base·Factor², … capped at
// Max, each jittered.
func (b Backoff) Delay(n int) time.Duration {
	b = b.withDefaults()
	if n <= 0 {
		return 0
	}
	d := min(float64(b.Base)*math.Pow(b.Factor, float64(n-1)), float64(b.Max))
	if b.Jitter > 0 {
		d *= 1 + b.Jitter*(2*rand.Float64()-1)
	}
	return time.Duration(d)
}
