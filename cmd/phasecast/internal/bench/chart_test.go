package bench

import (
	"encoding/xml"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestSteps(t *testing.T) {
	for _, tc := range []struct{ v, up, down float64 }{
		{1, 1, 1}, {1.5, 2, 1}, {3, 5, 2}, {7, 10, 5}, {0.13, 0.2, 0.1}, {1001, 2000, 1000}, {94, 100, 50},
	} {
		require.InDelta(t, tc.up, stepUp(tc.v), 1e-9, "up %g", tc.v)
		require.InDelta(t, tc.down, stepDown(tc.v), 1e-9, "down %g", tc.v)
	}
}

func TestRenderCDF(t *testing.T) {
	ms := func(vs ...float64) []time.Duration {
		var out []time.Duration
		for _, v := range vs {
			out = append(out, time.Duration(v*1e6))
		}
		return out
	}
	svg := renderCDF("t <&>", "s", []series{
		{label: "a", color: "#000", data: ms(0, 0.0001, 3, 4, 5)},
		{label: "b", color: "#111", dash: "6 4", data: ms(900, 1001)},
		{label: "empty", color: "#222"},
	})
	require.NoError(t, xml.Unmarshal(svg, new(struct{})))
	require.Contains(t, string(svg), "t &lt;&amp;&gt;")
	require.Contains(t, string(svg), ">0.1<", "the axis starts at 0.1ms however fast a value")
	require.Contains(t, string(svg), ">2s<", "and ends at the 1-2-5 step above the slowest")
	require.NotContains(t, string(svg), ">5s<")
	require.Contains(t, string(svg), "empty — no data")
	require.NotContains(t, string(svg), "NaN")
	require.NotContains(t, string(svg), "Inf")
}
