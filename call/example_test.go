package call_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
)

func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Serve an "upper" method on a loopback port.
	var hm call.HandlerMap
	hm.Set("text", "Upper", func(ctx context.Context, args []byte) ([]byte, error) {
		return []byte(strings.ToUpper(string(args))), nil
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	serveCtx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- call.Serve(serveCtx, call.NetListener(l, &hm), call.ServerOptions{}) }()

	// Call it.
	c, err := call.Dial(ctx, endpoint.TCP(l.Addr().String()), call.ClientOptions{})
	if err != nil {
		panic(err)
	}
	reply, err := c.Call(ctx, call.MakeMethodKey("text", "Upper"), []byte("hello, weft"), call.CallOptions{})
	fmt.Println(string(reply), err)

	c.Close()
	stop()
	<-served
	// Output: HELLO, WEFT <nil>
}
