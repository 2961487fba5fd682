// Package shadow declares types whose names are those of the local variables of generated
// code (v, k, x, i, n, s, enc, dec, ctx, reply): the generated code must still compile.
package shadow

import (
	"context"

	"github.com/weftrpc/weft/runtime"
)

type (
	v     struct{ A int }
	k     struct{ B int }
	x     struct{ C int }
	i     struct{ D int }
	n     struct{ E int }
	s     struct{ F int }
	enc   struct{ G int }
	dec   struct{ H int }
	ctx   struct{ I int }
	reply struct{ J int }
)

// Shadow echoes its arguments.
type Shadow interface {
	Values(c context.Context, a v, b k, c2 x, d i, e n, f s, g enc, h dec, j ctx, l reply) (v, k, x, i, n, s, enc, dec, ctx, reply, error)
	Slices(c context.Context, a []v, b []k, c2 []x, d []i, e []n, f []s, g []enc, h []dec, j []ctx, l []reply) ([]v, []n, error)
	Maps(c context.Context, a map[k]x, b map[n]v, d map[v]n) (map[k]x, map[n]v, map[v]n, error)
	Pointers(c context.Context, a *v, b *n, d *enc) (*v, *n, *enc, error)
}

type impl struct {
	runtime.Implements[Shadow]
}

func (*impl) Values(_ context.Context, a v, b k, c2 x, d i, e n, f s, g enc, h dec, j ctx, l reply) (v, k, x, i, n, s, enc, dec, ctx, reply, error) {
	return a, b, c2, d, e, f, g, h, j, l, nil
}

func (*impl) Slices(_ context.Context, a []v, b []k, c2 []x, d []i, e []n, f []s, g []enc, h []dec, j []ctx, l []reply) ([]v, []n, error) {
	return a, e, nil
}

func (*impl) Maps(_ context.Context, a map[k]x, b map[n]v, d map[v]n) (map[k]x, map[n]v, map[v]n, error) {
	return a, b, d, nil
}

func (*impl) Pointers(_ context.Context, a *v, b *n, d *enc) (*v, *n, *enc, error) {
	return a, b, d, nil
}
