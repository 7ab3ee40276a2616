-- Retries (operate_step_instance 2 and 8) run a step's hosts again under a new execute_count
-- (bk-job's count: 0 for the first run). host_result and host_log hold each host's latest
-- result and log; `actual_execute_count` is the run that result and log come from (a host left
-- out of a retry keeps an earlier one, as bk-job's actual_execute_count does).
ALTER TABLE host_result ADD COLUMN actual_execute_count INTEGER NOT NULL DEFAULT 0;

-- Every host's result as it stood at the end of each earlier execute_count, copied when a retry
-- starts the next one.
CREATE TABLE host_result_history (
    step_instance_id     INTEGER NOT NULL,
    execute_count        INTEGER NOT NULL,
    bk_host_id           INTEGER NOT NULL,
    bk_cloud_id          INTEGER NOT NULL,
    ip                   TEXT    NOT NULL,
    status               INTEGER NOT NULL,
    tag                  TEXT    NOT NULL DEFAULT '',
    exit_code            INTEGER,
    error_code           INTEGER NOT NULL DEFAULT 0,
    start_time           INTEGER,
    end_time             INTEGER,
    output_bytes         INTEGER NOT NULL DEFAULT 0,
    dropped_bytes        INTEGER NOT NULL DEFAULT 0,
    dropped_lines        INTEGER NOT NULL DEFAULT 0,
    survivors            INTEGER NOT NULL DEFAULT 0,
    actual_execute_count INTEGER NOT NULL,
    PRIMARY KEY (step_instance_id, execute_count, bk_host_id)
) WITHOUT ROWID;

-- The logs of runs a retry replaced, by the execute_count they were written in.
CREATE TABLE host_log_history (
    step_instance_id INTEGER NOT NULL,
    execute_count    INTEGER NOT NULL,
    bk_host_id       INTEGER NOT NULL,
    offset           INTEGER NOT NULL,
    data             BLOB    NOT NULL,
    PRIMARY KEY (step_instance_id, execute_count, bk_host_id, offset)
) WITHOUT ROWID;
