package call

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// checker schedules the health checks of one connection: a ping every
// PoolOptions.HealthCheckInterval, and a probe when its endpoint's ejection ends. It is owned
// by the link's goroutine.
type checker struct {
	interval time.Duration // 0: no periodic checks
	limit    time.Duration // how long a ping waits for its pong
	next     time.Time     // when the next periodic check is due; zero if none
	timer    *time.Timer   // fires when a check is due
	tmo      *time.Timer   // fires when the outstanding ping times out
	pending  bool          // a ping is outstanding
	pong     <-chan struct{}
	id       uint64
	started  time.Time
	err      error // why the outstanding ping could not be sent

	// A ping that timed out and has not been answered yet. No other ping is sent until it is:
	// a connection that does not answer must not pile pings up for the server.
	late      <-chan struct{}
	lateID    uint64
	lateSince time.Time
}

func newChecker(p PoolOptions) *checker {
	k := &checker{limit: p.HealthCheckTimeout, timer: time.NewTimer(time.Hour), tmo: time.NewTimer(time.Hour)}
	k.timer.Stop()
	k.tmo.Stop()
	if p.HealthCheckInterval > 0 {
		k.interval = p.HealthCheckInterval
		k.next = time.Now().Add(k.interval)
	}
	return k
}

// stop stops the timers and forgets the pings of conn that are still unanswered.
func (k *checker) stop(conn *Conn) {
	k.timer.Stop()
	k.tmo.Stop()
	if k.pending && k.err == nil {
		conn.cancelPing(k.id)
	}
	if k.late != nil {
		conn.cancelPing(k.lateID)
	}
}

// arm returns a channel that fires when the next check is due: the next periodic check, or
// the end of the endpoint's ejection (ejectedUntil, zero if it is not ejected), whichever
// comes first. It returns nil while a ping is outstanding or when nothing is due.
func (k *checker) arm(ejectedUntil time.Time) <-chan time.Time {
	if k.pending {
		return nil
	}
	due := k.next
	if !ejectedUntil.IsZero() && (due.IsZero() || ejectedUntil.Before(due)) {
		due = ejectedUntil
	}
	if due.IsZero() {
		k.timer.Stop()
		return nil
	}
	k.timer.Reset(time.Until(due))
	return k.timer.C
}

// start sends a ping on conn, unless an earlier one is still unanswered: that check fails at
// once.
func (k *checker) start(conn *Conn) {
	k.pending, k.started = true, time.Now()
	if k.late != nil {
		select {
		case <-k.late:
			k.late = nil // answered after all
		default:
			k.err = fmt.Errorf("health check: the ping sent to %s %v ago is still unanswered", conn.Addr(), time.Since(k.lateSince).Round(time.Millisecond))
			k.tmo.Reset(0)
			return
		}
	}
	k.id, k.pong, k.err = conn.startPing()
	if k.err != nil {
		k.tmo.Reset(0)
		return
	}
	k.tmo.Reset(k.limit)
}

// timeout returns a channel that fires when the outstanding ping has waited too long, or nil.
func (k *checker) timeout() <-chan time.Time {
	if !k.pending {
		return nil
	}
	return k.tmo.C
}

// done records the pong of the outstanding ping and returns its round trip.
func (k *checker) done() time.Duration {
	rtt := time.Since(k.started)
	k.finish()
	return rtt
}

// fail gives up on the outstanding ping and returns the error of the failed check.
func (k *checker) fail(conn *Conn) error {
	err := k.err
	if err == nil {
		// Keep waiting for its pong, without sending another ping meanwhile.
		k.late, k.lateID, k.lateSince = k.pong, k.id, k.started
		err = fmt.Errorf("health check: no pong from %s within %v", conn.Addr(), k.limit)
	}
	k.finish()
	return err
}

func (k *checker) finish() {
	k.tmo.Stop()
	k.pending, k.pong, k.err = false, nil, nil
	if k.interval > 0 {
		k.next = time.Now().Add(k.interval)
	}
}

