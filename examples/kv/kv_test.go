package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weftrpc/weft/runtime"
)

// The example is built with `go build` (with -race when this test is) and run as a real
// program, in both modes; the multi-process runs start real replica processes.

var keys = []string{"apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew", "kiwi"}

// tokenEnv marks the processes of one run: the example's replicas inherit its environment.
const tokenEnv = "WEFT_KV_TEST_TOKEN"

func buildKV(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build the example with")
	}
	exe := filepath.Join(t.TempDir(), "kv")
	args := []string{"build", "-o", exe}
	if raceEnabled() {
		args = append(args, "-race")
	}
	cmd := exec.Command(goTool, append(args, ".")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return exe
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

type result struct {
	stdout []string
	stderr string
	took   time.Duration
}

// runKV runs the example with args to completion, and checks that no process of it is left.
func runKV(t *testing.T, exe string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	token := strconv.FormatInt(time.Now().UnixNano(), 36)
	cmd := exec.CommandContext(ctx, exe, args...)
	// GORACE: a program built with -race otherwise sleeps a second in os.Exit.
	cmd.Env = append(os.Environ(), tokenEnv+"="+token, strings.TrimSpace("GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	r := result{stderr: stderr.String(), took: time.Since(start)}
	if s := strings.TrimSuffix(stdout.String(), "\n"); s != "" {
		r.stdout = strings.Split(s, "\n")
	}
	if err != nil {
		t.Fatalf("kv %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	if left := processesWith(tokenEnv + "=" + token); len(left) > 0 {
		t.Errorf("kv %s exited, leaving processes %v", strings.Join(args, " "), left)
	}
	return r
}

// processesWith returns the processes whose environment holds the entry kv.
func processesWith(kv string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err == nil && slices.ContainsFunc(bytes.Split(env, []byte{0}), func(e []byte) bool { return string(e) == kv }) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// appLines are the lines of the application's own report: without the diagnostics the
// runtime may add, and with the first line cut at its first ';'.
func appLines(lines []string) []string {
	var out []string
	for _, l := range lines {
		if strings.HasPrefix(l, "diagnostics:") {
			continue
		}
		if strings.HasPrefix(l, "main runs in ") {
			l, _, _ = strings.Cut(l, ";")
		}
		out = append(out, l)
	}
	return out
}

var storeLine = regexp.MustCompile(`^store replica (\S+) holds \[(.*)\]$`)

// placement parses the "store replica" lines: where each key is, and how often it appears.
func placement(t *testing.T, lines []string) (where map[string]string, rest []string) {
	t.Helper()
	where = map[string]string{}
	for _, l := range lines {
		m := storeLine.FindStringSubmatch(l)
		if m == nil {
			rest = append(rest, l)
			continue
		}
		for _, k := range strings.Fields(m[2]) {
			if other, dup := where[k]; dup {
				t.Errorf("key %s is on %s and on %s", k, other, m[1])
			}
			where[k] = m[1]
		}
	}
	return where, rest
}

// TestKV runs the example in one process and in many: both print the same results; in one
// process every key is in "main"; in many, the three Store replicas hold the keys between
// them, each key on exactly one, the same one on every run.
func TestKV(t *testing.T) {
	exe := buildKV(t)

	single := runKV(t, exe, "-single")
	want := []string{
		`main runs in "main"`,
		fmt.Sprintf("store replica main holds %v", keys),
		"set apple again: version 2 on main",
		"get durian: not found=true (key not found)",
		"audit: 10 get",
		"audit: 10 set",
		"done",
	}
	if got := appLines(single.stdout); !slices.Equal(got, want) {
		t.Errorf("kv -single printed\n%s\nwant\n%s", strings.Join(single.stdout, "\n"), strings.Join(want, "\n"))
	}
	if single.stderr != "" {
		t.Errorf("kv -single wrote to stderr:\n%s", single.stderr)
	}

	multi := runKV(t, exe)
	t.Logf("single process: %v; multi-process: %v", single.took, multi.took)
	if multi.stderr != "" {
		t.Logf("kv wrote to stderr:\n%s", multi.stderr)
	}
	lines := appLines(multi.stdout)
	where, rest := placement(t, lines)
	var replicas []string
	for _, k := range keys {
		r, ok := where[k]
		if !ok {
			t.Errorf("no store replica holds %s", k)
		}
		if !regexp.MustCompile(`^store/[0-2]$`).MatchString(r) {
			t.Errorf("key %s is on %q, not a store replica", k, r)
		}
		if !slices.Contains(replicas, r) {
			replicas = append(replicas, r)
		}
	}
	if len(where) != len(keys) {
		t.Errorf("the store replicas hold %d keys, want %d: %v", len(where), len(keys), where)
	}
	if len(replicas) != 3 {
		t.Errorf("the keys are on %d replicas (%v), want all 3", len(replicas), replicas)
	}
	// Apart from where things are, the results are those of the single process.
	apple := where["apple"]
	for i, l := range rest {
		rest[i] = strings.Replace(l, "on "+apple, "on main", 1)
	}
	wantRest := slices.DeleteFunc(slices.Clone(want), func(l string) bool { return strings.HasPrefix(l, "store replica") })
	if !slices.Equal(rest, wantRest) {
		t.Errorf("kv printed\n%s\nwant, apart from the store replica lines, the single process's\n%s\nwith apple's second version on %s",
			strings.Join(multi.stdout, "\n"), strings.Join(want, "\n"), apple)
	}

	// Fixed membership: every run puts every key where the first did.
	again, _ := placement(t, appLines(runKV(t, exe).stdout))
	for _, k := range keys {
		if again[k] != where[k] {
			t.Errorf("key %s was on %s, and on %s in a second run", k, where[k], again[k])
		}
	}
}

// TestKVDistributed runs the example as a distributed deployment on this machine, as
// k8s/kv.yaml runs it on a cluster: k8s/weft.json with loopback addresses, one process per
// replica serving its group on its own port, and the main program. Its results are those of
// the other modes, the keys spread over the three store servers, and every server stops on
// SIGTERM.
func TestKVDistributed(t *testing.T) {
	exe := buildKV(t)
	cfg, err := runtime.LoadConfig(filepath.Join("k8s", "weft.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ports []int
	for range 5 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		l.Close()
	}
	addr := func(i int) string { return fmt.Sprintf("tcp://127.0.0.1:%d", ports[i]) }
	type server struct {
		group, listen string
	}
	var servers []server
	next := 0
	var groups []map[string]any
	for _, g := range cfg.Groups {
		var addrs []string
		n := len(g.Addresses)
		if !g.Sharded {
			n = 1
		}
		for range n {
			addrs = append(addrs, addr(next))
			servers = append(servers, server{g.Name, addr(next)})
			next++
		}
		groups = append(groups, map[string]any{"name": g.Name, "components": g.Components, "sharded": g.Sharded, "listen": g.Listen, "addresses": addrs})
	}
	if len(servers) != len(ports) {
		t.Fatalf("k8s/weft.json has %d replicas to serve, want 5", len(servers))
	}
	local, _ := json.Marshal(map[string]any{"mode": "distributed", "drain_timeout": "2s", "groups": groups})
	path := filepath.Join(t.TempDir(), "weft.json")
	if err := os.WriteFile(path, local, 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for _, s := range servers {
		cmd := exec.CommandContext(ctx, exe, "-weft.config="+path, "-weft.serve="+s.group, "-weft.listen="+s.listen)
		cmd.Env = append(os.Environ(), strings.TrimSpace("GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0"))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, &out)
	}
	defer func() {
		for _, c := range cmds {
			c.Process.Kill()
			c.Wait()
		}
	}()

	r := runKV(t, exe, "-weft.config="+path)
	where, rest := placement(t, appLines(r.stdout))
	servedBy := map[string]bool{}
	for _, k := range keys {
		if !regexp.MustCompile(`^store@\S+$`).MatchString(where[k]) {
			t.Errorf("key %s is on %q, want a store server", k, where[k])
		}
		servedBy[where[k]] = true
	}
	if len(servedBy) != 1 { // every store server has the same name, store@host, on one machine
		t.Errorf("keys on %v", servedBy)
	}
	if !slices.Contains(rest, "done") || !slices.Contains(rest, "audit: 10 get") || !slices.Contains(rest, "get durian: not found=true (key not found)") {
		t.Errorf("kv printed\n%s", strings.Join(r.stdout, "\n"))
	}
	for i, c := range cmds {
		c.Process.Signal(syscall.SIGTERM)
		if err := c.Wait(); err != nil {
			t.Errorf("%s server on %s exited with %v:\n%s", servers[i].group, servers[i].listen, err, outs[i])
		}
	}
	cmds = nil
}
