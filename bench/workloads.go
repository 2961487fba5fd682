package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftrpc/weft/bench/internal/stack"
)

// Sizes of the workloads.
var (
	seqSizes        = []int{16, 1 << 10, 64 << 10, 1 << 20} // sequential latency
	allocSizes      = []int{16, 1 << 10}                    // allocations per call
	throughputSizes = []int{16, 1 << 10}                    // 64 callers
	stubSizes       = []int{16, 1 << 10, 64 << 10}          // generated stubs vs raw calls
)

// Params sizes a run. Durations are in nanoseconds in JSON.
type Params struct {
	Rounds       int           `json:"rounds"`
	SeqCalls     []int         `json:"seq_calls"`     // timed calls per round, per size of seqSizes
	Callers      int           `json:"callers"`       // concurrent callers of the throughput workload
	Warmup       time.Duration `json:"warmup"`        // of the throughput workload, before its window
	Window       time.Duration `json:"window"`        // measured window of the throughput workload
	HOLCalls     int           `json:"hol_calls"`     // small calls timed idle, and while a large one runs
	HOLMax       time.Duration `json:"hol_max"`       // bound of the loaded part of the head-of-line workload
	HOLSize      int           `json:"hol_size"`      // the large call's size
	IdlePairs    int           `json:"idle_pairs"`    // connections opened to measure idle memory
	Timeout      time.Duration `json:"timeout"`       // bound of one stack's part of one round
	WarmFraction float64       `json:"warm_fraction"` // untimed calls before timed ones, as a fraction of them
	MaxMessage   int           `json:"max_message"`   // limit raised for the head-of-line workload
	Workloads    []string      `json:"workloads"`     // which workloads ran
	StubVariants []string      `json:"stub_variants"` // rows of the stub table
}

// paramsFor returns the parameters of a mode: smoke (seconds, for CI), quick, or full.
func paramsFor(mode string) Params {
	p := Params{
		Callers:      64,
		HOLSize:      16 << 20,
		MaxMessage:   32 << 20,
		WarmFraction: 0.1,
		Timeout:      2 * time.Minute,
	}
	switch mode {
	case "smoke":
		p.Rounds = 2
		p.SeqCalls = []int{40, 40, 10, 4}
		p.Warmup, p.Window = 10*time.Millisecond, 40*time.Millisecond
		p.HOLCalls, p.HOLMax, p.HOLSize = 10, 500*time.Millisecond, 4<<20
		p.IdlePairs = 4
	case "quick":
		p.Rounds = 3
		p.SeqCalls = []int{500, 500, 150, 30}
		p.Warmup, p.Window = 100*time.Millisecond, 400*time.Millisecond
		p.HOLCalls, p.HOLMax = 100, 2*time.Second
		p.IdlePairs = 50
	default:
		// Many short rounds rather than a few long ones: the machine's noise comes in bursts,
		// and the median over rounds discards the rounds a burst hit.
		p.Rounds = 15
		p.SeqCalls = []int{1000, 1000, 250, 40}
		p.Warmup, p.Window = 100*time.Millisecond, 400*time.Millisecond
		p.HOLCalls, p.HOLMax = 150, 2*time.Second
		p.IdlePairs = 200
	}
	return p
}

// Names of the workloads, in the order they run.
const (
	wlSequential = "sequential"
	wlThroughput = "throughput"
	wlHOL        = "hol"
	wlIdle       = "idle"
	wlStubs      = "stubs"
)

var allWorkloads = []string{wlSequential, wlThroughput, wlHOL, wlIdle, wlStubs}

// runner runs workloads and records what they measure.
type runner struct {
	p       Params
	network string
	dir     string // holds Unix sockets
	stacks  []stack.Stack
	res     *Results
	log     io.Writer // progress
	sockets atomic.Int64
}

// sizeName returns n bytes as a short name: 16B, 1KiB, 64KiB, 1MiB.
func sizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// sizeTitle returns n bytes as a column title: "16 B", "1 KiB".
func sizeTitle(n int) string {
	s := sizeName(n)
	i := len(s) - 1
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	return s[:i] + " " + s[i:]
}

