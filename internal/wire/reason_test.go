package wire

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{ErrTooLarge, ReasonTooLarge},
		{ErrMalformed, ReasonMalformed},
		{ErrVersion, ReasonVersion},
		{ErrKind, ReasonKind},
		{ErrInvalid, ReasonInvalid},
		{ErrUnsigned, ReasonUnsigned},
		{ErrBadSignature, ReasonBadSignature},
		{fmt.Errorf("%w: detail", ErrVersion), ReasonVersion},
		{errors.New("not one of ours"), ReasonMalformed},
	} {
		require.Equal(t, tc.want, Reason(tc.err), "%v", tc.err)
	}
	// What the decoders and checks return maps the same way.
	_, err := DecodeGrant([]byte(`{"v":1,"kind":"state"}`))
	require.Equal(t, ReasonKind, Reason(err))
	require.Equal(t, ReasonBadSignature, Reason(CheckMAC([]byte("k"), []byte("body"), MAC([]byte("other"), []byte("body")))))
}

func TestCheckSize(t *testing.T) {
	require.NoError(t, CheckSize(make([]byte, MaxMessageSize)))
	err := CheckSize(make([]byte, MaxMessageSize+1))
	require.ErrorIs(t, err, ErrTooLarge)
	require.ErrorContains(t, err, "1048577 bytes (limit 1048576)")
}
