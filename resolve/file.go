package resolve

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/weftrpc/weft/endpoint"
)

// FileTrailer is the line that must end every endpoints file (see [File]). A file without it
// is taken for one that is still being written.
const FileTrailer = "# end"

const (
	defaultFilePollInterval = time.Second
	defaultFileMaxSize      = 1 << 20

	// fileReadAttempts bounds how many times one poll reads a file that keeps changing while
	// it is being read.
	fileReadAttempts = 3
)

// ErrBadFile matches (with errors.Is) every rejection of an endpoints file's content: a
// [*FileSyntaxError] or a [*FileTooLargeError].
var ErrBadFile = errors.New("resolve: bad endpoints file")

// errFileChanging means that the file changed while it was being read, every time it was read.
var errFileChanging = errors.New("changed while being read")

// FileSyntaxError reports content that is not a complete endpoints file. It matches
// [ErrBadFile] with errors.Is, and unwraps to its cause, if any (an address that
// [endpoint.Parse] rejects wraps [endpoint.ErrBadAddress]).
type FileSyntaxError struct {
	Path string // the file, or "" for [ParseEndpoints]
	Line int    // the line at fault, counted from 1; 0 if the fault is the file as a whole
	Msg  string // what is wrong
	Err  error  // the cause, or nil
}

