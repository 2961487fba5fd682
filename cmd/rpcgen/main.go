// Command rpcgen generates the stubs of weft components.
//
// For every package matched by its arguments (default "."), rpcgen type-checks the package,
// finds its components (structs that embed runtime.Implements[T] for an interface T), checks
// that every method can cross the wire, and writes weft_gen.go next to the package's files:
// method keys, a local stub, a client stub, a server stub, the encoding of every type that
// crosses the wire, and the component's registration. Every problem is reported at once, each
// at file:line:col, and nothing is written for a package with problems.
//
// Usage:
//
//	go run github.com/weftrpc/weft/cmd/rpcgen ./...
//
// or, in a package:
//
//	//go:generate go run github.com/weftrpc/weft/cmd/rpcgen
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/weftrpc/weft/cmd/rpcgen/internal/gen"
)

func main() {
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: rpcgen [packages]\n\nGenerates %s for the weft components of each package (default \".\").\n", gen.FileName)
		flag.PrintDefaults()
	}
	verbose := flag.Bool("v", false, "print the files written")
	flag.Parse()
	patterns := flag.Args()
	if len(patterns) == 0 {
		patterns = []string{"."}
	}
	results, err := gen.Run("", patterns)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	failed := false
	for _, r := range results {
		for _, e := range r.Errors {
			fmt.Fprintln(os.Stderr, e)
			failed = true
		}
		if *verbose && r.File != "" {
			fmt.Fprintln(os.Stderr, "rpcgen: wrote", r.File)
		}
	}
	if failed {
		os.Exit(1)
	}
}
