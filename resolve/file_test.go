package resolve_test

// Black-box tests of the file resolver: the format, the polling timeline, rejected and
// half-written files, missing files, the size limit, cancellation, concurrent Resolves, a
// writer rewriting the file in place, and call.Connect following the file over TCP.
// Identifiers of this file start with "fr".

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/resolve"
)

// frContent returns a complete endpoints file listing addrs.
func frContent(addrs ...string) string {
	var b strings.Builder
	for _, a := range addrs {
		b.WriteString(a + "\n")
	}
	b.WriteString(resolve.FileTrailer + "\n")
	return b.String()
}

// frWrite rewrites the file at path in place (truncating it), as a careless writer would.
func frWrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// frLog collects what a resolver logs.
type frLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *frLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *frLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// count returns how many logged lines contain s.
func (l *frLog) count(s string) int {
	n := 0
	for line := range strings.Lines(l.String()) {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func (l *frLog) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// frResolver returns a file resolver for a file named "endpoints" in a new directory (the
// file is not created), and its log.
func frResolver(t *testing.T, opts resolve.FileOptions) (*resolve.FileResolver, string, *frLog) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "endpoints")
	log := &frLog{}
	if opts.Logger == nil {
		opts.Logger = log.logger()
	}
	r, err := resolve.File(path, opts)
	if err != nil {
		t.Fatalf("File(%q, %+v): %v", path, opts, err)
	}
	return r, path, log
}

// frCtx returns a context that ends with the test or after an hour (of bubble time inside a
// synctest bubble), so that no test can hang.
func frCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
	t.Cleanup(cancel)
	return ctx
}

// frResolveErr calls r.Resolve inside a synctest bubble and fails the test unless it returns
// an error before the bubble's clock moves.
func frResolveErr(t *testing.T, r resolve.Resolver, v *resolve.Version) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
	defer cancel()
	start := time.Now()
	set, nv, err := r.Resolve(ctx, v)
	if err == nil {
		t.Fatalf("Resolve(%v) = %q, %v; want an error", v, addrs(set), nv)
	}
	if set != nil || nv != nil {
		t.Fatalf("Resolve(%v) returned %q, %v with error %v; want nil set and version", v, addrs(set), nv, err)
	}
	if d := time.Since(start); d != 0 {
		t.Fatalf("Resolve(%v) took %v of bubble time, want an answer at once", v, d)
	}
	return err
}

// frBlocked fails the test if ch already has a result.
func frBlocked(t *testing.T, what string, ch <-chan result) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("%s: Resolve returned %q, %v, %v; want it still blocked", what, addrs(r.set), r.v, r.err)
	default:
	}
}

// frReturned returns the result in ch, failing the test if there is none yet or it is an error.
func frReturned(t *testing.T, what string, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("%s: Resolve: %v", what, r.err)
		}
		return r
	default:
		t.Fatalf("%s: Resolve still blocked", what)
		return result{}
	}
}

func TestFileResolveNilReadsFile(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, _ := frResolver(t, resolve.FileOptions{})
		if r.IsConstant() {
			t.Fatal("IsConstant() = true, want false")
		}
		content := "# replicas of the cache\n" +
			"\n" +
			"tcp://10.0.0.2:8000\r\n" +
			"   tcp://10.0.0.1:8000  \n" +
			"  # a comment after space\n" +
			"unix:///run/weft/a#b.sock\n" +
			"unix://relative.sock\n" +
			"# end\n"
		frWrite(t, path, content)
		set, v1 := resolveAtOnce(t, r, nil)
		if v1 == nil {
			t.Fatal("Resolve(nil) returned a nil version")
		}
		want := []string{"tcp://10.0.0.1:8000", "tcp://10.0.0.2:8000", "unix:///run/weft/a#b.sock", "unix://relative.sock"}
		if got := addrs(set); !slices.Equal(got, want) {
			t.Fatalf("Resolve(nil) = %q, want %q (ordered by address)", got, want)
		}

		// Without a change, the same version.
		_, v2 := resolveAtOnce(t, r, nil)
		if *v2 != *v1 {
			t.Fatalf("second Resolve(nil) version %q, want %q", v2.Opaque, v1.Opaque)
		}

		// Any version other than the current one gets the current set at once.
		for _, opaque := range []string{"", "foreign", "0", "-1", v1.Opaque + "0"} {
			set, v := resolveAtOnce(t, r, &resolve.Version{Opaque: opaque})
			if got := addrs(set); !slices.Equal(got, want) || *v != *v1 {
				t.Fatalf("Resolve(%q) = %q, %q; want %q, %q", opaque, got, v.Opaque, want, v1.Opaque)
			}
		}

		// The caller owns the answer.
		set[0] = endpoint.TCP("mutated:1")
		set, _ = resolveAtOnce(t, r, nil)
		if got := addrs(set); !slices.Equal(got, want) {
			t.Fatalf("after mutating an answer, Resolve(nil) = %q, want %q", got, want)
		}
	})
}

