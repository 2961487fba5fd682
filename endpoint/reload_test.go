package endpoint_test

// Tests of CertReloader (RELIABILITY.md scenario 20 at the level of files): initial load
// errors, rotation after the check interval under testing/synctest (the file system is real
// inside the bubble, its clock is not), pairs caught half written that are never loaded, and
// concurrent callers while the files are rewritten. Identifiers start with "rl".

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/weftrpc/weft/endpoint"
	"github.com/weftrpc/weft/internal/testkit"
)

// rlPair is a certificate and its key in PEM form, as files hold them.
type rlPair struct {
	name      string
	cert, key []byte
	serial    *big.Int
}

// rlIssue issues a certificate for cn by ca and returns it in PEM form.
func rlIssue(t testing.TB, ca *testkit.CA, cn string) rlPair {
	t.Helper()
	c := ca.Issue(t, testkit.CertOptions{CommonName: cn, DNSNames: []string{cn}})
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatalf("encoding key: %v", err)
	}
	return rlPair{
		name:   cn,
		cert:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}),
		key:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		serial: c.Leaf.SerialNumber,
	}
}

// rlFiles are the paths of a certificate file and a key file in a test's directory.
type rlFiles struct{ cert, key string }

func rlNewFiles(t testing.TB) rlFiles {
	dir := t.TempDir()
	return rlFiles{cert: filepath.Join(dir, "tls.crt"), key: filepath.Join(dir, "tls.key")}
}

