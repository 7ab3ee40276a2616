-- The audit trail: one row per state-changing API call, numbered from 1 without gaps. Each row
-- carries the hash of the one before it (`prev_hash`, empty for the first) and its own (`hash`,
-- over its fields and `prev_hash`), so an edited, inserted or deleted row breaks the chain.
-- Job retention never touches it.
CREATE TABLE audit_log (
    seq          BIGINT  PRIMARY KEY,
    at           BIGINT  NOT NULL,
    app_code     TEXT    NOT NULL,
    operator     TEXT    NOT NULL,
    source       TEXT    NOT NULL,
    request_id   TEXT    NOT NULL,
    api          TEXT    NOT NULL,
    change       TEXT    NOT NULL,
    outcome_code BIGINT  NOT NULL,
    outcome      TEXT    NOT NULL,
    prev_hash    TEXT    NOT NULL,
    hash         TEXT    NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_app ON audit_log (app_code, seq);
-- Finished jobs by when they ended, for retention.
CREATE INDEX job_instance_end_time ON job_instance (end_time);
