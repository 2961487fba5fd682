// Package multi has two components, one of which uses the other through a runtime.Ref.
package multi

import (
	"context"
	"errors"
	"sync"

	"github.com/weftrpc/weft/runtime"
)

// ErrMissing is returned for a key that is not stored.
var ErrMissing = errors.New("multi: missing")

// Store stores strings.
type Store interface {
	Put(ctx context.Context, key, value string) error
	Get(ctx context.Context, key string) (string, error)
}

// Cache reads through the Store it refers to and counts its misses.
type Cache interface {
	Lookup(ctx context.Context, keys ...string) (map[string]string, int, error)
}

type store struct {
	runtime.Implements[Store]

	mu sync.Mutex // guards m
	m  map[string]string
}

func (s *store) Put(_ context.Context, key, value string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]string{}
	}
	s.m[key] = value
	return nil
}

func (s *store) Get(_ context.Context, key string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[key]
	if !ok {
		return "", ErrMissing
	}
	return v, nil
}

type cache struct {
	runtime.Implements[Cache]
	store runtime.Ref[Store]
}

func (c *cache) Lookup(ctx context.Context, keys ...string) (map[string]string, int, error) {
	if keys == nil {
		return nil, 0, nil
	}
	out := map[string]string{}
	misses := 0
	for _, k := range keys {
		v, err := c.store.Get().Get(ctx, k)
		switch {
		case errors.Is(err, ErrMissing):
			misses++
		case err != nil:
			return nil, misses, err
		default:
			out[k] = v
		}
	}
	return out, misses, nil
}
