package runtime

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/weftrpc/weft/call"
	"go.opentelemetry.io/otel/trace"
)

type diagIface interface{ Ping(context.Context) error }

type diagImpl struct{ Implements[diagIface] }

func (*diagImpl) Ping(context.Context) error { return nil }

// TestDiagnosticsPage serves the page for a process with one local component whose name needs
// escaping, and checks the JSON and HTML forms.
func TestDiagnosticsPage(t *testing.T) {
	const name = `example.com/<script>alert(1)</script>/Diag`
	Register(Registration{
		Name: name, Iface: reflect.TypeFor[diagIface](), Impl: reflect.TypeFor[diagImpl](),
		LocalStub:   func(impl any, _ trace.Tracer) any { return impl },
		ClientStub:  func(call.Connection) any { return nil },
		AddHandlers: func(any, *call.HandlerMap) {},
	})
	t.Cleanup(func() { // other tests plan deployments from the registry
		registry.Lock()
		defer registry.Unlock()
		delete(registry.byName, name)
		delete(registry.byType, reflect.TypeFor[diagIface]())
	})
	w, err := newWiring(Config{Logger: slog.New(slog.DiscardHandler), DrainTimeout: time.Second}, newHealth(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.get(reflect.TypeFor[diagIface]()); err != nil {
		t.Fatal(err)
	}
	page := &diag{started: time.Now(), mode: "single", w: w}

	rec := httptest.NewRecorder()
	page.ServeHTTP(rec, httptest.NewRequest("GET", DiagnosticsPath+"?format=json", nil))
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("JSON content type %q", ct)
	}
	var d Diagnostics
	if err := json.Unmarshal(rec.Body.Bytes(), &d); err != nil {
		t.Fatalf("JSON page does not parse: %v\n%s", err, rec.Body)
	}
	if d.Mode != "single" || d.Process != "main" || len(d.Components) != 1 || d.Components[0].Name != name || d.Components[0].Where != "local" {
		t.Errorf("JSON page describes %+v, want the one local component", d)
	}

	rec = httptest.NewRecorder()
	page.ServeHTTP(rec, httptest.NewRequest("GET", DiagnosticsPath, nil))
	html := rec.Body.String()
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("HTML content type %q", ct)
	}
	if !strings.Contains(html, "<!DOCTYPE html>") || !strings.HasSuffix(strings.TrimSpace(html), "</html>") {
		t.Errorf("HTML page is not a whole document:\n%s", html)
	}
	if strings.Contains(html, "<script>") || !strings.Contains(html, "&lt;script&gt;alert(1)&lt;/script&gt;") {
		t.Errorf("HTML page does not escape the component's name:\n%s", html)
	}
}
