package call_test

import (
	"math"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
)

// backoffNear fails t unless got is within tol of want (for delays computed in float64).
func backoffNear(t *testing.T, what string, got, want, tol time.Duration) {
	t.Helper()
	if got < want-tol || got > want+tol {
		t.Fatalf("%s = %v, want %v (±%v)", what, got, want, tol)
	}
}

// backoffSamples draws n samples of b.Delay(retry) and fails t unless each lies in [lo, hi],
// they are not all equal, and some fall below mid and some above it.
func backoffSamples(t *testing.T, b call.Backoff, retry, n int, lo, hi, mid time.Duration) {
	t.Helper()
	var below, above bool
	first := b.Delay(retry)
	varied := false
	for i := range n {
		d := b.Delay(retry)
		if d < lo || d > hi {
			t.Fatalf("sample %d: %+v.Delay(%d) = %v, want within [%v, %v]", i, b, retry, d, lo, hi)
		}
		if d != first {
			varied = true
		}
		below = below || d < mid
		above = above || d > mid
	}
	if !varied {
		t.Fatalf("%d samples of %+v.Delay(%d) all equal %v: want jitter", n, b, retry, first)
	}
	// With uniform jitter, n samples all on one side of the middle has probability 2^-n.
	if !below || !above {
		t.Fatalf("%d samples of %+v.Delay(%d): below %v = %v, above = %v; want jitter on both sides", n, b, retry, mid, below, above)
	}
}

func TestBackoffFirstRetryImmediate(t *testing.T) {
	for _, b := range []call.Backoff{
		{},
		{Jitter: -1},
		{Base: 5 * time.Second, Factor: 3, Jitter: 0.5, Max: time.Hour},
		{Base: time.Millisecond, Jitter: 1},
	} {
		for range 100 {
			if d := b.Delay(0); d != 0 {
				t.Fatalf("%+v.Delay(0) = %v, want 0 (the first retry is immediate)", b, d)
			}
		}
		if d := b.Delay(-1); d != 0 {
			t.Fatalf("%+v.Delay(-1) = %v, want 0", b, d)
		}
	}
}

func TestBackoffNoJitterGeometric(t *testing.T) {
	b := call.Backoff{Base: 10 * time.Millisecond, Factor: 2, Jitter: -1, Max: time.Second}
	want := []time.Duration{
		0,
		10 * time.Millisecond, // Base
		20 * time.Millisecond, // Base·Factor
		40 * time.Millisecond,
		80 * time.Millisecond,
		160 * time.Millisecond,
		320 * time.Millisecond,
		640 * time.Millisecond,
		time.Second, // 1280ms capped at Max
		time.Second,
		time.Second,
	}
	for n, w := range want {
		for range 3 { // Without jitter every call gives the same delay.
			if d := b.Delay(n); d != w {
				t.Fatalf("%+v.Delay(%d) = %v, want %v", b, n, d, w)
			}
		}
	}
	for _, n := range []int{50, 1000, 1 << 20, math.MaxInt32, math.MaxInt} {
		if d := b.Delay(n); d != time.Second {
			t.Fatalf("%+v.Delay(%d) = %v, want the cap %v (no overflow)", b, n, d, time.Second)
		}
	}
}

func TestBackoffNoJitterNonIntegerFactor(t *testing.T) {
	b := call.Backoff{Base: time.Second, Factor: 1.5, Jitter: -0.3, Max: 10 * time.Second}
	want := []time.Duration{0, time.Second, 1500 * time.Millisecond, 2250 * time.Millisecond, 3375 * time.Millisecond}
	for n, w := range want {
		backoffNear(t, "Delay", b.Delay(n), w, time.Microsecond)
	}
	// Monotonic up to the cap, then flat at it.
	prev := time.Duration(0)
	for n := 1; n < 40; n++ {
		d := b.Delay(n)
		if d < prev {
			t.Fatalf("Delay(%d) = %v < Delay(%d) = %v: delays must not shrink", n, d, n-1, prev)
		}
		if d > b.Max {
			t.Fatalf("Delay(%d) = %v exceeds Max %v", n, d, b.Max)
		}
		prev = d
	}
	if prev != b.Max {
		t.Fatalf("Delay(39) = %v, want the cap %v", prev, b.Max)
	}
}

