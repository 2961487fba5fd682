package main

import (
	"bufio"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"time"
)

// Machine describes where a run happened.
type Machine struct {
	CPUs       int               `json:"cpus"` // runtime.NumCPU, as nproc reports
	CPUModel   string            `json:"cpu_model"`
	GOMAXPROCS int               `json:"gomaxprocs"`
	GoVersion  string            `json:"go_version"`
	GOOS       string            `json:"goos"`
	GOARCH     string            `json:"goarch"`
	LoadStart  string            `json:"loadavg_start,omitempty"` // /proc/loadavg before the run
	LoadEnd    string            `json:"loadavg_end,omitempty"`   // and after
	Modules    map[string]string `json:"modules"`                 // versions of the stacks' modules
}

// machineFacts returns the facts of this machine, without the load after the run.
func machineFacts() Machine {
	m := Machine{
		CPUs:       runtime.NumCPU(),
		CPUModel:   cpuModel(),
		GOMAXPROCS: runtime.GOMAXPROCS(0),
		GoVersion:  runtime.Version(),
		GOOS:       runtime.GOOS,
		GOARCH:     runtime.GOARCH,
		LoadStart:  loadAverage(),
		Modules:    map[string]string{},
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			switch d.Path {
			case "google.golang.org/grpc", "storj.io/drpc", "github.com/weftrpc/weft":
				v := d.Version
				if d.Replace != nil {
					v = "replaced by " + d.Replace.Path
				}
				m.Modules[d.Path] = v
			}
		}
	}
	return m
}

// cpuModel returns the first "model name" of /proc/cpuinfo, or "unknown".
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(name) == "model name" {
			return strings.TrimSpace(value)
		}
	}
	return "unknown"
}

// loadAverage returns the three load averages of /proc/loadavg, or "" where there is none.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// memInUse returns the heap and goroutine stack bytes in use after garbage collection.
func memInUse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}

// settle waits, up to a second, until the number of goroutines has stopped changing for a few
// checks in a row, so that goroutines of closed connections have exited before memory is
// measured. It returns that number.
func settle() int {
	n, same := runtime.NumGoroutine(), 0
	deadline := time.Now().Add(time.Second)
	for same < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m == n {
			same++
		} else {
			n, same = m, 0
		}
	}
	return n
}
