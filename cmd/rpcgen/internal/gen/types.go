package gen

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"go/token"
	"go/types"
	"sort"
	"strings"
)

// typeSet checks which types can cross the wire and generates the functions that encode and
// decode them.
type typeSet struct {
	g     *generator
	fns   map[string]*typeFn // by type key
	names map[string]string  // function name suffix -> type key
}

// typeFn is the pair of functions that encode and decode one type.
type typeFn struct {
	t    types.Type
	name string // suffix of weft_enc_<name> and weft_dec_<name>
}

// key identifies a type independently of how the generated file imports packages.
func key(t types.Type) string {
	return types.TypeString(t, func(p *types.Package) string { return p.Path() })
}

func isNamed(t types.Type, path, name string) bool {
	n, ok := types.Unalias(t).(*types.Named)
	return ok && n.Obj().Pkg() != nil && n.Obj().Pkg().Path() == path && n.Obj().Name() == name
}

func isTime(t types.Type) bool     { return isNamed(t, "time", "Time") }
func isDuration(t types.Type) bool { return isNamed(t, "time", "Duration") }

var bytesType = types.NewSlice(types.Typ[types.Byte])

// hasMethod reports whether t or *t declares a method name with the given parameter and
// result types, and whether its receiver is a value.
func hasMethod(t types.Type, name string, params, results []types.Type) (found, onValue bool) {
	obj, index, _ := types.LookupFieldOrMethod(t, true, nil, name)
	f, ok := obj.(*types.Func)
	if !ok || len(index) != 1 {
		// Absent, or promoted from an embedded field: a struct that embeds time.Time does
		// not marshal its other fields by time.Time's MarshalBinary.
		return false, false
	}
	sig := f.Type().(*types.Signature)
	if sig.Params().Len() != len(params) || sig.Results().Len() != len(results) {
		return false, false
	}
	for i, p := range params {
		if !types.Identical(sig.Params().At(i).Type(), p) {
			return false, false
		}
	}
	for i, r := range results {
		if !types.Identical(sig.Results().At(i).Type(), r) {
			return false, false
		}
	}
	_, isPtr := sig.Recv().Type().(*types.Pointer)
	return true, !isPtr
}

// isBinary reports whether the named type t marshals itself: t or *t has MarshalBinary and *t
// has UnmarshalBinary.
func isBinary(t types.Type) bool {
	if _, ok := types.Unalias(t).(*types.Named); !ok || types.IsInterface(t) {
		return false
	}
	m, _ := hasMethod(t, "MarshalBinary", nil, []types.Type{bytesType, errorType})
	u, _ := hasMethod(t, "UnmarshalBinary", []types.Type{bytesType}, []types.Type{errorType})
	return m && u
}

// fixedKinds are the basic kinds whose slices codec copies in bulk with AppendFixed.
var fixedKinds = map[types.BasicKind]bool{
	types.Int8: true, types.Int16: true, types.Int32: true, types.Int64: true,
	types.Uint8: true, types.Uint16: true, types.Uint32: true, types.Uint64: true,
	types.Float32: true, types.Float64: true,
}

// wordKinds are the basic kinds whose slices codec encodes with AppendWords.
var wordKinds = map[types.BasicKind]bool{types.Int: true, types.Uint: true, types.Uintptr: true}

// basicOf returns the basic underlying type of t, if t is a basic type (or a named type of one)
// that is encoded as one.
func basicOf(t types.Type) (*types.Basic, bool) {
	if isBinary(t) || isError(t) {
		return nil, false
	}
	b, ok := t.Underlying().(*types.Basic)
	return b, ok
}

// check reports, at pos, why t cannot cross the wire, if it cannot.
func (s *typeSet) check(t types.Type, pos token.Pos, what string) {
	if why := s.why(t, nil); why != "" {
		s.g.errorf(pos, "%s has type %s: %s", what, types.TypeString(t, s.g.relative), why)
	}
}