func TestFileEmptySetIsValid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, _ := frResolver(t, resolve.FileOptions{})
		frWrite(t, path, "# nothing here yet\n# end\n")
		set, v := resolveAtOnce(t, r, nil)
		if len(set) != 0 || v == nil {
			t.Fatalf("Resolve(nil) of an empty list = %q, %v; want an empty set and a version", addrs(set), v)
		}
		// An empty set is a version like any other: a change wakes a Resolve blocked on it.
		ch := goResolve(frCtx(t), r, v)
		synctest.Wait()
		frWrite(t, path, frContent("tcp://a:1"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := frReturned(t, "after the first endpoint", ch)
		wantSet(t, "after the first endpoint", got.set, []endpoint.Endpoint{endpoint.TCP("a:1")})
	})
}

func TestParseEndpoints(t *testing.T) {
	good := []struct {
		name, content string
		want          []string
	}{
		{"empty set", "# end\n", nil},
		{"file order", "tcp://b:1\ntcp://a:1\n# end\n", []string{"tcp://b:1", "tcp://a:1"}},
		{"comments and blanks", "# x\n\n  \ntcp://a:1\n#end is a comment\n# end\n", []string{"tcp://a:1"}},
		{"crlf", "tcp://a:1\r\n# end\r\n", []string{"tcp://a:1"}},
		{"spaced trailer", "tcp://a:1\n  # end \n", []string{"tcp://a:1"}},
		{"unix", "unix:///run/s.sock\nunix://rel\n# end\n", []string{"unix:///run/s.sock", "unix://rel"}},
		{"ipv6", "tcp://[::1]:80\n# end\n", []string{"tcp://[::1]:80"}},
	}
	for _, tc := range good {
		t.Run(tc.name, func(t *testing.T) {
			set, err := resolve.ParseEndpoints([]byte(tc.content))
			if err != nil {
				t.Fatalf("ParseEndpoints(%q): %v", tc.content, err)
			}
			if got := addrs(set); !slices.Equal(got, tc.want) {
				t.Fatalf("ParseEndpoints(%q) = %q, want %q", tc.content, got, tc.want)
			}
		})
	}

	bad := []struct {
		name, content string
		line          int   // the line the error names
		cause         error // an error it wraps besides ErrBadFile, or nil
	}{
		{"empty", "", 0, nil},
		{"no trailer", "tcp://a:1\ntcp://a:2\n", 0, nil},
		{"truncated mid-line", "tcp://a:1\ntcp://a:", 0, nil},
		{"trailer without newline", "tcp://a:1\n# end", 0, nil},
		{"only blank lines", "\n\n", 0, nil},
		{"garbage line", "tcp://a:1\nnot an address\n# end\n", 2, endpoint.ErrBadAddress},
		{"unknown scheme", "udp://a:1\n# end\n", 1, endpoint.ErrBadAddress},
		{"mtls address", "mtls+tcp://a:1\n# end\n", 1, endpoint.ErrBadAddress},
		{"missing port", "tcp://a\n# end\n", 1, endpoint.ErrBadAddress},
		{"duplicate", "tcp://a:1\ntcp://b:1\n  tcp://a:1\n# end\n", 3, nil},
		{"trailer not last", "tcp://a:1\n# end\ntcp://b:1\n# end\n", 2, nil},
		{"lines after trailer", "tcp://a:1\n# end\n\n", 2, nil},
		{"control character", "tcp://[\r]:1\n# end\n", 1, endpoint.ErrBadAddress},
		{"invalid utf-8", "tcp://a:1\n# caf\xe9\n# end\n", 2, nil},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			set, err := resolve.ParseEndpoints([]byte(tc.content))
			if err == nil {
				t.Fatalf("ParseEndpoints(%q) = %q, want an error", tc.content, addrs(set))
			}
			if set != nil {
				t.Fatalf("ParseEndpoints(%q) returned %q with its error, want nil", tc.content, addrs(set))
			}
			if !errors.Is(err, resolve.ErrBadFile) {
				t.Fatalf("error %v does not match ErrBadFile", err)
			}
			var se *resolve.FileSyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("error %v (%T) is not a *FileSyntaxError", err, err)
			}
			if se.Line != tc.line {
				t.Fatalf("error %v names line %d, want %d", err, se.Line, tc.line)
			}
			if tc.cause != nil && !errors.Is(err, tc.cause) {
				t.Fatalf("error %v does not wrap %v", err, tc.cause)
			}
			if !strings.HasPrefix(err.Error(), "resolve: ") {
				t.Fatalf("error %q lacks the package prefix", err)
			}
		})
	}
}

