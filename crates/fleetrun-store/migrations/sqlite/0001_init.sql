-- Hosts: one row per agent identity. bk_host_id is allocated at the agent's first registration.
CREATE TABLE host (
    bk_host_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id       TEXT    NOT NULL UNIQUE,
    bk_cloud_id    INTEGER NOT NULL,
    ip             TEXT    NOT NULL,
    hostname       TEXT    NOT NULL,
    os_type        TEXT    NOT NULL,
    agent_version  TEXT    NOT NULL,
    bk_biz_id      INTEGER,
    online         INTEGER NOT NULL DEFAULT 0,
    last_seen      INTEGER NOT NULL
);
CREATE INDEX host_cloud_ip ON host (bk_cloud_id, ip);

CREATE TABLE job_instance (
    job_instance_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    operator        TEXT    NOT NULL,
    app_code        TEXT    NOT NULL,
    bk_scope_type   TEXT    NOT NULL,
    bk_scope_id     TEXT    NOT NULL,
    status          INTEGER NOT NULL,
    type            INTEGER NOT NULL,
    launch_mode     INTEGER NOT NULL,
    callback_url    TEXT,
    create_time     INTEGER NOT NULL,
    start_time      INTEGER,
    end_time        INTEGER
);
CREATE INDEX job_instance_create_time ON job_instance (create_time);

CREATE TABLE step_instance (
    step_instance_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    job_instance_id    INTEGER NOT NULL REFERENCES job_instance (job_instance_id),
    name               TEXT    NOT NULL,
    type               INTEGER NOT NULL,
    status             INTEGER NOT NULL,
    execute_count      INTEGER NOT NULL DEFAULT 0,
    script_language    INTEGER NOT NULL,
    script_content     BLOB    NOT NULL,
    script_param       TEXT    NOT NULL,
    is_param_sensitive INTEGER NOT NULL,
    timeout            INTEGER NOT NULL,
    account_id         INTEGER NOT NULL,
    account            TEXT    NOT NULL,
    create_time        INTEGER NOT NULL,
    start_time         INTEGER,
    end_time           INTEGER
);
CREATE INDEX step_instance_job ON step_instance (job_instance_id);

-- One row per (step, host): the host's status and timing. Output lives in host_log.
CREATE TABLE host_result (
    step_instance_id INTEGER NOT NULL REFERENCES step_instance (step_instance_id),
    bk_host_id       INTEGER NOT NULL,
    bk_cloud_id      INTEGER NOT NULL,
    ip               TEXT    NOT NULL,
    status           INTEGER NOT NULL,
    tag              TEXT    NOT NULL DEFAULT '',
    exit_code        INTEGER,
    error_code       INTEGER NOT NULL DEFAULT 0,
    start_time       INTEGER,
    end_time         INTEGER,
    output_bytes     INTEGER NOT NULL DEFAULT 0,
    dropped_bytes    INTEGER NOT NULL DEFAULT 0,
    dropped_lines    INTEGER NOT NULL DEFAULT 0,
    survivors        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (step_instance_id, bk_host_id)
) WITHOUT ROWID;

-- A host's log as the chunks arrived; `offset` is the chunk's position in the stored log.
CREATE TABLE host_log (
    step_instance_id INTEGER NOT NULL,
    bk_host_id       INTEGER NOT NULL,
    offset           INTEGER NOT NULL,
    data             BLOB    NOT NULL,
    PRIMARY KEY (step_instance_id, bk_host_id, offset)
) WITHOUT ROWID;
