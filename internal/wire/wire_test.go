package wire

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
)

// Valid messages of each kind, as a sender on the wire would write them.
const (
	validState  = `{"v":1,"kind":"state","store_id":"6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f","epoch":7,"releases":[{"name":"L","phase":"contract","removals":[{"table":"nova.instances","columns":["name","display_name"]},{"table":"legacy_flavors"}]}],"sent_at":"2026-01-02T03:04:05.123456789Z"}`
	validStatus = `{"v":2,"kind":"status","store_id":"6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f","agent_id":"api-1","incarnation":"i1","token":"abababababababababababababababababababababababababababababababab","service":"api","host":"h1","pid":42,"version":"1.2.3","releases":["L"],"seq":3,"applied_epoch":7,"drained_epoch":6,"inflight":2,"queue":"phasecast.agent.api-1","sent_at":"2026-01-02T03:04:05Z"}`
	validGrant  = `{"v":1,"kind":"grant","agent_id":"api-1","seq":3,"lease_ms":15000,"epoch":7}`
)

func decodeKind(kind Kind, body []byte) error {
	var err error
	switch kind {
	case KindState:
		_, err = DecodeState(body)
	case KindStatus:
		_, err = DecodeStatus(body)
	case KindGrant:
		_, err = DecodeGrant(body)
	default:
		panic("unknown kind " + kind)
	}
	return err
}

func TestDecodeAcceptsValid(t *testing.T) {
	for kind, body := range map[Kind]string{KindState: validState, KindStatus: validStatus, KindGrant: validGrant} {
		require.NoError(t, decodeKind(kind, []byte(body)), kind)
	}
}

