// Package composite has a component whose methods take and return composite types: slices
// (of numbers, copied in bulk, and of structs, strings, pointers), arrays, maps (of slices, of
// maps, with struct keys), pointers, nested structs, types recursive through pointers, slices
// and maps, named types of those, a generic struct, and structs of other packages.
package composite

import (
	"context"
	"image"
	"time"

	"github.com/weftrpc/weft/cmd/rpcgen/internal/gen/testdata/composite/sub"
	"github.com/weftrpc/weft/runtime"
)

// Point is a small struct.
type Point struct{ X, Y float64 }

// Shape nests structs, arrays, slices, maps and pointers, and refers to itself through a
// pointer.
type Shape struct {
	Name    string
	Center  Point
	Corners [4]Point
	Tags    []string
	Attrs   map[string]string
	Parent  *Shape
	Origin  *image.Point
	Weights []float64
	Created time.Time
	TTL     time.Duration
}

// Tree refers to itself through a slice.
type Tree struct {
	Label string
	Kids  []Tree
}

// Node refers to itself through a map.
type Node struct {
	ID       int
	Children map[string]Node
}

// List refers to itself through a pointer.
type List struct {
	Value int
	Next  *List
}

type (
	Graph   map[string][]string
	Matrix  [2][3]int32
	Shapes  []*Shape
	Index   map[int64]*Point
	Samples []uint32
	Temps   []Celsius
	Celsius float64
	PointP  *Point
)

// Pair is a generic struct; instances of it cross the wire.
type Pair[K comparable, V any] struct {
	Key   K
	Value V
}

// Composite echoes its arguments.
type Composite interface {
	Numbers(ctx context.Context, i8 []int8, i16 []int16, i32 []int32, i64 []int64, u16 []uint16, u32 []uint32, u64 []uint64) ([]int8, []int16, []int32, []int64, []uint16, []uint32, []uint64, error)
	Words(ctx context.Context, f32 []float32, f64 []float64, ints []int, uints []uint, ptrs []uintptr, s Samples, t Temps) ([]float32, []float64, []int, []uint, []uintptr, Samples, Temps, error)
	Slices(ctx context.Context, s []string, p []Point, pp []*Point, bb [][]byte, bools []bool, shapes Shapes) ([]string, []Point, []*Point, [][]byte, []bool, Shapes, error)
	Arrays(ctx context.Context, a [3]int, b [2]string, m Matrix, k [16]byte, e [0]int, ps [2]*Point) ([3]int, [2]string, Matrix, [16]byte, [0]int, [2]*Point, error)
	Maps(ctx context.Context, m map[string]int, g Graph, idx Index, nested map[string]map[int]bool, byPoint map[Point]string) (map[string]int, Graph, Index, map[string]map[int]bool, map[Point]string, error)
	Pointers(ctx context.Context, p *int, pp **string, ps *Point, pslice *[]int, pmap *map[string]int, named PointP) (*int, **string, *Point, *[]int, *map[string]int, PointP, error)
	Shape(ctx context.Context, s Shape) (Shape, error)
	Recursive(ctx context.Context, t Tree, n Node, l *List) (Tree, Node, *List, error)
	Other(ctx context.Context, v sub.Vec, g sub.Grid, p image.Point, r image.Rectangle) (sub.Vec, sub.Grid, image.Point, image.Rectangle, error)
	Generic(ctx context.Context, p Pair[string, int], ps []Pair[int, *Point]) (Pair[string, int], []Pair[int, *Point], error)
	Anonymous(ctx context.Context, s struct{ A, B int }) (struct{ A, B int }, error)
	Big(ctx context.Context, b []byte, ps []Point, shapes []Shape) ([]byte, []Point, []Shape, error)
}

type composite struct {
	runtime.Implements[Composite]
}

func (*composite) Numbers(_ context.Context, i8 []int8, i16 []int16, i32 []int32, i64 []int64, u16 []uint16, u32 []uint32, u64 []uint64) ([]int8, []int16, []int32, []int64, []uint16, []uint32, []uint64, error) {
	return i8, i16, i32, i64, u16, u32, u64, nil
}

func (*composite) Words(_ context.Context, f32 []float32, f64 []float64, ints []int, uints []uint, ptrs []uintptr, s Samples, t Temps) ([]float32, []float64, []int, []uint, []uintptr, Samples, Temps, error) {
	return f32, f64, ints, uints, ptrs, s, t, nil
}

func (*composite) Slices(_ context.Context, s []string, p []Point, pp []*Point, bb [][]byte, bools []bool, shapes Shapes) ([]string, []Point, []*Point, [][]byte, []bool, Shapes, error) {
	return s, p, pp, bb, bools, shapes, nil
}

func (*composite) Arrays(_ context.Context, a [3]int, b [2]string, m Matrix, k [16]byte, e [0]int, ps [2]*Point) ([3]int, [2]string, Matrix, [16]byte, [0]int, [2]*Point, error) {
	return a, b, m, k, e, ps, nil
}

func (*composite) Maps(_ context.Context, m map[string]int, g Graph, idx Index, nested map[string]map[int]bool, byPoint map[Point]string) (map[string]int, Graph, Index, map[string]map[int]bool, map[Point]string, error) {
	return m, g, idx, nested, byPoint, nil
}

func (*composite) Pointers(_ context.Context, p *int, pp **string, ps *Point, pslice *[]int, pmap *map[string]int, named PointP) (*int, **string, *Point, *[]int, *map[string]int, PointP, error) {
	return p, pp, ps, pslice, pmap, named, nil
}

func (*composite) Shape(_ context.Context, s Shape) (Shape, error) { return s, nil }

func (*composite) Recursive(_ context.Context, t Tree, n Node, l *List) (Tree, Node, *List, error) {
	return t, n, l, nil
}

func (*composite) Other(_ context.Context, v sub.Vec, g sub.Grid, p image.Point, r image.Rectangle) (sub.Vec, sub.Grid, image.Point, image.Rectangle, error) {
	return v, g, p, r, nil
}

func (*composite) Generic(_ context.Context, p Pair[string, int], ps []Pair[int, *Point]) (Pair[string, int], []Pair[int, *Point], error) {
	return p, ps, nil
}

func (*composite) Anonymous(_ context.Context, s struct{ A, B int }) (struct{ A, B int }, error) {
	return s, nil
}

func (*composite) Big(_ context.Context, b []byte, ps []Point, shapes []Shape) ([]byte, []Point, []Shape, error) {
	return b, ps, shapes, nil
}
