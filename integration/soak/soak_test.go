package soak

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// ciSeed is the seed CI runs, fixed before any run. A seed that ever
// fails becomes a test of its own, named for what it found, that calls
// runSoak with that seed and duration.
const ciSeed = 1

var (
	soakDuration = flag.Duration("soak.duration", 45*time.Second, "how long the nemesis injects faults while releases run")
	soakSeed     = flag.Uint64("soak.seed", ciSeed, "the seed of the fault schedule and of the services' choices")
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBuilt()
	os.Exit(code)
}

// TestSoak runs the fleet through releases while the nemesis injects
// faults, then checks the history (see doc.go).
func TestSoak(t *testing.T) {
	runSoak(t, *soakSeed, *soakDuration)
}

// summary is the run's one-line JSON report.
type summary struct {
	Seed             uint64         `json:"seed"`
	Duration         string         `json:"duration"`
	Releases         int            `json:"releases_completed"`
	ContractRuns     int            `json:"contract_runs"`
	Faults           map[string]int `json:"faults"`
	FaultsTotal      int            `json:"faults_total"`
	ServiceProcs     int            `json:"service_processes"`
	UnitsChecked     int            `json:"units_checked"`
	UnitsFailed      int            `json:"units_failed"`
	FailedBySQLSTATE map[string]int `json:"units_failed_by_sqlstate,omitempty"`
	OpenDuringDDL    int            `json:"guards_open_during_ddl"`
	PauseLimit       int            `json:"pause_limit_hits"`
	Violations       map[string]int `json:"violations"`
	Stalls           int            `json:"stalls"`
}

func runSoak(t *testing.T, seed uint64, duration time.Duration) summary {
	t.Logf("soak: seed %d, duration %s; reproduce with: go test -count=1 -run '%s$' ./integration/soak -soak.seed %d -soak.duration %s -v",
		seed, duration, t.Name(), seed, duration)
	// Setting up, stopping the fleet and checking take a minute or two
	// beyond the faults themselves.
	if deadline, ok := t.Deadline(); ok && time.Until(deadline) < duration+2*time.Minute {
		t.Fatalf("-soak.duration %s does not fit in the test binary's -timeout (%s left): add -timeout %s",
			duration, time.Until(deadline).Round(time.Second), (duration + 5*time.Minute).Round(time.Minute))
	}
	binaries(t)
	w := newWorld(t, seed, duration)
	w.newServices()
	w.newBroadcasters()
	// Every process is stopped when the test ends, failure or not, and
	// before the proxies close.
	t.Cleanup(w.stopAll)
	w.start = time.Now()
	for _, b := range w.bcasts {
		require.NoError(t, w.startBroadcaster(b, startLease))
	}
	require.True(t, waitFor(20*time.Second, func() bool { return w.leader() != nil }), "no broadcaster took the lead")
	for _, s := range w.services {
		_, err := w.startService(s, true)
		require.NoError(t, err)
	}
	require.True(t, waitFor(60*time.Second, func() bool {
		agents, err := w.store.LiveAgents(w.ctx)
		require.NoError(t, err)
		return len(agents) == numAgents
	}), "the fleet did not register")
	w.logf("fleet up: %d agents (%d with a store handle), 2 broadcasters", numAgents, numAgents/2)

	var current atomic.Int64
	current.Store(-1)
	nctx, stopNemesis := context.WithCancel(w.ctx)
	n := &nemesis{w: w, rng: rand.New(rand.NewPCG(seed, 1)), current: &current}
	var nwg sync.WaitGroup
	nwg.Go(func() { n.run(nctx) })
	completed, runs := w.drive(rand.New(rand.NewPCG(seed, 2)), &current, time.Now().Add(duration))
	stopNemesis()
	nwg.Wait()
	n.stop()
	w.logf("nemesis stopped; stopping the fleet")
	w.stopAll()

	res := w.check()
	s := summary{
		Seed: seed, Duration: duration.String(), Releases: completed, ContractRuns: runs, Faults: w.faults,
		ServiceProcs: len(w.procs), UnitsChecked: res.units, UnitsFailed: res.failed, FailedBySQLSTATE: res.byState,
		Violations: res.violations, Stalls: w.stalls, OpenDuringDDL: len(res.openDuringDDL), PauseLimit: len(res.pauseLimit),
	}
	for _, v := range w.faults {
		s.FaultsTotal += v
	}
	raw, err := json.Marshal(s)
	require.NoError(t, err)
	t.Logf("SOAK %s", raw)
	t.Logf("soak: %d releases completed in %d contract runs; %d faults %v; %d units of work checked (%d failed: %v); %d guards open during a DDL but not across its commit; %d hits of the pause limit; violations %v",
		completed, runs, s.FaultsTotal, w.faults, res.units, res.failed, res.byState, len(res.openDuringDDL), len(res.pauseLimit), res.violations)
	for _, d := range res.pauseLimit {
		t.Logf("the pause limit (not a violation): %s", d)
	}
	for _, d := range res.openDuringDDL {
		t.Logf("open during the DDL, not across its commit: %s", d)
	}
	for i, f := range res.findings {
		if i == 30 {
			t.Errorf("... and %d more violations", len(res.findings)-i)
			break
		}
		t.Errorf("seed %d: %s: %s", seed, f.kind, f.detail)
	}
	if len(res.findings) > 0 {
		t.Errorf("seed %d: %d violations; reproduce with: go test -count=1 -run '%s$' ./integration/soak -soak.seed %d -soak.duration %s -v",
			seed, len(res.findings), t.Name(), seed, duration)
		w.showLogs()
	}
	return s
}

