package wire

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
)

func TestDigest(t *testing.T) {
	base := func() State {
		return State{Epoch: 7, Releases: []Release{
			{Name: "K", Phase: phase.Complete},
			{Name: "L", Phase: phase.Contract, Removals: []Removal{{Table: "nova.instances", Columns: []string{"name", "display_name"}}}},
		}}
	}
	b := base()
	want := b.Digest()
	require.Len(t, want, 64)

	t.Run("survives the wire, and ignores the envelope", func(t *testing.T) {
		body, err := EncodeState(base())
		require.NoError(t, err)
		got, err := DecodeState(body)
		require.NoError(t, err)
		require.Equal(t, want, got.Digest())
	})

	// The store id is left out on purpose (see Digest): digests written
	// by builds before it still match, and agents keep confirming by
	// digest across an upgrade.
	t.Run("ignores the store id", func(t *testing.T) {
		s := base()
		s.StoreID = "6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f"
		require.Equal(t, want, s.Digest())
	})

	// Every field the agent acts on changes the digest, including where
	// a string ends (so "ab","c" and "a","bc" differ).
	for name, change := range map[string]func(*State){
		"epoch":               func(s *State) { s.Epoch++ },
		"phase":               func(s *State) { s.Releases[1].Phase = phase.Migrate },
		"release name":        func(s *State) { s.Releases[0].Name = "J" },
		"release order":       func(s *State) { s.Releases[0], s.Releases[1] = s.Releases[1], s.Releases[0] },
		"release dropped":     func(s *State) { s.Releases = s.Releases[1:] },
		"table":               func(s *State) { s.Releases[1].Removals[0].Table = "instances" },
		"column dropped":      func(s *State) { s.Releases[1].Removals[0].Columns = []string{"name"} },
		"column boundary":     func(s *State) { s.Releases[1].Removals[0].Columns = []string{"named", "isplay_name"} },
		"whole table":         func(s *State) { s.Releases[1].Removals[0].Columns = nil },
		"removal dropped":     func(s *State) { s.Releases[1].Removals = nil },
		"removal moved":       func(s *State) { s.Releases[0].Removals, s.Releases[1].Removals = s.Releases[1].Removals, nil },
		"name/phase boundary": func(s *State) { s.Releases[0].Name, s.Releases[0].Phase = "Kc", "omplete" },
	} {
		t.Run("changes with "+name, func(t *testing.T) {
			s := base()
			change(&s)
			require.NotEqual(t, want, s.Digest())
		})
	}
}
