// Command testapp runs the runtime's test application (package testapp) as a program of its
// own, for trying by hand what the runtime's end-to-end tests do with the test binary:
//
//	go run ./runtime/internal/testapp/cmd -mode=load -workers=2
//	go run ./runtime/internal/testapp/cmd -mode=idle -log=info
//
// Stop it with Ctrl-C. See testapp.Main for the modes and flags.
package main

import (
	"os"

	"github.com/weftrpc/weft/runtime/internal/testapp"
)

func main() { os.Exit(testapp.Main(os.Args[1:])) }
