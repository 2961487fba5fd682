// Package sub declares a component interface.
package sub

import "context"

type Store interface {
	Get(ctx context.Context, key string) (string, error)
}
