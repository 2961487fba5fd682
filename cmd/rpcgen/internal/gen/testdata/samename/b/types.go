// Package types has the same name as package a.
package types

// Item crosses the wire.
type Item struct{ B string }
