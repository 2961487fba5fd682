// Package embedded has structs with embedded fields: a struct, a pointer to a struct, and a
// struct of another package.
package embedded

import (
	"context"
	"image"

	"github.com/weftrpc/weft/runtime"
)

// Base is embedded by value.
type Base struct {
	ID   int
	Name string
}

// Meta is embedded through a pointer.
type Meta struct {
	Labels map[string]string
}

// Item embeds Base, *Meta and image.Point.
type Item struct {
	Base
	*Meta
	image.Point
	Price float64
}

// Embedded echoes its arguments.
type Embedded interface {
	Item(ctx context.Context, it Item, its []Item) (Item, []Item, error)
}

type impl struct {
	runtime.Implements[Embedded]
}

func (*impl) Item(_ context.Context, it Item, its []Item) (Item, []Item, error) {
	return it, its, nil
}