// write writes cert and key over the files; a nil slice removes the file instead.
func (f rlFiles) write(t testing.TB, cert, key []byte) {
	t.Helper()
	for _, w := range []struct {
		path string
		b    []byte
	}{{f.cert, cert}, {f.key, key}} {
		if w.b == nil {
			if err := os.Remove(w.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(w.path, w.b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// rlLogs collects what a reloader logs, in text form.
type rlLogs struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *rlLogs) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *rlLogs) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (l *rlLogs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// count returns the number of records logged at level ("INFO", "WARN").
func (l *rlLogs) count(level string) int {
	return strings.Count(l.String(), "level="+level+" ")
}

// rlConsistent fails t unless c's private key belongs to its leaf certificate.
func rlConsistent(t testing.TB, what string, c *tls.Certificate) {
	t.Helper()
	if c == nil || c.Leaf == nil {
		t.Fatalf("%s: got certificate %v, want one with its Leaf set", what, c)
	}
	pub, ok := c.PrivateKey.(crypto.Signer)
	if !ok {
		t.Fatalf("%s: private key of type %T is not a crypto.Signer", what, c.PrivateKey)
	}
	if !pub.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(c.Leaf.PublicKey) {
		t.Fatalf("%s: the private key does not belong to certificate %x", what, c.Leaf.SerialNumber)
	}
}

// rlWantServed checks that r serves p to servers and clients, and that Current and NotAfter
// agree.
func rlWantServed(t testing.TB, what string, r *endpoint.CertReloader, p rlPair) {
	t.Helper()
	sc, err := r.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatalf("%s: GetCertificate: %v", what, err)
	}
	cc, err := r.GetClientCertificate(&tls.CertificateRequestInfo{})
	if err != nil {
		t.Fatalf("%s: GetClientCertificate: %v", what, err)
	}
	for _, c := range []*tls.Certificate{sc, cc, r.Current()} {
		rlConsistent(t, what, c)
		if got := c.Leaf.SerialNumber; got.Cmp(p.serial) != 0 {
			t.Fatalf("%s: served certificate %x (%s), want %x (%s)", what, got, c.Leaf.Subject.CommonName, p.serial, p.name)
		}
	}
	if got, want := r.NotAfter(), r.Current().Leaf.NotAfter; !got.Equal(want) {
		t.Errorf("%s: NotAfter() = %v, want %v", what, got, want)
	}
}

func TestCertReloaderLoads(t *testing.T) {
	ca := testkit.NewCA(t)
	p := rlIssue(t, ca, "a")
	f := rlNewFiles(t)
	f.write(t, p.cert, p.key)
	var logs rlLogs
	r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{Logger: logs.logger()})
	if err != nil {
		t.Fatalf("NewCertReloader: %v", err)
	}
	rlWantServed(t, "initial pair", r, p)
	if err := r.Err(); err != nil {
		t.Errorf("Err() = %v, want nil", err)
	}
	if got := r.Current().Leaf.Subject.CommonName; got != "a" {
		t.Errorf("Current().Leaf common name %q, want %q", got, "a")
	}
	if s := logs.String(); s != "" {
		t.Errorf("loading the initial pair logged %q, want nothing", s)
	}
}

// A pair that cannot be loaded at construction is an error wrapping ErrKeyPair and its cause,
// naming the file at fault.
func TestCertReloaderInitialLoadErrors(t *testing.T) {
	ca := testkit.NewCA(t)
	a, b := rlIssue(t, ca, "a"), rlIssue(t, ca, "b")
	half := func(x []byte) []byte { return x[:len(x)/2] }
	tests := []struct {
		name      string
		cert, key []byte // nil: the file does not exist
		certDir   bool   // the certificate path is a directory
		notExist  bool   // the error wraps fs.ErrNotExist
		mentions  string // "cert", "key" or "both": the file names the error includes
	}{
		{name: "missing_cert", key: a.key, notExist: true, mentions: "cert"},
		{name: "missing_key", cert: a.cert, notExist: true, mentions: "key"},
		{name: "missing_both", notExist: true, mentions: "cert"},
		{name: "cert_is_a_directory", key: a.key, certDir: true, mentions: "cert"},
		{name: "empty_cert", cert: []byte{}, key: a.key, mentions: "cert"},
		{name: "garbage_cert", cert: []byte("this is not a certificate\n"), key: a.key, mentions: "cert"},
		{name: "garbage_key", cert: a.cert, key: []byte("\x00\x01\x02 not a key"), mentions: "key"},
		{name: "truncated_cert", cert: half(a.cert), key: a.key, mentions: "cert"},
		{name: "truncated_key", cert: a.cert, key: half(a.key), mentions: "key"},
		{name: "chain_with_truncated_intermediate", cert: append(bytes.Clone(a.cert), half(ca.CertPEM())...), key: a.key, mentions: "cert"},
		{name: "mismatched_pair", cert: a.cert, key: b.key, mentions: "both"},
		{name: "key_file_holds_the_cert", cert: a.cert, key: a.cert, mentions: "both"},
		{name: "cert_file_holds_the_key", cert: a.key, key: a.key, mentions: "both"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := rlNewFiles(t)
			f.write(t, tt.cert, tt.key)
			if tt.certDir {
				if err := os.Mkdir(f.cert, 0o700); err != nil {
					t.Fatal(err)
				}
			}
			var logs rlLogs
			r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{Logger: logs.logger()})
			if err == nil {
				t.Fatalf("NewCertReloader succeeded (serving %x), want an error", r.Current().Leaf.SerialNumber)
			}
			if r != nil {
				t.Errorf("NewCertReloader returned a reloader with its error %v", err)
			}
			t.Logf("error: %v", err)
			if !errors.Is(err, endpoint.ErrKeyPair) {
				t.Errorf("error %q does not match ErrKeyPair", err)
			}
			if got := errors.Is(err, fs.ErrNotExist); got != tt.notExist {
				t.Errorf("errors.Is(%q, fs.ErrNotExist) = %v, want %v", err, got, tt.notExist)
			}
			if (tt.mentions == "cert" || tt.mentions == "both") && !strings.Contains(err.Error(), f.cert) {
				t.Errorf("error %q does not name the certificate file %s", err, f.cert)
			}
			if (tt.mentions == "key" || tt.mentions == "both") && !strings.Contains(err.Error(), f.key) {
				t.Errorf("error %q does not name the key file %s", err, f.key)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Errorf("error %q quotes key material", err)
			}
		})
	}
}

