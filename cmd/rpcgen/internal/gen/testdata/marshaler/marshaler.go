// Package marshaler has a component whose methods take and return types that marshal
// themselves with encoding.BinaryMarshaler and encoding.BinaryUnmarshaler: with a value
// receiver for MarshalBinary and a pointer receiver for UnmarshalBinary, with pointer
// receivers for both, and a named basic type that marshals itself. Their fields are
// unexported: they cross the wire only through their methods.
package marshaler

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/weftrpc/weft/runtime"
)

// Money marshals itself with a value receiver and unmarshals with a pointer receiver. A
// Money with a negative amount cannot be marshalled.
type Money struct {
	units    int64
	currency string
}

// NewMoney returns a Money.
func NewMoney(units int64, currency string) Money { return Money{units, currency} }

func (m Money) String() string { return fmt.Sprintf("%d %s", m.units, m.currency) }

// ErrNegative is returned by MarshalBinary for a negative amount.
var ErrNegative = errors.New("marshaler: negative amount")

func (m Money) MarshalBinary() ([]byte, error) {
	if m.units < 0 {
		return nil, ErrNegative
	}
	b := binary.LittleEndian.AppendUint64(nil, uint64(m.units))
	return append(b, m.currency...), nil
}

func (m *Money) UnmarshalBinary(b []byte) error {
	if len(b) < 8 {
		return errors.New("marshaler: short money")
	}
	m.units, m.currency = int64(binary.LittleEndian.Uint64(b)), string(b[8:])
	return nil
}

// Token marshals and unmarshals itself with pointer receivers.
type Token struct {
	id     [4]byte
	secret string
}

// NewToken returns a Token.
func NewToken(id [4]byte, secret string) Token { return Token{id, secret} }

func (t *Token) MarshalBinary() ([]byte, error) { return append(t.id[:], t.secret...), nil }

func (t *Token) UnmarshalBinary(b []byte) error {
	if len(b) < 4 {
		return errors.New("marshaler: short token")
	}
	t.id, t.secret = [4]byte(b[:4]), string(b[4:])
	return nil
}

// Version is a named basic type that marshals itself (as a string of digits).
type Version uint32

func (v Version) MarshalBinary() ([]byte, error) { return fmt.Appendf(nil, "%d", uint32(v)), nil }

func (v *Version) UnmarshalBinary(b []byte) error {
	var n uint32
	if _, err := fmt.Sscanf(string(b), "%d", &n); err != nil {
		return err
	}
	*v = Version(n)
	return nil
}

// Wallet holds self-marshalling values in fields.
type Wallet struct {
	Owner   string
	Cash    Money
	Savings *Money
	Keys    []Token
}

// Binary echoes its arguments.
type Binary interface {
	Money(ctx context.Context, m Money, ms []Money, pm *Money) (Money, []Money, *Money, error)
	Token(ctx context.Context, t Token, byName map[string]Token, pt *Token) (Token, map[string]Token, *Token, error)
	Version(ctx context.Context, v Version, vs []Version) (Version, []Version, error)
	Wallet(ctx context.Context, w Wallet) (Wallet, error)
	// Owe returns a negative Money, which cannot be marshalled.
	Owe(ctx context.Context, units int64) (Money, error)
}

type impl struct {
	runtime.Implements[Binary]
}

func (*impl) Money(_ context.Context, m Money, ms []Money, pm *Money) (Money, []Money, *Money, error) {
	return m, ms, pm, nil
}

func (*impl) Token(_ context.Context, t Token, byName map[string]Token, pt *Token) (Token, map[string]Token, *Token, error) {
	return t, byName, pt, nil
}

func (*impl) Version(_ context.Context, v Version, vs []Version) (Version, []Version, error) {
	return v, vs, nil
}

func (*impl) Wallet(_ context.Context, w Wallet) (Wallet, error) { return w, nil }

func (*impl) Owe(_ context.Context, units int64) (Money, error) { return NewMoney(-units, "EUR"), nil }
