package runtime_test

import (
	"errors"
	"flag"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/weftrpc/weft/runtime"
)

func TestParseConfig(t *testing.T) {
	cfg, err := runtime.ParseConfig([]byte(`{
  "mode": "distributed",
  "serve": "store",
  "diagnostics": "127.0.0.1:0",
  "dir": "/run/app",
  "drain_timeout": "3s",
  "groups": [
    {"name": "store", "components": ["example.com/app/Store"], "replicas": 3, "sharded": true,
     "listen": "tcp://:9000", "addresses": ["dns:store:9000"]},
    {"components": ["example.com/app/Front"]}
  ]
}`))
	if err != nil {
		t.Fatal(err)
	}
	want := runtime.Config{
		Distributed: true, Serve: "store", Diagnostics: "127.0.0.1:0", Dir: "/run/app", DrainTimeout: 3 * time.Second,
		Groups: []runtime.Group{
			{Name: "store", Components: []string{"example.com/app/Store"}, Replicas: 3, Sharded: true, Listen: "tcp://:9000", Addresses: []string{"dns:store:9000"}},
			{Components: []string{"example.com/app/Front"}},
		},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("ParseConfig:\n got %+v\nwant %+v", cfg, want)
	}
	for mode, multi := range map[string]bool{`{}`: false, `{"mode": "single"}`: false, `{"mode": "multi"}`: true} {
		cfg, err := runtime.ParseConfig([]byte(mode))
		if err != nil || cfg.Multi != multi || cfg.Distributed {
			t.Errorf("ParseConfig(%s) = %+v, %v", mode, cfg, err)
		}
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{``, "empty file"},
		{`{"mode": "multi"`, "ends in the middle"},
		{"{\n  \"mode\": \"multi\",\n  \"replicas\": 3\n}", `line 3, column 3: json: unknown field "replicas"`},
		{"{\n  \"mode\": multi\n}", "line 2, column 11"},
		{`{"mode": "cluster"}`, `mode "cluster": want "single", "multi" or "distributed"`},
		{`{"drain_timeout": "soon"}`, `drain_timeout "soon": want a positive duration`},
		{`{"drain_timeout": "-1s"}`, `drain_timeout "-1s"`},
		{`{"drain_timeout": 10}`, `field "drain_timeout": got a JSON number, want string`},
		{`{"groups": [{"name": "a"}]}`, `groups[0] ("a") has no components`},
		{`{"groups": [{"components": ["x/A"], "replicas": -1}]}`, `groups[0] has -1 replicas`},
		{`{"groups": [{"components": ["Store"]}]}`, `component "Store" is not a full name`},
		{`{"serve": "store"}`, `serve "store" needs mode "distributed"`},
		{`{} {}`, `data after the configuration object`},
		{`[]`, "got a JSON array"},
		{`{"mode": "multi"}` + strings.Repeat(" ", 1<<20), "larger than"},
	} {
		_, err := runtime.ParseConfig([]byte(tt.in))
		if !errors.Is(err, runtime.ErrBadConfig) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseConfig(%.40q) = %v; want ErrBadConfig saying %q", tt.in, err, tt.want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	if _, err := runtime.LoadConfig(filepath.Join(dir, "missing.json")); !errors.Is(err, runtime.ErrBadConfig) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadConfig of a missing file: %v", err)
	}
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"mode": "multi", "extra": 1}`), 0o600)
	if _, err := runtime.LoadConfig(bad); !errors.Is(err, runtime.ErrBadConfig) || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), `unknown field "extra"`) {
		t.Errorf("LoadConfig of a bad file: %v; want the path and the problem", err)
	}
}

func TestFlags(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "weft.json")
	os.WriteFile(file, []byte(`{"mode": "distributed", "groups": [{"name": "g", "components": ["x/G"], "addresses": ["tcp://a:1"]}]}`), 0o600)
	logger := slog.New(slog.DiscardHandler)
	base := runtime.Config{Multi: true, Logger: logger, Diagnostics: "127.0.0.1:0"}

	parse := func(args ...string) (runtime.Config, error) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		f := runtime.RegisterFlags(fs)
		if err := fs.Parse(args); err != nil {
			return runtime.Config{}, err
		}
		return f.Config(base)
	}
	cfg, err := parse()
	if err != nil || !reflect.DeepEqual(cfg, base) {
		t.Errorf("no flags: %+v, %v; want the base config", cfg, err)
	}
	cfg, err = parse("-weft.config", file, "-weft.serve", "g", "-weft.listen", "tcp://:7000")
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Distributed || cfg.Multi || cfg.Serve != "g" || cfg.Listen != "tcp://:7000" || len(cfg.Groups) != 1 || cfg.Logger != logger || cfg.Diagnostics != "127.0.0.1:0" {
		t.Errorf("file and flags: %+v", cfg)
	}
	if cfg, err = parse("-weft.mode", "single", "-weft.diagnostics", "127.0.0.1:9"); err != nil || cfg.Multi || cfg.Diagnostics != "127.0.0.1:9" {
		t.Errorf("-weft.mode single: %+v, %v", cfg, err)
	}
	for _, args := range [][]string{
		{"-weft.mode", "cluster"},
		{"-weft.serve", "g"},
		{"-weft.config", file, "-weft.listen", "tcp://:1"},
		{"-weft.config", filepath.Join(dir, "missing.json")},
	} {
		if _, err := parse(args...); !errors.Is(err, runtime.ErrBadConfig) {
			t.Errorf("flags %q: %v; want ErrBadConfig", args, err)
		}
	}
}