func TestFormatEndpoints(t *testing.T) {
	in := []endpoint.Endpoint{endpoint.TCP("b:1"), endpoint.Unix("/run/x y.sock"), endpoint.TCP("[::1]:2"), endpoint.Unix("rel")}
	data, err := resolve.FormatEndpoints(in)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(data, []byte("\n"+resolve.FileTrailer+"\n")) {
		t.Fatalf("FormatEndpoints = %q, want it to end with the trailer", data)
	}
	out, err := resolve.ParseEndpoints(data)
	if err != nil {
		t.Fatalf("ParseEndpoints(FormatEndpoints(...)) = %v for %q", err, data)
	}
	wantSet(t, "round trip", out, in)

	empty, err := resolve.FormatEndpoints(nil)
	if err != nil {
		t.Fatal(err)
	}
	if set, err := resolve.ParseEndpoints(empty); err != nil || len(set) != 0 {
		t.Fatalf("ParseEndpoints(FormatEndpoints(nil)) = %q, %v; want an empty set", addrs(set), err)
	}

	for _, tc := range []struct {
		name string
		eps  []endpoint.Endpoint
	}{
		{"nil endpoint", []endpoint.Endpoint{endpoint.TCP("a:1"), nil}},
		{"duplicate", []endpoint.Endpoint{endpoint.TCP("a:1"), endpoint.TCP("b:1"), endpoint.TCP("a:1")}},
		{"mtls", []endpoint.Endpoint{endpoint.MTLS(&tls.Config{}, endpoint.TCP("a:1"))}},
		{"newline in path", []endpoint.Endpoint{endpoint.Unix("/run/a\ntcp://evil:1")}},
		{"trailing space", []endpoint.Endpoint{endpoint.Unix("/run/a ")}},
		{"bad tcp", []endpoint.Endpoint{endpoint.TCP("no-port")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if data, err := resolve.FormatEndpoints(tc.eps); err == nil {
				t.Fatalf("FormatEndpoints = %q, want an error", data)
			}
			path := filepath.Join(t.TempDir(), "endpoints")
			if err := resolve.WriteEndpointsFile(path, tc.eps); err == nil {
				t.Fatal("WriteEndpointsFile succeeded, want an error")
			}
			if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 0 {
				t.Fatalf("a failed WriteEndpointsFile left %d files behind", len(entries))
			}
		})
	}
}

func FuzzParseEndpoints(f *testing.F) {
	f.Add([]byte("tcp://a:1\nunix:///s\n# end\n"))
	f.Add([]byte("# end\n"))
	f.Add([]byte("tcp://a:1\n# end"))
	f.Add([]byte("# x\r\n\r\ntcp://[::1]:1\r\n# end\r\n"))
	f.Add([]byte("tcp://a:1\ntcp://a:1\n# end\n"))
	f.Add([]byte("tcp://[\r]:0\n# end\n"))
	f.Add([]byte("unix:///a\tb\n# end\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := resolve.ParseEndpoints(data)
		if err != nil {
			if !errors.Is(err, resolve.ErrBadFile) {
				t.Fatalf("error %v does not match ErrBadFile", err)
			}
			return
		}
		// What parses formats, and parses back to the same list.
		again, err := resolve.FormatEndpoints(set)
		if err != nil {
			t.Fatalf("FormatEndpoints(%q) of a parsed file: %v", addrs(set), err)
		}
		set2, err := resolve.ParseEndpoints(again)
		if err != nil {
			t.Fatalf("ParseEndpoints(%q): %v", again, err)
		}
		if !slices.Equal(addrs(set), addrs(set2)) {
			t.Fatalf("round trip of %q gave %q", addrs(set), addrs(set2))
		}
	})
}

func TestFileOptionsInvalid(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		path string
		opts resolve.FileOptions
	}{
		{"empty path", "", resolve.FileOptions{}},
		{"negative poll interval", filepath.Join(dir, "e"), resolve.FileOptions{PollInterval: -time.Second}},
		{"negative max size", filepath.Join(dir, "e"), resolve.FileOptions{MaxSize: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := resolve.File(tc.path, tc.opts)
			if err == nil || r != nil {
				t.Fatalf("File(%q, %+v) = %v, %v; want an error", tc.path, tc.opts, r, err)
			}
		})
	}
}

