package integration

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/creack/pty"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// What an operator sees on a terminal: the runner's progress line and
// 'status --watch', run on a real pseudo-terminal.

// e2eTerminal is a pseudo-terminal of cols × rows: what the command
// writes to TTY is read from the other end into a buffer.
type e2eTerminal struct {
	TTY  *os.File
	ptmx *os.File
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
}

func e2eOpenTerminal(t *testing.T, cols, rows uint16) *e2eTerminal {
	t.Helper()
	ptmx, tty, err := pty.Open()
	require.NoError(t, err)
	require.NoError(t, pty.Setsize(ptmx, &pty.Winsize{Cols: cols, Rows: rows}))
	term := &e2eTerminal{TTY: tty, ptmx: ptmx, done: make(chan struct{})}
	go func() {
		defer close(term.done)
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			term.mu.Lock()
			term.out.Write(buf[:n])
			term.mu.Unlock()
			if err != nil {
				return // EIO once the terminal's side is closed
			}
		}
	}()
	t.Cleanup(func() { term.Close() })
	return term
}

// Output is everything written to the terminal so far, as the terminal
// got it (its line discipline turns "\n" into "\r\n").
func (term *e2eTerminal) Output() string {
	term.mu.Lock()
	defer term.mu.Unlock()
	return term.out.String()
}

// Close closes the terminal's side, and returns once all its output is
// read.
func (term *e2eTerminal) Close() string {
	_ = term.TTY.Close()
	<-term.done
	_ = term.ptmx.Close()
	return term.Output()
}

// waitOutput waits until the terminal's output, from offset on, matches re.
func (term *e2eTerminal) waitOutput(t *testing.T, limit time.Duration, from int, re *regexp.Regexp) {
	t.Helper()
	e2eWaitFor(t, limit, "the terminal to show "+re.String(), func() bool {
		out := term.Output()
		return len(out) >= from && re.MatchString(out[from:])
	})
}

// TestContractProgressRedrawnOnTerminal: on a terminal, the runner's
// progress line is redrawn in place (carriage return, clear to end of
// line), never wider than the terminal (a wrapped line cannot be redrawn:
// the carriage return goes back only to its last row), and the error that
// ends the run starts a line of its own.
func TestContractProgressRedrawnOnTerminal(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	held := e.startAgent(e.agentConfig("nova-held", true))
	e.toMigrate()
	g, err := held.Enter()
	require.NoError(t, err)
	defer g.Exit()
	e.flipChecked("L")

	const cols = 80
	term := e2eOpenTerminal(t, cols, 24)
	var stdout testenv.LogBuffer
	code := e.h.CLIWith(e.ctx, &stdout, term.TTY, "contract", "L", "--timeout", "2s")
	out := term.Close()
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nterminal:\n%q", stdout.String(), out)

	const redraw = "\r\033[K"
	draws := strings.Split(out, redraw)[1:]
	require.GreaterOrEqual(t, len(draws), 3, "the line is redrawn on every poll: %q", out)
	for i, d := range draws {
		line := d
		if j := strings.IndexAny(d, "\r\n"); j >= 0 {
			line = d[:j]
			require.Equal(t, len(draws)-1, i, "only the last redraw is followed by a new line, not appended to: %q", d)
		}
		require.Contains(t, line, "waiting for acknowledgements of L")
		require.LessOrEqual(t, utf8.RuneCountInString(line), cols-1, "a redrawn line fits the terminal: %q", line)
	}
	last := draws[len(draws)-1]
	require.Regexp(t, `^[^\r\n]*\r\nphasecast: release "L": timed out`, last, "the error starts a line of its own")
	require.Contains(t, out, "0/1 live agents acknowledged")
}

