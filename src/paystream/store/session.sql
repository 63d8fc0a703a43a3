-- Run on every connection of the processor's pool when it opens (SET, not startup options, so
-- that PgBouncer and other poolers accept them).

-- configure_session --
-- A batch's transaction cut off mid-way by a partition holds its row locks until the server
-- notices the client is gone; waiting for the next command, the server sends nothing, so only
-- its own keepalive probes find out: 11 s after the link went silent, not 2 hours.
SET tcp_keepalives_idle = 5;
SET tcp_keepalives_interval = 2;
SET tcp_keepalives_count = 3;
-- Through a proxy the server's probes are answered by the proxy, so also end any transaction of
-- ours left idle for 30 s; ours hold no transaction open across a network call (gateway and log
-- calls are made outside them), so only an abandoned one is hit.
SET idle_in_transaction_session_timeout = '30s';
-- Our statements take milliseconds; one running for a minute is waiting on a lock held by such
-- an abandoned transaction, and is better failed and retried than left hanging.
SET statement_timeout = '60s';
-- A statement waiting 10 s for a lock (an operator's ACCESS EXCLUSIVE on accounts, say) fails,
-- and its batch waits and is retried with back-off, instead of holding its connection for up to
-- the statement timeout; a lock held longer than PAYSTREAM_STALL_AFTER_S raises the stall alarm,
-- which names the error (LockNotAvailable 55P03).
SET lock_timeout = '10s';

-- answers --
-- Answering is not enough: a standby, a demoted primary or a server turned read-only answers
-- and refuses every write.
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
