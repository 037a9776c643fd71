-- Every status rewrites its agent's row (seq, epochs, lease). The index on
-- lease_expires_at made each of those updates a new index entry in both
-- indexes and ruled out heap-only (HOT) updates, so the table and its
-- indexes bloated between vacuums: 60 batches of 1,000 heartbeats left the
-- table at 12 MB and took 43 ms a batch; without the index, and with room
-- left in each page for the row's next version, 97% of the updates were
-- HOT, the table stayed under 1 MB and a batch took 30-36 ms (BENCHMARKS.md,
-- round 3). No query needs the index: "live" is most of the table, which
-- PostgreSQL reads whole anyway. The fillfactor applies to pages written
-- from now on. Re-runnable.
DROP INDEX IF EXISTS @schema.agents_lease;
ALTER TABLE @schema.agents SET (fillfactor = 70);
