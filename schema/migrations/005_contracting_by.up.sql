-- Who took the release to contracting: the contract runner's identity,
-- written by the runner itself in the transaction that enters contracting
-- after its checks and the wait for acknowledgements. Operators cannot
-- enter contracting. NULL on a release in contracting means something else
-- put it there (a 'flip L contracting' by a binary that predates this
-- column, or such a binary's runner): the runner does not resume such a
-- release on trust, but re-runs its checks and the wait first (--recheck).
ALTER TABLE @schema.releases ADD COLUMN contracting_by text CHECK (contracting_by <> '');
