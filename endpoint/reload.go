package endpoint

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrKeyPair is the category of the errors of [NewCertReloader], [CertReloader.Reload] and
// [CertReloader.Err]: a certificate/key pair that could not be read or did not form a valid
// pair. The error also wraps its cause (for example fs.ErrNotExist). Test for it with errors.Is.
var ErrKeyPair = errors.New("endpoint: cannot load certificate/key pair")

// maxPEMFileSize bounds what a [CertReloader] reads of a certificate or key file.
const maxPEMFileSize = 1 << 20

// ReloadOptions configures a [CertReloader]. The zero value is ready to use.
type ReloadOptions struct {
	// CheckInterval is the least time between two checks of the files. The files are checked
	// when a certificate is requested (a TLS handshake), never in the background. If zero, 10 s.
	// If negative, the files are checked on every request.
	CheckInterval time.Duration

	// Logger receives one warning per distinct failure to load the files and one message per
	// pair loaded after the first. Logs name the files and the certificate (serial number,
	// subject, expiry), never key material. If nil, [slog.Default].
	Logger *slog.Logger
}

func (o ReloadOptions) withDefaults() ReloadOptions {
	if o.CheckInterval == 0 {
		o.CheckInterval = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// A CertReloader serves a TLS certificate and its private key from two PEM files and follows
// changes to them, so that certificates can be rotated without a restart: plug its
// [CertReloader.GetCertificate] into a server's tls.Config, or its
// [CertReloader.GetClientCertificate] into a client's (for example the config of [MTLS]).
// New handshakes present the new pair; connections already open keep the one they were
// established with.
//
// The files are checked when a certificate is requested, at most once per
// [ReloadOptions.CheckInterval]; there is no background goroutine. A check reads both files and
// compares their contents (by hash) with those of the pair in use: modification times and sizes
// are not trusted, since a file rewritten within its file system's timestamp granularity, or
// with a certificate of the same length, keeps both. A new pair replaces the old one only if
//
//   - both files could be read, are regular files and hold at most 1 MiB each;
//   - every PEM block of each file is complete, with nothing but white space after the last
//     one (a file caught half written is rejected);
//   - [tls.X509KeyPair] accepts them: the key matches the certificate;
//   - every certificate of the chain parses.
//
// Otherwise the last good pair stays in use and the failure is reported by
// [CertReloader.Err] and logged once. Files written one after the other (the certificate, then
// the key) can be briefly mismatched: that state is rejected and the pair is picked up by the
// next check after both are complete. A file truncated exactly at the end of a PEM block (a
// chain missing its last certificates) cannot be told from a complete one, so writers should
// replace files atomically (write a temporary file, then rename it over the old one).
//
// Only the certificate and key are reloaded: the roots that verify the peer (RootCAs,
// ClientCAs) are whatever the tls.Config holds, and stay as they are.
//
// A CertReloader is safe for concurrent use.
type CertReloader struct {
	certFile, keyFile string
	opts              ReloadOptions

	// state is what the last check found; it is replaced as a whole, under mu.
	state atomic.Pointer[reloadState]

	// mu serializes checks of the files.
	mu sync.Mutex
	// guarded by mu
	nextCheck time.Time // no check before this time (when CheckInterval > 0)
	failed    string    // identifies the failure logged last; "" once the files load
}

// reloadState is the pair in use and the error of the last check.
type reloadState struct {
	pair *keyPair
	err  error // nil if the files hold the pair in use
}

// keyPair is a loaded certificate/key pair and a digest of the files it came from.
type keyPair struct {
	cert *tls.Certificate
	sum  pairSum
}

// pairSum is the SHA-256 digests of a certificate file and a key file.
type pairSum [2][sha256.Size]byte

// NewCertReloader returns a CertReloader serving the pair in certFile (the certificate, then
// any intermediate certificates, PEM-encoded) and keyFile (its PEM-encoded private key). It
// loads the pair at once, with the checks described on [CertReloader], and returns an error
// wrapping [ErrKeyPair] and its cause if it cannot.
func NewCertReloader(certFile, keyFile string, opts ReloadOptions) (*CertReloader, error) {
	r := &CertReloader{certFile: certFile, keyFile: keyFile, opts: opts.withDefaults()}
	pair, err := r.load()
	if err != nil {
		return nil, err
	}
	r.state.Store(&reloadState{pair: pair})
	r.nextCheck = time.Now().Add(r.opts.CheckInterval)
	return r, nil
}

// GetCertificate returns the current certificate, after checking the files if the check
// interval has passed. Its signature is that of tls.Config.GetCertificate; it never returns an
// error, since a reloader always holds a good pair.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.get(), nil
}

// GetClientCertificate returns the current certificate, after checking the files if the check
// interval has passed. Its signature is that of tls.Config.GetClientCertificate; it never
// returns an error.
func (r *CertReloader) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return r.get(), nil
}

// Current returns the certificate in use, without checking the files. Its Leaf is set. The
// caller must not modify it.
func (r *CertReloader) Current() *tls.Certificate {
	return r.state.Load().pair.cert
}

// NotAfter returns the end of the validity of the certificate in use, for monitoring expiry.
func (r *CertReloader) NotAfter() time.Time {
	return r.Current().Leaf.NotAfter
}

// Err returns the error of the last check of the files (wrapping [ErrKeyPair]) while they hold
// something other than a valid pair, or nil if they hold the pair in use. A non-nil Err means
// the last good pair is still being served.
func (r *CertReloader) Err() error {
	return r.state.Load().err
}

