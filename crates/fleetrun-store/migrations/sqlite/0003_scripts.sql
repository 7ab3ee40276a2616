-- The script library: scripts of a scope, each with numbered versions. At most one version of
-- a script is online (status 1); publishing another sets the previous one offline (2).
CREATE TABLE script (
    script_id        TEXT    PRIMARY KEY,
    bk_scope_type    TEXT    NOT NULL,
    bk_scope_id      TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    description      TEXT    NOT NULL DEFAULT '',
    script_language  INTEGER NOT NULL,
    creator          TEXT    NOT NULL,
    create_time      INTEGER NOT NULL,
    last_modify_user TEXT    NOT NULL,
    last_modify_time INTEGER NOT NULL
);
CREATE INDEX script_scope ON script (bk_scope_type, bk_scope_id);

CREATE TABLE script_version (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    script_id        TEXT    NOT NULL REFERENCES script (script_id),
    version          TEXT    NOT NULL,
    content          BLOB    NOT NULL,
    status           INTEGER NOT NULL,
    version_desc     TEXT    NOT NULL DEFAULT '',
    creator          TEXT    NOT NULL,
    create_time      INTEGER NOT NULL,
    last_modify_user TEXT    NOT NULL,
    last_modify_time INTEGER NOT NULL,
    UNIQUE (script_id, version)
);
CREATE UNIQUE INDEX script_version_one_online ON script_version (script_id) WHERE status = 1;
-- Versions start above bk-job's example ids, so they never look like small counters.
INSERT INTO sqlite_sequence (name, seq) VALUES ('script_version', 1000000);