func TestDecodeRejects(t *testing.T) {
	tests := []struct {
		name     string
		kind     Kind
		body     string
		err      error
		contains string
	}{
		// Not JSON, or not one JSON object.
		{name: "empty body", kind: KindState, body: ``, err: ErrMalformed},
		{name: "malformed JSON", kind: KindState, body: `{"v":1,"kind":"state"`, err: ErrMalformed},
		{name: "not JSON", kind: KindGrant, body: `v=1 kind=grant`, err: ErrMalformed},
		{name: "array", kind: KindStatus, body: `[]`, err: ErrMalformed},
		{name: "null", kind: KindGrant, body: `null`, err: ErrVersion},
		{name: "string", kind: KindState, body: `"state"`, err: ErrMalformed},
		{name: "trailing object", kind: KindGrant, body: validGrant + `{}`, err: ErrMalformed},
		{name: "trailing garbage", kind: KindGrant, body: validGrant + ` x`, err: ErrMalformed},
		{name: "two messages", kind: KindGrant, body: validGrant + "\n" + validGrant, err: ErrMalformed},

		// Version and kind.
		{name: "unknown version", kind: KindState, body: strings.Replace(validState, `"v":1`, `"v":2`, 1), err: ErrVersion, contains: "v=2 (this build speaks v=1)"},
		{name: "version zero", kind: KindGrant, body: strings.Replace(validGrant, `"v":1`, `"v":0`, 1), err: ErrVersion},
		{name: "no version", kind: KindGrant, body: strings.Replace(validGrant, `"v":1,`, ``, 1), err: ErrVersion},
		{name: "version as string", kind: KindGrant, body: strings.Replace(validGrant, `"v":1`, `"v":"1"`, 1), err: ErrMalformed},
		{name: "version as float", kind: KindGrant, body: strings.Replace(validGrant, `"v":1`, `"v":1.5`, 1), err: ErrMalformed},
		{name: "status as state", kind: KindState, body: validStatus, err: ErrKind, contains: `got "status", want "state"`},
		{name: "grant as status", kind: KindStatus, body: validGrant, err: ErrKind, contains: `got "grant", want "status"`},
		{name: "state as grant", kind: KindGrant, body: validState, err: ErrKind, contains: `got "state", want "grant"`},
		{name: "no kind", kind: KindGrant, body: strings.Replace(validGrant, `"kind":"grant",`, ``, 1), err: ErrKind, contains: `got "", want "grant"`},
		{name: "kind differs in case", kind: KindGrant, body: strings.Replace(validGrant, `"kind":"grant"`, `"kind":"Grant"`, 1), err: ErrKind},
		{name: "kind as number", kind: KindGrant, body: strings.Replace(validGrant, `"kind":"grant"`, `"kind":3`, 1), err: ErrMalformed},

		// Wrong types.
		{name: "epoch as string", kind: KindState, body: strings.Replace(validState, `"epoch":7`, `"epoch":"7"`, 1), err: ErrMalformed, contains: "epoch"},
		{name: "epoch as float", kind: KindState, body: strings.Replace(validState, `"epoch":7`, `"epoch":7.5`, 1), err: ErrMalformed},
		{name: "epoch overflows int64", kind: KindState, body: strings.Replace(validState, `"epoch":7`, `"epoch":9223372036854775808`, 1), err: ErrMalformed},
		{name: "releases as object", kind: KindState, body: strings.Replace(validState, `"releases":[`, `"releases":{"x":[`, 1) + "}", err: ErrMalformed},
		{name: "phase as number", kind: KindState, body: strings.Replace(validState, `"phase":"contract"`, `"phase":2`, 1), err: ErrMalformed},
		{name: "columns as string", kind: KindState, body: strings.Replace(validState, `"columns":["name","display_name"]`, `"columns":"name"`, 1), err: ErrMalformed},
		{name: "sent_at not a time", kind: KindState, body: strings.Replace(validState, `"2026-01-02T03:04:05.123456789Z"`, `"yesterday"`, 1), err: ErrMalformed},
		{name: "agent_id as number", kind: KindStatus, body: strings.Replace(validStatus, `"agent_id":"api-1"`, `"agent_id":1`, 1), err: ErrMalformed},
		{name: "seq negative", kind: KindStatus, body: strings.Replace(validStatus, `"seq":3`, `"seq":-3`, 1), err: ErrMalformed},
		{name: "pid as string", kind: KindStatus, body: strings.Replace(validStatus, `"pid":42`, `"pid":"42"`, 1), err: ErrMalformed},
		{name: "releases as string", kind: KindStatus, body: strings.Replace(validStatus, `"releases":["L"]`, `"releases":"L"`, 1), err: ErrMalformed},
		{name: "lease_ms as string", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000`, `"lease_ms":"15s"`, 1), err: ErrMalformed},
		{name: "lease_ms as float", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000`, `"lease_ms":1.5`, 1), err: ErrMalformed},
		{name: "grant epoch as bool", kind: KindGrant, body: strings.Replace(validGrant, `"epoch":7`, `"epoch":true`, 1), err: ErrMalformed},

		// State values.
		{name: "negative epoch", kind: KindState, body: strings.Replace(validState, `"epoch":7`, `"epoch":-1`, 1), err: ErrInvalid, contains: "negative epoch -1"},
		{name: "unknown phase", kind: KindState, body: strings.Replace(validState, `"phase":"contract"`, `"phase":"contracted"`, 1), err: ErrInvalid, contains: `release "L" has unknown phase "contracted"`},
		{name: "empty phase", kind: KindState, body: strings.Replace(validState, `"phase":"contract",`, ``, 1), err: ErrInvalid, contains: "unknown phase"},
		{name: "duplicate release", kind: KindState, body: `{"v":1,"kind":"state","epoch":1,"releases":[{"name":"L","phase":"expand"},{"name":"M","phase":"expand"},{"name":"L","phase":"migrate"}]}`, err: ErrInvalid, contains: `release "L" listed twice`},
		{name: "release with no name", kind: KindState, body: `{"v":1,"kind":"state","epoch":1,"releases":[{"phase":"expand"}]}`, err: ErrInvalid, contains: "release with no name"},
		{name: "removal with no table", kind: KindState, body: `{"v":1,"kind":"state","epoch":1,"releases":[{"name":"L","phase":"contract","removals":[{"columns":["a"]}]}]}`, err: ErrInvalid, contains: `release "L" has a removal with no table`},

		// Status values.
		{name: "status without agent_id", kind: KindStatus, body: strings.Replace(validStatus, `"agent_id":"api-1",`, ``, 1), err: ErrInvalid, contains: "status with no agent_id"},
		{name: "status with empty agent_id", kind: KindStatus, body: strings.Replace(validStatus, `"agent_id":"api-1"`, `"agent_id":""`, 1), err: ErrInvalid, contains: "no agent_id"},
		{name: "agent_id too long", kind: KindStatus, body: strings.Replace(validStatus, `"agent_id":"api-1"`, `"agent_id":"`+strings.Repeat("a", 201)+`"`, 1), err: ErrInvalid, contains: "agent_id longer than 200 bytes"},
		{name: "drained ahead of applied", kind: KindStatus, body: strings.Replace(validStatus, `"drained_epoch":6`, `"drained_epoch":8`, 1), err: ErrInvalid, contains: "drained_epoch 8 ahead of applied_epoch 7"},
		{name: "negative applied epoch", kind: KindStatus, body: strings.NewReplacer(`"applied_epoch":7`, `"applied_epoch":-1`, `"drained_epoch":6`, `"drained_epoch":-2`).Replace(validStatus), err: ErrInvalid, contains: "negative epoch"},
		{name: "negative drained epoch", kind: KindStatus, body: strings.Replace(validStatus, `"drained_epoch":6`, `"drained_epoch":-1`, 1), err: ErrInvalid, contains: "negative epoch"},
		{name: "seq beyond bigint", kind: KindStatus, body: strings.Replace(validStatus, `"seq":3`, `"seq":9223372036854775808`, 1), err: ErrInvalid, contains: "seq"},
		{name: "pid beyond int4", kind: KindStatus, body: strings.Replace(validStatus, `"pid":42`, `"pid":4294967296`, 1), err: ErrInvalid, contains: "pid"},
		{name: "NUL in a string", kind: KindStatus, body: strings.Replace(validStatus, `"host":"h1"`, `"host":"h\u00001"`, 1), err: ErrInvalid, contains: "NUL"},
		{name: "incarnation too long", kind: KindStatus, body: strings.Replace(validStatus, `"incarnation":"i1"`, `"incarnation":"`+strings.Repeat("i", MaxIncarnation+1)+`"`, 1), err: ErrInvalid, contains: "incarnation longer than"},
		{name: "NUL in the incarnation", kind: KindStatus, body: strings.Replace(validStatus, `"incarnation":"i1"`, `"incarnation":"a\u0000b"`, 1), err: ErrInvalid, contains: "NUL"},
		{name: "status with no incarnation", kind: KindStatus, body: strings.Replace(validStatus, `"incarnation":"i1",`, ``, 1), err: ErrInvalid, contains: "no incarnation"},
		{name: "status with no token", kind: KindStatus, body: strings.Replace(validStatus, `"token":"`+strings.Repeat("ab", TokenSize)+`",`, ``, 1), err: ErrInvalid, contains: "without a token"},
		{name: "status with a short token", kind: KindStatus, body: strings.Replace(validStatus, `"token":"ab`, `"token":"`, 1), err: ErrInvalid, contains: "without a token"},
		{name: "status with an upper-case token", kind: KindStatus, body: strings.Replace(validStatus, `"token":"ab`, `"token":"AB`, 1), err: ErrInvalid, contains: "without a token"},
		{name: "status of version 1", kind: KindStatus, body: strings.Replace(validStatus, `"v":2`, `"v":1`, 1), err: ErrVersion, contains: "status v=1 (this build speaks v=2)"},
		{name: "negative inflight", kind: KindStatus, body: strings.Replace(validStatus, `"inflight":2`, `"inflight":-1`, 1), err: ErrInvalid, contains: "negative inflight"},

		// Grant values.
		{name: "grant with lease 0", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000`, `"lease_ms":0`, 1), err: ErrInvalid, contains: "lease_ms 0"},
		{name: "grant without lease", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000,`, ``, 1), err: ErrInvalid, contains: "lease_ms 0"},
		{name: "grant with negative lease", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000`, `"lease_ms":-1`, 1), err: ErrInvalid},
		{name: "grant with a lease Duration cannot hold", kind: KindGrant, body: strings.Replace(validGrant, `"lease_ms":15000`, `"lease_ms":9223372036854776`, 1), err: ErrInvalid, contains: "lease_ms 9223372036854776 is too large"},
		{name: "grant with negative epoch", kind: KindGrant, body: strings.Replace(validGrant, `"epoch":7`, `"epoch":-1`, 1), err: ErrInvalid, contains: "epoch -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			valid := map[Kind]string{KindState: validState, KindStatus: validStatus, KindGrant: validGrant}
			require.NotEqual(t, valid[tt.kind], tt.body, "the replacement did not apply")
			err := decodeKind(tt.kind, []byte(tt.body))
			require.ErrorIs(t, err, tt.err)
			if tt.contains != "" {
				require.ErrorContains(t, err, tt.contains)
			}
		})
	}
}

func TestDecodeSizeLimit(t *testing.T) {
	pad := func(body string, size int) []byte {
		return append([]byte(body), bytes.Repeat([]byte(" "), size-len(body))...)
	}
	for kind, body := range map[Kind]string{KindState: validState, KindStatus: validStatus, KindGrant: validGrant} {
		t.Run(string(kind), func(t *testing.T) {
			require.NoError(t, decodeKind(kind, pad(body, MaxMessageSize)), "exactly the limit is allowed")
			err := decodeKind(kind, pad(body, MaxMessageSize+1))
			require.ErrorIs(t, err, ErrTooLarge)
			require.ErrorContains(t, err, "1048577 bytes (limit 1048576)")
		})
	}
}

func TestDecodeIgnoresUnknownFields(t *testing.T) {
	t.Run("state", func(t *testing.T) {
		body := `{"v":1,"kind":"state","epoch":7,"future":{"x":[1,2]},"releases":[{"name":"L","phase":"migrate","owner":"team-a","removals":[{"table":"t","columns":["a"],"ttl":3}]}]}`
		s, err := DecodeState([]byte(body))
		require.NoError(t, err)
		require.Equal(t, State{V: 1, Kind: KindState, Epoch: 7, Releases: []Release{{
			Name: "L", Phase: phase.Migrate, Removals: []Removal{{Table: "t", Columns: []string{"a"}}},
		}}}, s)
	})
	t.Run("status", func(t *testing.T) {
		body := `{"v":2,"kind":"status","agent_id":"a","incarnation":"i","token":"abababababababababababababababababababababababababababababababab","applied_epoch":2,"drained_epoch":1,"zone":"eu-1","labels":{"k":"v"}}`
		s, err := DecodeStatus([]byte(body))
		require.NoError(t, err)
		require.Equal(t, Status{V: 2, Kind: KindStatus, AgentID: "a", Incarnation: "i", Token: "abababababababababababababababababababababababababababababababab", AppliedEpoch: 2, DrainedEpoch: 1}, s)
	})
	t.Run("grant", func(t *testing.T) {
		body := `{"v":1,"kind":"grant","agent_id":"a","seq":9,"lease_ms":1000,"epoch":3,"leader":"b-2","extra":null}`
		g, err := DecodeGrant([]byte(body))
		require.NoError(t, err)
		require.Equal(t, Grant{V: 1, Kind: KindGrant, AgentID: "a", Seq: 9, LeaseMS: 1000, Epoch: 3}, g)
		require.Equal(t, time.Second, g.Lease())
	})
}

func TestWireRoundTrip(t *testing.T) {
	sentAt := time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)

	t.Run("state", func(t *testing.T) {
		in := State{StoreID: "6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f", Epoch: 42, SentAt: sentAt, Releases: []Release{
			{Name: "K", Phase: phase.Complete},
			{Name: "L", Phase: phase.Contract, Removals: []Removal{
				{Table: "nova.instances", Columns: []string{"Name", "display name"}},
				{Table: "legacy_flavors"},
			}},
		}}
		body, err := EncodeState(in)
		require.NoError(t, err)
		out, err := DecodeState(body)
		require.NoError(t, err)
		in.V, in.Kind = Version, KindState
		require.Equal(t, in, out)
	})
	t.Run("state with no releases", func(t *testing.T) {
		body, err := EncodeState(State{Epoch: 1})
		require.NoError(t, err)
		require.Contains(t, string(body), `"releases":[]`)
		out, err := DecodeState(body)
		require.NoError(t, err)
		require.Equal(t, State{V: Version, Kind: KindState, Epoch: 1, Releases: []Release{}}, out)
	})
	t.Run("status", func(t *testing.T) {
		in := Status{
			StoreID: "6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f",
			AgentID: "api-1", Service: "api", Host: "h1", PID: 42, Version: "1.2.3",
			Releases: []string{"K", "L"}, Seq: 1<<63 - 1, AppliedEpoch: 7, DrainedEpoch: 7,
			Inflight: 3, Incarnation: "i1", Token: strings.Repeat("ab", TokenSize), SentAt: sentAt,
		}
		body, err := EncodeStatus(in)
		require.NoError(t, err)
		out, err := DecodeStatus(body)
		require.NoError(t, err)
		in.V, in.Kind = StatusVersion, KindStatus
		require.Equal(t, in, out)
	})
	t.Run("grant", func(t *testing.T) {
		in := Grant{AgentID: "api-1", Seq: 3, LeaseMS: 15000, Epoch: 7}
		body, err := EncodeGrant(in)
		require.NoError(t, err)
		out, err := DecodeGrant(body)
		require.NoError(t, err)
		in.V, in.Kind = Version, KindGrant
		require.Equal(t, in, out)
		require.Equal(t, 15*time.Second, out.Lease())
	})
	t.Run("encoders stamp version and kind", func(t *testing.T) {
		body, err := EncodeGrant(Grant{V: 9, Kind: KindState, AgentID: "a", LeaseMS: 1})
		require.NoError(t, err)
		var h header
		require.NoError(t, json.Unmarshal(body, &h))
		require.Equal(t, header{V: Version, Kind: KindGrant}, h)

		body, err = EncodeStatus(Status{V: 9, Kind: KindGrant, AgentID: "a"})
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(body, &h))
		require.Equal(t, header{V: StatusVersion, Kind: KindStatus}, h)

		body, err = EncodeState(State{V: 9, Kind: KindGrant})
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(body, &h))
		require.Equal(t, header{V: Version, Kind: KindState}, h)
	})
}

// The store id is an optional field, not a new protocol version: a
// message of a build that predates it decodes as before with no store id
// (the broadcaster then drops such a status as naming no store), and one
// without a store id encodes without the field.
func TestStoreIDIsOptional(t *testing.T) {
	withoutStoreID := func(body string) string {
		out := strings.Replace(body, `"store_id":"6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f",`, ``, 1)
		require.NotEqual(t, body, out, "the replacement did not apply")
		return out
	}
	st, err := DecodeState([]byte(withoutStoreID(validState)))
	require.NoError(t, err)
	require.Empty(t, st.StoreID)
	status, err := DecodeStatus([]byte(withoutStoreID(validStatus)))
	require.NoError(t, err)
	require.Empty(t, status.StoreID)

	st, err = DecodeState([]byte(validState))
	require.NoError(t, err)
	require.Equal(t, "6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f", st.StoreID)
	status, err = DecodeStatus([]byte(validStatus))
	require.NoError(t, err)
	require.Equal(t, "6f1c2a8e-3d4b-4c5a-9e7f-0a1b2c3d4e5f", status.StoreID)

	body, err := EncodeStatus(Status{AgentID: "a"})
	require.NoError(t, err)
	require.NotContains(t, string(body), "store_id")
	body, err = EncodeState(State{Epoch: 1})
	require.NoError(t, err)
	require.NotContains(t, string(body), "store_id")
}

func TestSignVerify(t *testing.T) {
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, ed25519.SeedSize))
	pub := priv.Public().(ed25519.PublicKey)
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, ed25519.SeedSize)).Public().(ed25519.PublicKey)
	body := []byte(validState)
	sig := Sign(priv, body)

	tests := []struct {
		name string
		key  ed25519.PublicKey
		body []byte
		sig  string
		err  error // nil: must verify
	}{
		{name: "good", key: pub, body: body, sig: sig},
		{name: "unsigned", key: pub, body: body, sig: "", err: ErrUnsigned},
		{name: "tampered body", key: pub, body: []byte(strings.Replace(validState, `"epoch":7`, `"epoch":8`, 1)), sig: sig, err: ErrBadSignature},
		{name: "body with a trailing space", key: pub, body: append(append([]byte{}, body...), ' '), sig: sig, err: ErrBadSignature},
		{name: "garbage base64", key: pub, body: body, sig: "not base64!", err: ErrBadSignature},
		{name: "short signature", key: pub, body: body, sig: "AAAA", err: ErrBadSignature},
		{name: "signature of another body", key: pub, body: body, sig: Sign(priv, []byte(validGrant)), err: ErrBadSignature},
		{name: "other key", key: other, body: body, sig: sig, err: ErrBadSignature},
		{name: "public key of the wrong size", key: pub[:16], body: body, sig: sig, err: ErrBadSignature},
		{name: "empty public key", key: ed25519.PublicKey{}, body: body, sig: sig, err: ErrBadSignature},
		{name: "nil key passes unsigned", key: nil, body: body, sig: ""},
		{name: "nil key passes garbage", key: nil, body: body, sig: "not base64!"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Verify(tt.key, tt.body, tt.sig)
			if tt.err == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tt.err)
		})
	}
}

func TestMACCheckMAC(t *testing.T) {
	key := []byte("status-secret")
	body := []byte(validStatus)
	mac := MAC(key, body)
	require.Equal(t, mac, MAC(key, body), "MAC is deterministic")

	tests := []struct {
		name string
		key  []byte
		body []byte
		mac  string
		err  error // nil: must pass
	}{
		{name: "good", key: key, body: body, mac: mac},
		{name: "unsigned", key: key, body: body, mac: "", err: ErrUnsigned},
		{name: "tampered body", key: key, body: []byte(strings.Replace(validStatus, `"seq":3`, `"seq":4`, 1)), mac: mac, err: ErrBadSignature},
		{name: "garbage base64", key: key, body: body, mac: "%%%", err: ErrBadSignature},
		{name: "truncated mac", key: key, body: body, mac: mac[:8], err: ErrBadSignature},
		{name: "other key", key: []byte("other-secret"), body: body, mac: mac, err: ErrBadSignature},
		{name: "empty key is a key", key: []byte{}, body: body, mac: mac, err: ErrBadSignature},
		{name: "empty key, its own mac", key: []byte{}, body: body, mac: MAC([]byte{}, body)},
		{name: "nil key passes unsigned", key: nil, body: body, mac: ""},
		{name: "nil key passes garbage", key: nil, body: body, mac: "%%%"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckMAC(tt.key, tt.body, tt.mac)
			if tt.err == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tt.err)
		})
	}
}

func TestWantsGrant(t *testing.T) {
	for _, c := range []struct {
		skip, leaving bool
		applied       int64
		want          bool
	}{
		{skip: false, applied: 7, want: true},    // a heartbeat
		{skip: true, applied: 7, want: false},    // an ack on a fresh lease
		{skip: true, applied: 6, want: true},     // an ack, but behind: the grant says so
		{skip: true, applied: 8, want: false},    // the store's epoch read before a flip
		{leaving: true, applied: 7, want: false}, // a goodbye
		{leaving: true, applied: 6, want: false}, // a goodbye, even behind
	} {
		st := Status{SkipGrant: c.skip, Leaving: c.leaving, AppliedEpoch: c.applied}
		require.Equal(t, c.want, st.WantsGrant(7), "skip=%v leaving=%v applied=%d", c.skip, c.leaving, c.applied)
	}
}

func TestRedactTokenHidesTheCredential(t *testing.T) {
	out := string(RedactToken([]byte(validStatus)))
	require.NotContains(t, out, strings.Repeat("ab", TokenSize))
	require.Contains(t, out, `"token":"(redacted)"`)
	// A body cut short inside the token still hides what it holds.
	cut := validStatus[:strings.Index(validStatus, `"token":"`)+20]
	require.NotContains(t, string(RedactToken([]byte(cut))), "abababab")
}
