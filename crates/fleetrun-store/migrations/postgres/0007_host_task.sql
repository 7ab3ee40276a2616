-- Where each (step, host) stands with an agent that owns its task, so that a restarted controller
-- can take the task up again: the task's id and agent, the agent's output offset the log holds,
-- the log's length, what was dropped, and when the task started and must end. A row is written
-- only after the log it describes was committed; log chunks beyond `stored` were not.
CREATE TABLE host_task (
    step_instance_id BIGINT NOT NULL,
    bk_host_id       BIGINT NOT NULL,
    task_id          TEXT   NOT NULL,
    agent_id         TEXT   NOT NULL,
    received         BIGINT NOT NULL,
    stored           BIGINT NOT NULL,
    dropped_bytes    BIGINT NOT NULL,
    dropped_lines    BIGINT NOT NULL,
    truncated        BIGINT NOT NULL,
    started_at       BIGINT,
    deadline         BIGINT,
    PRIMARY KEY (step_instance_id, bk_host_id)
);
