package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/phasecast/phasecast/internal/phase"
)

// Fault kinds, as counted in the summary.
const (
	faultBrokerCut       = "broker_cut"
	faultBrokerBlackhole = "broker_blackhole"
	faultAgentBlackhole  = "agent_broker_blackhole"
	faultStoreBlackhole  = "store_blackhole"
	faultKillAgent       = "kill_agent"
	faultKillLeader      = "kill_leader"
	faultPauseAgent      = "pause_agent"
	faultReLease         = "broadcaster_new_lease"
	faultDuplicateID     = "duplicate_id"
	faultRollback        = "rollback_reflip"
	faultWrongOrder      = "wrong_order"
)

// faultWeights is how often the nemesis draws each fault.
var faultWeights = []struct {
	kind   string
	weight int
}{
	{faultBrokerCut, 2}, {faultBrokerBlackhole, 1}, {faultAgentBlackhole, 2}, {faultStoreBlackhole, 2},
	{faultKillAgent, 2}, {faultKillLeader, 1}, {faultPauseAgent, 3}, {faultReLease, 1},
	{faultDuplicateID, 2}, {faultRollback, 2}, {faultWrongOrder, 2},
}

// nemesis injects faults drawn from its seeded generator until its
// context ends. Faults that last (a black-hole, a pause, a second process)
// heal on goroutines it owns and joins in stop.
type nemesis struct {
	w       *world
	rng     *rand.Rand
	current *atomic.Int64 // index of the release the driver works on
	wg      sync.WaitGroup
	active  atomic.Int32 // lasting faults under way
	ctx     context.Context
}

func (n *nemesis) run(ctx context.Context) {
	n.ctx = ctx
	total := 0
	for _, f := range faultWeights {
		total += f.weight
	}
	for {
		// Every draw comes from the seeded generator in the same order,
		// so a seed gives the same schedule of kinds, targets and
		// durations (the interleaving with the fleet's timing varies).
		pause := 300*time.Millisecond + time.Duration(n.rng.Int64N(int64(1200*time.Millisecond)))
		pick := n.rng.IntN(total)
		var kind string
		for _, f := range faultWeights {
			if pick < f.weight {
				kind = f.kind
				break
			}
			pick -= f.weight
		}
		target, dur := n.rng.IntN(1<<30), time.Duration(n.rng.Int64N(int64(time.Second)))
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		if n.active.Load() >= 2 && lasting(kind) {
			continue // keep the fleet able to make progress
		}
		n.inject(kind, target, dur)
	}
}

func lasting(kind string) bool {
	switch kind {
	case faultBrokerBlackhole, faultAgentBlackhole, faultStoreBlackhole, faultPauseAgent, faultDuplicateID, faultKillAgent, faultKillLeader:
		return true
	}
	return false
}

// later runs heal after d on a goroutine the nemesis joins; the stop of
// the run cuts d short.
func (n *nemesis) later(d time.Duration, heal func()) {
	n.active.Add(1)
	n.wg.Go(func() {
		defer n.active.Add(-1)
		select {
		case <-time.After(d):
		case <-n.ctx.Done():
		}
		heal()
	})
}

func (n *nemesis) stop() { n.wg.Wait() }

// pickService returns the target-th service that no other fault holds,
// claimed; nil if none is free.
func (n *nemesis) pickService(target int, withDB bool) *service {
	w := n.w
	for i := range len(w.services) {
		s := w.services[(target+i)%len(w.services)]
		if withDB && !s.hasDB {
			continue
		}
		if s.claim() {
			return s
		}
	}
	return nil
}