// ok reports whether t can cross the wire.
func (s *typeSet) ok(t types.Type) bool { return s.why(t, nil) == "" }

// why returns why t cannot cross the wire, or "".
func (s *typeSet) why(t types.Type, stack []types.Type) string {
	t = types.Unalias(t)
	if isError(t) || isTime(t) || isDuration(t) || isBinary(t) {
		return ""
	}
	switch u := t.(type) {
	case *types.Named:
		for _, x := range stack {
			if types.Identical(x, t) {
				return ""
			}
		}
		if p := u.Obj().Pkg(); p != nil && p != s.g.pkg.Types && !u.Obj().Exported() {
			return fmt.Sprintf("%s is not exported by its package, so generated code cannot name it", types.TypeString(t, s.g.relative))
		}
		why := s.why(u.Underlying(), append(stack, t))
		if why != "" && stack != nil {
			return types.TypeString(t, s.g.relative) + ": " + why
		}
		return why
	case *types.Basic:
		switch {
		case u.Info()&types.IsUntyped != 0:
			return "untyped values cannot cross the wire"
		case u.Info()&(types.IsBoolean|types.IsInteger|types.IsFloat|types.IsString) != 0:
			return ""
		case u.Info()&types.IsComplex != 0:
			return "complex numbers cannot cross the wire"
		default:
			return u.Name() + " cannot cross the wire"
		}
	case *types.Pointer:
		return s.why(u.Elem(), stack)
	case *types.Slice:
		return s.why(u.Elem(), stack)
	case *types.Array:
		return s.why(u.Elem(), stack)
	case *types.Map:
		if why := s.why(u.Key(), stack); why != "" {
			return "map key: " + why
		}
		return s.why(u.Elem(), stack)
	case *types.Struct:
		for i := range u.NumFields() {
			f := u.Field(i)
			if !f.Exported() {
				return fmt.Sprintf("field %s is unexported (export it, or give the type MarshalBinary and UnmarshalBinary methods)", f.Name())
			}
			if why := s.why(f.Type(), stack); why != "" {
				return fmt.Sprintf("field %s: %s", f.Name(), why)
			}
		}
		return ""
	case *types.Interface:
		return "interfaces other than error cannot cross the wire"
	case *types.Chan:
		return "channels cannot cross the wire"
	case *types.Signature:
		return "functions cannot cross the wire"
	case *types.TypeParam:
		return "type parameters cannot cross the wire"
	}
	return fmt.Sprintf("%T cannot cross the wire", t)
}

// canon returns the canonical form of t for signature digests: every named type with its full
// path, expanded to its structure (field names included), so that any change that could make
// two builds read each other's bytes differently changes the digest.
func (s *typeSet) canon(t types.Type, stack []types.Type) string {
	t = types.Unalias(t)
	switch {
	case isError(t):
		return "error"
	case isTime(t):
		return "time"
	case isDuration(t):
		return "duration"
	}
	switch u := t.(type) {
	case *types.Named:
		id := key(t)
		if isBinary(t) {
			return "binary(" + id + ")"
		}
		for _, x := range stack {
			if types.Identical(x, t) {
				return id
			}
		}
		return id + "=" + s.canon(u.Underlying(), append(stack, t))
	case *types.Basic:
		return types.Typ[u.Kind()].Name()
	case *types.Pointer:
		return "*" + s.canon(u.Elem(), stack)
	case *types.Slice:
		return "[]" + s.canon(u.Elem(), stack)
	case *types.Array:
		return fmt.Sprintf("[%d]%s", u.Len(), s.canon(u.Elem(), stack))
	case *types.Map:
		return "map[" + s.canon(u.Key(), stack) + "]" + s.canon(u.Elem(), stack)
	case *types.Struct:
		var b strings.Builder
		b.WriteString("struct{")
		for i := range u.NumFields() {
			fmt.Fprintf(&b, "%s %s;", u.Field(i).Name(), s.canon(u.Field(i).Type(), stack))
		}
		b.WriteString("}")
		return b.String()
	}
	return key(t)
}

