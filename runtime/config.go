package runtime

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// ErrBadConfig is wrapped by the errors of [LoadConfig], [ParseConfig] and [Flags.Config]
// for configuration that cannot be used.
var ErrBadConfig = errors.New("runtime: bad configuration")

// maxConfigSize bounds a configuration file.
const maxConfigSize = 1 << 20

// fileConfig is the JSON form of a Config.
type fileConfig struct {
	Mode         string      `json:"mode"` // "single", "multi" or "distributed"
	Serve        string      `json:"serve"`
	Diagnostics  string      `json:"diagnostics"`
	Dir          string      `json:"dir"`
	DrainTimeout string      `json:"drain_timeout"`
	Groups       []fileGroup `json:"groups"`
}

type fileGroup struct {
	Name       string   `json:"name"`
	Components []string `json:"components"`
	Replicas   int      `json:"replicas"`
	Sharded    bool     `json:"sharded"`
	Listen     string   `json:"listen"`
	Addresses  []string `json:"addresses"`
}

// LoadConfig reads a Config from the JSON file at path; see [ParseConfig] for its form.
func LoadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("%w: %w", ErrBadConfig, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("%w: reading %s: %w", ErrBadConfig, path, err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig parses a Config from JSON of this form (every field may be left out):
//
//	{
//	  "mode": "multi",                  // "single" (the default), "multi" or "distributed"
//	  "serve": "",                      // distributed: the group this process serves
//	  "diagnostics": "127.0.0.1:0",     // Config.Diagnostics
//	  "dir": "",                        // Config.Dir
//	  "drain_timeout": "10s",           // Config.DrainTimeout, a Go duration
//	  "groups": [
//	    {"name": "store", "components": ["example.com/app/Store"], "replicas": 3,
//	     "sharded": true, "listen": "tcp://:9000", "addresses": ["dns:store:9000"]}
//	  ]
//	}
//
// Unknown fields, trailing data, bad values and files over 1 MiB are errors wrapping
// [ErrBadConfig] that say where the problem is. Logger, Tracer and MeterProvider are left
// nil: they are not configuration but code. Checks that need the program's registered
// components (component names, groups' Addresses) happen in [Run].
func ParseConfig(data []byte) (Config, error) {
	if len(data) > maxConfigSize {
		return Config{}, fmt.Errorf("%w: larger than %d bytes", ErrBadConfig, maxConfigSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var fc fileConfig
	if err := dec.Decode(&fc); err != nil {
		return Config{}, fmt.Errorf("%w: %s", ErrBadConfig, jsonError(data, dec, err))
	}
	if dec.More() {
		return Config{}, fmt.Errorf("%w: data after the configuration object at %s", ErrBadConfig, position(data, dec.InputOffset()))
	}
	cfg := Config{Serve: fc.Serve, Diagnostics: fc.Diagnostics, Dir: fc.Dir}
	switch fc.Mode {
	case "", "single":
	case "multi":
		cfg.Multi = true
	case "distributed":
		cfg.Distributed = true
	default:
		return Config{}, fmt.Errorf("%w: mode %q: want \"single\", \"multi\" or \"distributed\"", ErrBadConfig, fc.Mode)
	}
	if fc.DrainTimeout != "" {
		d, err := time.ParseDuration(fc.DrainTimeout)
		if err != nil || d <= 0 {
			return Config{}, fmt.Errorf("%w: drain_timeout %q: want a positive duration such as \"10s\"", ErrBadConfig, fc.DrainTimeout)
		}
		cfg.DrainTimeout = d
	}
	for i, g := range fc.Groups {
		where := fmt.Sprintf("groups[%d]", i)
		if g.Name != "" {
			where += fmt.Sprintf(" (%q)", g.Name)
		}
		switch {
		case len(g.Components) == 0:
			return Config{}, fmt.Errorf("%w: %s has no components", ErrBadConfig, where)
		case g.Replicas < 0:
			return Config{}, fmt.Errorf("%w: %s has %d replicas", ErrBadConfig, where, g.Replicas)
		}
		for _, c := range g.Components {
			if !strings.Contains(c, "/") {
				return Config{}, fmt.Errorf("%w: %s: component %q is not a full name (\"package/path/Interface\")", ErrBadConfig, where, c)
			}
		}
		cfg.Groups = append(cfg.Groups, Group{Name: g.Name, Components: g.Components, Replicas: g.Replicas,
			Sharded: g.Sharded, Listen: g.Listen, Addresses: g.Addresses})
	}
	if cfg.Serve != "" && !cfg.Distributed {
		return Config{}, fmt.Errorf("%w: serve %q needs mode \"distributed\"", ErrBadConfig, cfg.Serve)
	}
	return cfg, nil
}

// jsonError describes a decoding error with its line and column.
func jsonError(data []byte, dec *json.Decoder, err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("%s: %v", position(data, se.Offset-1), err) // the offending byte
	case errors.As(err, &te):
		return fmt.Sprintf("%s: field %q: got a JSON %s, want %s", position(data, te.Offset), te.Field, te.Value, te.Type)
	case errors.Is(err, io.EOF):
		return "empty file"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the file ends in the middle of the configuration"
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		if i := bytes.Index(data, []byte(name)); i >= 0 {
			return fmt.Sprintf("%s: %v", position(data, int64(i)), err)
		}
	}
	return fmt.Sprintf("%s: %v", position(data, dec.InputOffset()), err)
}

// position returns "line L, column C" (both from 1) of the byte at offset off of data.
func position(data []byte, off int64) string {
	off = min(max(off, 0), int64(len(data)))
	before := data[:off]
	line := bytes.Count(before, []byte("\n")) + 1
	col := int(off) - bytes.LastIndexByte(before, '\n')
	return fmt.Sprintf("line %d, column %d", line, col)
}

// Flags are the command-line flags of a weft program. Register them with [RegisterFlags]
// before flag parsing, and build the Config with [Flags.Config] after it.
type Flags struct {
	config, mode, serve, listen, diagnostics string
}

// RegisterFlags registers on fs (flag.CommandLine if nil) the flags
//
//	-weft.config file   a configuration file (see ParseConfig)
//	-weft.mode mode     single, multi or distributed, overriding the file's
//	-weft.serve group   the group this process serves (distributed mode)
//	-weft.listen addr   where it listens, replacing its group's Listen
//	-weft.diagnostics addr   where to serve the diagnostics page
//
// A multi-process deployment starts its replicas with the program's own arguments, so
// they read the same configuration.
func RegisterFlags(fs *flag.FlagSet) *Flags {
	if fs == nil {
		fs = flag.CommandLine
	}
	f := &Flags{}
	fs.StringVar(&f.config, "weft.config", "", "weft configuration `file` (JSON)")
	fs.StringVar(&f.mode, "weft.mode", "", "deployment `mode`: single, multi or distributed")
	fs.StringVar(&f.serve, "weft.serve", "", "in distributed mode, the `group` this process serves")
	fs.StringVar(&f.listen, "weft.listen", "", "in distributed mode, the `address` (tcp://host:port) this process serves on")
	fs.StringVar(&f.diagnostics, "weft.diagnostics", "", "TCP `address` of the diagnostics page")
	return f
}

// Config returns base with the configuration file's settings (if -weft.config was given)
// and then the flags' applied. The file replaces base's mode, groups, directory, drain
// timeout and diagnostics address; base's Logger, Tracer and MeterProvider are kept.
func (f *Flags) Config(base Config) (Config, error) {
	cfg := base
	if f.config != "" {
		fc, err := LoadConfig(f.config)
		if err != nil {
			return Config{}, err
		}
		fc.Logger, fc.Tracer, fc.MeterProvider = base.Logger, base.Tracer, base.MeterProvider
		if fc.Diagnostics == "" {
			fc.Diagnostics = base.Diagnostics
		}
		cfg = fc
	}
	switch f.mode {
	case "":
	case "single":
		cfg.Multi, cfg.Distributed = false, false
	case "multi":
		cfg.Multi, cfg.Distributed = true, false
	case "distributed":
		cfg.Multi, cfg.Distributed = false, true
	default:
		return Config{}, fmt.Errorf("%w: -weft.mode %q: want single, multi or distributed", ErrBadConfig, f.mode)
	}
	if f.serve != "" {
		cfg.Serve = f.serve
	}
	if f.listen != "" {
		cfg.Listen = f.listen
	}
	if f.diagnostics != "" {
		cfg.Diagnostics = f.diagnostics
	}
	if cfg.Serve != "" && !cfg.Distributed {
		return Config{}, fmt.Errorf("%w: -weft.serve %q needs distributed mode", ErrBadConfig, cfg.Serve)
	}
	if cfg.Listen != "" && cfg.Serve == "" {
		return Config{}, fmt.Errorf("%w: -weft.listen needs -weft.serve", ErrBadConfig)
	}
	return cfg, nil
}