// Under the default interval (10 s), a new pair is served once the interval has passed since
// the last check, and not before; the contents decide, even with the old modification times
// and sizes; nothing happens without a request (Current does not check).
func TestCertReloaderRotation(t *testing.T) {
	ca := testkit.NewCA(t)
	p1, p2, p3, p4 := rlIssue(t, ca, "p1"), rlIssue(t, ca, "p2"), rlIssue(t, ca, "p3"), rlIssue(t, ca, "p4")
	synctest.Test(t, func(t *testing.T) {
		f := rlNewFiles(t)
		f.write(t, p1.cert, p1.key)
		var logs rlLogs
		r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{Logger: logs.logger()})
		if err != nil {
			t.Fatalf("NewCertReloader: %v", err)
		}
		rlWantServed(t, "initial", r, p1)

		// Rewrite the files, then give them back their old modification times.
		var old []fs.FileInfo
		for _, p := range []string{f.cert, f.key} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			old = append(old, fi)
		}
		f.write(t, p2.cert, p2.key)
		for i, p := range []string{f.cert, f.key} {
			if err := os.Chtimes(p, time.Time{}, old[i].ModTime()); err != nil {
				t.Fatal(err)
			}
			if fi, err := os.Stat(p); err != nil || fi.Size() != old[i].Size() {
				t.Logf("%s changed size on rotation (%d to %d bytes): the test is weaker", p, old[i].Size(), fi.Size())
			}
		}

		time.Sleep(9 * time.Second)
		rlWantServed(t, "9s after construction", r, p1)
		time.Sleep(time.Second)
		rlWantServed(t, "10s after construction", r, p2)
		if err := r.Err(); err != nil {
			t.Errorf("Err() after rotation = %v, want nil", err)
		}

		// The check just made sets the next one 10 s later.
		f.write(t, p3.cert, p3.key)
		time.Sleep(9 * time.Second)
		rlWantServed(t, "9s after the last check", r, p2)
		time.Sleep(time.Second)
		rlWantServed(t, "10s after the last check", r, p3)

		// Without requests nothing is read.
		f.write(t, p4.cert, p4.key)
		time.Sleep(time.Minute)
		if got := r.Current().Leaf.SerialNumber; got.Cmp(p3.serial) != 0 {
			t.Errorf("Current() without requests: %x, want still p3 (%x)", got, p3.serial)
		}
		rlWantServed(t, "a request a minute later", r, p4)

		if n := logs.count("INFO"); n != 3 {
			t.Errorf("logged %d INFO records for 3 rotations, want 3:\n%s", n, logs.String())
		}
		if n := logs.count("WARN"); n != 0 {
			t.Errorf("logged %d warnings, want none:\n%s", n, logs.String())
		}
	})
}

// A negative interval checks on every request.
func TestCertReloaderNegativeIntervalChecksEveryRequest(t *testing.T) {
	ca := testkit.NewCA(t)
	p1, p2 := rlIssue(t, ca, "p1"), rlIssue(t, ca, "p2")
	synctest.Test(t, func(t *testing.T) {
		f := rlNewFiles(t)
		f.write(t, p1.cert, p1.key)
		r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{CheckInterval: -1, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatalf("NewCertReloader: %v", err)
		}
		f.write(t, p2.cert, p2.key)
		rlWantServed(t, "at once", r, p2) // no bubble time has passed
	})
}

// Reload checks at once, whatever the interval, and reports the result.
func TestCertReloaderReload(t *testing.T) {
	ca := testkit.NewCA(t)
	p1, p2 := rlIssue(t, ca, "p1"), rlIssue(t, ca, "p2")
	synctest.Test(t, func(t *testing.T) {
		f := rlNewFiles(t)
		f.write(t, p1.cert, p1.key)
		r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{CheckInterval: time.Hour, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatalf("NewCertReloader: %v", err)
		}
		f.write(t, p2.cert, p1.key)
		if err := r.Reload(); !errors.Is(err, endpoint.ErrKeyPair) {
			t.Errorf("Reload of a mismatched pair = %v, want an error matching ErrKeyPair", err)
		}
		rlWantServed(t, "after a failed Reload", r, p1)
		f.write(t, p2.cert, p2.key)
		rlWantServed(t, "within the interval", r, p1)
		if err := r.Reload(); err != nil {
			t.Errorf("Reload of a good pair = %v, want nil", err)
		}
		rlWantServed(t, "after Reload", r, p2)
	})
}