func TestFilePollingTimeline(t *testing.T) {
	for _, tc := range []struct {
		name     string
		interval time.Duration // FileOptions.PollInterval
		changeAt time.Duration // after the Resolve starts blocking
		seenAt   time.Duration // the next poll
	}{
		{"default interval", 0, 0, time.Second},
		{"default interval, change late", 0, 1500 * time.Millisecond, 2 * time.Second},
		{"250ms", 250 * time.Millisecond, 600 * time.Millisecond, 750 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				r, path, _ := frResolver(t, resolve.FileOptions{PollInterval: tc.interval})
				frWrite(t, path, frContent("tcp://a:1", "tcp://a:2"))
				_, v1 := resolveAtOnce(t, r, nil)

				start := time.Now()
				ch := goResolve(frCtx(t), r, v1)
				time.Sleep(tc.changeAt)
				synctest.Wait()
				frBlocked(t, "before the change", ch)
				frWrite(t, path, frContent("tcp://b:1"))

				time.Sleep(tc.seenAt - tc.changeAt - time.Millisecond)
				synctest.Wait()
				frBlocked(t, "just before the next poll", ch)

				time.Sleep(time.Millisecond)
				synctest.Wait()
				got := frReturned(t, "at the next poll", ch)
				wantSet(t, "at the next poll", got.set, []endpoint.Endpoint{endpoint.TCP("b:1")})
				if got.v == nil || *got.v == *v1 {
					t.Fatalf("version after the change %v, want one newer than %q", got.v, v1.Opaque)
				}
				if d := time.Since(start); d != tc.seenAt {
					t.Fatalf("change seen after %v, want %v", d, tc.seenAt)
				}
			})
		})
	}
}

func TestFileSameSetDoesNotWake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, log := frResolver(t, resolve.FileOptions{})
		content := frContent("tcp://a:1", "tcp://a:2", "unix:///s")
		frWrite(t, path, content)
		_, v1 := resolveAtOnce(t, r, nil)
		ch := goResolve(frCtx(t), r, v1)
		synctest.Wait()

		// The same bytes with a new modification time.
		frWrite(t, path, content)
		later := time.Unix(2_000_000_000, 0)
		if err := os.Chtimes(path, later, later); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		frBlocked(t, "after touching the file", ch)

		// The same set, reordered, with comments and blank lines.
		frWrite(t, path, "# rewritten\nunix:///s\n\n tcp://a:2\ntcp://a:1\n# end\n")
		time.Sleep(3 * time.Second)
		synctest.Wait()
		frBlocked(t, "after reordering the set", ch)
		if _, v := resolveAtOnce(t, r, nil); *v != *v1 {
			t.Fatalf("Resolve(nil) after rewriting the same set: version %q, want %q", v.Opaque, v1.Opaque)
		}
		if log.count("rejected") != 0 {
			t.Fatalf("rewriting the same set logged a rejection:\n%s", log)
		}

		// A real change still wakes it, at the next poll.
		frWrite(t, path, frContent("tcp://a:1", "tcp://a:2"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := frReturned(t, "after a real change", ch)
		wantSet(t, "after a real change", got.set, []endpoint.Endpoint{endpoint.TCP("a:1"), endpoint.TCP("a:2")})
	})
}

func TestFileIncompleteNeverApplied(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, log := frResolver(t, resolve.FileOptions{})
		good := []endpoint.Endpoint{endpoint.TCP("a:1"), endpoint.TCP("a:2")}
		frWrite(t, path, frContent("tcp://a:1", "tcp://a:2"))
		_, v1 := resolveAtOnce(t, r, nil)
		ch := goResolve(frCtx(t), r, v1)
		synctest.Wait()

		// The stages of a writer rewriting the file in place, and other broken files: each
		// is rejected as a whole, logged once however often it is read, and the last good
		// set stays.
		bad := []struct{ name, content string }{
			{"truncated", ""},
			{"first line only", "tcp://b:1\n"},
			{"cut mid-line", "tcp://b:1\ntcp://b:"},
			{"no trailer", "tcp://b:1\ntcp://b:2\n"},
			{"trailer without newline", "tcp://b:1\ntcp://b:2\n# end"},
			{"garbage line", "tcp://b:1\n\x00garbage\n# end\n"},
			{"duplicate", "tcp://b:1\ntcp://b:1\n# end\n"},
			{"two files run together", "tcp://b:1\n# end\ntcp://a:1\n# end\n"},
		}
		for i, tc := range bad {
			frWrite(t, path, tc.content)
			time.Sleep(3 * time.Second) // three polls
			synctest.Wait()
			frBlocked(t, tc.name, ch)
			set, v := resolveAtOnce(t, r, nil)
			wantSet(t, "Resolve(nil) with a "+tc.name+" file", set, good)
			if *v != *v1 {
				t.Fatalf("%s: version %q, want %q", tc.name, v.Opaque, v1.Opaque)
			}
			if n := log.count("rejected"); n != i+1 {
				t.Fatalf("%s: %d rejections logged after %d broken files, want %d:\n%s", tc.name, n, i+1, i+1, log)
			}
			if n := log.count(path); n != i+1 {
				t.Fatalf("%s: %d log lines name the file, want %d:\n%s", tc.name, n, i+1, log)
			}
		}

		// The complete file is applied at once, all of it.
		frWrite(t, path, frContent("tcp://b:1", "tcp://b:2", "tcp://b:3"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := frReturned(t, "complete file", ch)
		wantSet(t, "complete file", got.set, []endpoint.Endpoint{endpoint.TCP("b:1"), endpoint.TCP("b:2"), endpoint.TCP("b:3")})
		if log.count("good again") != 1 {
			t.Fatalf("recovery not logged once:\n%s", log)
		}
	})
}

func TestFileRejectedBeforeGoodSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, log := frResolver(t, resolve.FileOptions{})
		frWrite(t, path, "tcp://a:1\nbogus\n# end\n")
		err := frResolveErr(t, r, nil)
		var se *resolve.FileSyntaxError
		if !errors.As(err, &se) || !errors.Is(err, resolve.ErrBadFile) {
			t.Fatalf("Resolve(nil) error %v (%T), want a *FileSyntaxError matching ErrBadFile", err, err)
		}
		if se.Path != path || se.Line != 2 || !strings.Contains(err.Error(), path) {
			t.Fatalf("error %v names path %q line %d, want %q line 2", err, se.Path, se.Line, path)
		}
		// With no good set, a version (foreign: none was issued) gets the error too.
		frResolveErr(t, r, &resolve.Version{Opaque: "1"})
		if s := log.String(); s != "" {
			t.Fatalf("a rejection returned to the caller was also logged:\n%s", s)
		}

		frWrite(t, path, frContent("tcp://a:1"))
		set, _ := resolveAtOnce(t, r, nil)
		wantSet(t, "after fixing the file", set, []endpoint.Endpoint{endpoint.TCP("a:1")})
	})
}

func TestFileMissing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, log := frResolver(t, resolve.FileOptions{})

		// Before any good set: a clear error.
		err := frResolveErr(t, r, nil)
		if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) || !strings.HasPrefix(err.Error(), "resolve: ") {
			t.Fatalf("Resolve(nil) of a missing file: error %q, want one naming the file and wrapping fs.ErrNotExist", err)
		}

		// A directory in its place is no better.
		if err := os.Mkdir(path, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := frResolveErr(t, r, nil); !errors.Is(err, resolve.ErrBadFile) {
			t.Fatalf("Resolve(nil) of a directory: error %v, want ErrBadFile", err)
		}
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}

		good := []endpoint.Endpoint{endpoint.TCP("a:1")}
		if err := resolve.WriteEndpointsFile(path, good); err != nil {
			t.Fatal(err)
		}
		_, v1 := resolveAtOnce(t, r, nil)
		ch := goResolve(frCtx(t), r, v1)
		synctest.Wait()

		// After a good set: the file disappears, the set stays, the loss is logged once.
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		frBlocked(t, "after removing the file", ch)
		set, v := resolveAtOnce(t, r, nil)
		wantSet(t, "Resolve(nil) of a removed file", set, good)
		if *v != *v1 {
			t.Fatalf("Resolve(nil) of a removed file: version %q, want %q", v.Opaque, v1.Opaque)
		}
		if n := log.count("no such file"); n != 1 {
			t.Fatalf("the missing file was logged %d times, want once:\n%s", n, log)
		}

		// It returns with the same set: nothing wakes.
		if err := resolve.WriteEndpointsFile(path, good); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		frBlocked(t, "after restoring the same set", ch)
		if log.count("good again") != 1 {
			t.Fatalf("the restored file was not logged:\n%s", log)
		}

		// It changes: the change is applied.
		want := []endpoint.Endpoint{endpoint.TCP("b:1")}
		if err := resolve.WriteEndpointsFile(path, want); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		got := frReturned(t, "after a new set", ch)
		wantSet(t, "after a new set", got.set, want)
	})
}

