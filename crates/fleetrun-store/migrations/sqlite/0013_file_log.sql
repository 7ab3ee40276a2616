-- One row per (file step, host, direction, file): what became of each file of a file task on
-- a host, as bk-job's file logs report it. `mode` is bk-job's: 0 upload (the source side), 1
-- download (the target side); `status` is bk-job's file status (1 waiting, 2 uploading,
-- 3 downloading, 4 success, 5 failure); `size` in bytes, `speed` in bytes a second, `progress`
-- in percent.
CREATE TABLE file_log (
    step_instance_id BIGINT  NOT NULL,
    bk_host_id       BIGINT  NOT NULL,
    mode             INTEGER NOT NULL,
    seq              INTEGER NOT NULL,
    src_host_id      BIGINT  NOT NULL,
    src_cloud_id     BIGINT  NOT NULL,
    src_ip           TEXT    NOT NULL,
    src_path         TEXT    NOT NULL,
    dest_path        TEXT    NOT NULL,
    status           INTEGER NOT NULL,
    size             BIGINT  NOT NULL,
    speed            BIGINT  NOT NULL,
    progress         INTEGER NOT NULL,
    log_content      TEXT    NOT NULL,
    start_time       BIGINT,
    end_time         BIGINT,
    PRIMARY KEY (step_instance_id, bk_host_id, mode, seq)
);
