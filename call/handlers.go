package call

import (
	"context"
	"crypto/sha256"
	"maps"
	"sync"
	"sync/atomic"
)

// MethodKey identifies a method of a component on the wire: a fingerprint of the component
// and method names.
type MethodKey [16]byte

// MakeMethodKey returns the key of method of component. It is the first 16 bytes of the
// SHA-256 of component, a NUL byte, and method.
func MakeMethodKey(component, method string) MethodKey {
	h := sha256.New()
	h.Write([]byte(component))
	h.Write([]byte{0})
	h.Write([]byte(method))
	var k MethodKey
	copy(k[:], h.Sum(nil))
	return k
}

// A Handler runs one call. args is valid only until the handler returns, but the handler may
// return args (or part of it) as its reply: the reply is written before args are released. The
// server does not modify the bytes a handler returns.
//
// Application errors belong inside the returned bytes (the codec encodes them). A handler
// returns a non-nil error only when it could not run the call; the caller then receives
// [ErrRemote] with the error's message (wrap it in a [HandlerError] to add a retry-after
// delay). A panic is recovered and reported to that caller alone as [ErrRemote].
type Handler func(ctx context.Context, args []byte) ([]byte, error)

type handlerEntry struct {
	h         Handler
	component string
	method    string
	signature uint64
	recycled  bool // the server reuses the memory of h's replies; see SetRecycled
}

// HandlerMap maps method keys to handlers. The zero value is an empty map. It is safe for
// concurrent use; handlers may be added while the map is being served.
type HandlerMap struct {
	mu sync.Mutex // serializes writers; readers load handlers without locking
	// handlers is replaced, never modified, by writers.
	handlers atomic.Pointer[map[MethodKey]*handlerEntry]
	affinity map[MethodKey]AffinityFunc // guarded by mu
}

// Set registers h for method of component, replacing any earlier handler.
func (hm *HandlerMap) Set(component, method string, h Handler) {
	hm.SetSigned(component, method, 0, h)
}

// SetSigned registers h for method of component with a signature digest. A call that carries a
// different non-zero digest (see [CallOptions].Signature) is refused with
// [ErrSignatureMismatch]. Generated stubs use it; a signature of zero is not checked.
func (hm *HandlerMap) SetSigned(component, method string, signature uint64, h Handler) {
	hm.set(&handlerEntry{h: h, component: component, method: method, signature: signature})
}

// SetRecycled is [HandlerMap.SetSigned] for a handler whose replies are its own: nothing else
// refers to the bytes h returns, so the server reuses their memory once they are written. h
// builds its replies in buffers from [ReplyBuffer] (grown or not) to save an allocation per
// call. A reply that shares memory with h's args is not reused. Generated server stubs use it.
func (hm *HandlerMap) SetRecycled(component, method string, signature uint64, h Handler) {
	hm.set(&handlerEntry{h: h, component: component, method: method, signature: signature, recycled: true})
}

// ReplyBuffer returns an empty buffer with room for at least n bytes, from the memory the
// server reuses, for a handler registered with [HandlerMap.SetRecycled] to build its reply in.
func ReplyBuffer(n int) []byte { return getBuffer(n)[:0] }

func (hm *HandlerMap) set(e *handlerEntry) {
	k := MakeMethodKey(e.component, e.method)
	hm.mu.Lock()
	defer hm.mu.Unlock()
	m := map[MethodKey]*handlerEntry{}
	if old := hm.handlers.Load(); old != nil {
		m = maps.Clone(*old)
	}
	m[k] = e
	hm.handlers.Store(&m)
}

// lookup returns the entry for k, or nil.
func (hm *HandlerMap) lookup(k MethodKey) *handlerEntry {
	if m := hm.handlers.Load(); m != nil {
		if e := (*m)[k]; e != nil {
			return e
		}
	}
	if k == affinityKey {
		return hm.affinityEntry()
	}
	return nil
}

// Wrap replaces every handler of the map with wrap(component, method, handler), for example
// to measure or authorize every call. Handlers set later are not wrapped. A wrapper of a handler
// set with [HandlerMap.SetRecycled] returns that handler's reply or bytes nothing else refers to.
func (hm *HandlerMap) Wrap(wrap func(component, method string, h Handler) Handler) {
	hm.mu.Lock()
	defer hm.mu.Unlock()
	old := hm.handlers.Load()
	if old == nil {
		return
	}
	m := make(map[MethodKey]*handlerEntry, len(*old))
	for k, e := range *old {
		w := *e
		w.h = wrap(e.component, e.method, e.h)
		m[k] = &w
	}
	hm.handlers.Store(&m)
}
