package soak

import (
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
)

// Kinds of violation the checker reports.
const (
	violationUndefined   = "query_failed_undefined"  // 42703 or 42P01
	violationGuardAcross = "guard_open_across_drop"  // a guard on a snapshot naming what a DROP removed, open while it committed
	violationNotDropped  = "complete_but_present"    // a release in complete whose columns still exist
	violationEarlyDrop   = "dropped_before_complete" // a release not complete whose columns are gone
	violationFalseAck    = "ack_without_drain"       // the runner counted an agent whose process had not drained
	violationWrongOrder  = "wrong_order_accepted"    // an operator command out of order was accepted
)

type finding struct {
	kind   string
	detail string
}

// unit is one unit of work from a history, its times in Unix nanoseconds.
type unit struct {
	proc     *procHistory
	epoch    int64
	table    string
	cols     string // the columns, comma-joined and interned
	begin    int64
	end      int64 // the process's last known moment if it never ended
	ended    bool
	outcome  string
	sqlstate string
	err      string
}

// procHistory is what one service process recorded.
type procHistory struct {
	p       *proc
	started int64 // agent.Start was called; 0 if it never returned
	epoch   int64 // the snapshot's epoch when Start returned
	applies []epochAt
	units   []*unit
	end     int64
}

type epochAt struct{ at, epoch int64 }

// appliedBy reports whether the process held a snapshot of at least epoch
// by time at.
func (h *procHistory) appliedBy(epoch, at int64) bool {
	if h.started == 0 || h.started > at {
		return false
	}
	if h.epoch >= epoch {
		return true
	}
	for _, a := range h.applies {
		if a.at <= at && a.epoch >= epoch {
			return true
		}
	}
	return false
}

// checkResult is the checker's verdict and its counts.
type checkResult struct {
	units      int
	failed     int // units that failed for any reason (not cancelled)
	byState    map[string]int
	findings   []finding
	violations map[string]int
	// pauseLimit lists the hits of the pause limit (pauseLimit).
	pauseLimit []string
	// openDuringDDL lists guards on a snapshot naming what a DROP removed
	// that were open while its DDL ran but not provably across its commit.
	openDuringDDL []string
}

