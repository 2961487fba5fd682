package main

//go:generate go run github.com/weftrpc/weft/cmd/rpcgen

import (
	"context"
	"errors"
	"hash/fnv"
	"sort"
	"sync"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/runtime"
)

// ErrNotFound is returned by Frontend.Get for a key that was never set. It crosses process
// boundaries as itself: errors.Is works in the caller.
var ErrNotFound = errors.New("key not found")

// Store is one shard of a key-value store. It is replicated; every key lives on the replica
// that owns its shard.
type Store interface {
	Put(ctx context.Context, key, value string) (Stored, error)
	Get(ctx context.Context, key string) (Stored, error)
}

// Stored is a value and where it lives.
type Stored struct {
	Value   string
	Version int64
	Replica string
}

// Frontend is what clients call: it shards keys over the Store's replicas and audits every
// operation.
type Frontend interface {
	Set(ctx context.Context, key, value string) (Stored, error)
	Get(ctx context.Context, key string) (Stored, error)
}

// Audit counts operations.
type Audit interface {
	Record(ctx context.Context, op string) error
	Counts(ctx context.Context) (map[string]int64, error)
}

type store struct {
	runtime.Implements[Store]
	mu   sync.Mutex
	data map[string]Stored
}

func (s *store) Put(_ context.Context, key, value string) (Stored, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.data == nil {
		s.data = map[string]Stored{}
	}
	v := Stored{Value: value, Version: s.data[key].Version + 1, Replica: runtime.ReplicaName()}
	s.data[key] = v
	return v, nil
}

func (s *store) Get(_ context.Context, key string) (Stored, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.data[key]
	if !ok {
		return Stored{Replica: runtime.ReplicaName()}, ErrNotFound
	}
	return v, nil
}

type frontend struct {
	runtime.Implements[Frontend]
	store runtime.Ref[Store]
	audit runtime.Ref[Audit]
}

// shard is the key's shard: calls for one key always reach the same Store replica.
func shard(ctx context.Context, key string) context.Context {
	h := fnv.New64a()
	h.Write([]byte(key))
	return call.WithShardKey(ctx, h.Sum64())
}

func (f *frontend) Set(ctx context.Context, key, value string) (Stored, error) {
	if err := f.audit.Get().Record(ctx, "set"); err != nil {
		return Stored{}, err
	}
	return f.store.Get().Put(shard(ctx, key), key, value)
}

func (f *frontend) Get(ctx context.Context, key string) (Stored, error) {
	if err := f.audit.Get().Record(ctx, "get"); err != nil {
		return Stored{}, err
	}
	return f.store.Get().Get(shard(ctx, key), key)
}

type audit struct {
	runtime.Implements[Audit]
	mu     sync.Mutex
	counts map[string]int64
}

func (a *audit) Record(_ context.Context, op string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.counts == nil {
		a.counts = map[string]int64{}
	}
	a.counts[op]++
	return nil
}

func (a *audit) Counts(context.Context) (map[string]int64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]int64, len(a.counts))
	for k, v := range a.counts {
		out[k] = v
	}
	return out, nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
