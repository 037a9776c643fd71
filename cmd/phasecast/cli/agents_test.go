package cli

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestAgentsAllowDenyForget: an operator allows a principal, sees who
// vouches for each agent in status, forgets a ghost, and every change is
// in the access audit with the actor.
func TestAgentsAllowDenyForget(t *testing.T) {
	b, _ := setupCLI(t)
	ctx := context.Background()

	code, out, errOut := b.run(t, "agents", "allow", "nova", "--amqp-user", "nova-agent", "--actor", "alice")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "amqp:nova-agent may enrol agents of nova")
	code, _, errOut = b.run(t, "agents", "allow", "nova", "--amqp-user", "x", "--db-role", "y")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "exactly one of --amqp-user and --db-role")
	code, out, errOut = b.run(t, "agents", "principals")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "amqp:nova-agent")

	require.NoError(t, recordAgent(ctx, b.store, "ghost-1", 0, "L"))
	code, out, errOut = b.run(t, "status")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "VOUCHED BY")
	require.Contains(t, out, "db:", "status shows who vouches for the agent")

	code, out, errOut = b.run(t, "agents", "forget", "ghost-1", "--actor", "alice")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "forgot agent ghost-1")
	agents, err := b.store.Agents(ctx)
	require.NoError(t, err)
	require.Empty(t, agents)
	code, _, errOut = b.run(t, "agents", "forget", "ghost-1")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, `no agent "ghost-1"`)

	code, _, errOut = b.run(t, "agents", "deny", "nova", "--amqp-user", "nova-agent", "--actor", "bob")
	require.Zero(t, code, errOut)

	audit, err := b.store.AccessAudit(ctx, 10)
	require.NoError(t, err)
	var got []string
	for _, a := range audit {
		got = append(got, a.Action+" "+a.Subject+" by "+a.Actor)
	}
	require.Contains(t, got, "allow amqp:nova-agent by alice")
	require.Contains(t, got, "forget ghost-1 by alice")
	require.Contains(t, got, "deny amqp:nova-agent by bob")
}

// TestBroadcastRefusesWithoutStateKey: secure by default. 'phasecast
// broadcast' without --state-key refuses to start and says how to go on;
// --insecure is the explicit way out.
func TestBroadcastRefusesWithoutStateKey(t *testing.T) {
	b, _ := setupCLI(t)
	code, _, errOut := b.run(t, "broadcast")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "no state key: give --state-key (make one with 'phasecast keys generate'), or run with --insecure")
	code, out, errOut := b.run(t, "broadcast", "--help")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "anyone who can publish to the state exchange can move agents' phases and leases")
}