// Pairs that are incomplete or mismatched are never loaded: the last good pair keeps being
// served, Err reports the failure, and each distinct failure is logged once, without key
// material. When the files hold the pair in use again, Err is nil. A certificate written
// before its key is picked up at the first check after both are complete.
func TestCertReloaderRejectsIncompletePairs(t *testing.T) {
	ca := testkit.NewCA(t)
	p1, p2, p3 := rlIssue(t, ca, "p1"), rlIssue(t, ca, "p2"), rlIssue(t, ca, "p3")
	half := func(x []byte) []byte { return bytes.Clone(x[:len(x)/2]) }
	states := []struct {
		name      string
		cert, key []byte // nil: the file is removed
		notExist  bool
	}{
		{name: "truncated_cert", cert: half(p2.cert), key: p2.key},
		{name: "cert_cut_before_its_end_line", cert: p2.cert[:bytes.LastIndex(p2.cert, []byte("-----END"))], key: p2.key},
		{name: "new_cert_with_the_old_key", cert: p2.cert, key: p1.key},
		{name: "new_key_without_its_cert", cert: p1.cert, key: p2.key},
		{name: "truncated_key", cert: p2.cert, key: half(p2.key)},
		{name: "chain_with_truncated_intermediate", cert: append(bytes.Clone(p2.cert), half(ca.CertPEM())...), key: p2.key},
		{name: "empty_cert", cert: []byte{}, key: p2.key},
		{name: "empty_key", cert: p2.cert, key: []byte{}},
		{name: "garbage_cert", cert: []byte("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"), key: p2.key},
		{name: "missing_cert", key: p2.key, notExist: true},
		{name: "missing_key", cert: p2.cert, notExist: true},
	}
	synctest.Test(t, func(t *testing.T) {
		const interval = time.Second
		f := rlNewFiles(t)
		f.write(t, p1.cert, p1.key)
		var logs rlLogs
		r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{CheckInterval: interval, Logger: logs.logger()})
		if err != nil {
			t.Fatalf("NewCertReloader: %v", err)
		}
		warns := 0
		for _, s := range states {
			f.write(t, s.cert, s.key)
			for i := range 3 { // the same bad files over three checks: one warning
				time.Sleep(interval)
				rlWantServed(t, fmt.Sprintf("%s, check %d", s.name, i), r, p1)
				err := r.Err()
				if !errors.Is(err, endpoint.ErrKeyPair) {
					t.Fatalf("%s: Err() = %v, want an error matching ErrKeyPair", s.name, err)
				}
				if got := errors.Is(err, fs.ErrNotExist); got != s.notExist {
					t.Errorf("%s: errors.Is(%q, fs.ErrNotExist) = %v, want %v", s.name, err, got, s.notExist)
				}
			}
			warns++
			if n := logs.count("WARN"); n != warns {
				t.Fatalf("%s: %d warnings logged so far, want %d (one per distinct failure):\n%s", s.name, n, warns, logs.String())
			}
			// Back to the pair in use: no error, nothing logged.
			f.write(t, p1.cert, p1.key)
			time.Sleep(interval)
			rlWantServed(t, s.name+", restored", r, p1)
			if err := r.Err(); err != nil {
				t.Errorf("%s: Err() with the files restored = %v, want nil", s.name, err)
			}
		}
		if n := logs.count("INFO"); n != 0 {
			t.Errorf("logged %d INFO records, want none (no pair was loaded):\n%s", n, logs.String())
		}

		// A rotation written file by file: the new certificate with the old key is rejected;
		// once the key follows, the next check loads the pair.
		f.write(t, p2.cert, p1.key)
		time.Sleep(interval)
		rlWantServed(t, "certificate written, key not yet", r, p1)
		f.write(t, p2.cert, p2.key)
		rlWantServed(t, "key written, within the interval", r, p1)
		time.Sleep(interval)
		rlWantServed(t, "both written", r, p2)
		if err := r.Err(); err != nil {
			t.Errorf("Err() after the rotation completed = %v, want nil", err)
		}

		// A failure logged before a successful load is logged again if it recurs.
		f.write(t, half(p3.cert), p3.key)
		time.Sleep(interval)
		rlWantServed(t, "p3 half written", r, p2)
		f.write(t, p3.cert, p3.key)
		time.Sleep(interval)
		rlWantServed(t, "p3 complete", r, p3)

		out := logs.String()
		if n, want := logs.count("WARN"), len(states)+2; n != want {
			t.Errorf("%d warnings logged, want %d:\n%s", n, want, out)
		}
		if n := logs.count("INFO"); n != 2 {
			t.Errorf("%d INFO records logged, want 2 (p2, p3):\n%s", n, out)
		}
		if strings.Contains(out, "PRIVATE KEY") {
			t.Errorf("the logs contain key material:\n%s", out)
		}
		for _, p := range []rlPair{p1, p2, p3} {
			block, _ := pem.Decode(p.key)
			b64 := strings.ReplaceAll(string(p.key), "\n", "")
			if block == nil || strings.Contains(out, b64[40:80]) {
				t.Errorf("the logs contain %s's key:\n%s", p.name, out)
			}
		}
	})
}

