package bench

import (
	"bytes"
	"fmt"
	"html"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// series is one curve of a chart.
type series struct {
	label string
	color string
	dash  string // SVG stroke-dasharray; "" for solid
	data  []time.Duration
}

// Chart geometry, in SVG user units.
const (
	chartW, plotH             = 820, 380
	marginL, marginR, marginT = 70, 24, 64
	axisH, rowH               = 50, 17 // below the plot: tick labels and axis title; one legend row
	maxPoints                 = 400    // per curve: quantiles beyond this add nothing visible
)

// writeChart writes the acknowledgement-latency distribution of one fleet
// size as an SVG: the cumulative share of acknowledgements (and of floor
// replies and poller sightings) recorded by each time after the commit, on
// a logarithmic time axis. It returns the file's path.
func writeChart(dir string, f *Fleet, setup Setup) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	ss := []series{{label: "floor: bare amqp091 fan-out and reply", color: "#7f7f7f", dash: "6 4", data: flat(f.Floor.flips)}}
	for _, pc := range f.Phasecast {
		color := map[Path]string{PathDB: "#1f77b4", PathDBRead: "#9467bd", PathNoDB: "#2ca02c"}[pc.Path]
		ss = append(ss, series{label: pathName(pc.Path), color: color, data: flat(pc.flips)})
	}
	if f.Polling != nil {
		ss = append(ss, series{label: fmt.Sprintf("polling every %s", time.Duration(setup.PollIntervalMS*1e6)), color: "#d62728", data: flat(f.Polling.flips)})
	}
	title := fmt.Sprintf("%d agent%s: flip commit → each acknowledgement recorded", f.Agents, plural(f.Agents))
	sub := fmt.Sprintf("cumulative share of every acknowledgement (reply, sighting) over %d flips; %d agents per AMQP connection; heartbeat %s",
		setup.Flips, setup.AgentsPerConn, time.Duration(setup.HeartbeatMS*1e6))
	svg := renderCDF(title, sub, ss)
	file := filepath.Join(dir, fmt.Sprintf("ack-latency-%d.svg", f.Agents))
	return file, os.WriteFile(file, svg, 0o644)
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func flat(flips [][]time.Duration) []time.Duration {
	var all []time.Duration
	for _, f := range flips {
		all = append(all, f...)
	}
	slices.Sort(all)
	return all
}

// renderCDF draws the series as cumulative curves on a log10 time axis in
// milliseconds, from a 1-2-5 step at or below the fastest value (but not
// below axisMinMS) to one at or above the slowest.
func renderCDF(title, subtitle string, ss []series) []byte {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		if len(s.data) > 0 {
			lo = math.Min(lo, clampMS(s.data[0]))
			hi = math.Max(hi, clampMS(s.data[len(s.data)-1]))
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 1000
	}
	lo, hi = stepDown(math.Max(lo, axisMinMS)), stepUp(hi)
	if hi <= lo {
		hi = stepUp(lo * 1.01)
	}
	plotW := float64(chartW - marginL - marginR)
	chartH := marginT + plotH + axisH + rowH*len(ss) + 12
	x := func(v float64) float64 {
		v = math.Min(math.Max(v, lo), hi)
		return marginL + (math.Log10(v)-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))*plotW
	}
	y := func(frac float64) float64 { return marginT + (1-frac)*plotH }
	xAxisTitleY := marginT + plotH + 38

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="12">`+"\n", chartW, chartH, chartW, chartH)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="24" font-size="16" font-weight="bold">%s</text>`+"\n", marginL, html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="%d" y="44" fill="#555">%s</text>`+"\n", marginL, html.EscapeString(subtitle))

	// Grid and axes: a line at every 1-2-5 step, labelled.
	for v := lo; v <= hi*1.0001; v = stepUp(v * 1.01) {
		px := x(v)
		stroke := "#e5e5e5"
		if isDecade(v) {
			stroke = "#c8c8c8"
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.1f" stroke="%s"/>`+"\n", px, marginT, px, y(0), stroke)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#333">%s</text>`+"\n", px, y(0)+16, tickLabel(v))
	}
	for _, frac := range []float64{0, 0.25, 0.5, 0.75, 1} {
		py := y(frac)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", marginL, py, marginL+plotW, py)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" fill="#333">%g%%</text>`+"\n", marginL-6, py+4, frac*100)
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999" stroke-dasharray="2 3"/>`+"\n", marginL, y(0.99), marginL+plotW, y(0.99))
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end" fill="#777" font-size="10">99%%</text>`+"\n", marginL+plotW-4, y(0.99)+11)
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="none" stroke="#333"/>`+"\n", marginL, marginT, plotW, plotH)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#333">milliseconds after the flip's commit (log scale)</text>`+"\n", marginL+plotW/2, xAxisTitleY)
	fmt.Fprintf(&b, `<text transform="translate(16 %d) rotate(-90)" text-anchor="middle" fill="#333">share recorded</text>`+"\n", marginT+plotH/2)

	// Curves.
	for _, s := range ss {
		if len(s.data) == 0 {
			continue
		}
		var pts bytes.Buffer
		n := len(s.data)
		step := max(1, n/maxPoints)
		fmt.Fprintf(&pts, "%.1f,%.1f", x(clampMS(s.data[0])), y(0))
		for i := 0; i < n; i += step {
			fmt.Fprintf(&pts, " %.1f,%.1f", x(clampMS(s.data[i])), y(float64(i+1)/float64(n)))
		}
		fmt.Fprintf(&pts, " %.1f,%.1f", x(clampMS(s.data[n-1])), y(1))
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>`+"\n", s.color, dashAttr(s.dash), pts.String())
	}

	// Legend, under the plot, with each curve's median and p99.
	lx, ly := float64(marginL), float64(xAxisTitleY+8)
	for _, s := range ss {
		ly += rowH
		text := html.EscapeString(s.label) + " — no data"
		if len(s.data) > 0 {
			d := dist(s.data)
			text = fmt.Sprintf("%s — p50 %s, p99 %s ms", html.EscapeString(s.label), fmtMS(d.P50MS), fmtMS(d.P99MS))
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"%s/>`+"\n", lx+8, ly-8, lx+32, ly-8, s.color, dashAttr(s.dash))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", lx+38, ly-4, text)
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// axisMinMS is where the time axis starts at the earliest: pollers that
// happen to read just after a commit see it within microseconds.
const axisMinMS = 0.1

func dashAttr(dash string) string {
	if dash == "" {
		return ""
	}
	return fmt.Sprintf(` stroke-dasharray="%s"`, dash)
}

// stepUp returns the smallest 1-2-5 step (…, 0.5, 1, 2, 5, 10, …) at or
// above v; stepDown the largest at or below.
func stepUp(v float64) float64 {
	d := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*d >= v*(1-1e-9) {
			return m * d
		}
	}
	return 10 * d
}

func stepDown(v float64) float64 {
	d := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{5, 2, 1} {
		if m*d <= v*(1+1e-9) {
			return m * d
		}
	}
	return d
}

func isDecade(v float64) bool {
	l := math.Log10(v)
	return math.Abs(l-math.Round(l)) < 1e-9
}

// clampMS is d in milliseconds, at least a microsecond so that it has a
// logarithm.
func clampMS(d time.Duration) float64 { return math.Max(ms(d), 0.001) }

func tickLabel(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%gs", v/1000)
	}
	return fmt.Sprintf("%g", v)
}

func fmtMS(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}
