package wire

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// The decoders face bytes from the network. Whatever they accept must
// survive being re-encoded, as the broadcaster and agents do when they pass
// state on, and a rejection must be one of the documented sentinels.

func FuzzDecodeState(f *testing.F) {
	for _, s := range []string{
		validState,
		`{"v":1,"kind":"state","epoch":0,"releases":[]}`,
		`{"v":1,"kind":"state","epoch":1,"releases":[{"name":"L","phase":"expand","removals":[]}],"sent_at":"2026-01-02T03:04:05+05:30"}`,
		`{"v":1,"kind":"state","epoch":1,"releases":[{"name":"L","phase":"expand"},{"name":"L","phase":"migrate"}]}`,
		`{"v":1,"kind":"state","epoch":-1}`,
		`{"V":1,"KIND":"state","Epoch":3}`,
		`{"v":1,"kind":"state","store_id":"","epoch":2,"releases":[]}`,
		`{"v":1,"kind":"state","store_id":7,"epoch":2,"releases":[]}`,
		validStatus,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		s, err := DecodeState(body)
		if err != nil {
			requireSentinel(t, err)
			require.Equal(t, State{}, s)
			return
		}
		b1, err := EncodeState(s)
		require.NoError(t, err)
		s2, err := DecodeState(b1)
		require.NoError(t, err, "re-encoded as %s", b1)
		require.Equal(t, normState(s), normState(s2))
		b2, err := EncodeState(s2)
		require.NoError(t, err)
		require.Equal(t, string(b1), string(b2), "encoding is not a fixed point")
	})
}

func FuzzDecodeStatus(f *testing.F) {
	for _, s := range []string{
		validStatus,
		`{"v":1,"kind":"status","agent_id":"a"}`,
		`{"v":1,"kind":"status","agent_id":"a","releases":[],"seq":18446744073709551615,"sent_at":"0001-01-01T00:00:00Z"}`,
		`{"v":1,"kind":"status","agent_id":"a","applied_epoch":1,"drained_epoch":2}`,
		`{"v":1,"kind":"status","agent_id":"a\u0000\ud800<>&","host":"\u2028"}`,
		`{"v":1,"kind":"status","store_id":"\u0000\ud800","agent_id":"a"}`,
		`{"v":1,"kind":"status","store_id":null,"agent_id":"a","leaving":true}`,
		validGrant,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		s, err := DecodeStatus(body)
		if err != nil {
			requireSentinel(t, err)
			require.Equal(t, Status{}, s)
			return
		}
		b1, err := EncodeStatus(s)
		require.NoError(t, err)
		s2, err := DecodeStatus(b1)
		require.NoError(t, err, "re-encoded as %s", b1)
		require.Equal(t, normStatus(s), normStatus(s2))
		b2, err := EncodeStatus(s2)
		require.NoError(t, err)
		require.Equal(t, string(b1), string(b2), "encoding is not a fixed point")
	})
}

func FuzzDecodeGrant(f *testing.F) {
	for _, s := range []string{
		validGrant,
		`{"v":1,"kind":"grant","lease_ms":1}`,
		`{"v":1,"kind":"grant","agent_id":"a","seq":1,"lease_ms":9223372036854775,"epoch":9223372036854775807}`,
		`{"v":1,"kind":"grant","lease_ms":0}`,
		`{"v":1,"kind":"grant","lease_ms":9223372036854775807}`,
		validState,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		g, err := DecodeGrant(body)
		if err != nil {
			requireSentinel(t, err)
			require.Equal(t, Grant{}, g)
			return
		}
		require.Positive(t, g.Lease(), "an accepted grant has a positive lease")
		b1, err := EncodeGrant(g)
		require.NoError(t, err)
		g2, err := DecodeGrant(b1)
		require.NoError(t, err, "re-encoded as %s", b1)
		require.Equal(t, g, g2)
		b2, err := EncodeGrant(g2)
		require.NoError(t, err)
		require.Equal(t, string(b1), string(b2), "encoding is not a fixed point")
	})
}

func requireSentinel(t *testing.T, err error) {
	t.Helper()
	for _, s := range []error{ErrTooLarge, ErrMalformed, ErrVersion, ErrKind, ErrInvalid} {
		if errors.Is(err, s) {
			return
		}
	}
	t.Fatalf("error wraps no sentinel: %v", err)
}

// normState makes states comparable: JSON does not keep nil apart from
// empty, and a time keeps its instant and offset but not its *Location.
func normState(s State) State {
	s.SentAt = s.SentAt.UTC()
	if len(s.Releases) == 0 {
		s.Releases = nil
	}
	rs := make([]Release, len(s.Releases))
	for i, r := range s.Releases {
		if len(r.Removals) == 0 {
			r.Removals = nil
		}
		rms := make([]Removal, len(r.Removals))
		for j, rm := range r.Removals {
			if len(rm.Columns) == 0 {
				rm.Columns = nil
			}
			rms[j] = rm
		}
		if r.Removals != nil {
			r.Removals = rms
		}
		rs[i] = r
	}
	if s.Releases != nil {
		s.Releases = rs
	}
	return s
}

func normStatus(s Status) Status {
	s.SentAt = s.SentAt.UTC()
	if len(s.Releases) == 0 {
		s.Releases = nil
	}
	return s
}