func TestFileSizeLimit(t *testing.T) {
	t.Run("configured", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			const limit = 64
			r, path, log := frResolver(t, resolve.FileOptions{MaxSize: limit})
			small := frContent("tcp://a:1")
			frWrite(t, path, small)
			_, v1 := resolveAtOnce(t, r, nil)
			ch := goResolve(frCtx(t), r, v1)
			synctest.Wait()

			big := frContent("tcp://b:1", "tcp://b:2", "tcp://b:3", "tcp://b:4", "tcp://b:5", "tcp://b:6", "tcp://b:7")
			if len(big) <= limit {
				t.Fatalf("test file of %d bytes is not over the limit", len(big))
			}
			frWrite(t, path, big)
			time.Sleep(3 * time.Second)
			synctest.Wait()
			frBlocked(t, "after writing a file over the limit", ch)
			set, _ := resolveAtOnce(t, r, nil)
			wantSet(t, "Resolve(nil) of a file over the limit", set, []endpoint.Endpoint{endpoint.TCP("a:1")})
			if log.count("over the limit") != 1 {
				t.Fatalf("the size rejection was not logged once:\n%s", log)
			}

			// A fresh resolver of the big file has no good set: it returns the typed error.
			r2, err := resolve.File(path, resolve.FileOptions{MaxSize: limit})
			if err != nil {
				t.Fatal(err)
			}
			err = frResolveErr(t, r2, nil)
			var tl *resolve.FileTooLargeError
			if !errors.As(err, &tl) || !errors.Is(err, resolve.ErrBadFile) {
				t.Fatalf("error %v (%T), want a *FileTooLargeError matching ErrBadFile", err, err)
			}
			if tl.Limit != limit || tl.Size != int64(len(big)) || tl.Path != path {
				t.Fatalf("FileTooLargeError %+v, want size %d, limit %d, path %q", *tl, len(big), limit, path)
			}
			// Exactly at the limit is fine.
			frWrite(t, path, strings.Repeat("#", limit-len(frContent("tcp://c:1"))-1)+"\n"+frContent("tcp://c:1"))
			set, _ = resolveAtOnce(t, r2, nil)
			wantSet(t, "a file of exactly the limit", set, []endpoint.Endpoint{endpoint.TCP("c:1")})
		})
	})
	t.Run("default 1MiB", func(t *testing.T) {
		r, path, _ := frResolver(t, resolve.FileOptions{})
		body := frContent("tcp://a:1")
		pad := strings.Repeat("#", 1<<20-len(body)-1) + "\n"
		frWrite(t, path, pad+body)
		set, _, err := r.Resolve(testCtx(t), nil)
		if err != nil {
			t.Fatalf("Resolve(nil) of a file of exactly 1 MiB: %v", err)
		}
		wantSet(t, "a file of 1 MiB", set, []endpoint.Endpoint{endpoint.TCP("a:1")})

		frWrite(t, path, "#"+pad+body)
		r2, err := resolve.File(path, resolve.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = r2.Resolve(testCtx(t), nil)
		var tl *resolve.FileTooLargeError
		if !errors.As(err, &tl) || tl.Limit != 1<<20 || tl.Size != 1<<20+1 {
			t.Fatalf("Resolve(nil) of a file of 1 MiB + 1: error %v, want a *FileTooLargeError with limit 1 MiB", err)
		}
	})
}

func TestFileContextDone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, _ := frResolver(t, resolve.FileOptions{})

		// A done context wins, even over a missing file.
		done, cancel := context.WithCancel(frCtx(t))
		cancel()
		if _, _, err := r.Resolve(done, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("Resolve(cancelled ctx) error %v, want context.Canceled", err)
		}

		frWrite(t, path, frContent("tcp://a:1"))
		_, v1 := resolveAtOnce(t, r, nil)

		// Cancelled while blocked, between polls: it returns at once.
		ctx, cancel := context.WithCancel(frCtx(t))
		defer cancel()
		start := time.Now()
		ch := goResolve(ctx, r, v1)
		time.Sleep(2500 * time.Millisecond)
		synctest.Wait()
		frBlocked(t, "before cancel", ch)
		cancel()
		synctest.Wait()
		var res result
		select {
		case res = <-ch:
		default:
			t.Fatal("Resolve still blocked after its context was cancelled")
		}
		if !errors.Is(res.err, context.Canceled) || res.set != nil || res.v != nil {
			t.Fatalf("cancelled Resolve = %q, %v, %v; want context.Canceled alone", addrs(res.set), res.v, res.err)
		}
		if d := time.Since(start); d != 2500*time.Millisecond {
			t.Fatalf("cancelled Resolve returned after %v, want 2.5s (at the cancel)", d)
		}

		// A deadline between polls ends it at the deadline.
		dctx, dcancel := context.WithTimeout(t.Context(), 1700*time.Millisecond)
		defer dcancel()
		start = time.Now()
		_, _, err := r.Resolve(dctx, v1)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Resolve past its deadline: error %v, want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d != 1700*time.Millisecond {
			t.Fatalf("Resolve with a 1.7s deadline returned after %v", d)
		}

		// The resolver is unharmed.
		ch = goResolve(frCtx(t), r, v1)
		synctest.Wait()
		frWrite(t, path, frContent("tcp://b:1"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := frReturned(t, "after cancellations", ch)
		wantSet(t, "after cancellations", got.set, []endpoint.Endpoint{endpoint.TCP("b:1")})
	})
}

