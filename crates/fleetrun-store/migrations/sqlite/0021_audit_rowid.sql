-- The audit trail's number becomes the table's row id (`INTEGER PRIMARY KEY`): SQLite then keeps
-- the rows in one b-tree ordered by number, where `BIGINT PRIMARY KEY` kept them by a hidden row id
-- plus a separate index of their numbers. Its two other indexes go: the trail's one query
-- (`audit_entries`) is prepared with its filters as parameters, and SQLite plans it as a range of
-- numbers read in order (`seq > $1 ... ORDER BY seq LIMIT $8`) whatever the values, so it never
-- read `audit_log_at` or `audit_log_app`; every append wrote both. An append now writes one b-tree
-- instead of four; every request that changes state appends one entry, in the job engine's group
-- commit.
CREATE TABLE audit_log_by_seq (
    seq          INTEGER PRIMARY KEY,
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
INSERT INTO audit_log_by_seq (seq, at, app_code, operator, source, request_id, api, change,
                              outcome_code, outcome, prev_hash, hash)
    SELECT seq, at, app_code, operator, source, request_id, api, change, outcome_code, outcome,
           prev_hash, hash
    FROM audit_log ORDER BY seq;
DROP TABLE audit_log;
ALTER TABLE audit_log_by_seq RENAME TO audit_log;