// check reads every history and the store and applies the rules of the
// soak.
//
// Clocks: the services stamp events with the wall clock
// (time.Now().UnixNano()), and the runner's AckedAt, DDLStart and DDLEnd,
// and the catalog watch that narrows the commit, are the test process's
// wall clock; every process runs on this machine, so they read one clock
// and compare directly. The database's clock is not used: mapping it
// onto the wall clock would only add an error bar.
//
// The DROP's commit is not observable from outside the runner's session.
// It lies inside [DDLStart, DDLEnd], and after the last catalog read that
// still saw the column was sent and before the first that did not was
// answered (dropWatch). A guard counts as open across the commit only
// when it began before the earliest moment the commit can have been and
// ended after the latest: no false alarms, at the price of missing guards
// that straddle the commit by less than the watch's resolution (a few
// milliseconds). Guards that overlap the DDL without provably straddling
// its commit are listed apart (openDuringDDL).
func (w *world) check() checkResult {
	w.t.Helper()
	res := checkResult{byState: map[string]int{}, violations: map[string]int{}}
	add := func(kind, format string, args ...any) {
		res.findings = append(res.findings, finding{kind: kind, detail: fmt.Sprintf(format, args...)})
	}
	intern := map[string]string{}
	var hists []*procHistory
	byAgent := map[string][]*procHistory{}
	for _, p := range w.procs {
		h := &procHistory{p: p, end: p.end().UnixNano()}
		open := map[int64]*unit{}
		err := ReadHistory(p.history, func(e Event) {
			switch e.Kind {
			case EventStart:
				h.started, h.epoch = e.At, e.Epoch
			case EventApply:
				h.applies = append(h.applies, epochAt{e.At, e.Epoch})
			case EventBegin:
				key := strings.Join(e.Columns, ",")
				if k, ok := intern[key]; ok {
					key = k
				} else {
					intern[key] = key
				}
				u := &unit{proc: h, epoch: e.Epoch, table: e.Table, cols: key, begin: e.At, end: h.end}
				open[e.Unit] = u
				h.units = append(h.units, u)
			case EventEnd:
				if u := open[e.Unit]; u != nil {
					u.end, u.ended, u.outcome, u.sqlstate, u.err = e.At, true, e.Outcome, e.SQLState, e.Error
					delete(open, e.Unit)
				}
			}
		})
		// A process stopped before it opened its history never started
		// its agent: there is nothing of it to check.
		if !errors.Is(err, fs.ErrNotExist) {
			require.NoError(w.t, err)
		}
		hists = append(hists, h)
		byAgent[p.agent] = append(byAgent[p.agent], h)
	}

	// 1. No query failed with undefined column or table.
	for _, h := range hists {
		for _, u := range h.units {
			res.units++
			if u.outcome == OutcomeError {
				res.failed++
				res.byState[u.sqlstate]++
			}
			if u.sqlstate == "42703" || u.sqlstate == "42P01" {
				detail := fmt.Sprintf("%s (pid %d) epoch %d on %s from %s to %s: %s", h.p.Name, h.p.PID, u.epoch, u.table, w.at(u.begin), w.at(u.end), u.err)
				if h.p.frozenWhile(u.begin, u.end) {
					res.pauseLimit = append(res.pauseLimit, "query failed after a freeze inside its guard: "+detail)
				} else {
					add(violationUndefined, "%s", detail)
				}
			}
		}
	}

	// 2. No guard on a snapshot naming a dropped column or table was open
	// while the DROP committed.
	var all []*unit
	var longest int64
	for _, h := range hists {
		for _, u := range h.units {
			all = append(all, u)
			longest = max(longest, u.end-u.begin)
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].begin < all[j].begin })
	for _, c := range w.contracts {
		from, to := c.ddlStart.UnixNano(), c.ddlEnd.UnixNano()
		after, before := c.commitAfter.UnixNano(), c.commitBefore.UnixNano()
		i := sort.Search(len(all), func(i int) bool { return all[i].begin >= from-longest })
		for ; i < len(all) && all[i].begin < to; i++ {
			u, h := all[i], all[i].proc
			if u.end <= from || !c.rel.names(u.table, u.cols) {
				continue
			}
			state := "ended " + w.at(u.end)
			if !u.ended {
				state = "never ended; process gone " + w.at(u.end)
			}
			detail := fmt.Sprintf("%s: %s (pid %d) held a guard on epoch %d naming %s from %s (%s); DDL of contract epoch %d %s..%s, committed between %s and %s; outcome %q %s",
				c.rel.name, h.p.Name, h.p.PID, u.epoch, c.rel.what(), w.at(u.begin), state, c.epoch, w.at(from), w.at(to), w.at(after), w.at(before), u.outcome, u.sqlstate)
			switch {
			case u.begin < after && u.end > before && h.p.frozenWhile(u.begin, after):
				res.pauseLimit = append(res.pauseLimit, "guard frozen across a DROP: "+detail)
			case u.begin < after && u.end > before:
				add(violationGuardAcross, "%s", detail)
			default:
				// Open while the DDL ran, but not provably across its
				// commit: most often a transaction whose lock the DROP
				// had to wait for. Safe, but the runner had gone ahead.
				res.openDuringDDL = append(res.openDuringDDL, detail)
			}
		}
	}

	// 3. Every release in complete has its columns gone, and no other has.
	rep, err := w.store.Report(w.ctx, 0)
	require.NoError(w.t, err)
	phases := map[string]phase.Phase{}
	for _, r := range rep.Releases {
		phases[r.Name] = r.Phase
	}
	for _, rel := range w.releases {
		switch present := w.present(rel); {
		case phases[rel.name] == phase.Complete && present:
			add(violationNotDropped, "%s is complete but %s still exists", rel.name, rel.what())
		case phases[rel.name] != phase.Complete && !present:
			add(violationEarlyDrop, "%s is in %s but %s is gone", rel.name, phases[rel.name], rel.what())
		}
	}

	// 4. Every agent the runner counted as acknowledged had drained: each
	// of its processes running when the runner decided held a snapshot of
	// the contract epoch and no guard on an older one.
	for _, c := range w.contracts {
		at := c.ackedAt.UnixNano()
		for _, id := range c.acked {
			var running []*procHistory
			var last *procHistory
			for _, h := range byAgent[id] {
				if h.p.Started.UnixNano() < at && h.end > at {
					running = append(running, h)
				}
				if h.started != 0 && h.started < at && (last == nil || h.started > last.started) {
					last = h
				}
			}
			if len(running) == 0 {
				if last == nil || !last.appliedBy(c.epoch, at) {
					add(violationFalseAck, "%s: agent %s counted as acknowledged epoch %d at %s, but no process under that ID held that epoch then", c.rel.name, id, c.epoch, w.at(at))
				}
				continue
			}
			for _, h := range running {
				if h.started == 0 || h.started > at {
					continue // its agent had not started: not yet one of the fleet
				}
				if !h.appliedBy(c.epoch, at) {
					add(violationFalseAck, "%s: agent %s counted as acknowledged epoch %d at %s, but its process %s (pid %d) had not applied it", c.rel.name, id, c.epoch, w.at(at), h.p.Name, h.p.PID)
					continue
				}
				for _, u := range h.units {
					if u.epoch < c.epoch && u.begin < at && u.end > at {
						add(violationFalseAck, "%s: agent %s counted as acknowledged epoch %d at %s, but its process %s (pid %d) held a guard on epoch %d from %s to %s", c.rel.name, id, c.epoch, w.at(at), h.p.Name, h.p.PID, u.epoch, w.at(u.begin), w.at(u.end))
						break
					}
				}
			}
		}
	}

	res.findings = append(append([]finding(nil), w.findings...), res.findings...)
	for _, f := range res.findings {
		res.violations[f.kind]++
	}
	sort.SliceStable(res.findings, func(i, j int) bool { return res.findings[i].kind < res.findings[j].kind })
	return res
}

// at renders a wall-clock time as the run's offset.
func (w *world) at(ns int64) string {
	return fmt.Sprintf("+%.3fs", time.Unix(0, ns).Sub(w.start).Seconds())
}

func (r release) what() string {
	if r.column == "" {
		return "table " + r.table
	}
	return "column " + r.table + "." + r.column
}
