package schema_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// sqlAgent is an agent in another language as docs/PROTOCOL.md §10 has it
// call the store: plain SQL on a connection of a service's role that holds
// only the documented grants, JSON in and out, no schema.Store method.
type sqlAgent struct {
	db     *sqlx.DB
	schema string // quoted
}

func (a sqlAgent) query(t *testing.T, sql string, args ...any) (map[string]any, []byte) {
	t.Helper()
	var raw []byte
	require.NoError(t, a.db.QueryRowContext(context.Background(), fmt.Sprintf(sql, a.schema), args...).Scan(&raw))
	var out map[string]any
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return out, raw
}

// sync calls agent_sync with status as JSON text, the token's raw bytes
// and a lease.
func (a sqlAgent) sync(t *testing.T, status map[string]any, token []byte, leaseMS int64) (map[string]any, error) {
	t.Helper()
	body, err := json.Marshal(status)
	require.NoError(t, err)
	var raw []byte
	err = a.db.QueryRowContext(context.Background(), fmt.Sprintf(`SELECT %s.agent_sync($1::text::jsonb, $2, $3)`, a.schema), string(body), token, leaseMS).Scan(&raw)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return out, nil
}

func keysOf(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestAgentSQLInterface holds the store's interface for agents to what
// docs/PROTOCOL.md §10 documents: the JSON each function returns, member
// by member, the outcome of agent_sync for each verdict, and its errors.
func TestAgentSQLInterface(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	owner := testenv.Store(t)
	q := pq.QuoteIdentifier(owner.Schema())
	_, err := owner.DB().ExecContext(ctx, `CREATE TABLE `+q+`.instances (id int, name text, display_name text); CREATE TABLE `+q+`.legacy_flavors (id int)`)
	require.NoError(t, err)
	m, err := schema.ParseManifest("L.yaml", fmt.Appendf(nil, `
release: L
expand:
  - SELECT 1
removed:
  - table: %[1]s.instances
    columns: [name, display_name]
  - table: legacy_flavors
`, owner.Schema()))
	require.NoError(t, err)
	_, err = owner.ApplyRelease(ctx, m, "test")
	require.NoError(t, err)
	svc, _ := serviceRole(t, owner, "nova")
	agent := sqlAgent{db: svc.DB(), schema: q}

	t.Run("agent_state and agent_digest", func(t *testing.T) {
		st, raw := agent.query(t, `SELECT %s.agent_state()`)
		require.Equal(t, []string{"epoch", "releases", "store_id"}, keysOf(st))
		epoch, err := owner.Epoch(ctx)
		require.NoError(t, err)
		id, err := owner.ID(ctx)
		require.NoError(t, err)
		require.EqualValues(t, epoch, st["epoch"])
		require.Equal(t, id, st["store_id"])
		releases := st["releases"].([]any)
		require.Len(t, releases, 1)
		rel := releases[0].(map[string]any)
		require.Equal(t, []string{"name", "phase", "removals"}, keysOf(rel))
		require.Equal(t, "L", rel["name"])
		require.Equal(t, "expand", rel["phase"])
		require.Equal(t, []any{
			map[string]any{"table": owner.Schema() + ".instances", "columns": []any{"name", "display_name"}},
			map[string]any{"table": "legacy_flavors", "columns": []any{}}, // the whole table: [], never null
		}, rel["removals"])

		// With v and kind it is a state message, whose digest is the
		// store's.
		st["v"], st["kind"] = wire.Version, wire.KindState
		body, err := json.Marshal(st)
		require.NoError(t, err)
		msg, err := wire.DecodeState(body)
		require.NoError(t, err, string(raw))
		var digest string
		require.NoError(t, agent.db.GetContext(ctx, &digest, fmt.Sprintf(`SELECT %s.agent_digest()`, q)))
		require.Len(t, digest, 64)
		require.Equal(t, digest, msg.Digest())
	})

	t.Run("agent_sync", func(t *testing.T) {
		token := make([]byte, wire.TokenSize)
		_, err := rand.Read(token)
		require.NoError(t, err)
		// A status as the agent would publish it, without its token: the
		// token goes as its own parameter.
		status := func(incarnation string, seq uint64) map[string]any {
			body, err := wire.EncodeStatus(wire.Status{AgentID: "nova-api-1", Incarnation: incarnation, Service: "nova", Host: "h1",
				PID: 42, Version: "1.0", Releases: []string{"L"}, Seq: seq, SentAt: time.Now()})
			require.NoError(t, err)
			var st map[string]any
			require.NoError(t, json.Unmarshal(body, &st))
			require.NotContains(t, st, "token")
			return st
		}
		want := func(kept, conflict bool, refused any) map[string]any {
			return map[string]any{"kept": kept, "conflict": conflict, "refused": refused}
		}
		outcome := func(out map[string]any) map[string]any {
			require.Equal(t, []string{"conflict", "holder", "kept", "refused", "state"}, keysOf(out))
			return map[string]any{"kept": out["kept"], "conflict": out["conflict"], "refused": out["refused"]}
		}
		state, _ := agent.query(t, `SELECT %s.agent_state()`)

		// Enrol: kept, with the lease asked for, and the state read.
		out, err := agent.sync(t, status("i1", 100), token, 60_000)
		require.NoError(t, err)
		require.Equal(t, want(true, false, nil), outcome(out))
		require.Nil(t, out["holder"])
		require.Equal(t, state, out["state"])
		row := agentByID(t, owner, "nova-api-1")
		require.Greater(t, row.LeaseRemainingMS, int64(50_000))
		require.LessOrEqual(t, row.LeaseRemainingMS, int64(60_000))

		// A replay: not kept, not refused; the holder is shown.
		out, err = agent.sync(t, status("i1", 100), token, 60_000)
		require.NoError(t, err)
		require.Equal(t, want(false, false, nil), outcome(out))
		require.Equal(t, map[string]any{"incarnation": "i1", "host": "h1", "pid": float64(42), "seq": float64(100), "live": true}, out["holder"])

		// The token is its 32 raw bytes: its hex, or another token, is
		// refused, and the holder is not shown.
		other := make([]byte, wire.TokenSize)
		for _, tok := range [][]byte{[]byte(hex.EncodeToString(token)), other, token[:16]} {
			out, err = agent.sync(t, status("i1", 101), tok, 60_000)
			require.NoError(t, err)
			require.Equal(t, want(false, false, schema.RefusedUnauthenticated), outcome(out))
			require.Nil(t, out["holder"])
		}

		// A seq more than 2^40 ahead of the row's.
		out, err = agent.sync(t, status("i1", 100+schema.MaxSeqStep+1), token, 60_000)
		require.NoError(t, err)
		require.Equal(t, want(false, false, schema.RefusedSeqBound), outcome(out))

		// Another process under the ID while the lease is live.
		rivalToken := make([]byte, wire.TokenSize)
		_, err = rand.Read(rivalToken)
		require.NoError(t, err)
		out, err = agent.sync(t, status("i2", 1), rivalToken, 60_000)
		require.NoError(t, err)
		require.Equal(t, want(false, true, nil), outcome(out))
		require.Equal(t, "i1", out["holder"].(map[string]any)["incarnation"])

		// The goodbye, with lease 0: kept, and the lease is over.
		bye := status("i1", 100+schema.MaxSeqStep)
		bye["leaving"] = true
		out, err = agent.sync(t, bye, token, 0)
		require.NoError(t, err)
		require.Equal(t, want(true, false, nil), outcome(out))
		require.LessOrEqual(t, agentByID(t, owner, "nova-api-1").LeaseRemainingMS, int64(0))
	})

	t.Run("agent_sync errors", func(t *testing.T) {
		token := make([]byte, wire.TokenSize)
		_, err := rand.Read(token)
		require.NoError(t, err)
		full := map[string]any{"agent_id": "nova-api-2", "incarnation": "i", "service": "nova", "host": "h", "pid": 1, "version": "",
			"seq": 1, "applied_epoch": 0, "drained_epoch": 0, "inflight": 0}
		without := func(key string) map[string]any {
			st := map[string]any{}
			for k, v := range full {
				if k != key {
					st[k] = v
				}
			}
			return st
		}
		with := func(key string, v any) map[string]any {
			st := without(key)
			st[key] = v
			return st
		}
		for _, tc := range []struct {
			name   string
			status map[string]any
			code   pq.ErrorCode
		}{
			{"no version", without("version"), "23502"},
			{"no pid", without("pid"), "23502"},
			{"no inflight", without("inflight"), "23502"},
			{"pid beyond int4", with("pid", int64(1)<<32), "22003"},
			{"seq beyond bigint", with("seq", uint64(1)<<63), "22003"},
		} {
			_, err := agent.sync(t, tc.status, token, 10_000)
			var pqErr *pq.Error
			require.True(t, errors.As(err, &pqErr), "%s: %v", tc.name, err)
			require.Equal(t, tc.code, pqErr.Code, "%s: %v", tc.name, err)
		}
		out, err := agent.sync(t, full, token, 10_000)
		require.NoError(t, err)
		require.Equal(t, true, out["kept"], "the full status enrols")
	})
}