func TestFileConcurrentResolves(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r, path, _ := frResolver(t, resolve.FileOptions{})
		frWrite(t, path, frContent("tcp://a:1"))
		_, v1 := resolveAtOnce(t, r, nil)

		// Blocked Resolves started at different times, so their polls are not in step, and
		// Resolve(nil) callers in between.
		const n = 8
		chs := make([]<-chan result, n)
		for i := range chs {
			chs[i] = goResolve(frCtx(t), r, v1)
			time.Sleep(100 * time.Millisecond)
			if _, v := resolveAtOnce(t, r, nil); *v != *v1 {
				t.Fatalf("Resolve(nil) version %q before any change, want %q", v.Opaque, v1.Opaque)
			}
		}
		synctest.Wait()
		for i, ch := range chs {
			frBlocked(t, fmt.Sprintf("Resolve %d before the change", i), ch)
		}

		want := []endpoint.Endpoint{endpoint.TCP("b:1"), endpoint.TCP("b:2")}
		if err := resolve.WriteEndpointsFile(path, want); err != nil {
			t.Fatal(err)
		}
		// Within one poll interval every blocked Resolve has the new set, with one version.
		time.Sleep(time.Second)
		synctest.Wait()
		var v2 *resolve.Version
		for i, ch := range chs {
			got := frReturned(t, fmt.Sprintf("Resolve %d", i), ch)
			wantSet(t, fmt.Sprintf("Resolve %d", i), got.set, want)
			if v2 == nil {
				v2 = got.v
			}
			if *got.v != *v2 || *got.v == *v1 {
				t.Fatalf("Resolve %d version %q; want %q, as the others, and not %q", i, got.v.Opaque, v2.Opaque, v1.Opaque)
			}
		}
	})
}

