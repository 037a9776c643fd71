package phase

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCanMove(t *testing.T) {
	allowed := map[[2]Phase]bool{
		{Expand, Migrate}:       true,
		{Migrate, Contract}:     true,
		{Contract, Contracting}: true,
		{Contract, Migrate}:     true,
		{Contracting, Complete}: true,
	}
	for _, from := range All {
		for _, to := range All {
			require.Equal(t, allowed[[2]Phase{from, to}], CanMove(from, to), "%s -> %s", from, to)
		}
	}
}

func TestParse(t *testing.T) {
	p, err := Parse("contract")
	require.NoError(t, err)
	require.Equal(t, Contract, p)
	_, err = Parse("contracted")
	require.ErrorContains(t, err, `unknown phase "contracted"`)
}

func TestHidesRemoved(t *testing.T) {
	require.False(t, Expand.HidesRemoved())
	require.False(t, Migrate.HidesRemoved())
	require.True(t, Contract.HidesRemoved())
	require.True(t, Contracting.HidesRemoved())
	require.True(t, Complete.HidesRemoved())
}

func TestRunnerOnly(t *testing.T) {
	for _, p := range All {
		require.Equal(t, p == Contracting || p == Complete, p.RunnerOnly(), p)
	}
}