// defineMeasures adds every measure to r.res in table order, so that output order does not
// depend on which workload ran first.
func (r *runner) defineMeasures() {
	res := r.res
	for _, s := range seqSizes {
		res.define("latency/"+sizeName(s)+"/p50", sizeTitle(s), "ns", "lower")
	}
	for _, s := range seqSizes {
		res.define("latency/"+sizeName(s)+"/p99", sizeTitle(s), "ns", "lower")
	}
	for _, s := range throughputSizes {
		res.define("throughput/"+sizeName(s)+"/calls", sizeTitle(s)+" calls/s", "calls/s", "higher")
		res.define("throughput/"+sizeName(s)+"/cpu", sizeTitle(s)+" CPU/call", "ns", "lower")
		res.define("throughput/"+sizeName(s)+"/allocs", sizeTitle(s)+" allocs/call", "allocs/call", "lower")
	}
	for _, s := range allocSizes {
		res.define("allocs/"+sizeName(s), sizeTitle(s)+" allocs/call", "allocs/call", "lower")
		res.define("bytes/"+sizeName(s), sizeTitle(s)+" bytes/call", "B/call", "lower")
	}
	res.define("hol/idle-p99", "idle p99", "ns", "lower")
	res.define("hol/loaded-p50", "median during the large call", "ns", "lower")
	res.define("hol/loaded-p99", "p99 during the large call", "ns", "lower")
	res.define("hol/ratio", "p99 loaded / idle", "x", "lower")
	res.define("idle/bytes", "heap + stacks per pair", "B/pair", "lower")
	res.define("idle/goroutines", "goroutines per pair", "goroutines/pair", "lower")
	for _, s := range stubSizes {
		res.define("stubs/"+sizeName(s)+"/p50", sizeTitle(s)+" median", "ns", "lower")
	}
	for _, s := range stubSizes {
		res.define("stubs/"+sizeName(s)+"/allocs", sizeTitle(s)+" allocs/call", "allocs/call", "lower")
	}
}

// record records one round's value of the measure id for row.
func (r *runner) record(id, row string, v float64) {
	m := r.res.measure(id)
	if m == nil {
		panic("bench: undefined measure " + id) // a programming error in this file
	}
	m.add(row, v)
}

// rotated returns s rotated left by k, so that every round starts with another stack.
func rotated[T any](s []T, k int) []T {
	if len(s) == 0 {
		return nil
	}
	k %= len(s)
	return append(slices.Clone(s[k:]), s[:k]...)
}

// rounds runs fn for every row in every round, rows interleaved and rotated each round, each
// run bounded by the Timeout and preceded by a garbage collection.
func rounds[T any](r *runner, name string, rows []T, rowName func(T) string, fn func(ctx context.Context, row T) error) error {
	start := time.Now()
	for round := range r.p.Rounds {
		for _, row := range rotated(rows, round) {
			runtime.GC()
			ctx, cancel := context.WithTimeout(context.Background(), r.p.Timeout)
			err := fn(ctx, row)
			cancel()
			if err != nil {
				return fmt.Errorf("bench: %s, %s, round %d: %w", name, rowName(row), round+1, err)
			}
		}
		fmt.Fprintf(r.log, "  %s: round %d/%d done (%.1fs)\n", name, round+1, r.p.Rounds, time.Since(start).Seconds())
	}
	return nil
}

// runStacks runs fn for every stack under test in every round.
func (r *runner) runStacks(name string, fn func(ctx context.Context, st stack.Stack) error) error {
	return rounds(r, name, r.stacks, stack.Stack.Name, fn)
}

// listen returns a new listener on r's network.
func (r *runner) listen() (net.Listener, error) {
	if r.network == "unix" {
		return net.Listen("unix", filepath.Join(r.dir, fmt.Sprintf("s%d", r.sockets.Add(1))))
	}
	return net.Listen("tcp", "127.0.0.1:0")
}

// pair is a server of a stack and one client of it.
type pair struct {
	srv  stack.Server
	cli  stack.Client
	addr string
}

// startPair serves st on a new listener and dials a client of it.
func (r *runner) startPair(ctx context.Context, st stack.Stack, cfg stack.Config) (*pair, error) {
	l, err := r.listen()
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	srv, err := st.Serve(l, cfg)
	if err != nil {
		l.Close()
		return nil, err
	}
	cli, err := st.Dial(ctx, r.network, addr, cfg)
	if err != nil {
		srv.Close()
		return nil, err
	}
	return &pair{srv: srv, cli: cli, addr: addr}, nil
}

func (p *pair) close() {
	p.cli.Close()
	p.srv.Close()
}

// echoOnce makes one call and checks that the reply has the payload's length.
func echoOnce(ctx context.Context, c stack.Client, payload []byte) error {
	reply, err := c.Call(ctx, payload)
	if err != nil {
		return err
	}
	if len(reply) != len(payload) {
		return fmt.Errorf("sent %d bytes, got %d back", len(payload), len(reply))
	}
	return nil
}

// warmCalls returns the number of untimed calls before n timed ones.
func (r *runner) warmCalls(n int) int { return max(3, int(float64(n)*r.p.WarmFraction)) }

