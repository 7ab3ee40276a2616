-- The audit trail's number becomes the table's row id (`INTEGER PRIMARY KEY`): SQLite then keeps
-- the rows in one b-tree ordered by number, where `BIGINT PRIMARY KEY` kept them by a hidden row id
-- plus a separate index of their numbers. Its two other indexes go, and every append wrote all
-- four b-trees (each request that changes state appends one entry, in the job engine's group
-- commit); an append now writes one.
-- - `audit_log_app` served no query: the trail's filters are optional (`$4 IS NULL OR
--   app_code = $4`), which no index serves.
-- - `audit_log_at` was the plan of every page of the trail's query (`audit_entries`), which binds
--   `at >= $2 AND at < $3` always (the whole range without a time filter): the whole index read
--   and sorted by number for each page. Without it a page is a range of numbers read in order,
--   and a time window is found by reading forward from the page's first number, so a window far
--   from the start of a long trail costs a scan of what lies before it (36 ms per 300,000
--   entries here); reading the trail (`get_audit_log` without times, `verify_audit_log`) costs
--   nothing per page.
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