// Reload checks the files now, whatever the check interval, and returns the error of that
// check, as [CertReloader.Err] would. It is meant for an operator's signal (such as SIGHUP).
// On an error the last good pair stays in use.
func (r *CertReloader) Reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.checkLocked(time.Now())
	return r.state.Load().err
}

// get returns the pair in use after checking the files if the interval has passed.
func (r *CertReloader) get() *tls.Certificate {
	r.mu.Lock()
	if now := time.Now(); r.opts.CheckInterval < 0 || !now.Before(r.nextCheck) {
		r.checkLocked(now)
	}
	r.mu.Unlock()
	return r.Current()
}

// checkLocked reads the files and replaces the pair in use if they hold a new valid pair.
//
// REQUIRES: r.mu is held.
func (r *CertReloader) checkLocked(now time.Time) {
	r.nextCheck = now.Add(r.opts.CheckInterval)
	cur := r.state.Load()
	certPEM, keyPEM, err := r.read()
	if err != nil {
		r.failLocked(cur, "read: "+err.Error(), err)
		return
	}
	sum := pairSum{sha256.Sum256(certPEM), sha256.Sum256(keyPEM)}
	if sum == cur.pair.sum {
		if cur.err != nil {
			r.state.Store(&reloadState{pair: cur.pair})
		}
		r.failed = ""
		return
	}
	failKey := fmt.Sprintf("content: %x", sum)
	if failKey == r.failed {
		return // the same bad contents as last time: already reported and logged
	}
	pair, err := r.parse(certPEM, keyPEM)
	if err != nil {
		r.failLocked(cur, failKey, err)
		return
	}
	pair.sum = sum
	r.state.Store(&reloadState{pair: pair})
	r.failed = ""
	leaf := pair.cert.Leaf
	r.opts.Logger.Info("weft: loaded a new TLS certificate",
		slog.String("cert", r.certFile), slog.String("key", r.keyFile),
		slog.String("serial", leaf.SerialNumber.Text(16)), slog.String("subject", leaf.Subject.String()),
		slog.Time("not_after", leaf.NotAfter))
}

// failLocked records err as the result of a check, keeping the pair in use, and logs it unless
// the failure identified by key was the last one logged.
//
// REQUIRES: r.mu is held.
func (r *CertReloader) failLocked(cur *reloadState, key string, err error) {
	r.state.Store(&reloadState{pair: cur.pair, err: err})
	if key == r.failed {
		return
	}
	r.failed = key
	leaf := cur.pair.cert.Leaf
	r.opts.Logger.Warn("weft: cannot reload TLS certificate; still serving the last good one",
		slog.Any("err", err), slog.String("serial", leaf.SerialNumber.Text(16)),
		slog.Time("not_after", leaf.NotAfter))
}

// load reads and parses the files.
func (r *CertReloader) load() (*keyPair, error) {
	certPEM, keyPEM, err := r.read()
	if err != nil {
		return nil, err
	}
	pair, err := r.parse(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	pair.sum = pairSum{sha256.Sum256(certPEM), sha256.Sum256(keyPEM)}
	return pair, nil
}

// read returns the contents of the certificate and key files.
func (r *CertReloader) read() (certPEM, keyPEM []byte, err error) {
	if certPEM, err = readPEMFile(r.certFile); err != nil {
		return nil, nil, fmt.Errorf("%w: reading certificate: %w", ErrKeyPair, err)
	}
	if keyPEM, err = readPEMFile(r.keyFile); err != nil {
		return nil, nil, fmt.Errorf("%w: reading key: %w", ErrKeyPair, err)
	}
	return certPEM, keyPEM, nil
}

// parse builds a pair from the contents of the files, checking them as [CertReloader] says.
// Errors never quote the key file's contents.
func (r *CertReloader) parse(certPEM, keyPEM []byte) (*keyPair, error) {
	if err := checkPEM(certPEM); err != nil {
		return nil, fmt.Errorf("%w: certificate %s: %w", ErrKeyPair, r.certFile, err)
	}
	if err := checkPEM(keyPEM); err != nil {
		return nil, fmt.Errorf("%w: key %s: %w", ErrKeyPair, r.keyFile, err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %s and %s: %w", ErrKeyPair, r.certFile, r.keyFile, err)
	}
	for i, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: certificate %d of %s: %w", ErrKeyPair, i, r.certFile, err)
		}
		if i == 0 && cert.Leaf == nil {
			cert.Leaf = c
		}
	}
	return &keyPair{cert: &cert}, nil
}

// readPEMFile reads the regular file at path, of at most maxPEMFileSize bytes.
func readPEMFile(path string) ([]byte, error) {
	// Stat first: opening a named pipe for reading would block until a writer appears.
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (mode %v)", path, fi.Mode())
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPEMFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxPEMFileSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxPEMFileSize)
	}
	return b, nil
}

// checkPEM returns an error unless b holds at least one PEM block and nothing but white space
// after its last complete block: a file cut in the middle of a block ends with the start of
// that block, which pem.Decode leaves undecoded.
func checkPEM(b []byte) error {
	n := 0
	rest := b
	for {
		block, r := pem.Decode(rest)
		if block == nil {
			break
		}
		n++
		rest = r
	}
	rest = bytes.TrimSpace(rest)
	switch {
	case len(rest) == 0 && n == 0:
		return errors.New("file is empty")
	case len(rest) == 0:
		return nil
	case bytes.Contains(rest, []byte("-----BEGIN")):
		return errors.New("incomplete PEM block (a partly written file?)")
	case n == 0:
		return errors.New("no PEM data")
	default:
		return errors.New("unexpected data after the last PEM block (a partly written file?)")
	}
}
