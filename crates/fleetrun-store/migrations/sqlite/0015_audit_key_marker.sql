-- What the audit trail is keyed with: one row, the fingerprint of the key its hashes are made
-- with (never the key, which lives in a file outside the database), the entry from which that
-- key signs, and whether the head anchor file beside the key has been written. A controller
-- whose key file is missing or holds another key refuses to start instead of making a new one.
CREATE TABLE audit_key_marker (
    id              INTEGER PRIMARY KEY,
    key_fingerprint TEXT    NOT NULL,
    since_seq       BIGINT  NOT NULL,
    anchored        INTEGER NOT NULL DEFAULT 0,
    recorded_at     BIGINT  NOT NULL
);
