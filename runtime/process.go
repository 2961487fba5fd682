package runtime

import (
	"context"
	"net"
	"os"
	"os/signal"
	"syscall"
)

// signalContext is ctx, cancelled when the process is asked to stop (SIGTERM, or an interrupt).
func signalContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
}

// listenUnix listens on a Unix socket at path, replacing a stale socket file.
func listenUnix(path string) (net.Listener, error) {
	os.Remove(path)
	return net.Listen("unix", path)
}
