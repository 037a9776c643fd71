package soak

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// TestCheckerFindsEachViolation feeds the checker a history and a store
// with one instance of each violation, beside work that is fine, and
// requires it to report exactly those: a checker that cannot fail would
// make every soak pass.
func TestCheckerFindsEachViolation(t *testing.T) {
	w := newWorld(t, 1, 0)
	ctx := context.Background()
	env := &fleet.Env{Store: w.store, DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(), Prefix: w.prefix, Logger: testenv.Logger()}
	b, err := env.StartBroadcaster(ctx, env.BroadcasterConfig(), true)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Stop(context.Background())) })

	// R0001 completes for real (no agents to wait for), then its column
	// comes back: complete but present. R0002's column goes while the
	// release is in expand: dropped before complete.
	r1, r2 := w.releases[0], w.releases[1]
	for _, to := range []phase.Phase{phase.Migrate, phase.Contract} {
		_, err := w.store.Flip(ctx, r1.name, to, schema.FlipOptions{Actor: "test"})
		require.NoError(t, err)
	}
	res, err := w.store.Contract(ctx, r1.name, schema.ContractOptions{Timeout: 10 * time.Second})
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	w.exec(`ALTER TABLE ` + schema.QuoteTable(r1.table) + ` ADD COLUMN ` + r1.column + ` text`)
	w.exec(`ALTER TABLE ` + schema.QuoteTable(r2.table) + ` DROP COLUMN ` + r2.column)

	base := time.Now().Add(-time.Minute)
	w.start = base
	at := func(ms int) int64 { return base.Add(time.Duration(ms) * time.Millisecond).UnixNano() }
	named := w.tables[r1.table]               // a snapshot from before the contract
	hidden := []string{"id", "keep", "c0005"} // one that no longer names r1's column
	history := func(name, agentID string, events ...Event) {
		path := filepath.Join(w.dir, name+".jsonl")
		h, err := CreateHistory(path)
		require.NoError(t, err)
		for _, e := range events {
			require.NoError(t, h.Write(e))
		}
		require.NoError(t, h.Close())
		// Never started: the checker reads its name, pid, start and end
		// (killed stands for the end).
		w.procs = append(w.procs, &proc{Proc: &testenv.Proc{Name: name, PID: len(w.procs) + 100, Started: time.Unix(0, at(0))},
			agent: agentID, history: path, killed: time.Unix(0, at(10_000))})
	}
	// The contract of R0001 at epoch 10: decided at 1140 ms, DDL from
	// 1150 to 1200 ms, committed between 1170 and 1180 ms, counting a1
	// and b1.
	w.contracts = append(w.contracts, contractRecord{rel: r1, epoch: 10,
		ackedAt: time.Unix(0, at(1140)), ddlStart: time.Unix(0, at(1150)), ddlEnd: time.Unix(0, at(1200)),
		commitAfter: time.Unix(0, at(1170)), commitBefore: time.Unix(0, at(1180)), acked: []string{"a1", "b1"}})
	// a1 never applied epoch 10 (a false ack), held a guard naming the
	// column across the DDL, and then failed on it.
	history("a1.1", "a1",
		Event{Kind: EventStart, At: at(10), Agent: "a1", Epoch: 5},
		Event{Kind: EventBegin, At: at(1100), Unit: 1, Epoch: 5, Table: r1.table, Columns: named},
		Event{Kind: EventEnd, At: at(1300), Unit: 1, Outcome: OutcomeOK},
		Event{Kind: EventBegin, At: at(1400), Unit: 2, Epoch: 5, Table: r1.table, Columns: named},
		Event{Kind: EventEnd, At: at(1410), Unit: 2, Outcome: OutcomeError, SQLState: "42703", Error: `column "c0001" does not exist`},
	)
	// b1 drained: it applied epoch 10 before the decision, its guard on
	// epoch 5 ended before it, and its work during the DDL does not name
	// the column.
	history("b1.1", "b1",
		Event{Kind: EventStart, At: at(10), Agent: "b1", Epoch: 5},
		Event{Kind: EventBegin, At: at(1000), Unit: 1, Epoch: 5, Table: r1.table, Columns: named},
		Event{Kind: EventEnd, At: at(1090), Unit: 1, Outcome: OutcomeOK},
		Event{Kind: EventApply, At: at(1095), Epoch: 10},
		Event{Kind: EventBegin, At: at(1120), Unit: 2, Epoch: 10, Table: r1.table, Columns: hidden},
		Event{Kind: EventEnd, At: at(1250), Unit: 2, Outcome: OutcomeOK},
	)
	// c1 (not counted) held a guard naming the column while the DDL ran
	// that ended before the commit may have happened: the DROP waited
	// for it. Listed, not a violation.
	history("c1.1", "c1",
		Event{Kind: EventStart, At: at(10), Agent: "c1", Epoch: 5},
		Event{Kind: EventBegin, At: at(1100), Unit: 1, Epoch: 5, Table: r1.table, Columns: named},
		Event{Kind: EventEnd, At: at(1175), Unit: 1, Outcome: OutcomeOK},
	)

	// d1 (not counted) was frozen inside a guard naming the column, and
	// the DROP committed while it was: the pause limit, listed apart.
	history("d1.1", "d1",
		Event{Kind: EventStart, At: at(10), Agent: "d1", Epoch: 5},
		Event{Kind: EventBegin, At: at(1050), Unit: 1, Epoch: 5, Table: r1.table, Columns: named},
		Event{Kind: EventEnd, At: at(4100), Unit: 1, Outcome: OutcomeOK},
	)
	w.procs[len(w.procs)-1].frozen = []freeze{{from: at(1060), to: at(4090)}}

	got := w.check()
	require.Equal(t, map[string]int{
		violationUndefined: 1, violationGuardAcross: 1, violationNotDropped: 1, violationEarlyDrop: 1, violationFalseAck: 1,
	}, got.violations, "findings: %v", got.findings)
	require.Equal(t, 6, got.units)
	require.Len(t, got.pauseLimit, 1)
	require.Contains(t, got.pauseLimit[0], "d1.1")
	require.Len(t, got.openDuringDDL, 1)
	require.Contains(t, got.openDuringDDL[0], "c1.1")
	for _, f := range got.findings {
		if f.kind == violationFalseAck {
			require.Contains(t, f.detail, "agent a1")
		}
	}
}