// minSize returns the fewest bytes a value of t encodes to.
func minSize(t types.Type, stack []types.Type) int {
	t = types.Unalias(t)
	switch {
	case isError(t), isTime(t):
		return 1
	case isDuration(t):
		return 8
	case isBinary(t):
		return 4
	}
	if n, ok := t.(*types.Named); ok {
		for _, x := range stack {
			if types.Identical(x, t) {
				return 0
			}
		}
		return minSize(n.Underlying(), append(stack, t))
	}
	switch u := t.(type) {
	case *types.Basic:
		switch u.Kind() {
		case types.Bool, types.Int8, types.Uint8, types.String:
			return 1
		case types.Int16, types.Uint16:
			return 2
		case types.Int32, types.Uint32, types.Float32:
			return 4
		default:
			return 8
		}
	case *types.Array:
		return int(min(u.Len()*int64(minSize(u.Elem(), stack)), 1<<30))
	case *types.Struct:
		n := 0
		for i := range u.NumFields() {
			n = min(n+minSize(u.Field(i).Type(), stack), 1<<30)
		}
		return n
	}
	return 1 // pointers, slices, maps
}

// funcs returns the names of the functions that encode and decode t, arranging for them to be
// generated.
func (s *typeSet) funcs(t types.Type) (enc, dec string) {
	k := key(t)
	if s.fns == nil {
		s.fns = map[string]*typeFn{}
		s.names = map[string]string{}
	}
	fn, ok := s.fns[k]
	if !ok {
		name := mangle(t, s.g)
		for i := 2; s.names[name] != "" && s.names[name] != k; i++ {
			name = fmt.Sprintf("%s_%d", mangle(t, s.g), i)
		}
		s.names[name] = k
		fn = &typeFn{t: t, name: name}
		s.fns[k] = fn
	}
	return "weft_enc_" + fn.name, "weft_dec_" + fn.name
}

// mangle returns a readable identifier for t.
func mangle(t types.Type, g *generator) string {
	t = types.Unalias(t)
	switch u := t.(type) {
	case *types.Named:
		name := u.Obj().Name()
		if p := u.Obj().Pkg(); p != nil && p != g.pkg.Types {
			name = p.Name() + "_" + name
		}
		for i := range u.TypeArgs().Len() {
			name += "_" + mangle(u.TypeArgs().At(i), g)
		}
		return name
	case *types.Basic:
		return types.Typ[u.Kind()].Name()
	case *types.Pointer:
		return "ptr_" + mangle(u.Elem(), g)
	case *types.Slice:
		return "slice_" + mangle(u.Elem(), g)
	case *types.Array:
		return fmt.Sprintf("array%d_%s", u.Len(), mangle(u.Elem(), g))
	case *types.Map:
		return "map_" + mangle(u.Key(), g) + "_" + mangle(u.Elem(), g)
	case *types.Struct:
		sum := sha256.Sum256([]byte(key(t)))
		return fmt.Sprintf("struct_%x", sum[:4])
	}
	return "type"
}

// basicMethod returns the Encoder and Decoder method for a basic kind.
func basicMethod(b *types.Basic) string {
	switch b.Kind() {
	case types.Bool:
		return "Bool"
	case types.String:
		return "String"
	}
	name := types.Typ[b.Kind()].Name()
	return strings.ToUpper(name[:1]) + name[1:]
}

// encode returns a statement that encodes the value of expression v, of type t, with enc.
func (s *typeSet) encode(t types.Type, v string) string {
	t = types.Unalias(t)
	switch {
	case isError(t):
		return fmt.Sprintf("enc.Error(%s)", v)
	case isTime(t):
		return fmt.Sprintf("enc.Time(%s)", v)
	case isDuration(t):
		return fmt.Sprintf("enc.Duration(%s)", v)
	}
	if b, ok := basicOf(t); ok {
		if _, named := t.(*types.Named); named {
			return fmt.Sprintf("enc.%s(%s(%s))", basicMethod(b), types.Typ[b.Kind()].Name(), v)
		}
		return fmt.Sprintf("enc.%s(%s)", basicMethod(b), v)
	}
	enc, _ := s.funcs(t)
	return fmt.Sprintf("%s(enc, %s)", enc, v)
}

