// Package bad has a component without methods.
package bad

import "github.com/weftrpc/weft/runtime"

type Empty interface{}

type empty struct {
	runtime.Implements[Empty]
}