func (n *nemesis) inject(kind string, target int, jitter time.Duration) {
	w := n.w
	note := func(format string, args ...any) {
		w.countFault(kind)
		w.logf("FAULT %s: %s", kind, fmt.Sprintf(format, args...))
	}
	lease := w.maxLease()
	switch kind {
	case faultBrokerCut:
		note("every AMQP connection cut (agents and broadcasters)")
		for _, s := range w.services {
			s.amqp.Cut()
		}
		for _, b := range w.bcasts {
			b.amqp.Cut()
		}
	case faultBrokerBlackhole:
		d := 500*time.Millisecond + 2*jitter
		note("broker black-holed for everyone for %s", d)
		set := func(on bool) {
			for _, s := range w.services {
				s.amqp.Blackhole(on)
			}
			for _, b := range w.bcasts {
				b.amqp.Blackhole(on)
			}
		}
		set(true)
		n.later(d, func() { set(false); w.logf("HEAL %s: broker reachable", kind) })
	case faultAgentBlackhole:
		s := n.pickService(target, false)
		if s == nil {
			return
		}
		d := lease + 3*jitter
		note("%s's broker link black-holed for %s (lease %s)", s.id, d, lease)
		s.amqp.Blackhole(true)
		n.later(d, func() { s.amqp.Blackhole(false); s.release(); w.logf("HEAL %s: %s", kind, s.id) })
	case faultStoreBlackhole:
		s := n.pickService(target, true)
		if s == nil {
			return
		}
		d := time.Second + 4*jitter
		note("%s's store link black-holed for %s", s.id, d)
		s.pg.Blackhole(true)
		n.later(d, func() { s.pg.Blackhole(false); s.release(); w.logf("HEAL %s: %s", kind, s.id) })
	case faultKillAgent:
		s := n.pickService(target, false)
		if s == nil {
			return
		}
		p := s.current()
		d := 200*time.Millisecond + 2*jitter
		note("SIGKILL %s (pid %d), restarted under the same ID after %s", p.Name, p.PID, d)
		p.signal(syscall.SIGKILL)
		n.later(d, func() {
			<-p.Done()
			if _, err := w.startService(s, true); err != nil {
				w.t.Errorf("restart %s: %v", s.id, err)
			}
			s.release()
			w.logf("HEAL %s: %s restarted", kind, s.id)
		})
	case faultKillLeader:
		b := w.leader()
		if b == nil || !b.claim() {
			return
		}
		p, id, l := b.current()
		d := 500*time.Millisecond + 2*jitter
		note("SIGKILL the leading broadcaster %s (pid %d), restarted after %s", id, p.PID, d)
		p.signal(syscall.SIGKILL)
		n.later(d, func() {
			<-p.Done()
			if err := w.startBroadcaster(b, l); err != nil {
				w.t.Errorf("restart broadcaster: %v", err)
			}
			b.release()
			w.logf("HEAL %s: broadcaster slot %d restarted", kind, b.slot)
		})
	case faultPauseAgent:
		s := n.pickService(target, false)
		if s == nil {
			return
		}
		p := s.current()
		d := lease + 500*time.Millisecond + 2*jitter
		note("SIGSTOP %s (pid %d) for %s, longer than the lease %s", p.Name, p.PID, d, lease)
		p.signal(syscall.SIGSTOP)
		n.later(d, func() { p.signal(syscall.SIGCONT); s.release(); w.logf("HEAL %s: SIGCONT %s", kind, p.Name) })
	case faultReLease:
		b := w.bcasts[target%len(w.bcasts)]
		if !b.claim() {
			return
		}
		p, id, l := b.current()
		next := leaseChoices[int(jitter)%len(leaseChoices)]
		if next == l {
			next = leaseChoices[(int(jitter)+1)%len(leaseChoices)]
		}
		note("broadcaster %s stopped (SIGTERM) and restarted with --lease %s (was %s)", id, next, l)
		p.terminate(15 * time.Second)
		if err := w.startBroadcaster(b, next); err != nil {
			w.t.Errorf("restart broadcaster: %v", err)
		}
		b.release()
	case faultDuplicateID:
		s := n.pickService(target, false)
		if s == nil {
			return
		}
		d := time.Second + 3*jitter
		p, err := w.startService(s, false)
		if err != nil {
			w.t.Errorf("second process under %s: %v", s.id, err)
			s.release()
			return
		}
		note("second process %s started under the live agent's ID %s for %s", p.Name, s.id, d)
		n.later(d, func() { p.terminate(15 * time.Second); s.release(); w.logf("HEAL %s: %s stopped", kind, p.Name) })
	case faultRollback:
		i := int(n.current.Load())
		if i < 0 || i >= len(w.releases) {
			return
		}
		rel := w.releases[i]
		if w.phaseOf(rel.name) != phase.Contract {
			return
		}
		code, _, stderr := w.cli(n.ctx, "rollback", rel.name, "--actor", "nemesis")
		note("rollback %s: exit %d %s; re-flip after %s", rel.name, code, strings.TrimSpace(stderr), jitter/2)
		if code != 0 {
			return
		}
		time.Sleep(jitter / 2)
		if code, _, stderr := w.cli(n.ctx, "flip", rel.name, "contract", "--actor", "nemesis"); code != 0 {
			w.logf("re-flip %s: exit %d %s", rel.name, code, strings.TrimSpace(stderr))
		}
	case faultWrongOrder:
		n.wrongOrder(target, note)
	}
}