// decode returns an expression that decodes a value of type t with dec.
func (s *typeSet) decode(t types.Type) string {
	t = types.Unalias(t)
	switch {
	case isError(t):
		return "dec.Error()"
	case isTime(t):
		return "dec.Time()"
	case isDuration(t):
		return "dec.Duration()"
	}
	if b, ok := basicOf(t); ok {
		if _, named := t.(*types.Named); named {
			return fmt.Sprintf("%s(dec.%s())", s.g.typeString(t), basicMethod(b))
		}
		return fmt.Sprintf("dec.%s()", basicMethod(b))
	}
	_, dec := s.funcs(t)
	return dec + "(dec)"
}

// sizeHint returns an expression for the encoded size of the value of expression v, of type t,
// when that is cheap to know and may be large (strings and slices of numbers), or "".
func (s *typeSet) sizeHint(t types.Type, v string) string {
	if b, ok := basicOf(t); ok && b.Kind() == types.String {
		return "len(" + v + ")"
	}
	sl, ok := t.Underlying().(*types.Slice)
	if !ok || isBinary(t) {
		return ""
	}
	if b, ok := basicOf(sl.Elem()); ok && (fixedKinds[b.Kind()] || wordKinds[b.Kind()]) {
		if size := minSize(sl.Elem(), nil); size > 1 {
			return fmt.Sprintf("%d*len(%s)", size, v)
		}
		return "len(" + v + ")"
	}
	return ""
}

// sizeof returns a constant expression for the size of a value of t in memory.
func (s *typeSet) sizeof(t types.Type) string {
	return fmt.Sprintf("%s.Sizeof(*new(%s))", s.g.importName("unsafe", "unsafe"), s.g.typeString(t))
}

