package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/schema"
)

// expiredShownFor bounds how long an expired agent stays in the view;
// older ones are counted on one line.
const expiredShownFor = 10 * time.Minute

// watchWait bounds the wait for the LISTEN connection before the first
// frame; past it the view starts anyway and the refresh covers the gap.
const watchWait = 5 * time.Second

// watchOptions are the flags of 'status --watch'.
type watchOptions struct {
	flips   int
	refresh time.Duration
}

// watchStatus redraws the fleet view on every change until ctx ends:
// at once on the store's NOTIFY (every flip sends one), and every
// opts.refresh for what sends none (agent statuses and lease expiry:
// a NOTIFY per status batch would serialize the status writes on the
// server's notification queue lock). On a terminal it redraws the
// screen in place; elsewhere it writes the view as plain lines each
// time it changes.
func (g *globals) watchStatus(ctx context.Context, store *schema.Store, out io.Writer, opts watchOptions, log zerolog.Logger) error {
	fd, tty := terminal(out)
	dsn, err := config.WithApplicationName(g.databaseURL, schema.ApplicationName)
	if err != nil {
		return err
	}
	listener := pq.NewListener(dsn, 100*time.Millisecond, 5*time.Second, func(ev pq.ListenerEventType, err error) {
		switch ev {
		case pq.ListenerEventDisconnected:
			log.Warn().Err(config.RedactError(err, dsn)).Msg("LISTEN connection lost; reconnecting (the view refreshes meanwhile)")
		case pq.ListenerEventConnectionAttemptFailed:
			log.Debug().Err(config.RedactError(err, dsn)).Msg("LISTEN connection attempt failed")
		}
	})
	listened := make(chan error, 1)
	go func() { listened <- listener.Listen(store.NotifyChannel()) }()
	defer func() {
		_ = listener.Close()
		<-listened                  // Close unblocks a Listen still waiting to connect
		for range listener.Notify { // until the Listener closes it
		}
	}()
	wait := time.NewTimer(watchWait)
	select {
	case err := <-listened:
		listened <- err // for the deferred receive
		if err != nil && !errors.Is(err, net.ErrClosed) {
			log.Warn().Err(err).Msg("LISTEN failed; the view refreshes every --refresh only")
		}
	case <-wait.C:
		log.Warn().Dur("waited", watchWait).Msg("the LISTEN connection is not up yet; starting the view, which refreshes every --refresh meanwhile")
	case <-ctx.Done():
		wait.Stop()
		return nil
	}
	wait.Stop()

	refresh := time.NewTicker(opts.refresh)
	defer refresh.Stop()
	if tty {
		_, _ = io.WriteString(out, "\033[2J")
	}
	last := ""
	for {
		rep, err := store.Report(ctx, opts.flips)
		if ctx.Err() != nil {
			return nil
		}
		frame := ""
		if err != nil {
			frame = "phasecast status --watch: reading the store failed (retrying): " + oneLine(config.RedactError(err, g.databaseURL).Error()) + "\n"
		} else {
			frame = renderWatch(rep, tty)
		}
		switch {
		case tty:
			drawScreen(out, fd, time.Now().Format("15:04:05")+"  "+frame)
		case frame != last:
			fmt.Fprintf(out, "--- %s\n%s\n", time.Now().Format("2006-01-02T15:04:05.000Z07:00"), frame)
		}
		last = frame
		select {
		case <-ctx.Done():
			return nil
		case <-listener.Notify:
			// A burst of flips is one redraw.
			for drained := false; !drained; {
				select {
				case <-listener.Notify:
				default:
					drained = true
				}
			}
		case <-refresh.C:
		}
	}
}

// drawScreen redraws the terminal from its top left corner: each line cut
// to the width and cleared to its end, the lines past the height left out,
// and the rest of the screen cleared.
func drawScreen(out io.Writer, fd int, frame string) {
	lines := strings.Split(strings.TrimRight(frame, "\n"), "\n")
	width, height := terminalSize(fd)
	if height > 1 && len(lines) > height-1 {
		more := len(lines) - (height - 2)
		lines = append(lines[:height-2], fmt.Sprintf("… %d more lines: widen the terminal, or run 'phasecast status'", more))
	}
	var b strings.Builder
	b.WriteString("\033[H")
	for _, l := range lines {
		b.WriteString(fitWidth(l, width-1))
		b.WriteString("\033[K\n") // the terminal adds the carriage return
	}
	b.WriteString("\033[J")
	_, _ = io.WriteString(out, b.String())
}

// standing is an agent's part in release r's pending contract, with the
// detail the view shows: the guards open while draining, the epoch it is
// at while behind.
func standing(a schema.Agent, r schema.ReleaseStatus) string {
	switch s := a.StandingIn(r); s {
	case schema.StandingDraining:
		if a.Inflight > 0 {
			return fmt.Sprintf("%s (%d guard%s open)", s, a.Inflight, map[bool]string{true: "", false: "s"}[a.Inflight == 1])
		}
		return s
	case schema.StandingBehind:
		return fmt.Sprintf("%s (at epoch %d)", s, a.AppliedEpoch)
	default:
		return s
	}
}

