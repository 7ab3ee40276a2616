-- Controllers sharing one database, and who holds each job's bookkeeping.
-- `controller`: one row per controller name, its addresses and the time it last renewed (its
-- heartbeat); a controller whose heartbeat is older than its lease is taken for dead.
CREATE TABLE controller (
    name         TEXT   NOT NULL PRIMARY KEY,
    api_url      TEXT   NOT NULL,
    agent_addr   TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
-- `job_lease`: the controller that ends a running job, fires its callback and rolls its
-- batches, until `expires_at` (renewed with the heartbeat). Taken by one conditional statement:
-- free, expired, or already the taker's.
CREATE TABLE job_lease (
    job_instance_id BIGINT NOT NULL PRIMARY KEY,
    controller      TEXT   NOT NULL,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX job_lease_controller ON job_lease (controller);
