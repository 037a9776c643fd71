package wire

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
)

// Digest identifies what a state says: its epoch and every release's name,
// phase and removals, in order (SentAt, StoreID and the envelope are left
// out).
// The store writes the digest of its state with every change, so an agent
// with a database confirms a state message by reading one row and
// comparing digests, instead of reading the whole state back. SHA-256
// over length-prefixed fields: no two different states share an encoding,
// and a forger cannot find a second state with the same digest.
//
// StoreID is left out on purpose. The digest vouches for what an agent
// applies (phases and removals at an epoch), which the store id does not
// change; an agent with a database takes the store id from the store,
// never from a message, so a message cannot teach it a wrong one. And
// digests stay as they were: during an upgrade, an agent or broadcaster of
// an older build and a store sealed by either still agree, and agents
// keep confirming by digest.
func (s *State) Digest() string {
	h := sha256.New()
	s.writeDigestInput(h)
	return hex.EncodeToString(h.Sum(nil))
}

// writeDigestInput writes the bytes Digest hashes (docs/PROTOCOL.md,
// "Digest"): uvarints for numbers and lengths, every string as the
// uvarint of its length in bytes followed by its UTF-8 bytes.
func (s *State) writeDigestInput(w io.Writer) {
	var buf [binary.MaxVarintLen64]byte
	putInt := func(n uint64) { w.Write(buf[:binary.PutUvarint(buf[:], n)]) }
	putStr := func(s string) { putInt(uint64(len(s))); io.WriteString(w, s) }
	putInt(uint64(s.Epoch))
	putInt(uint64(len(s.Releases)))
	for _, r := range s.Releases {
		putStr(r.Name)
		putStr(string(r.Phase))
		putInt(uint64(len(r.Removals)))
		for _, rm := range r.Removals {
			putStr(rm.Table)
			putInt(uint64(len(rm.Columns)))
			for _, c := range rm.Columns {
				putStr(c)
			}
		}
	}
}
