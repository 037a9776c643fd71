package agent

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// TestFencedEnterBacksOutAfterStop: a Stop that lands between a fenced
// Enter's re-sync and its pin says goodbye (no guard is open yet), so the
// Enter must not hand a guard out after it.
func TestFencedEnterBacksOutAfterStop(t *testing.T) {
	t.Parallel()
	b, a, _ := startFencedWithDB(t)

	resynced := make(chan struct{})
	pin := make(chan struct{})
	a.hooks.afterResync = func() {
		close(resynced)
		<-pin
	}
	type result struct {
		g   Guard
		err error
	}
	entered := make(chan result, 1)
	go func() {
		g, err := a.Enter()
		entered <- result{g, err}
	}()
	<-resynced
	require.False(t, a.Stats().Fenced, "the re-sync renewed the lease")

	from := len(b.fake.received())
	stopAgent(t, a)
	goodbye := b.fake.waitStatus(t, from, 5*time.Second, func(s wire.Status) bool { return s.Leaving })
	require.Equal(t, a.ID(), goodbye.AgentID)

	close(pin)
	res := <-entered
	if res.err == nil {
		res.g.Exit()
	}
	require.ErrorIs(t, res.err, ErrStale, "a guard was handed out after the goodbye")
	require.Nil(t, res.g.Snapshot())
	require.Zero(t, a.openGuards())
}

// startFencedWithDB starts an agent with a DB on release L (applied; its
// epoch is returned) whose lease has run out: the fake broadcaster stopped
// granting, no beacon comes, and only Enter renews through the store.
func startFencedWithDB(t *testing.T) (*bundle, *Agent, int64) {
	t.Helper()
	b := setup(t, fakeOptions{lease: 600 * time.Millisecond, noBeacons: true})
	epoch := applyRelease(t, b.store, manifestL)
	cfg := b.config(t, true)
	cfg.HeartbeatInterval = time.Minute
	cfg.InitialLease = 600 * time.Millisecond
	a := startAgent(t, cfg)
	b.fake.answering.Store(false)
	require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
	return b, a, epoch
}

// TestNoStatusAfterTheGoodbye: a heartbeat waiting behind the goodbye
// must not be sent after it: the store would take its higher seq and
// renew the lease the goodbye ended. The test holds the status lock just
// before the goodbye for several heartbeat intervals, so a heartbeat
// waits for it; the agent's own log says what it sent, in order.
func TestNoStatusAfterTheGoodbye(t *testing.T) {
	t.Parallel()
	b := setup(t, fakeOptions{lease: 10 * time.Second})
	applyRelease(t, b.store, manifestL)
	for i := range 3 {
		var logs testenv.LogBuffer
		cfg := b.config(t, false)
		cfg.HeartbeatInterval = 20 * time.Millisecond
		cfg.Logger = zerolog.New(&logs).Level(zerolog.DebugLevel)
		a := startAgent(t, cfg)
		a.hooks.beforeGoodbye = func() {
			a.statusMu.Lock()
			time.Sleep(5 * cfg.HeartbeatInterval)
			a.statusMu.Unlock()
		}
		stopAgent(t, a)
		var sent []string
		for _, line := range strings.Split(logs.String(), "\n") {
			var e struct{ Message, Reason string }
			if json.Unmarshal([]byte(line), &e) == nil && e.Message == "status sent" {
				sent = append(sent, e.Reason)
			}
		}
		require.NotEmpty(t, sent)
		require.Equal(t, reasonLeaving, sent[len(sent)-1], "stop %d: the statuses sent, in order: %v", i, sent)
	}
}
