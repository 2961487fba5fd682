package call_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/embedded"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/internal/testkit"
)

// recTracer records the spans it starts.
type recTracer struct {
	embedded.Tracer
	mu    sync.Mutex
	next  byte
	spans []*recSpan
}

type recSpan struct {
	embedded.Span
	name   string
	kind   trace.SpanKind
	parent trace.SpanContext
	sc     trace.SpanContext
	mu     sync.Mutex
	ended  bool
	status codes.Code
}

func (t *recTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	cfg := trace.NewSpanStartConfig(opts...)
	parent := trace.SpanContextFromContext(ctx)
	t.mu.Lock()
	t.next++
	tid := parent.TraceID()
	if !tid.IsValid() {
		tid = trace.TraceID{0: 0xEE, 15: t.next}
	}
	s := &recSpan{
		name:   name,
		kind:   cfg.SpanKind(),
		parent: parent,
		sc:     trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: trace.SpanID{0: 0x5A, 7: t.next}, TraceFlags: trace.FlagsSampled}),
	}
	t.spans = append(t.spans, s)
	t.mu.Unlock()
	return trace.ContextWithSpan(ctx, s), s
}

func (t *recTracer) recorded() []*recSpan {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*recSpan(nil), t.spans...)
}

func (s *recSpan) End(...trace.SpanEndOption)            { s.mu.Lock(); s.ended = true; s.mu.Unlock() }
func (s *recSpan) AddEvent(string, ...trace.EventOption) {}
func (s *recSpan) AddLink(trace.Link)                    {}
func (s *recSpan) IsRecording() bool                     { return true }
func (s *recSpan) RecordError(error, ...trace.EventOption) {
}
func (s *recSpan) SpanContext() trace.SpanContext { return s.sc }
func (s *recSpan) SetStatus(c codes.Code, _ string) {
	s.mu.Lock()
	s.status = c
	s.mu.Unlock()
}
func (s *recSpan) SetName(string)                       {}
func (s *recSpan) SetAttributes(...attribute.KeyValue)  {}
func (s *recSpan) TracerProvider() trace.TracerProvider { return noop.NewTracerProvider() }
func (s *recSpan) isEnded() (bool, codes.Code) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended, s.status
}

// TestTracerSpans checks that with tracers installed, a call makes a client span and a server
// span that is its child in the same trace, both ended.
func TestTracerSpans(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var clientT, serverT recTracer
	var hm call.HandlerMap
	var handlerSpan trace.SpanContext
	hm.Set("echo", "Echo", func(ctx context.Context, args []byte) ([]byte, error) {
		handlerSpan = trace.SpanContextFromContext(ctx)
		return args, nil
	})
	l, ep := testkit.Transports()[1].Listen(t) // tcp
	sctx, stop := context.WithCancel(ctx)
	served := make(chan struct{})
	go func() {
		defer close(served)
		call.Serve(sctx, call.NetListener(l, &hm), call.ServerOptions{Tracer: &serverT})
	}()
	defer func() { stop(); <-served }()
	c, err := call.Dial(ctx, ep, call.ClientOptions{Tracer: &clientT})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Call(ctx, call.MakeMethodKey("echo", "Echo"), []byte("x"), call.CallOptions{}); err != nil {
		t.Fatal(err)
	}
	cs, ss := clientT.recorded(), serverT.recorded()
	if len(cs) != 1 || len(ss) != 1 {
		t.Fatalf("got %d client spans and %d server spans, want 1 and 1", len(cs), len(ss))
	}
	client, server := cs[0], ss[0]
	if client.kind != trace.SpanKindClient || server.kind != trace.SpanKindServer {
		t.Errorf("span kinds = %v, %v; want client, server", client.kind, server.kind)
	}
	if server.name != "echo.Echo" {
		t.Errorf("server span name = %q, want echo.Echo", server.name)
	}
	if server.parent.TraceID() != client.sc.TraceID() || server.parent.SpanID() != client.sc.SpanID() || !server.parent.IsRemote() {
		t.Errorf("server span parent = %v, want the client span %v, remote", server.parent, client.sc)
	}
	if handlerSpan.SpanID() != server.sc.SpanID() {
		t.Errorf("handler sees span %v, want the server span %v", handlerSpan.SpanID(), server.sc.SpanID())
	}
	for _, s := range []*recSpan{client, server} {
		if ended, _ := s.isEnded(); !ended {
			t.Errorf("span %q was not ended", s.name)
		}
	}
}
