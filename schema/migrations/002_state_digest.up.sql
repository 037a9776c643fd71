-- The digest of the state at the current epoch (wire.State.Digest), written
-- by every change in its own transaction. An agent confirms a state message
-- by comparing its digest with this one: one row read instead of the whole
-- state. NULL, or a digest of an older epoch (a change made by a binary that
-- predates this column), matches no message, and agents read the state.
ALTER TABLE @schema.epoch ADD COLUMN state_digest text;
