package gen

import (
	"fmt"
	"go/ast"
	"go/token"
	"go/types"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DirectivePrefix starts the comment lines, in the doc comment of a component interface's
// method, that set how the method is called:
//
//	//weft:idempotent                         running it twice does no harm: it may be retried after
//	                                          errors that leave open whether it ran, and hedged
//	//weft:retry attempts=3 base=50ms max=1s  retries (call.RetryPolicy)
//	//weft:hedge delay=20ms percentile=0.95 max=1
//	                                          hedges (call.HedgePolicy); needs idempotent
//	//weft:multi                              also generate <Interface><Method>All, which calls
//	                                          every replica and yields each one's reply
//	//weft:affinity min=0.5 first timeout=100ms short=10ms
//	                                          choose the replica by affinity (call.SelectionOptions);
//	                                          the implementation has a method <Method>Affinity with
//	                                          the method's parameters, returning float32
const DirectivePrefix = "//weft:"

// settings are a method's directives.
type settings struct {
	idempotent bool
	retry      *retrySetting
	hedge      *hedgeSetting
	multi      bool
	affinity   *affinitySetting
}

type retrySetting struct {
	attempts  int
	base, max time.Duration
}

type hedgeSetting struct {
	delay      time.Duration
	percentile float64
	max        int
}

type affinitySetting struct {
	min            float64
	first          bool
	timeout, short time.Duration
}

// callOptions reports whether the method has settings its client stub passes in CallOptions.
func (s *settings) callOptions() bool {
	return s != nil && (s.idempotent || s.retry != nil || s.hedge != nil || s.affinity != nil)
}

// directives reads the //weft: lines of the doc comments of c's methods, reporting bad ones.
func (g *generator) directives(c *component) map[string]*settings {
	out := map[string]*settings{}
	var it *ast.InterfaceType
	for _, f := range g.pkg.Syntax {
		ast.Inspect(f, func(n ast.Node) bool {
			ts, ok := n.(*ast.TypeSpec)
			if !ok || it != nil {
				return it == nil
			}
			if g.pkg.TypesInfo.Defs[ts.Name] == c.iface.Obj() {
				it, _ = ts.Type.(*ast.InterfaceType)
			}
			return false
		})
	}
	if it == nil {
		return out
	}
	for _, field := range it.Methods.List {
		if len(field.Names) != 1 || field.Doc == nil {
			continue
		}
		name := field.Names[0].Name
		for _, cm := range field.Doc.List {
			text, ok := strings.CutPrefix(cm.Text, DirectivePrefix)
			if !ok {
				continue
			}
			s := out[name]
			if s == nil {
				s = &settings{}
				out[name] = s
			}
			g.directive(s, c.iface.Obj().Name()+"."+name, cm.Slash, text)
		}
	}
	for _, m := range c.methods {
		s := out[m.Name()]
		if s == nil {
			continue
		}
		what := c.iface.Obj().Name() + "." + m.Name()
		sig := m.Type().(*types.Signature)
		if s.hedge != nil && !s.idempotent {
			g.errorf(m.Pos(), "method %s: //weft:hedge needs //weft:idempotent: a hedged call may run twice", what)
		}
		if s.multi && sig.Results().Len() > 2 {
			g.errorf(m.Pos(), "method %s: a //weft:multi method has at most one result besides its error", what)
		}
		if s.affinity != nil {
			g.checkAffinityMethod(c, m)
		}
	}
	return out
}

// directive parses one //weft: line (text, without the prefix) of method what into s.
func (g *generator) directive(s *settings, what string, at token.Pos, text string) {
	fields := strings.Fields(text)
	if len(fields) == 0 {
		g.errorf(at, "method %s: empty //weft: directive", what)
		return
	}
	name, args := fields[0], fields[1:]
	bad := func(format string, a ...any) {
		g.errorf(at, "method %s: //weft:%s: %s", what, name, fmt.Sprintf(format, a...))
	}
	kv := func(allowed ...string) map[string]string {
		m := map[string]string{}
		for _, a := range args {
			k, v, _ := strings.Cut(a, "=")
			if !slices.Contains(allowed, k) {
				bad("unknown setting %q (want %s)", k, strings.Join(allowed, ", "))
				continue
			}
			m[k] = v
		}
		return m
	}
	dur := func(m map[string]string, k string) time.Duration {
		v, ok := m[k]
		if !ok {
			return 0
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			bad("%s=%q is not a positive duration", k, v)
		}
		return d
	}
	num := func(m map[string]string, k string, lo, hi int) int {
		v, ok := m[k]
		if !ok {
			return 0
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			bad("%s=%q is not a whole number from %d to %d", k, v, lo, hi)
		}
		return n
	}
	frac := func(m map[string]string, k string) float64 {
		v, ok := m[k]
		if !ok {
			return 0
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f > 0 && f < 1) {
			bad("%s=%q is not a number between 0 and 1", k, v)
		}
		return f
	}
	switch name {
	case "idempotent":
		if len(args) > 0 {
			bad("takes no settings")
		}
		s.idempotent = true
	case "multi":
		if len(args) > 0 {
			bad("takes no settings")
		}
		s.multi = true
	case "retry":
		m := kv("attempts", "base", "max")
		s.retry = &retrySetting{attempts: num(m, "attempts", 2, 100), base: dur(m, "base"), max: dur(m, "max")}
		if _, ok := m["attempts"]; !ok {
			bad("needs attempts=N (the most attempts, the first included)")
		}
	case "hedge":
		m := kv("delay", "percentile", "max")
		s.hedge = &hedgeSetting{delay: dur(m, "delay"), percentile: frac(m, "percentile"), max: num(m, "max", 1, 10)}
		if s.hedge.delay == 0 && s.hedge.percentile == 0 {
			bad("needs delay=D or percentile=P")
		}
	case "affinity":
		a := &affinitySetting{}
		var rest []string
		for _, arg := range args {
			if arg == "first" {
				a.first = true
			} else {
				rest = append(rest, arg)
			}
		}
		args = rest
		m := kv("min", "timeout", "short")
		if v, ok := m["min"]; ok {
			f, err := strconv.ParseFloat(v, 32)
			if err != nil || f < 0 {
				bad("min=%q is not a number of at least 0", v)
			}
			a.min = f
		}
		a.timeout, a.short = dur(m, "timeout"), dur(m, "short")
		s.affinity = a
	default:
		g.errorf(at, "method %s: unknown directive //weft:%s (want idempotent, retry, hedge, multi or affinity)", what, name)
	}
}

// checkAffinityMethod reports an implementation of c that lacks m's affinity method.
func (g *generator) checkAffinityMethod(c *component, m *types.Func) {
	name := m.Name() + "Affinity"
	what := c.iface.Obj().Name() + "." + m.Name()
	obj, _, _ := types.LookupFieldOrMethod(types.NewPointer(c.impl), true, g.pkg.Types, name)
	fn, ok := obj.(*types.Func)
	if !ok {
		g.errorf(m.Pos(), "method %s: //weft:affinity needs a method %s on *%s, with the parameters of %s and a float32 result", what, name, c.impl.Obj().Name(), m.Name())
		return
	}
	want := m.Type().(*types.Signature).Params()
	got := fn.Type().(*types.Signature)
	ok = got.Params().Len() == want.Len() && got.Results().Len() == 1 && types.Identical(got.Results().At(0).Type(), types.Typ[types.Float32])
	for i := 0; ok && i < want.Len(); i++ {
		ok = types.Identical(got.Params().At(i).Type(), want.At(i).Type())
	}
	if !ok {
		g.errorf(fn.Pos(), "method %s.%s must take the parameters of %s and return a float32", c.impl.Obj().Name(), name, what)
	}
}

// optionsLiteral is the call.CallOptions literal of a method with settings s.
func optionsLiteral(callPkg, sig string, s *settings) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s.CallOptions{Signature: %s", callPkg, sig)
	if s.idempotent {
		b.WriteString(", Idempotent: true")
	}
	if r := s.retry; r != nil {
		fmt.Fprintf(&b, ", Retry: &%s.RetryPolicy{MaxAttempts: %d, Backoff: %s.Backoff{Base: %d, Max: %d}}", callPkg, r.attempts, callPkg, r.base, r.max)
	}
	if h := s.hedge; h != nil {
		fmt.Fprintf(&b, ", Hedge: &%s.HedgePolicy{Delay: %d, Percentile: %v, MaxHedges: %d}", callPkg, h.delay, h.percentile, h.max)
	}
	if a := s.affinity; a != nil {
		fmt.Fprintf(&b, ", Affinity: &%s.SelectionOptions{MinAffinity: %v, AcceptFirstAvailable: %t, AffinityTimeout: %d, ShortCircuitTimeout: %d}", callPkg, float32(a.min), a.first, a.timeout, a.short)
	}
	b.WriteString("}")
	return b.String()
}