// drive takes the releases one after another through migrate, contract
// and the contract runner until the deadline, the way a deployment script
// would. It returns how many completed and how many runner runs it took.
func (w *world) drive(rng *rand.Rand, current *atomic.Int64, deadline time.Time) (completed, runs int) {
	for i, rel := range w.releases {
		if time.Now().After(deadline) {
			break
		}
		current.Store(int64(i))
		if !w.flip(rel.name, "migrate") || !w.flip(rel.name, "contract") {
			return completed, runs
		}
		// An operator's script takes a moment between the flip and the
		// runner: the window a rollback and re-flip falls into.
		time.Sleep(time.Duration(rng.Int64N(int64(800 * time.Millisecond))))
		giveUp := time.Now().Add(2 * time.Minute)
		for {
			runs++
			doc := w.contract(rel, "driver")
			if doc.Outcome == schema.OutcomeComplete || doc.Outcome == schema.OutcomeAlreadyComplete {
				break
			}
			if time.Now().After(giveUp) {
				w.stalls++
				w.t.Errorf("%s did not complete within 2 minutes; last: exit %d %s", rel.name, doc.ExitCode, doc.Error)
				return completed, runs
			}
			w.logf("contract %s: %s (exit %d) %s; again", rel.name, doc.Outcome, doc.ExitCode, doc.Error)
			// A rollback without its re-flip yet, or one whose re-flip
			// failed: give the nemesis a moment, then flip it back.
			if w.phaseOf(rel.name) == phase.Migrate && !waitFor(3*time.Second, func() bool { return w.phaseOf(rel.name) != phase.Migrate }) {
				if code, _, stderr := w.cli(w.ctx, "flip", rel.name, "contract", "--actor", "driver"); code != 0 {
					w.logf("flip %s contract again: exit %d %s", rel.name, code, strings.TrimSpace(stderr))
				}
			}
			time.Sleep(300 * time.Millisecond)
		}
		completed++
		if w.present(rel) {
			w.find(finding{kind: violationNotDropped, detail: fmt.Sprintf("%s completed but %s still exists", rel.name, rel.what())})
		}
		time.Sleep(200*time.Millisecond + time.Duration(rng.Int64N(int64(800*time.Millisecond))))
	}
	current.Store(int64(len(w.releases)))
	return completed, runs
}