// Error returns a description of the fault with its file and line.
func (e *FileSyntaxError) Error() string {
	var b strings.Builder
	b.WriteString("resolve: bad endpoints file")
	if e.Path != "" {
		b.WriteString(" ")
		b.WriteString(e.Path)
	}
	if e.Line > 0 {
		b.WriteString(": line ")
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Is reports whether target is [ErrBadFile].
func (e *FileSyntaxError) Is(target error) bool { return target == ErrBadFile }

// Unwrap returns the cause, or nil.
func (e *FileSyntaxError) Unwrap() error { return e.Err }

// FileTooLargeError reports an endpoints file larger than FileOptions.MaxSize. It matches
// [ErrBadFile] with errors.Is.
type FileTooLargeError struct {
	Path  string
	Size  int64 // the size of the file (at least Limit+1 if it grew while being read)
	Limit int64 // the largest size accepted
}

// Error returns a description of the fault with the file's size and the limit.
func (e *FileTooLargeError) Error() string {
	return fmt.Sprintf("resolve: bad endpoints file %s: %d bytes, over the limit of %d", e.Path, e.Size, e.Limit)
}

// Is reports whether target is [ErrBadFile].
func (e *FileTooLargeError) Is(target error) bool { return target == ErrBadFile }

// FileOptions configure a [FileResolver]. The zero value is ready to use.
type FileOptions struct {
	// PollInterval is how often the file is read while a Resolve is blocked on the current
	// version: a change is seen at most this long after it is made. If zero, 1s. If
	// negative, [File] returns an error.
	PollInterval time.Duration

	// MaxSize is the largest file accepted, in bytes; a larger one is rejected with a
	// [*FileTooLargeError] without being read. If zero, 1 MiB. If negative, [File] returns
	// an error.
	MaxSize int64

	// Logger receives the rejections that Resolve does not return (those that come while a
	// good set is known). If nil, [slog.Default].
	Logger *slog.Logger
}

func (o FileOptions) withDefaults() FileOptions {
	if o.PollInterval == 0 {
		o.PollInterval = defaultFilePollInterval
	}
	if o.MaxSize == 0 {
		o.MaxSize = defaultFileMaxSize
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// FileResolver is a [Resolver] whose set is the content of a file, which it watches by
// polling. Create one with [File]. It is safe for concurrent use and runs no goroutines of its
// own: a Resolve that waits for a change reads the file itself.
type FileResolver struct {
	path string
	opts FileOptions
	seed maphash.Seed
	sem  chan struct{} // a one-slot semaphore held while polling, so polls apply in order

	mu sync.Mutex
	// guarded by mu
	polled  time.Time           // when the last poll started
	seen    fileSeen            // the content last read
	good    bool                // whether a good set is known
	set     []endpoint.Endpoint // the last good set, ordered by address; never modified
	version uint64              // incremented when the set changes
	changed chan struct{}       // closed and replaced when the set changes
	logged  string              // the last rejection logged, so that one is logged once
}

var _ Resolver = (*FileResolver)(nil)

// fileSeen describes the content of the file as last read.
type fileSeen struct {
	valid   bool
	size    int64
	modTime time.Time
	hash    uint64
	err     error // why this content was rejected, or nil if it was good
}

// File returns a resolver whose set is the endpoints listed in the file at path. The file
// need not exist yet; while it does not, Resolve fails with an error wrapping [io/fs.ErrNotExist].
// File returns an error only for invalid arguments.
//
// # Format
//
// The file is UTF-8 text with one endpoint address per line, in the syntax of
// [endpoint.Parse] ("tcp://host:port", "unix:///path/to/socket"). Blank lines are ignored, as
// are lines whose first non-blank character is '#' (comments take whole lines: '#' may be
// part of a socket path). Space around a line and a "\r" before its "\n" are ignored; an
// address may not contain control characters. The last line must be exactly [FileTrailer] ("# end"), followed by a newline, and appear nowhere
// else, so that a file cut short is recognised: an empty set is a file holding only "# end\n".
// An address listed twice is an error, not silently merged, since it usually means two lists
// ran into each other. [WriteEndpointsFile] writes this format.
//
//	# cache replicas
//	tcp://10.0.0.1:8000
//	tcp://10.0.0.2:8000
//	unix:///run/weft/cache.sock
//	# end
//
// A file that breaks any rule, or is larger than FileOptions.MaxSize, is rejected as a whole:
// nothing in it is applied.
//
// # Watching
//
// Resolve with a nil version reads the file at once. While Resolves are blocked on the current
// version, the file is read one FileOptions.PollInterval after the last read (whoever made
// it), by one of them, and a change wakes them all. Every read that finds content other
// than the content last read reads the file a second time and checks that the two reads, and
// the file's identity, size and modification time before and after them, agree; otherwise the
// file is being written and is read again. Content that hashes the same as the content last
// read is not parsed again, whatever its modification time (a touched file). Only content that
// parses completely replaces the set, and all of it at once; a new version is made only when
// the set of addresses changes, whatever their order, so rewriting a file with the same
// endpoints wakes nobody.
//
// Until a good set is known, a rejected, missing or unreadable file makes Resolve return the
// error. Once one is known, it is kept: the rejection is logged through FileOptions.Logger
// (once, until the error changes or a good file returns) and blocked Resolves keep waiting.
//
// # Writing the file
//
// Writers should write a temporary file in the same directory and rename it over the old one,
// as [WriteEndpointsFile] does: readers then see the old file or the new one, never a mix. The
// trailer protects writers that rewrite the file in place, provided they truncate it first (as
// [os.WriteFile] does) and write the trailer last; it cannot protect a writer that overwrites
// a file without truncating it.
func File(path string, opts FileOptions) (*FileResolver, error) {
	if path == "" {
		return nil, errors.New("resolve: File with an empty path")
	}
	if opts.PollInterval < 0 {
		return nil, fmt.Errorf("resolve: File with a negative PollInterval (%v)", opts.PollInterval)
	}
	if opts.MaxSize < 0 {
		return nil, fmt.Errorf("resolve: File with a negative MaxSize (%d)", opts.MaxSize)
	}
	return &FileResolver{
		path:    path,
		opts:    opts.withDefaults(),
		seed:    maphash.MakeSeed(),
		sem:     make(chan struct{}, 1),
		changed: make(chan struct{}),
	}, nil
}

// IsConstant implements [Resolver]; it returns false.
func (r *FileResolver) IsConstant() bool { return false }

// Resolve implements [Resolver]. The set it returns is ordered by address.
//
// With a nil version it reads the file and returns its set, or the last good set if the file
// is rejected. With the current version it blocks, reading the file once every
// FileOptions.PollInterval (shared with other blocked Resolves), until the set changes or ctx
// is done. With any other version it returns the current set at once. It returns an error
// only while no good set is known, or ctx's error.
func (r *FileResolver) Resolve(ctx context.Context, version *Version) ([]endpoint.Endpoint, *Version, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	r.mu.Lock()
	good := r.good
	r.mu.Unlock()
	if version == nil || !good {
		err := r.poll(ctx, true)
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		r.mu.Lock()
		good = r.good
		r.mu.Unlock()
		if !good {
			return nil, nil, err
		}
	}

	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		r.mu.Lock()
		cur := strconv.FormatUint(r.version, 10)
		if version == nil || version.Opaque != cur {
			set := slices.Clone(r.set)
			r.mu.Unlock()
			return set, &Version{Opaque: cur}, nil
		}
		// Every poll, whoever makes it, wakes the Resolves it finds a change for; so the
		// blocked Resolves share one schedule: a poll an interval after the last one.
		changed := r.changed
		wait := r.opts.PollInterval - time.Since(r.polled)
		r.mu.Unlock()

		// Rejections are logged by poll; a blocked Resolve keeps the last good set.
		if wait <= 0 {
			r.poll(ctx, false)
		} else {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-changed:
			case <-timer.C:
				r.poll(ctx, false)
			case <-ctx.Done():
				return nil, nil, ctx.Err()
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
	}
}

// poll reads the file and applies what it finds. Unless always is set, it does nothing if the
// last poll started less than a poll interval ago (a concurrent Resolve just read the file).
// It returns nil if the file holds a good set (new or not), otherwise why it does not.
func (r *FileResolver) poll(ctx context.Context, always bool) error {
	select {
	case r.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-r.sem }()

	r.mu.Lock()
	now := time.Now()
	if !always && now.Sub(r.polled) < r.opts.PollInterval {
		r.mu.Unlock()
		return nil
	}
	r.polled = now
	r.mu.Unlock()

	data, seen, err := r.read()

	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if errors.Is(err, errFileChanging) {
			// Nothing was learnt about the file; the next poll reads it again.
			return err
		}
		r.seen = fileSeen{}
		return r.rejectLocked(err)
	}
	if r.seen.valid && r.seen.hash == seen.hash && r.seen.size == seen.size {
		// The content last read, perhaps touched.
		r.seen.modTime = seen.modTime
		if r.seen.err != nil {
			return r.rejectLocked(r.seen.err)
		}
		return nil
	}

	set, perr := parseEndpoints(data)
	if perr != nil {
		perr.Path = r.path
		seen.err = perr
		r.seen = seen
		return r.rejectLocked(perr)
	}
	r.seen = seen
	if r.logged != "" {
		r.opts.Logger.Info("weft: endpoints file is good again", slog.String("path", r.path), slog.Int("endpoints", len(set)))
		r.logged = ""
	}
	slices.SortFunc(set, func(a, b endpoint.Endpoint) int { return strings.Compare(a.Address(), b.Address()) })
	if r.good && slices.EqualFunc(set, r.set, func(a, b endpoint.Endpoint) bool { return a.Address() == b.Address() }) {
		return nil
	}
	r.set = set
	r.good = true
	r.version++
	close(r.changed)
	r.changed = make(chan struct{})
	return nil
}

// rejectLocked returns err, the reason the file holds no good set, after logging it if a good
// set is known (Resolve then does not return it) and it differs from the last one logged.
//
// REQUIRES: r.mu is held.
func (r *FileResolver) rejectLocked(err error) error {
	if !r.good {
		return err
	}
	if msg := err.Error(); msg != r.logged {
		r.logged = msg
		r.opts.Logger.Warn("weft: endpoints file rejected; keeping the last good set", slog.String("path", r.path), slog.Any("err", err))
	}
	return err
}

// read reads the file until two reads agree, at most fileReadAttempts times. It does not read
// it a second time if the first read finds the content last read.
func (r *FileResolver) read() ([]byte, fileSeen, error) {
	for range fileReadAttempts {
		data, seen, err := r.readOnce()
		if errors.Is(err, errFileChanging) {
			continue
		}
		if err != nil {
			return nil, fileSeen{}, err
		}
		r.mu.Lock()
		known := r.seen.valid && r.seen.hash == seen.hash && r.seen.size == seen.size
		r.mu.Unlock()
		if known {
			return data, seen, nil
		}
		again, seen2, err := r.readOnce()
		if errors.Is(err, errFileChanging) {
			continue
		}
		if err != nil {
			return nil, fileSeen{}, err
		}
		if seen2.size == seen.size && seen2.modTime.Equal(seen.modTime) && bytes.Equal(again, data) {
			return data, seen, nil
		}
	}
	return nil, fileSeen{}, fmt.Errorf("resolve: endpoints file %s: %w %d times in a row", r.path, errFileChanging, fileReadAttempts)
}

// readOnce reads the file once. It returns an error wrapping errFileChanging if the file was
// replaced, or changed size or modification time, while being read.
func (r *FileResolver) readOnce() ([]byte, fileSeen, error) {
	before, err := os.Stat(r.path)
	if err != nil {
		return nil, fileSeen{}, fmt.Errorf("resolve: endpoints file: %w", err)
	}
	if !before.Mode().IsRegular() {
		what := "not a regular file"
		if before.IsDir() {
			what = "a directory, not a regular file"
		}
		return nil, fileSeen{}, &FileSyntaxError{Path: r.path, Msg: what}
	}
	if before.Size() > r.opts.MaxSize {
		return nil, fileSeen{}, &FileTooLargeError{Path: r.path, Size: before.Size(), Limit: r.opts.MaxSize}
	}
	f, err := os.Open(r.path)
	if err != nil {
		return nil, fileSeen{}, fmt.Errorf("resolve: endpoints file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, r.opts.MaxSize+1))
	if err != nil {
		return nil, fileSeen{}, fmt.Errorf("resolve: endpoints file: %w", err)
	}
	if int64(len(data)) > r.opts.MaxSize {
		return nil, fileSeen{}, &FileTooLargeError{Path: r.path, Size: int64(len(data)), Limit: r.opts.MaxSize}
	}
	after, err := f.Stat()
	if err != nil {
		return nil, fileSeen{}, fmt.Errorf("resolve: endpoints file: %w", err)
	}
	if !os.SameFile(before, after) || after.Size() != before.Size() || after.Size() != int64(len(data)) ||
		!after.ModTime().Equal(before.ModTime()) {
		return nil, fileSeen{}, errFileChanging
	}
	return data, fileSeen{
		valid:   true,
		size:    after.Size(),
		modTime: after.ModTime(),
		hash:    maphash.Bytes(r.seed, data),
	}, nil
}

// ParseEndpoints parses the content of an endpoints file (the format is described at [File])
// and returns its endpoints in the order listed. Content that breaks a rule of the format
// returns a [*FileSyntaxError], which matches [ErrBadFile].
func ParseEndpoints(data []byte) ([]endpoint.Endpoint, error) {
	set, err := parseEndpoints(data)
	if err != nil {
		return nil, err
	}
	return set, nil
}

// parseEndpoints is [ParseEndpoints] with a typed error.
func parseEndpoints(data []byte) ([]endpoint.Endpoint, *FileSyntaxError) {
	if len(data) == 0 {
		return nil, &FileSyntaxError{Msg: fmt.Sprintf("empty (an empty set is written as %q followed by a newline)", FileTrailer)}
	}
	if data[len(data)-1] != '\n' {
		return nil, &FileSyntaxError{Msg: "the last line does not end with a newline (the file is incomplete)"}
	}
	lines := strings.Split(string(data[:len(data)-1]), "\n")
	var set []endpoint.Endpoint
	first := map[string]int{} // line of each address
	for i, line := range lines {
		n := i + 1
		if !utf8.ValidString(line) {
			return nil, &FileSyntaxError{Line: n, Msg: "not valid UTF-8"}
		}
		line = strings.TrimSpace(line)
		if line == FileTrailer {
			if n != len(lines) {
				return nil, &FileSyntaxError{Line: n, Msg: fmt.Sprintf("%q before the last line", FileTrailer)}
			}
			return set, nil
		}
		if line == "" || line[0] == '#' {
			continue
		}
		if strings.ContainsFunc(line, unicode.IsControl) {
			return nil, &FileSyntaxError{Line: n, Msg: "bad address: it contains a control character", Err: endpoint.ErrBadAddress}
		}
		ep, err := endpoint.Parse(line)
		if err != nil {
			return nil, &FileSyntaxError{Line: n, Msg: "bad address", Err: err}
		}
		addr := ep.Address()
		if prev, dup := first[addr]; dup {
			return nil, &FileSyntaxError{Line: n, Msg: fmt.Sprintf("%s listed again (first on line %d)", addr, prev)}
		}
		first[addr] = n
		set = append(set, ep)
	}
	return nil, &FileSyntaxError{Msg: fmt.Sprintf("no %q line at the end (the file is incomplete)", FileTrailer)}
}

// FormatEndpoints returns the content of an endpoints file (the format is described at [File])
// listing eps in order. It returns an error if an endpoint is nil, listed twice, or has an
// address the format cannot carry (one [endpoint.Parse] does not return unchanged, such as an
// [endpoint.MTLS] address).
func FormatEndpoints(eps []endpoint.Endpoint) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("# weft endpoints: one address per line; the file ends with the line \"" + FileTrailer + "\"\n")
	seen := make(map[string]bool, len(eps))
	for i, ep := range eps {
		if ep == nil {
			return nil, fmt.Errorf("resolve: format endpoints: endpoint %d is nil", i)
		}
		addr := ep.Address()
		parsed, err := endpoint.Parse(addr)
		if err != nil {
			return nil, fmt.Errorf("resolve: format endpoints: endpoint %d: %w", i, err)
		}
		if parsed.Address() != addr || strings.TrimSpace(addr) != addr || strings.ContainsFunc(addr, unicode.IsControl) || !utf8.ValidString(addr) {
			return nil, fmt.Errorf("resolve: format endpoints: endpoint %d: %w %q: not representable in an endpoints file", i, endpoint.ErrBadAddress, addr)
		}
		if seen[addr] {
			return nil, fmt.Errorf("resolve: format endpoints: endpoint %d: %s listed twice", i, addr)
		}
		seen[addr] = true
		b.WriteString(addr)
		b.WriteByte('\n')
	}
	b.WriteString(FileTrailer + "\n")
	return b.Bytes(), nil
}

// WriteEndpointsFile writes eps to the file at path in the format [File] reads, atomically: it
// writes a temporary file in the same directory, flushes it to stable storage and renames it
// over path, so a reader sees the old file or the new one, never a mix. The file is readable
// by everyone (mode 0644). On error path is unchanged and the temporary file is removed. It
// returns the errors of [FormatEndpoints] and of the file system.
func WriteEndpointsFile(path string, eps []endpoint.Endpoint) error {
	data, err := FormatEndpoints(eps)
	if err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("resolve: write endpoints file %s: %w", path, err)
	}
	fail := func(err error) error {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("resolve: write endpoints file %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fail(err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("resolve: write endpoints file %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("resolve: write endpoints file %s: %w", path, err)
	}
	return nil
}
