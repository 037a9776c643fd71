// Package agent is the part of phasecast embedded in every service. It holds
// the versioning state (which releases are in which phase, and which
// columns and tables their removals take away) as an immutable Snapshot
// behind an atomic pointer, keeps it current from the broadcaster and the
// store, and acknowledges each new state once no work begun under an older
// one is still running. The contract runner drops a column only when every
// live agent has acknowledged.
//
// # Using it
//
// Create the agent with New, resolve the tables the service queries with
// Table once, call Start before serving, and Stop when the service stops
// taking work (on SIGTERM), with the grace period as its context's
// deadline. Enter refuses from then on; Stop waits for the guards still
// open, keeping the lease alive meanwhile so that a contract runner waits
// for them, then says goodbye, and the store ends the agent's lease at
// once, so the runner need not wait it out. Wrap every unit of work that
// builds queries (a request, a transaction) in Enter and Exit, and build
// the queries from the pinned snapshot:
//
//	g, err := a.Enter()
//	if err != nil { // ErrStale: refuse the work, e.g. with a 503
//		return err
//	}
//	defer g.Exit()
//	q := "SELECT " + g.Snapshot().SelectList(instances) + " FROM instances"
//
// Snapshot.Columns and Snapshot.SelectList are computed once per snapshot,
// for every table registered in Config.Tables; Snapshot.Removed answers for
// any table and column (two string hashes), and Snapshot.ColumnRemoved for
// a registered column resolved once with Agent.Column (a slice index).
// None of them allocates, Agent.Snapshot is one atomic load, and
// Enter/Exit are a read of a cheap clock against the lease deadline (the
// CPU's time-stamp counter on amd64, see clock.go), an increment, a
// re-check of the snapshot, a look at the fence and a decrement.
// Agent.Table and Agent.Column panic on a table or column not in
// Config.Tables.
//
// # What an acknowledgement promises
//
// When a newer state is swapped in, the agent waits until every guard
// pinned to an older snapshot has exited, then sets its drained epoch and
// sends its status at once. That status is the acknowledgement: no
// operation that could name a removed column is still running here. The
// agent reports Config.Releases, the releases its code was built for; the
// runner counts an ack for release L only from agents that know L. A
// snapshot hides the removals of every release in contract, contracting or
// complete, known or not.
//
// # Trust
//
// The store is the truth; the broker only says "look". With Config.DB the
// agent applies a state message only if the store vouches for it. A state
// signed by the broadcaster (Config.StateKey) for the store the agent read
// its identity from is the store's word: the broadcaster signs only what
// it has just read from the store, store id and epoch included, so it is
// applied without a read (Config.ConfirmSignedStates says what that
// trusts, and turns it off). Any other state with a higher epoch makes the
// agent read, at most once per ConfirmInterval, the digest the
// store wrote with its last change (Store.StateDigest, one row). If that
// is the message's digest (wire.State.Digest) the message is applied;
// otherwise the agent reads the whole state (Store.State) and applies
// that. So a forged state changes nothing. With
// Config.StateKey, state and grant messages must carry a valid Ed25519
// signature; with Config.StatusMACKey, statuses carry an HMAC. Set StateKey
// in production: a DB protects the state, but without a key a grant (and
// so the lease) is not authenticated. Bad messages are logged, counted
// (Stats.RejectedMessages) and dropped.
//
// Every status names the store it belongs to (Stats.StoreID): read from
// the store with a DB, learnt from the states without one. An agent sends
// no status before it holds a state. Each status expires after a lease,
// in the queue (its AMQP expiration) and at the broadcaster (its sent_at).
//
// # Lease and fencing
//
// The broadcaster answers the agent's statuses with grants, each of which
// extends the agent's lease to (time the status was sent) + lease −
// Config.LeaseMargin on the agent's own monotonic clock. Heartbeats always
// ask for one; an ack sent while at least half the lease is left does
// not (wire.Status.SkipGrant), since the heartbeats renew the lease anyway
// and a grant per ack doubled a flip's messages back. The store
// records the lease on the database clock when it writes the status, which
// is later, and never moves an expiry earlier than one it granted, so the
// agent's lease always runs out first, whatever lease lengths granted it.
// Only a status the store recorded extends the lease: one it ignored earns
// no grant, and a sync through the store that it ignored
// (schema.ErrStatusIgnored) extends nothing and is logged.
//
// Each agent draws a random incarnation in New and sends it with every
// status: the store orders seqs within one incarnation, and while one
// process holds an ID with a live lease, a second process under the same
// Config.ID is refused and stays fenced (its Start waits for the ID,
// bounded by its context), and the store reports the conflict.
//
// When the lease runs out
// the agent is fenced (Enter compares the deadline with the clock itself,
// so this holds even when the process was paused and the lease timer has
// not run yet): Enter re-reads the state from the store and renews
// the lease there when there is a DB, and returns ErrStale when there is
// not. The runner treats an agent whose lease expired as gone, so a
// partitioned agent has always fenced itself before the runner stops
// waiting for it. A grant whose epoch is newer than the agent's state does
// not extend the lease: the agent missed a state and must catch up first.
//
// # Database sessions
//
// The runner tells the service's own database sessions from sessions
// nobody vouches for by their application_name. Open the service's
// database with Config.ApplicationName, "phasecast:"+ID by default; NewID
// and DefaultApplicationName give both before the agent exists, so the
// same *sql.DB can be handed to the agent as Config.DB.
//
// # Connections
//
// The agent keeps one AMQP connection, reconnecting with capped
// exponential backoff and jitter; Config.AMQPURL may list a cluster's
// nodes, which it tries in turn in an order shuffled per agent. Statuses
// are published with publisher confirms: one the broker nacks, returns or
// does not confirm within Config.StatusConfirmTimeout drops the
// connection, and the next one's first status carries the newer state. Each connection gets a server-named,
// exclusive, auto-delete queue bound to the state exchange and, under the
// agent's ID, to the grant exchange: grants arrive on the same queue, and
// only the agent's own (each names its incarnation). A process that runs many agents (the benchmark runs
// a thousand) can have several share one connection: NewSharedConnection
// and Config.Connection. Each agent then opens its own channels and queue
// on it, and when it drops, each re-syncs and reconnects as it would on a
// connection of its own. After a reconnect the agent re-syncs before trusting
// its cache: from the store if it has a DB, else from the next grant and
// beacon. With a DB, while the agent is fenced or disconnected, its
// heartbeats and acks go through the store.
//
// # Metrics
//
// Collector is a prometheus.Collector of Stats for the service to register
// on its own registry; the agent registers nothing by itself.
package agent