// Concurrent callers, while the files are rewritten in place (not atomically) with a reloader
// that checks on every request: every certificate served is a consistent pair from those
// written, never a mix or a partial read.
func TestCertReloaderConcurrent(t *testing.T) {
	ca := testkit.NewCA(t)
	pairs := []rlPair{rlIssue(t, ca, "p0"), rlIssue(t, ca, "p1"), rlIssue(t, ca, "p2"), rlIssue(t, ca, "p3")}
	known := map[string]bool{}
	for _, p := range pairs {
		known[p.serial.String()] = true
	}
	f := rlNewFiles(t)
	f.write(t, pairs[0].cert, pairs[0].key)
	r, err := endpoint.NewCertReloader(f.cert, f.key, endpoint.ReloadOptions{CheckInterval: -1, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("NewCertReloader: %v", err)
	}

	const readers, reads, rewrites = 8, 150, 60
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for i := range readers {
		wg.Go(func() {
			for j := range reads {
				var c *tls.Certificate
				switch (i + j) % 3 {
				case 0:
					c, _ = r.GetCertificate(&tls.ClientHelloInfo{})
				case 1:
					c, _ = r.GetClientCertificate(&tls.CertificateRequestInfo{})
				default:
					c = r.Current()
					_ = r.NotAfter()
					_ = r.Err()
				}
				if c == nil || c.Leaf == nil || !known[c.Leaf.SerialNumber.String()] {
					errs <- fmt.Errorf("reader %d: served an unknown certificate %v", i, c)
					return
				}
				pub := c.PrivateKey.(crypto.Signer).Public().(interface{ Equal(crypto.PublicKey) bool })
				if !pub.Equal(c.Leaf.PublicKey) {
					errs <- fmt.Errorf("reader %d: served certificate %x with another pair's key", i, c.Leaf.SerialNumber)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for i := range rewrites {
			p := pairs[i%len(pairs)]
			if err := os.WriteFile(f.cert, p.cert, 0o600); err != nil {
				errs <- err
				return
			}
			if err := os.WriteFile(f.key, p.key, 0o600); err != nil {
				errs <- err
				return
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	last := pairs[(rewrites-1)%len(pairs)]
	if err := r.Reload(); err != nil {
		t.Errorf("Reload after the last rewrite = %v, want nil", err)
	}
	rlWantServed(t, "after the rewrites", r, last)
}
