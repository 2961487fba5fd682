// Package types has the same name as package b.
package types

// Item crosses the wire.
type Item struct{ A int }