// TestFileInPlaceRewritesNeverMix rewrites the file in place, a line per write, thousands of
// times, while readers resolve in a loop: every set they see must be one of the sets written,
// complete. Lines of every generation have the same length, so a read that mixed two
// generations would look well formed; its generations would differ.
func TestFileInPlaceRewritesNeverMix(t *testing.T) {
	const generations = 2000
	path := filepath.Join(t.TempDir(), "endpoints")
	size := func(g int) int { return 1 + g%5 }
	content := func(g int) []string {
		var lines []string
		for i := range size(g) {
			lines = append(lines, fmt.Sprintf("tcp://h%d.g%06d:80\n", i, g))
		}
		return append(lines, resolve.FileTrailer+"\n")
	}
	// check returns why set is not the complete set of one generation, or "".
	check := func(set []endpoint.Endpoint) string {
		if len(set) == 0 {
			return "empty set"
		}
		var g int
		if _, err := fmt.Sscanf(set[0].Address(), "tcp://h0.g%06d:80", &g); err != nil {
			return fmt.Sprintf("first address %q: %v", set[0].Address(), err)
		}
		var want []string
		for _, l := range content(g)[:size(g)] {
			want = append(want, strings.TrimSuffix(l, "\n"))
		}
		if got := addrs(set); !slices.Equal(got, want) {
			return fmt.Sprintf("set %q is not generation %d's %q", got, g, want)
		}
		return ""
	}
	if err := os.WriteFile(path, []byte(strings.Join(content(0), "")), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := resolve.File(path, resolve.FileOptions{PollInterval: time.Millisecond, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	set0, v0, err := r.Resolve(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if why := check(set0); why != "" {
		t.Fatal(why)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var bad []string
	seen := map[string]bool{}
	record := func(set []endpoint.Endpoint, v *resolve.Version) {
		mu.Lock()
		defer mu.Unlock()
		if why := check(set); why != "" && len(bad) < 5 {
			bad = append(bad, why)
		}
		seen[v.Opaque] = true
	}
	wg.Add(2)
	go func() { // follows versions, as call.Connect does
		defer wg.Done()
		v := v0
		for {
			set, nv, err := r.Resolve(ctx, v)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				t.Errorf("Resolve(%v): %v", v, err)
				return
			}
			record(set, nv)
			v = nv
		}
	}()
	go func() { // reads as fast as it can
		defer wg.Done()
		for ctx.Err() == nil {
			set, v, err := r.Resolve(ctx, nil)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				t.Errorf("Resolve(nil): %v", err)
				return
			}
			record(set, v)
		}
	}()

	writeErr := func() error {
		for g := 1; g <= generations; g++ {
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
			if err != nil {
				return err
			}
			for _, line := range content(g) {
				if _, err := f.WriteString(line); err != nil {
					f.Close()
					return err
				}
			}
			if err := f.Close(); err != nil {
				return err
			}
		}
		return nil
	}()
	if writeErr == nil {
		// The last generation is the current set once it is read.
		set, _, err := r.Resolve(ctx, nil)
		if err != nil {
			t.Errorf("Resolve(nil) after the writer finished: %v", err)
		} else if got := addrs(set); check(set) != "" || !strings.Contains(got[0], fmt.Sprintf(".g%06d:", generations)) {
			t.Errorf("Resolve(nil) after the writer finished = %q, want generation %d, complete", got, generations)
		}
	}
	cancel()
	wg.Wait()
	if writeErr != nil {
		t.Fatal(writeErr)
	}
	for _, why := range bad {
		t.Error(why)
	}
	if len(seen) < 2 {
		t.Errorf("readers saw %d versions while %d generations were written, want several", len(seen), generations)
	}
}

// TestFileConnectFollowsFile runs call.Connect with a file resolver against two servers on
// 127.0.0.1: calls reach the server the file names, and follow the file when a deployer
// rewrites it.
func TestFileConnectFollowsFile(t *testing.T) {
	const component = "filetest"
	key := call.MakeMethodKey(component, "Name")
	quiet := slog.New(slog.DiscardHandler)
	serve := func(name string) endpoint.Endpoint {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		hm := &call.HandlerMap{}
		hm.Set(component, "Name", func(context.Context, []byte) ([]byte, error) { return []byte(name), nil })
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- call.Serve(ctx, call.NetListener(l, hm), call.ServerOptions{Logger: quiet, DrainTimeout: -1})
		}()
		t.Cleanup(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				t.Errorf("server %s: Serve did not return within 15s of a hard stop", name)
			}
		})
		return endpoint.TCP(l.Addr().String())
	}
	a, b := serve("A"), serve("B")

	path := filepath.Join(t.TempDir(), "endpoints")
	if err := resolve.WriteEndpointsFile(path, []endpoint.Endpoint{a}); err != nil {
		t.Fatal(err)
	}
	r, err := resolve.File(path, resolve.FileOptions{PollInterval: 10 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	conn, err := call.Connect(ctx, r, call.ClientOptions{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	reply, err := conn.Call(ctx, key, nil, call.CallOptions{})
	if err != nil || string(reply) != "A" {
		t.Fatalf("first call = %q, %v; want A", reply, err)
	}

	if err := resolve.WriteEndpointsFile(path, []endpoint.Endpoint{b}); err != nil {
		t.Fatal(err)
	}
	// Wait, without sleeping, until the Connection has B ready and no longer resolves A.
	insp, ok := conn.(call.Inspectable)
	if !ok {
		t.Fatalf("%T does not implement call.Inspectable", conn)
	}
	for {
		st := insp.Status()
		bReady, aResolved := false, false
		for _, ep := range st.Endpoints {
			switch ep.Address {
			case b.Address():
				bReady = ep.State == call.EndpointReady
			case a.Address():
				aResolved = ep.State != call.EndpointDraining
			}
		}
		if bReady && !aResolved {
			break
		}
		select {
		case <-st.Changed:
		case <-ctx.Done():
			t.Fatalf("the Connection did not follow the file to B within 20s: %+v", st.Endpoints)
		}
	}
	for i := range 3 {
		reply, err := conn.Call(ctx, key, nil, call.CallOptions{})
		if err != nil || string(reply) != "B" {
			t.Fatalf("call %d after rewriting the file = %q, %v; want B", i, reply, err)
		}
	}
}

func ExampleFile() {
	dir, err := os.MkdirTemp("", "weft-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "cache.endpoints")

	// A deployer writes the list atomically, whenever it changes.
	err = resolve.WriteEndpointsFile(path, []endpoint.Endpoint{endpoint.TCP("10.0.0.2:8000"), endpoint.Unix("/run/cache.sock")})
	if err != nil {
		fmt.Println(err)
		return
	}
	content, err := os.ReadFile(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Print(string(content))

	// Clients pass the resolver to call.Connect, which follows the file.
	r, err := resolve.File(path, resolve.FileOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	set, _, err := r.Resolve(ctx, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, ep := range set {
		fmt.Println("resolved", ep.Address())
	}
	// Output:
	// # weft endpoints: one address per line; the file ends with the line "# end"
	// tcp://10.0.0.2:8000
	// unix:///run/cache.sock
	// # end
	// resolved tcp://10.0.0.2:8000
	// resolved unix:///run/cache.sock
}