// checked records the outcome of a health check of the link's connection: its round trip, or
// the error of a failed check. A check of an endpoint whose ejection has ended is its probe:
// success re-admits it, failure ejects it again. It reports whether the connection must be
// evicted: it failed outside degraded mode.
func (l *link) checked(rtt time.Duration, err error) bool {
	m, c := l.m, l.m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	probe := m.ejected && !now.Before(m.ejectedUntil)
	if err == nil {
		l.rtt = rtt
		changed := l.unhealthy
		l.unhealthy = false
		if probe {
			m.ejected, m.readmitted = false, now
			m.fails.Store(0)
			changed = true
			c.opts.Logger.Info("weft: ejected endpoint re-admitted after a probe", slog.String("channel", c.name), slog.String("addr", m.addr))
		}
		if changed {
			m.refreshLocked()
			if c.pool.Size > 0 {
				c.rebalanceLocked()
			}
			c.publishLocked()
		}
		return false
	}
	m.noteLocked(err)
	if probe {
		m.ejections++
		m.ejectionsTotal++
		m.ejectedUntil = now.Add(c.ejectionTime(m.ejections))
		c.opts.Logger.Warn("weft: probe of ejected endpoint failed; ejected again", slog.String("channel", c.name),
			slog.String("addr", m.addr), slog.Int("ejections", m.ejections), slog.Time("until", m.ejectedUntil))
	}
	l.unhealthy = true
	if m.refreshLocked() || probe {
		c.publishLocked()
	}
	if c.degraded && !c.spareLocked(m) {
		c.opts.Logger.Debug("weft: keeping a connection that failed its health check: degraded", slog.String("channel", c.name), slog.String("addr", m.addr), slog.Any("err", err))
		return false
	}
	c.opts.Logger.Warn("weft: evicting a connection that failed its health check", slog.String("channel", c.name), slog.String("addr", m.addr), slog.Any("err", err))
	return true
}

// ejectionTime is how long the n-th ejection in a row lasts.
func (c *client) ejectionTime(n int) time.Duration {
	return min(c.pool.EjectionTime*time.Duration(n), c.pool.MaxEjectionTime)
}

// ejectedUntilIfEjected returns when the member's ejection ends, or zero if it is not ejected.
func (m *member) ejectedUntilIfEjected() time.Time {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	if m.ejected {
		return m.ejectedUntil
	}
	return time.Time{}
}

// record counts the outcome of a call sent to the member: a success ends a run of failures,
// and a run of EjectAfter failures that point at the server ejects it.
func (m *member) record(err error) {
	if err != nil && !wasSent(err) {
		return
	}
	m.calls.Add(1)
	if err == nil {
		if m.fails.Load() != 0 {
			m.fails.Store(0)
		}
		return
	}
	if !countsAgainst(err) {
		return
	}
	m.errs.Add(1)
	n := int(m.fails.Add(1))
	c := m.c
	c.mu.Lock()
	defer c.mu.Unlock()
	m.noteLocked(err)
	if c.pool.EjectAfter > 0 && n >= c.pool.EjectAfter {
		c.ejectLocked(m, n)
	}
}

// countsAgainst reports whether a call's error points at its server: a communication
// failure, a handler that could not run, or a deadline that expired after the request was
// sent. Errors of the caller (cancellation, bad arguments, unknown methods), refusals, and
// calls that never left are not held against it.
func countsAgainst(err error) bool {
	switch {
	case errors.Is(err, ErrCommunication), errors.Is(err, ErrRemote):
		return true
	case errors.Is(err, context.DeadlineExceeded):
		return !NeverRan(err)
	}
	return false
}

// ejectLocked ejects m after fails consecutive failures, unless that would eject more than
// PoolOptions.MaxEjectedFraction of the set or leave fewer than MinHealthy healthy endpoints,
// or the pool is degraded — except that a pool with a Size and an idle endpoint to replace m
// with always ejects it.
//
// REQUIRES: c.mu is held.
func (c *client) ejectLocked(m *member, fails int) {
	if c.closed || m.removed || m.ejected {
		return
	}
	spare := c.spareLocked(m)
	if c.degraded && !spare {
		return
	}
	total, ejected, healthy := 0, 0, 0
	for _, o := range c.members {
		if o.removed {
			continue
		}
		total++
		if o.ejected {
			ejected++
		}
		if o.healthyLocked() {
			healthy++
		}
	}
	allowed := int(c.pool.MaxEjectedFraction * float64(total))
	if allowed < 1 && total >= 2 {
		allowed = 1
	}
	if ejected >= allowed || !spare && m.healthyLocked() && healthy-1 < min(c.pool.MinHealthy, total) {
		return
	}
	now := time.Now()
	if !m.readmitted.IsZero() && now.Sub(m.readmitted) >= c.pool.MaxEjectionTime {
		m.ejections = 0
	}
	m.ejections++
	m.ejectionsTotal++
	m.ejected = true
	m.ejectedUntil = now.Add(c.ejectionTime(m.ejections))
	c.opts.Logger.Warn("weft: ejecting endpoint after failed calls", slog.String("channel", c.name), slog.String("addr", m.addr),
		slog.Int("failures", fails), slog.Int("ejections", m.ejections), slog.Time("until", m.ejectedUntil))
	m.kickLocked()
	if c.pool.Size > 0 {
		c.rebalanceLocked()
	}
	c.publishLocked()
}