// timed makes n sequential calls after some untimed ones and returns their latencies in ns,
// sorted, and the allocations and bytes allocated per call by the whole process.
func (r *runner) timed(ctx context.Context, call func() error, n int) (lat []float64, allocs, bytes float64, err error) {
	for range r.warmCalls(n) {
		if err := call(); err != nil {
			return nil, 0, 0, err
		}
	}
	lat = make([]float64, n)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range lat {
		t0 := time.Now()
		err := call()
		lat[i] = float64(time.Since(t0))
		if err != nil {
			return nil, 0, 0, err
		}
	}
	runtime.ReadMemStats(&after)
	slices.Sort(lat)
	return lat, float64(after.Mallocs-before.Mallocs) / float64(n), float64(after.TotalAlloc-before.TotalAlloc) / float64(n), ctx.Err()
}

// sequential measures one caller making calls back to back: latency at every size, and
// allocations per call at the small sizes.
func (r *runner) sequential(ctx context.Context, st stack.Stack) error {
	p, err := r.startPair(ctx, st, stack.Config{})
	if err != nil {
		return err
	}
	defer p.close()
	for i, size := range seqSizes {
		payload := make([]byte, size)
		lat, allocs, bytes, err := r.timed(ctx, func() error { return echoOnce(ctx, p.cli, payload) }, r.p.SeqCalls[i])
		if err != nil {
			return fmt.Errorf("%s: %w", sizeName(size), err)
		}
		r.record("latency/"+sizeName(size)+"/p50", st.Name(), sortedPercentile(lat, 0.5))
		r.record("latency/"+sizeName(size)+"/p99", st.Name(), sortedPercentile(lat, 0.99))
		if slices.Contains(allocSizes, size) {
			r.record("allocs/"+sizeName(size), st.Name(), allocs)
			r.record("bytes/"+sizeName(size), st.Name(), bytes)
		}
	}
	return nil
}

// sleepCtx waits for d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// counter is a per-caller call count on a cache line of its own.
type counter struct {
	n atomic.Int64
	_ [56]byte
}

// snapshot is the state of a throughput run at one instant.
type snapshot struct {
	calls   int64
	at      time.Time
	cpu     time.Duration
	mallocs uint64
}

func takeSnapshot(counters []counter) snapshot {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s := snapshot{at: time.Now(), mallocs: ms.Mallocs}
	s.cpu, _ = cpuTime()
	for i := range counters {
		s.calls += counters[i].n.Load()
	}
	return s
}

// hammerResult is what a throughput run measured over its window.
type hammerResult struct {
	callsPerSec  float64
	cpuPerCall   float64 // ns of process CPU time per call; -1 where unknown
	allocPerCall float64
}

// hammer runs callers goroutines calling c with size-byte payloads back to back, and measures
// the window after the warm-up.
func hammer(ctx context.Context, c stack.Client, size, callers int, warmup, window time.Duration) (hammerResult, error) {
	counters := make([]counter, callers)
	var (
		stop    atomic.Bool
		errOnce sync.Once
		callErr error
		wg      sync.WaitGroup
	)
	for i := range counters {
		wg.Go(func() {
			payload := make([]byte, size)
			for !stop.Load() {
				if err := echoOnce(ctx, c, payload); err != nil {
					errOnce.Do(func() { callErr = err })
					stop.Store(true)
					return
				}
				counters[i].n.Add(1)
			}
		})
	}
	err := sleepCtx(ctx, warmup)
	start := takeSnapshot(counters)
	if err == nil {
		err = sleepCtx(ctx, window)
	}
	end := takeSnapshot(counters)
	stop.Store(true)
	wg.Wait()
	if callErr != nil {
		return hammerResult{}, callErr
	}
	if err != nil {
		return hammerResult{}, err
	}
	calls := end.calls - start.calls
	if calls <= 0 {
		return hammerResult{}, errors.New("no call completed in the window")
	}
	res := hammerResult{
		callsPerSec:  float64(calls) / end.at.Sub(start.at).Seconds(),
		allocPerCall: float64(end.mallocs-start.mallocs) / float64(calls),
	}
	if _, ok := cpuTime(); ok {
		res.cpuPerCall = float64(end.cpu-start.cpu) / float64(calls)
	} else {
		res.cpuPerCall = -1
	}
	return res, nil
}

