-- Several controllers dispatching each other's jobs.
-- `agent_connection`: the controller holding each host's agent connection, written when the
-- agent connects and removed when that very connection (`connection`) ends; a row of a controller
-- whose heartbeat is older than its lease counts for nothing (it died holding it).
CREATE TABLE agent_connection (
    bk_host_id   BIGINT NOT NULL PRIMARY KEY,
    agent_id     TEXT   NOT NULL,
    controller   TEXT   NOT NULL,
    connection   TEXT   NOT NULL,
    connected_at BIGINT NOT NULL
);
CREATE INDEX agent_connection_controller ON agent_connection (controller);
-- `task_handover`: a (step, host) whose agent is connected to another controller than the one
-- holding the job's lease, handed to that controller (`controller`); `taken` once it dispatched
-- it or took it up. The receiving controller records the host's output and status as for its
-- own; the lease holder ends the job. Removed with the job's end.
CREATE TABLE task_handover (
    step_instance_id BIGINT  NOT NULL,
    bk_host_id       BIGINT  NOT NULL,
    job_instance_id  BIGINT  NOT NULL,
    controller       TEXT    NOT NULL,
    taken            INTEGER NOT NULL DEFAULT 0,
    handed_at        BIGINT  NOT NULL,
    PRIMARY KEY (step_instance_id, bk_host_id)
);
CREATE INDEX task_handover_controller ON task_handover (controller, taken);
CREATE INDEX task_handover_job ON task_handover (job_instance_id);
-- `job_cancel`: a termination asked through any controller, for every controller running a
-- part of the job to act on. Removed with the job's end.
CREATE TABLE job_cancel (
    job_instance_id BIGINT NOT NULL PRIMARY KEY,
    requested_at    BIGINT NOT NULL
);
