-- Job callbacks: one delivery per job that asked for one, queued when the job ended, with the
-- exact body that is sent (and signed) on every attempt.
CREATE TABLE callback_delivery (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_instance_id INTEGER NOT NULL UNIQUE REFERENCES job_instance (job_instance_id),
    url             TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
-- The dispatcher's queue: pending deliveries by when they are due.
CREATE INDEX callback_delivery_due ON callback_delivery (next_attempt_at) WHERE status = 'pending';

-- Every attempt of a delivery: the HTTP status it got, or why it got none.
CREATE TABLE callback_attempt (
    delivery_id INTEGER NOT NULL REFERENCES callback_delivery (id),
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    http_status INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
) WITHOUT ROWID;

-- Finding ended jobs whose delivery was never queued (a crash between the two) at start reads
-- only the jobs that asked for a callback.
CREATE INDEX job_instance_callback ON job_instance (job_instance_id) WHERE callback_url IS NOT NULL;
