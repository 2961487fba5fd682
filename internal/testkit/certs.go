package testkit

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"testing"
	"time"
)

// CA is a certificate authority generated at test time: an ECDSA P-256 key and a self-signed
// certificate. Nothing it makes is ever written outside the directories tests give it.
//
// Validity is checked against the clock of whoever verifies: inside a testing/synctest bubble
// time starts at 2000-01-01. A CA is valid from 1999-12-31 (or an hour before its creation, if
// earlier) to ten years after its creation, so it works in and out of bubbles; issue leaf
// certificates where they are used, or give them explicit validity.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA returns a new CA. It fails t on error.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testkit: generating CA key: %v", err)
	}
	now := time.Now()
	notBefore := time.Date(1999, 12, 31, 0, 0, 0, 0, time.UTC)
	if early := now.Add(-time.Hour); early.Before(notBefore) {
		notBefore = early
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "weft test CA", Organization: []string{"weft testkit"}},
		NotBefore:             notBefore,
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("testkit: creating CA certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("testkit: parsing CA certificate: %v", err)
	}
	return &CA{Cert: cert, Key: key}
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatalf("testkit: generating serial number: %v", err)
	}
	return n
}

// CertOptions describes a certificate for [CA.Issue].
type CertOptions struct {
	CommonName string
	DNSNames   []string
	IPs        []net.IP
	// NotBefore and NotAfter bound the validity; a zero value means an hour before, or a day
	// after, the time of issue.
	NotBefore, NotAfter time.Time
	// Client makes a client certificate (extended key usage client auth); otherwise it is a
	// server certificate (server auth).
	Client bool
	// Both gives the certificate both extended key usages, whatever Client says.
	Both bool
}

// Issue returns a new certificate and ECDSA P-256 key signed by ca, with its Leaf set. The chain
// holds only the leaf: peers verify it against [CA.Pool]. It fails t on error.
func (ca *CA) Issue(t testing.TB, o CertOptions) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testkit: generating key: %v", err)
	}
	now := time.Now()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = now.Add(24 * time.Hour)
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	switch {
	case o.Both:
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	case o.Client:
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: o.CommonName},
		DNSNames:              o.DNSNames,
		IPAddresses:           o.IPs,
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           usage,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatalf("testkit: issuing certificate %q: %v", o.CommonName, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("testkit: parsing certificate %q: %v", o.CommonName, err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// Pool returns a new pool holding only ca's certificate.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// CertPEM returns ca's certificate in PEM form.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// WriteCAFile writes ca's certificate in PEM form to a new file in dir and returns its path. It
// fails t on error.
func (ca *CA) WriteCAFile(t testing.TB, dir string) string {
	t.Helper()
	return writeTemp(t, dir, "ca-*.pem", ca.CertPEM())
}

// WriteFiles writes cert's chain and private key in PEM form (the key as PKCS #8) to two new
// files in dir, readable by tls.LoadX509KeyPair, and returns their paths. It fails t on error.
func (ca *CA) WriteFiles(t testing.TB, dir string, cert tls.Certificate) (certFile, keyFile string) {
	t.Helper()
	var certPEM []byte
	for _, der := range cert.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatalf("testkit: encoding private key: %v", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return writeTemp(t, dir, "cert-*.pem", certPEM), writeTemp(t, dir, "key-*.pem", keyPEM)
}

func writeTemp(t testing.TB, dir, pattern string, data []byte) string {
	t.Helper()
	f, err := os.CreateTemp(dir, pattern) // mode 0600
	if err != nil {
		t.Fatalf("testkit: %v", err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("testkit: writing %s: %v", f.Name(), err)
	}
	return f.Name()
}

// ServerTLS returns a server configuration presenting serverCert that requires client
// certificates and verifies them against ca, with TLS 1.2 at least.
func ServerTLS(t testing.TB, ca *CA, serverCert tls.Certificate) *tls.Config {
	t.Helper()
	return &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
		MinVersion:   tls.VersionTLS12,
	}
}

// ClientTLS returns a client configuration presenting clientCert that verifies the server against
// ca under serverName, with TLS 1.2 at least.
func ClientTLS(t testing.TB, ca *CA, clientCert tls.Certificate, serverName string) *tls.Config {
	t.Helper()
	return &tls.Config{
		Certificates: []tls.Certificate{clientCert},
		RootCAs:      ca.Pool(),
		ServerName:   serverName,
		MinVersion:   tls.VersionTLS12,
	}
}
