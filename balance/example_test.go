package balance_test

import (
	"fmt"

	"github.com/weftrpc/weft/balance"
	"github.com/weftrpc/weft/endpoint"
)

// server is a balance.Member for the examples: an endpoint with a fixed state.
type server struct {
	ep    endpoint.Endpoint
	up    bool
	calls int
}

func (s *server) Endpoint() endpoint.Endpoint { return s.ep }
func (s *server) Ready() bool                 { return s.up }
func (s *server) InFlight() int               { return s.calls }
func (s *server) Load() float64               { return 0 }

// view returns what a client shows a balancer of servers.
func view(servers ...*server) balance.PickInfo {
	var pi balance.PickInfo
	for _, s := range servers {
		pi.Members = append(pi.Members, s)
		if s.up {
			pi.Ready = append(pi.Ready, s)
		}
	}
	return pi
}

func ExampleConsistentHash() {
	ring, err := balance.ConsistentHash(balance.ConsistentHashOptions{})
	if err != nil {
		panic(err)
	}
	a := &server{ep: endpoint.TCP("a.internal:7000"), up: true}
	b := &server{ep: endpoint.TCP("b.internal:7000"), up: true}
	c := &server{ep: endpoint.TCP("c.internal:7000"), up: true}

	owner := func(key uint64) string {
		pi := view(a, b, c)
		pi.Sharded, pi.ShardKey = true, key
		m, err := ring.Pick(pi)
		if err != nil {
			return err.Error()
		}
		return m.Endpoint().Address()
	}
	show := func(when string) {
		fmt.Printf("%-11s key 0: %s, key 4: %s, key 6: %s\n", when, owner(0), owner(4), owner(6))
	}
	show("all up:")
	// a goes down: its keys move to the members after it on the ring; other keys stay.
	a.up = false
	show("a down:")
	a.up = true
	show("a back:")
	a.up, b.up, c.up = false, false, false
	fmt.Println("all down:  ", owner(4))
	// Output:
	// all up:     key 0: tcp://c.internal:7000, key 4: tcp://a.internal:7000, key 6: tcp://a.internal:7000
	// a down:     key 0: tcp://c.internal:7000, key 4: tcp://c.internal:7000, key 6: tcp://b.internal:7000
	// a back:     key 0: tcp://c.internal:7000, key 4: tcp://a.internal:7000, key 6: tcp://a.internal:7000
	// all down:   balance: no ready member
}

func ExampleLeastLoaded() {
	lb := balance.LeastLoaded()
	idle := &server{ep: endpoint.TCP("idle.internal:7000"), up: true}
	busy := &server{ep: endpoint.TCP("busy.internal:7000"), up: true, calls: 12}
	down := &server{ep: endpoint.TCP("down.internal:7000")}
	for range 3 {
		m, err := lb.Pick(view(busy, down, idle))
		if err != nil {
			panic(err)
		}
		fmt.Println(m.Endpoint().Address())
	}
	// Output:
	// tcp://idle.internal:7000
	// tcp://idle.internal:7000
	// tcp://idle.internal:7000
}
