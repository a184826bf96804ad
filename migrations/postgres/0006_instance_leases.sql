-- Each instance that answers Bearer checks from its memory of sessions holds a lease
-- here, renewed every second by its listening connection (src/store/session_cache.rs).
-- A write that ends a session or changes a user waits, before it is answered, until
-- every instance whose lease was live has acknowledged the change or seen its lease run
-- out; an instance answers from memory only within its lease. So requests need no
-- round trip to PostgreSQL to know that what they remember is still true.
--
-- Each side counts the lease on its own clock (the instance from before it asked for
-- the renewal, a waiting write from after it read this table); lease_until, in
-- PostgreSQL's clock, only tells which rows are recent enough to matter. Rows of leases
-- that ran out long ago are deleted when an instance starts listening.
CREATE TABLE gatehouse_instances (
    id TEXT PRIMARY KEY,
    lease_until TIMESTAMPTZ NOT NULL
);
