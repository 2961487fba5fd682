package stack

import (
	"net"
	"sync"
)

// connSet tracks a server's connections and the goroutines that serve them, for the servers
// whose library does not do it.
type connSet struct {
	// mu guards conns and closed.
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool

	wg sync.WaitGroup // one per serving goroutine
}

// add records c, or reports false if the set is closed.
func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = make(map[net.Conn]struct{})
	}
	s.conns[c] = struct{}{}
	return true
}

// remove closes c and forgets it.
func (s *connSet) remove(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// closeAll closes every connection, refuses new ones, and waits for the serving goroutines.
func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// server is a Server made of a listener, the goroutine accepting from it and a connSet.
type server struct {
	l        net.Listener
	conns    connSet
	accepted chan struct{} // closed when the accept loop returns
	once     sync.Once
}

// startServer starts accepting from l and serving every connection with serve.
func startServer(l net.Listener, serve func(net.Conn)) *server {
	s := &server{l: l, accepted: make(chan struct{})}
	go func() {
		defer close(s.accepted)
		acceptLoop(l, &s.conns, serve)
	}()
	return s
}

// Close implements Server.
func (s *server) Close() error {
	s.once.Do(func() {
		s.l.Close()
		<-s.accepted
		s.conns.closeAll()
	})
	return nil
}