// throughput measures many callers sharing one client.
func (r *runner) throughput(ctx context.Context, st stack.Stack) error {
	p, err := r.startPair(ctx, st, stack.Config{})
	if err != nil {
		return err
	}
	defer p.close()
	for _, size := range throughputSizes {
		res, err := hammer(ctx, p.cli, size, r.p.Callers, r.p.Warmup, r.p.Window)
		if err != nil {
			return fmt.Errorf("%s: %w", sizeName(size), err)
		}
		r.record("throughput/"+sizeName(size)+"/calls", st.Name(), res.callsPerSec)
		if res.cpuPerCall >= 0 {
			r.record("throughput/"+sizeName(size)+"/cpu", st.Name(), res.cpuPerCall)
		}
		r.record("throughput/"+sizeName(size)+"/allocs", st.Name(), res.allocPerCall)
	}
	return nil
}

// headOfLine measures the latency of 16-byte calls while a large call runs through the same
// client, against their latency when the client is otherwise idle.
func (r *runner) headOfLine(ctx context.Context, st stack.Stack) error {
	p, err := r.startPair(ctx, st, stack.Config{MaxMessageSize: r.p.MaxMessage})
	if err != nil {
		return err
	}
	defer p.close()
	small, large := make([]byte, 16), make([]byte, r.p.HOLSize)
	if err := echoOnce(ctx, p.cli, large); err != nil { // warms buffers and flow-control windows
		return fmt.Errorf("large call: %w", err)
	}
	idle, _, _, err := r.timed(ctx, func() error { return echoOnce(ctx, p.cli, small) }, r.p.HOLCalls)
	if err != nil {
		return fmt.Errorf("idle: %w", err)
	}

	var (
		stop     atomic.Bool
		inFlight atomic.Bool // a large call is in progress
		largeErr error
		done     = make(chan struct{})
	)
	go func() {
		defer close(done)
		for !stop.Load() {
			inFlight.Store(true)
			err := echoOnce(ctx, p.cli, large)
			inFlight.Store(false)
			if err != nil {
				largeErr = err
				return
			}
		}
	}()
	var loaded []float64
	deadline := time.Now().Add(r.p.HOLMax)
loop:
	for len(loaded) < r.p.HOLCalls && time.Now().Before(deadline) && ctx.Err() == nil {
		select {
		case <-done: // the large call failed
			break loop
		default:
		}
		during := inFlight.Load()
		t0 := time.Now()
		err := echoOnce(ctx, p.cli, small)
		d := time.Since(t0)
		if err != nil {
			stop.Store(true)
			<-done
			return fmt.Errorf("small call during a large one: %w", err)
		}
		if during {
			loaded = append(loaded, float64(d))
		}
		if !during {
			runtime.Gosched() // let the next large call start
		}
	}
	stop.Store(true)
	<-done
	if largeErr != nil {
		return fmt.Errorf("large call: %w", largeErr)
	}
	if len(loaded) == 0 {
		return errors.New("no small call started while a large one was in flight")
	}
	slices.Sort(loaded)
	idleP99, loadedP99 := sortedPercentile(idle, 0.99), sortedPercentile(loaded, 0.99)
	r.record("hol/idle-p99", st.Name(), idleP99)
	r.record("hol/loaded-p50", st.Name(), sortedPercentile(loaded, 0.5))
	r.record("hol/loaded-p99", st.Name(), loadedP99)
	r.record("hol/ratio", st.Name(), loadedP99/idleP99)
	return nil
}

// idleMemory measures the heap and goroutine stacks held by idle connections: it opens many
// clients, each making one call, and divides the growth of memory in use (after garbage
// collection) by their number. Client and server side are counted together.
func (r *runner) idleMemory(ctx context.Context, st stack.Stack) error {
	l, err := r.listen()
	if err != nil {
		return err
	}
	addr := l.Addr().String()
	srv, err := st.Serve(l, stack.Config{})
	if err != nil {
		l.Close()
		return err
	}
	defer srv.Close()
	payload := make([]byte, 16)
	// One client first, so that what a stack sets up once per process or server is not counted.
	c, err := st.Dial(ctx, r.network, addr, stack.Config{})
	if err != nil {
		return err
	}
	err = echoOnce(ctx, c, payload)
	c.Close()
	if err != nil {
		return err
	}
	clients := make([]stack.Client, 0, r.p.IdlePairs)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	g0 := settle()
	m0 := memInUse()
	for range r.p.IdlePairs {
		c, err := st.Dial(ctx, r.network, addr, stack.Config{})
		if err != nil {
			return err
		}
		clients = append(clients, c)
		if err := echoOnce(ctx, c, payload); err != nil {
			return err
		}
	}
	g1 := settle()
	m1 := memInUse()
	n := float64(len(clients))
	r.record("idle/bytes", st.Name(), float64(m1-m0)/n)
	r.record("idle/goroutines", st.Name(), float64(g1-g0)/n)
	return nil
}