// wrongOrder runs an operator command that is out of order and must be
// refused, changing nothing, or (a second runner) must not run beside
// the first.
func (n *nemesis) wrongOrder(target int, note func(string, ...any)) {
	w := n.w
	i := int(n.current.Load())
	type cmd struct {
		args []string
		why  string
		runs bool // may legitimately succeed
	}
	var cmds []cmd
	// A release two or more ahead of the driver is still in expand and
	// stays there while the command runs.
	if ahead := i + 2 + target%3; ahead < len(w.releases) {
		r := w.releases[ahead].name
		cmds = append(cmds,
			cmd{[]string{"contract", r, "--timeout", "2s"}, "contract of a release in expand", false},
			cmd{[]string{"flip", r, "contract"}, "expand straight to contract", false},
			cmd{[]string{"flip", r, "complete"}, "complete by flip", false},
			cmd{[]string{"rollback", r}, "rollback of a release in expand", false},
		)
	}
	if i > 0 {
		r := w.releases[i-1-target%min(i, 3)].name
		cmds = append(cmds,
			cmd{[]string{"flip", r, "migrate"}, "migrate after complete", false},
			cmd{[]string{"flip", r, "contract"}, "contract after complete", false},
			cmd{[]string{"rollback", r}, "rollback after complete", false},
		)
	}
	if i >= 0 && i < len(w.releases) {
		// A second runner beside the driver's: refused while the first
		// holds the release, a no-op once it is complete, or the one that
		// completes it (recorded like any other).
		cmds = append(cmds, cmd{[]string{"contract", w.releases[i].name}, "a second contract runner", true})
	}
	cmds = append(cmds, cmd{[]string{"flip", "NOSUCH", "migrate"}, "an unknown release", false})
	c := cmds[target%len(cmds)]
	if c.runs {
		doc := w.contract(w.releases[i], "nemesis")
		note("%s (phasecast %s): %s, exit %d %s", c.why, strings.Join(c.args, " "), doc.Outcome, doc.ExitCode, doc.Error)
		return
	}
	code, stdout, stderr := w.cli(n.ctx, append(c.args, "--actor", "nemesis")...)
	note("%s (phasecast %s): exit %d %s", c.why, strings.Join(c.args, " "), code, strings.TrimSpace(stderr))
	// contract of a release that is already complete is a no-op (exit 0);
	// everything else here must be refused.
	if code == 0 {
		w.find(finding{kind: violationWrongOrder, detail: fmt.Sprintf("phasecast %s (%s) was accepted: %s", strings.Join(c.args, " "), c.why, strings.TrimSpace(stdout))})
	}
}