// bodies returns the bodies of the functions that encode and decode t.
func (s *typeSet) bodies(t types.Type) (enc, dec string) {
	codec := s.g.importName(codecPath, "codec")
	ts := s.g.typeString(t)
	var e, d strings.Builder
	ep := func(format string, args ...any) { fmt.Fprintf(&e, "\t"+format+"\n", args...) }
	dp := func(format string, args ...any) { fmt.Fprintf(&d, "\t"+format+"\n", args...) }

	if isBinary(t) {
		if _, onValue := hasMethod(t, "MarshalBinary", nil, []types.Type{bytesType, errorType}); onValue {
			ep("enc.Binary(v)")
		} else {
			ep("enc.Binary(&v)")
		}
		dp("var v %s", ts)
		dp("dec.Binary(&v)")
		dp("return v")
		return e.String(), d.String()
	}
	switch u := t.Underlying().(type) {
	case *types.Pointer:
		ep("enc.Bool(v != nil)")
		ep("if v != nil {")
		ep("\t%s", s.encode(u.Elem(), "*v"))
		ep("}")
		dp("if !dec.Bool() || !dec.Enter() {")
		dp("\treturn nil")
		dp("}")
		dp("defer dec.Leave()")
		dp("if !dec.Alloc(int(%s)) {", s.sizeof(u.Elem()))
		dp("\treturn nil")
		dp("}")
		dp("v := new(%s)", s.g.typeString(u.Elem()))
		dp("*v = %s", s.decode(u.Elem()))
		dp("return v")
	case *types.Slice:
		elem := u.Elem()
		if b, ok := basicOf(elem); ok && (fixedKinds[b.Kind()] || wordKinds[b.Kind()]) {
			kind := "Fixed"
			if wordKinds[b.Kind()] {
				kind = "Words"
			}
			ep("%s.Append%s(enc, v)", codec, kind)
			dp("return %s.Decode%s[%s](dec)", codec, kind, s.g.typeString(elem))
			break
		}
		ep("if v == nil {")
		ep("\tenc.Len(-1)")
		ep("\treturn")
		ep("}")
		ep("enc.Len(len(v))")
		ep("for _, x := range v {")
		ep("\t%s", s.encode(elem, "x"))
		ep("}")
		dp("n := dec.Len(%d, int(%s))", minSize(elem, nil), s.sizeof(elem))
		dp("if n < 0 || !dec.Enter() {")
		dp("\treturn nil")
		dp("}")
		dp("defer dec.Leave()")
		dp("v := make(%s, n)", ts)
		dp("for i := range v {")
		dp("\tv[i] = %s", s.decode(elem))
		dp("}")
		dp("return v")
	case *types.Array:
		ep("for i := range v {")
		ep("\t%s", s.encode(u.Elem(), "v[i]"))
		ep("}")
		dp("var v %s", ts)
		dp("if !dec.Enter() {")
		dp("\treturn v")
		dp("}")
		dp("defer dec.Leave()")
		dp("for i := range v {")
		dp("\tv[i] = %s", s.decode(u.Elem()))
		dp("}")
		dp("return v")
	case *types.Map:
		ep("if v == nil {")
		ep("\tenc.Len(-1)")
		ep("\treturn")
		ep("}")
		ep("enc.Len(len(v))")
		ep("for k, x := range v {")
		ep("\t%s", s.encode(u.Key(), "k"))
		ep("\t%s", s.encode(u.Elem(), "x"))
		ep("}")
		dp("n := dec.Len(%d, int(%s+%s))", minSize(u.Key(), nil)+minSize(u.Elem(), nil), s.sizeof(u.Key()), s.sizeof(u.Elem()))
		dp("if n < 0 || !dec.Enter() {")
		dp("\treturn nil")
		dp("}")
		dp("defer dec.Leave()")
		dp("v := make(%s, n)", ts)
		dp("for range n {")
		dp("\tk := %s", s.decode(u.Key()))
		dp("\tv[k] = %s", s.decode(u.Elem()))
		dp("}")
		dp("return v")
	case *types.Struct:
		dp("var v %s", ts)
		for i := range u.NumFields() {
			f := u.Field(i)
			ep("%s", s.encode(f.Type(), "v."+f.Name()))
			dp("v.%s = %s", f.Name(), s.decode(f.Type()))
		}
		dp("return v")
	default:
		panic(fmt.Sprintf("rpcgen: no encoding for %s", key(t)))
	}
	return e.String(), d.String()
}

// emit writes every encoding function that the generated code uses, ordered by name.
func (s *typeSet) emit(w *bytes.Buffer, codecPkg string) {
	done := map[string]bool{}
	var out []string
	for {
		var pending []*typeFn
		for k, fn := range s.fns {
			if !done[k] {
				pending = append(pending, fn)
				done[k] = true
			}
		}
		if len(pending) == 0 {
			break
		}
		// Generating a body names the types it uses: do it in a fixed order, so that names
		// (and import names) do not depend on map iteration.
		sort.Slice(pending, func(i, j int) bool { return key(pending[i].t) < key(pending[j].t) })
		for _, fn := range pending {
			enc, dec := s.bodies(fn.t) // may add types to s.fns
			ts := s.g.typeString(fn.t)
			out = append(out, fmt.Sprintf("func weft_enc_%s(enc *%s.Encoder, v %s) {\n%s}\n\nfunc weft_dec_%s(dec *%s.Decoder) %s {\n%s}\n\n",
				fn.name, codecPkg, ts, enc, fn.name, codecPkg, ts, dec))
		}
	}
	if len(out) == 0 {
		return
	}
	sort.Strings(out)
	w.WriteString("// Encoding and decoding of the types that cross the wire.\n\n")
	for _, f := range out {
		w.WriteString(f)
	}
}