func TestBackoffZeroValueDefaults(t *testing.T) {
	var b call.Backoff
	// Defaults: Base 1s, Factor 1.6, ±20 % jitter, Max 2 min.
	backoffSamples(t, b, 1, 1000, 800*time.Millisecond, 1200*time.Millisecond, time.Second)
	backoffSamples(t, b, 2, 1000, 1280*time.Millisecond, 1920*time.Millisecond, 1600*time.Millisecond)
	backoffSamples(t, b, 100, 1000, 96*time.Second, 144*time.Second, 2*time.Minute)

	// The same defaults, seen without jitter.
	nj := call.Backoff{Jitter: -1}
	backoffNear(t, "Backoff{Jitter:-1}.Delay(1)", nj.Delay(1), time.Second, 0)
	backoffNear(t, "Backoff{Jitter:-1}.Delay(2)", nj.Delay(2), 1600*time.Millisecond, time.Microsecond)
	backoffNear(t, "Backoff{Jitter:-1}.Delay(3)", nj.Delay(3), 2560*time.Millisecond, time.Microsecond)
	backoffNear(t, "Backoff{Jitter:-1}.Delay(100)", nj.Delay(100), 2*time.Minute, 0)
	// 1s·1.6^10 ≈ 110s is under the cap; 1.6^11 ≈ 176s is over it.
	backoffNear(t, "Backoff{Jitter:-1}.Delay(11)", nj.Delay(11), time.Duration(float64(time.Second)*math.Pow(1.6, 10)), time.Microsecond)
	backoffNear(t, "Backoff{Jitter:-1}.Delay(12)", nj.Delay(12), 2*time.Minute, 0)
}

func TestBackoffCustomValues(t *testing.T) {
	b := call.Backoff{Base: 50 * time.Millisecond, Factor: 3, Jitter: 0.5, Max: time.Second}
	backoffSamples(t, b, 1, 1000, 25*time.Millisecond, 75*time.Millisecond, 50*time.Millisecond)
	backoffSamples(t, b, 2, 1000, 75*time.Millisecond, 225*time.Millisecond, 150*time.Millisecond)
	backoffSamples(t, b, 3, 1000, 225*time.Millisecond, 675*time.Millisecond, 450*time.Millisecond)
	// 50ms·3^3 = 1.35s is over Max: the cap applies before jitter.
	backoffSamples(t, b, 4, 1000, 500*time.Millisecond, 1500*time.Millisecond, time.Second)
	backoffSamples(t, b, 60, 1000, 500*time.Millisecond, 1500*time.Millisecond, time.Second)

	// Only Base set: the other fields keep their defaults.
	onlyBase := call.Backoff{Base: 100 * time.Millisecond, Jitter: -1}
	backoffNear(t, "Delay(1)", onlyBase.Delay(1), 100*time.Millisecond, 0)
	backoffNear(t, "Delay(2)", onlyBase.Delay(2), 160*time.Millisecond, time.Microsecond)
	backoffNear(t, "Delay(1000)", onlyBase.Delay(1000), 2*time.Minute, 0)

	// Only Max set.
	onlyMax := call.Backoff{Max: 3 * time.Second, Jitter: -1}
	backoffNear(t, "Delay(1)", onlyMax.Delay(1), time.Second, 0)
	backoffNear(t, "Delay(3)", onlyMax.Delay(3), 2560*time.Millisecond, time.Microsecond)
	backoffNear(t, "Delay(4)", onlyMax.Delay(4), 3*time.Second, 0)

	// Factor exactly 1 is valid: a constant delay.
	flat := call.Backoff{Base: 200 * time.Millisecond, Factor: 1, Jitter: -1}
	for n := 1; n < 20; n++ {
		if d := flat.Delay(n); d != 200*time.Millisecond {
			t.Fatalf("Factor 1: Delay(%d) = %v, want 200ms", n, d)
		}
	}

	// A small jitter stays within its bounds.
	small := call.Backoff{Base: time.Second, Factor: 2, Jitter: 0.01}
	backoffSamples(t, small, 1, 500, 990*time.Millisecond, 1010*time.Millisecond, time.Second)
}

func TestBackoffFactorBelowOneMeansDefault(t *testing.T) {
	for _, f := range []float64{0, 0.5, 0.999, -2} {
		b := call.Backoff{Base: time.Second, Factor: f, Jitter: -1}
		backoffNear(t, "Delay(1)", b.Delay(1), time.Second, 0)
		backoffNear(t, "Delay(2)", b.Delay(2), 1600*time.Millisecond, time.Microsecond)
		backoffNear(t, "Delay(3)", b.Delay(3), 2560*time.Millisecond, time.Microsecond)
		// A shrinking factor would make later delays smaller; the default makes them grow.
		if d5, d4 := b.Delay(5), b.Delay(4); d5 <= d4 {
			t.Fatalf("Factor %v: Delay(5) = %v <= Delay(4) = %v, want the default factor 1.6", f, d5, d4)
		}
	}
}

func TestBackoffJitterStaysInRange(t *testing.T) {
	// Jitter above 1 must never produce a negative delay, nor one over (1+Jitter) times the
	// nominal delay.
	b := call.Backoff{Base: time.Second, Factor: 2, Jitter: 5, Max: time.Minute}
	for i := range 2000 {
		d := b.Delay(1 + i%8)
		if d < 0 {
			t.Fatalf("%+v.Delay(%d) = %v, want a delay >= 0", b, 1+i%8, d)
		}
		nominal := time.Duration(float64(time.Second) * math.Pow(2, float64(i%8)))
		if d > 6*nominal {
			t.Fatalf("%+v.Delay(%d) = %v, over (1+Jitter) times the nominal %v", b, 1+i%8, d, nominal)
		}
	}
}
