package broadcaster_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// A leader that lost its broker kept the PostgreSQL lock and kept
// writing its liveness row as leader, so a standby that could reach the
// broker never took over and the contract runner counted a leader that
// published nothing. Now it stops counting as leader at once, steps down
// within Config.BrokerLossTimeout, and contends again once a broker
// answers.
func TestLeaderWithoutBrokerStepsDown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	bundle := setup(t)
	states := bundle.stateConsumer(t)
	applyRelease(t, bundle.store, "L")
	proxy := faultproxy.Start(t, "127.0.0.1:5672")

	cfgA, cfgB := bundle.config(t), bundle.config(t)
	cfgA.ID, cfgB.ID = "deaf-a", "heard-b"
	cfgA.AMQPURL = proxy.URL(testenv.AMQPURL())
	cfgA.BrokerLossTimeout = time.Second
	cfgA.LivenessInterval, cfgB.LivenessInterval = 100*time.Millisecond, 100*time.Millisecond
	a := start(t, cfgA)
	b := start(t, cfgB)
	require.True(t, a.IsLeader())
	alive, err := bundle.store.LeaderAliveWithin(ctx, 5*time.Second)
	require.NoError(t, err)
	require.True(t, alive, "a leader that publishes counts as alive")

	proxy.Refuse(true)
	proxy.Cut()
	cut := time.Now()
	require.Eventually(t, func() bool {
		rep, err := bundle.store.Report(ctx, 0)
		require.NoError(t, err)
		for _, row := range rep.Broadcasters {
			if row.ID == "deaf-a" {
				return !row.Leader && row.LastSeen.After(cut)
			}
		}
		return false
	}, 2*time.Second, 10*time.Millisecond, "the deaf leader's liveness row still says it leads")
	t.Logf("liveness row no longer leading %s after the cut", time.Since(cut).Round(time.Millisecond))

	require.Eventually(t, func() bool { return b.IsLeader() && !a.IsLeader() }, cfgA.BrokerLossTimeout+3*time.Second, 10*time.Millisecond,
		"the standby that reaches the broker never took over from the deaf leader")
	t.Logf("standby led %s after the cut (BrokerLossTimeout %s)", time.Since(cut).Round(time.Millisecond), cfgA.BrokerLossTimeout)
	epoch := flip(t, bundle.store, "L", phase.Migrate)
	waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })

	// The broker answers again: the old leader contends, and leads once
	// the other one goes.
	proxy.Refuse(false)
	time.Sleep(5 * cfgA.LivenessInterval)
	require.True(t, b.IsLeader())
	require.False(t, a.IsLeader())
	require.NoError(t, b.Stop(ctx))
	require.Eventually(t, func() bool {
		alive, err := bundle.store.LeaderAliveWithin(ctx, 5*time.Second)
		require.NoError(t, err)
		return a.IsLeader() && alive
	}, 5*time.Second, 10*time.Millisecond, "the former leader contends again once it reaches a broker")
}