// flip runs 'phasecast flip' for the driver. A database that refuses
// connections because the shared server is full is not what the soak
// tests, so that is retried; any other refusal fails the run.
func (w *world) flip(name, to string) bool {
	w.t.Helper()
	for attempt := 1; ; attempt++ {
		code, _, stderr := w.cli(w.ctx, "flip", name, to, "--actor", "driver")
		switch {
		case code == 0:
			return true
		case transient(stderr) && attempt < 10:
			w.logf("flip %s %s: %s; again", name, to, strings.TrimSpace(stderr))
			time.Sleep(time.Second)
		default:
			w.t.Errorf("flip %s %s: exit %d: %s", name, to, code, stderr)
			return false
		}
	}
}

// transient reports whether a command failed only because it could not
// connect to the database.
func transient(stderr string) bool {
	return strings.Contains(stderr, "53300") || strings.Contains(stderr, "connect to ")
}

// contractDoc is 'phasecast contract --json' output.
type contractDoc struct {
	schema.ContractResult
	Error    string `json:"error"`
	ExitCode int    `json:"exit_code"`
}

// contract runs 'phasecast contract' and records a run that completed.
func (w *world) contract(rel release, actor string) contractDoc {
	watch := w.watchDrop(rel)
	code, stdout, stderr := w.cli(w.ctx, "contract", rel.name, "--json", "--timeout", "30s", "--lock-timeout", "200ms", "--actor", actor)
	var doc contractDoc
	if err := json.Unmarshal([]byte(stdout), &doc); err != nil {
		doc.Outcome, doc.Error = "unparsed", fmt.Sprintf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	doc.ExitCode = code
	after, before := watch.bounds(doc.DDLStart, doc.DDLEnd)
	if doc.Outcome == schema.OutcomeComplete {
		rec := contractRecord{rel: rel, epoch: doc.ContractEpoch, ackedAt: doc.AckedAt, ddlStart: doc.DDLStart, ddlEnd: doc.DDLEnd,
			commitAfter: after, commitBefore: before}
		for _, a := range doc.Acked {
			rec.acked = append(rec.acked, a.ID)
		}
		w.mu.Lock()
		w.contracts = append(w.contracts, rec)
		w.mu.Unlock()
		w.logf("contract %s complete (%s): epoch %d, %d acked, waited %s, DDL %s..%s, committed %s..%s", rel.name, actor, doc.ContractEpoch, len(rec.acked),
			doc.Waited.Round(time.Millisecond), w.at(doc.DDLStart.UnixNano()), w.at(doc.DDLEnd.UnixNano()), w.at(after.UnixNano()), w.at(before.UnixNano()))
	}
	return doc
}

// stopAll stops every process: services first (their workers, then their
// agents), then the broadcasters. Safe to call twice.
func (w *world) stopAll() {
	var wg sync.WaitGroup
	w.mu.Lock()
	procs := append([]*proc(nil), w.procs...)
	w.mu.Unlock()
	for _, p := range procs {
		wg.Go(func() { p.terminate(15 * time.Second) })
	}
	wg.Wait()
	for _, b := range w.bcasts {
		if p, _, _ := b.current(); p != nil {
			wg.Go(func() { p.terminate(15 * time.Second) })
		}
	}
	wg.Wait()
}

// showLogs prints the end of every broadcaster's log and of each service
// process that exited with an error, for a failed run.
func (w *world) showLogs() {
	for _, b := range w.bcasts {
		if p, _, _ := b.current(); p != nil {
			w.t.Logf("%s's log (last 3000 bytes):\n%s", p.Name, p.Tail(3000))
		}
	}
	for _, p := range w.procs {
		_, err := p.Exit()
		p.mu.Lock()
		killed := !p.killed.IsZero()
		p.mu.Unlock()
		if err != nil && !killed {
			w.t.Logf("%s exited: %v; its log (last 2000 bytes):\n%s", p.Name, err, p.Tail(2000))
		}
	}
}
