-- Join tokens: what lets a host enroll, and where its agent lands. Only the token's SHA-256 is
-- kept; the token itself is shown once, to whoever created it. A token is spent when `uses`
-- reaches `max_uses`, and dead after `expires_at` or once revoked.
CREATE TABLE join_token (
    token_id     TEXT    PRIMARY KEY,
    token_sha256 TEXT    NOT NULL,
    bk_biz_id    INTEGER NOT NULL,
    bk_module_id INTEGER,
    bk_cloud_id  INTEGER NOT NULL,
    max_uses     INTEGER NOT NULL,
    uses         INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    created_by   TEXT    NOT NULL,
    description  TEXT    NOT NULL DEFAULT '',
    revoked_at   INTEGER,
    revoked_by   TEXT
);

-- Agents that enrolled: one row per agent key (the SHA-256 of its SubjectPublicKeyInfo), so that
-- enrolling again with the same key gives the same identity. `ips` are the addresses recorded
-- for the host (the one the controller saw first), comma-separated.
CREATE TABLE agent_enrollment (
    key_sha256     TEXT    PRIMARY KEY,
    agent_id       TEXT    NOT NULL UNIQUE,
    token_id       TEXT    NOT NULL,
    bk_cloud_id    INTEGER NOT NULL,
    ips            TEXT    NOT NULL,
    enrolled_at    INTEGER NOT NULL,
    cert_not_after INTEGER NOT NULL,
    renewed_at     INTEGER
);