// TestStatusWatchShowsFlipOnTerminal: 'status --watch' on a terminal
// redraws the fleet view in place and shows a flip at once, from its
// NOTIFY (the refresh is an hour): phases, who leads, each agent's
// standing in the pending contract and the last flips.
func TestStatusWatchShowsFlipOnTerminal(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	b := e.startBroadcaster(true, nil)
	acker := e.startAgent(e.agentConfig("nova-acker", true))
	held := e.startAgent(e.agentConfig("nova-held", true))
	oldCfg := e.agentConfig("nova-old", true)
	oldCfg.Releases = []string{"K"}
	old := e.startAgent(oldCfg)
	e.toMigrate()

	term := e2eOpenTerminal(t, 200, 50)
	ctx, stop := context.WithCancel(e.ctx)
	var stderr testenv.LogBuffer
	exited := make(chan int, 1)
	go func() { exited <- e.h.CLIWith(ctx, term.TTY, &stderr, "status", "--watch", "--refresh", "1h") }()
	defer func() {
		stop()
		select {
		case code := <-exited:
			require.Zero(t, code, "stderr:\n%s", stderr.String())
		case <-time.After(e2eWait):
			t.Error("status --watch did not stop when interrupted")
		}
	}()
	term.waitOutput(t, e2eWait, 0, regexp.MustCompile(`L\s+migrate`))
	require.Contains(t, term.Output(), "leader: "+b.ID())

	g, err := held.Enter()
	require.NoError(t, err)
	defer g.Exit()
	from := len(term.Output())
	flipped, err := e.store.Flip(e.ctx, "L", phase.Contract, schema.FlipOptions{Actor: "watch-test",
		Check: e.store.ContractCheck(schema.ContractCheckOptions{Force: true})})
	require.NoError(t, err)
	// Shown from the flip's NOTIFY: the next refresh is an hour away.
	term.waitOutput(t, 5*time.Second, from, regexp.MustCompile(`L\s+contract\s+\d+\s+\d/3 live agents`))
	term.waitOutput(t, 5*time.Second, from, regexp.MustCompile(`L\s+migrate → contract\s+epoch \d+\s+watch-test`))
	out := term.Output()
	require.Equal(t, 1, strings.Count(out, "\033[2J"), "the screen is cleared once, then redrawn in place")
	require.Greater(t, strings.Count(out, "\033[H"), 1, "each frame is drawn from the top left corner")
	require.NotContains(t, stderr.String(), "LISTEN")

	// The agents' statuses send no NOTIFY: a flip's redraw shows what is
	// recorded by then, so wait for the acks to be recorded and flip
	// again, here with a rollback and a re-flip.
	e.waitDrained(flipped.Epoch, acker, old)
	e2eWaitFor(t, e2eWait, "the held agent to apply the flip", func() bool {
		row, ok := e.agentRow(held.ID())
		return ok && row.AppliedEpoch >= flipped.Epoch
	})
	_, err = e.store.Rollback(e.ctx, "L", schema.FlipOptions{Actor: "watch-test"})
	require.NoError(t, err)
	reflipped, err := e.store.Flip(e.ctx, "L", phase.Contract, schema.FlipOptions{Actor: "watch-test",
		Check: e.store.ContractCheck(schema.ContractCheckOptions{Force: true})})
	require.NoError(t, err)
	e.waitDrained(reflipped.Epoch, acker, old)
	e2eWaitFor(t, e2eWait, "the held agent to apply the re-flip", func() bool {
		row, ok := e.agentRow(held.ID())
		return ok && row.AppliedEpoch >= reflipped.Epoch
	})
	from = len(term.Output())
	e.apply(e2eReleaseK) // one more change, to redraw with every status recorded
	term.waitOutput(t, 5*time.Second, from, regexp.MustCompile(`K\s+expand`))
	frame := term.Output()[from:]
	require.Regexp(t, regexp.QuoteMeta(acker.ID())+`\s.*\sacknowledged`, frame)
	require.Regexp(t, regexp.QuoteMeta(held.ID())+`\s.*\sdraining \(1 guard open\)`, frame)
	require.Regexp(t, regexp.QuoteMeta(old.ID())+`\s.*\sold code`, frame)
}

// e2eReleaseK is a release with nothing to remove.
const e2eReleaseK = `release: K
description: nothing removed
`

// TestStatusWatchWritesPlainLinesOffTerminal: with stdout not a terminal,
// 'status --watch' writes the view as plain lines, without escape codes,
// once per change: a flip adds a view, and nothing new comes while
// nothing changes.
func TestStatusWatchWritesPlainLinesOffTerminal(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	a := e.startAgent(e.agentConfig("nova-api", true))

	var out, stderr testenv.LogBuffer
	ctx, stop := context.WithCancel(e.ctx)
	exited := make(chan int, 1)
	go func() { exited <- e.h.CLIWith(ctx, &out, &stderr, "status", "--watch", "--refresh", "50ms") }()
	e2eWaitFor(t, e2eWait, "the first view", func() bool { return strings.Contains(out.String(), "LAST FLIPS") })
	epoch := e.flip("L", phase.Migrate)
	e.waitDrained(epoch, a)
	e2eWaitFor(t, e2eWait, "the flip in the view", func() bool {
		return regexp.MustCompile(`L\s+migrate\s+` + regexp.QuoteMeta(strconv.FormatInt(epoch, 10))).MatchString(out.String())
	})
	e2eWaitFor(t, e2eWait, "the agent's ack in the view", func() bool {
		return regexp.MustCompile(regexp.QuoteMeta(a.ID()) + `\s+nova-api\s+\S+\s+` + strconv.FormatInt(epoch, 10) + "/" + strconv.FormatInt(epoch, 10) + `\s+live`).MatchString(out.String())
	})
	views := strings.Count(out.String(), "\n--- ")
	time.Sleep(500 * time.Millisecond) // ten refreshes, heartbeats meanwhile
	require.Equal(t, views, strings.Count(out.String(), "\n--- "), "no new view while nothing changes:\n%s", out.String())
	stop()
	select {
	case code := <-exited:
		require.Zero(t, code, "stderr:\n%s", stderr.String())
	case <-time.After(e2eWait):
		t.Fatal("status --watch did not stop when interrupted")
	}
	require.NotContains(t, out.String(), "\033", "no escape codes off a terminal")
	require.NotContains(t, out.String(), "\r")
	require.True(t, strings.HasPrefix(out.String(), "--- "), out.String())
}