// renderWatch is the fleet view of rep. With countdown, leases show the
// time left; without, only whether they are live, so that the view
// changes only when the fleet does.
func renderWatch(rep *schema.Report, countdown bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "schema %s, epoch %d", rep.Schema, rep.Epoch)
	if rep.Unpublished > 0 {
		fmt.Fprintf(&b, " (changes up to epoch %d not yet published)", rep.Unpublished)
	}
	b.WriteString("\n")
	b.WriteString(describeLeader(rep.Broadcasters, rep.Now, countdown) + "\n\n")

	w := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	var pending []schema.ReleaseStatus
	fmt.Fprintln(w, "RELEASE\tPHASE\tEPOCH\tACKNOWLEDGED")
	if len(rep.Releases) == 0 {
		fmt.Fprintln(w, "(none)")
	}
	for _, r := range rep.Releases {
		acked := "-"
		if r.PendingContract() {
			pending = append(pending, r)
			n, live := 0, 0
			for _, a := range rep.Agents {
				if a.Live() {
					live++
					if a.Acked(r.Name, *r.ContractEpoch) {
						n++
					}
				}
			}
			acked = fmt.Sprintf("%d/%d live agents (contract epoch %d)", n, live, *r.ContractEpoch)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", r.Name, r.Phase, r.PhaseEpoch, acked)
	}
	fmt.Fprintln(w)

	header := "AGENT\tSERVICE\tHOST/PID\tAPPLIED/DRAINED\tLEASE"
	for _, r := range pending {
		header += "\t" + r.Name
	}
	fmt.Fprintln(w, header)
	shown, hidden := 0, 0
	for _, a := range rep.Agents {
		lease := a.LeaseStanding()
		if lease == schema.StandingExpired && -time.Duration(a.LeaseRemainingMS)*time.Millisecond > expiredShownFor {
			hidden++
			continue
		}
		if lease == schema.StandingLive {
			if countdown {
				lease = (time.Duration(a.LeaseRemainingMS) * time.Millisecond).Round(100 * time.Millisecond).String()
			}
		}
		row := fmt.Sprintf("%s\t%s\t%s/%d\t%d/%d\t%s", a.ID, a.Service, a.Host, a.PID, a.AppliedEpoch, a.DrainedEpoch, lease)
		for _, r := range pending {
			row += "\t" + standing(a, r)
		}
		fmt.Fprintln(w, row)
		shown++
	}
	if shown == 0 {
		fmt.Fprintln(w, "(none)")
	}
	if hidden > 0 {
		fmt.Fprintf(w, "(%d more expired over %s ago)\n", hidden, expiredShownFor)
	}
	fmt.Fprintln(w)

	fmt.Fprintln(w, "LAST FLIPS")
	if len(rep.RecentFlips) == 0 {
		fmt.Fprintln(w, "(none)")
	}
	for _, f := range rep.RecentFlips {
		from := "(new)"
		if f.FromPhase != nil {
			from = *f.FromPhase
		}
		fmt.Fprintf(w, "%s\t%s\t%s → %s\tepoch %d\t%s\n", f.At.Local().Format("15:04:05"), f.Release, from, f.ToPhase, f.Epoch, f.Actor)
	}
	_ = w.Flush()
	return b.String()
}

// broadcasterFresh is how recently a broadcaster must have written its
// liveness to be shown as running: the runner's --broadcaster-within.
const broadcasterFresh = 15 * time.Second

// describeLeader says which broadcaster leads and which stand by, of
// those alive at now (the database clock); rows of broadcasters that
// stopped writing their liveness are counted apart. With ages, it says
// how long ago each was seen.
func describeLeader(bs []schema.Broadcaster, now time.Time, ages bool) string {
	var leaders, standby []string
	gone := 0
	for _, b := range bs {
		ago := now.Sub(b.LastSeen)
		if ago > broadcasterFresh {
			gone++
			continue
		}
		s := fmt.Sprintf("%s (%s/%d)", b.ID, b.Host, b.PID)
		if ages {
			s += fmt.Sprintf(" seen %s ago", max(ago, 0).Round(100*time.Millisecond))
		}
		if b.Leader {
			leaders = append(leaders, s)
		} else {
			standby = append(standby, s)
		}
	}
	line := "leader: none (no broadcaster leads: agents hear of no flip)"
	if len(leaders) > 0 {
		line = "leader: " + strings.Join(leaders, ", ")
	}
	if len(standby) > 0 {
		line += "; standing by: " + strings.Join(standby, ", ")
	}
	if gone > 0 {
		line += fmt.Sprintf("; %d not seen for over %s", gone, broadcasterFresh)
	}
	return line
}
