// Package call implements weft's RPC protocol: a multiplexed binary protocol over a raw
// network connection that carries calls, identified by a [MethodKey], to the [Handler]s of a
// [HandlerMap].
//
// A server serves a HandlerMap on a listener with [Serve] (or one connection with [ServeOn]):
//
//	var hm call.HandlerMap
//	hm.Set("cache", "Get", func(ctx context.Context, args []byte) ([]byte, error) { ... })
//	err := call.Serve(ctx, call.NetListener(l, &hm), call.ServerOptions{})
//
// A client connects to the servers a [resolve.Resolver] names and calls methods by key; calls
// from many goroutines share its connections, and a [balance.Balancer] picks the server of
// each call:
//
//	r := resolve.Constant(endpoint.TCP("10.0.0.1:8000"), endpoint.TCP("10.0.0.2:8000"))
//	c, err := call.Connect(ctx, r, call.ClientOptions{})
//	reply, err := c.Call(ctx, call.MakeMethodKey("cache", "Get"), args, call.CallOptions{})
//
// [Dial] connects to a single server and returns its [Conn].
//
// Errors fall into categories tested with errors.Is ([ErrUnreachable], [ErrRefused],
// [ErrCommunication], [ErrUnknownMethod], [ErrSignatureMismatch], [ErrMessageTooLarge],
// [ErrRemote], [ErrAuthentication], and the context errors), and [NeverRan] tells a call that
// provably never reached a handler from one that may have run.
//
// Deadlines, cancellation, [Metadata], and OpenTelemetry trace context travel with each call;
// a handler sees the verified peer identity with [PeerFromContext] and can report its load
// with [SetLoad]. Every limit ([Limits]) has a default, is advertised in the handshake, and
// fails with a typed error when exceeded. DESIGN.md documents the wire format byte by byte.
package call

import (
	_ "github.com/weftrpc/weft/balance" // for doc links
	_ "github.com/weftrpc/weft/resolve" // for doc links
)

// # Overview
//
// A client connection ([Conn]) has one reader goroutine and no writer goroutine. A caller
// encodes its call header, takes a slot (the server advertises how many calls it runs at
// once; callers above that wait), and queues its message on the connection's writer. The
// writer is flat-combined: whichever goroutine finds it idle writes every queued message,
// one chunk of each per round, in one vectored write, and hands the role to the owner of
// another unfinished message when its own is done. The reader completes a caller with one
// channel send. Keepalive is a timer that queues a PING on a silent connection and declares
// it dead when nothing answers.
//
// A server connection has one reader at a time. A complete request's handler runs inline on
// the reader; a timer hands reading to a new goroutine if the handler runs longer than
// ServerOptions.InlineHandlerDuration. Replies use the same writer design. The reader never
// blocks on a write for control frames: PONGs and refusals go through a bounded control
// queue written by whoever is writing (or a short-lived goroutine); the reader waits for room
// when it is full, and a peer that leaves it full for a second is disconnected. Every server
// connection's goroutines are joined by ServeOn before it returns.
