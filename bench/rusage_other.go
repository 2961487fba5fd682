//go:build !unix

package main

import "time"

// cpuTime reports that the CPU time of the process is not known on this system.
func cpuTime() (time.Duration, bool) { return 0, false }
