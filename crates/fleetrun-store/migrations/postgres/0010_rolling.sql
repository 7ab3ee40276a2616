-- Rolling execution: a step's checked rolling_config (JSON), how many batches it makes, the batch
-- dispatched last (0 before the first), and how many failed hosts operators chose to ignore.
CREATE TABLE step_rolling (
    step_instance_id BIGINT  PRIMARY KEY,
    config           TEXT    NOT NULL,
    total_batches    INTEGER NOT NULL,
    current_batch    INTEGER NOT NULL DEFAULT 0,
    failures_ignored BIGINT  NOT NULL DEFAULT 0
);

-- The batch (from 1) each host of a rolling step belongs to.
CREATE TABLE rolling_host (
    step_instance_id BIGINT  NOT NULL,
    bk_host_id       BIGINT  NOT NULL,
    batch            INTEGER NOT NULL,
    PRIMARY KEY (step_instance_id, bk_host_id)
);
CREATE INDEX rolling_host_batch ON rolling_host (step_instance_id, batch);
