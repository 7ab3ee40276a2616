-- Dangerous-command rules (bk-job's "high-risk statement" rules): a regular expression checked
-- line by line against scripts of the languages listed in `script_languages` (bk-job's numbers,
-- comma-separated, ascending), with `action` 1 (scan: report and run) or 2 (intercept: refuse),
-- `status` 1 enabled or 0 disabled. One rule per (expression, languages).
CREATE TABLE dangerous_rule (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    expression       TEXT    NOT NULL,
    script_languages TEXT    NOT NULL,
    description      TEXT    NOT NULL DEFAULT '',
    action           INTEGER NOT NULL,
    status           INTEGER NOT NULL,
    creator          TEXT    NOT NULL,
    create_time      BIGINT  NOT NULL,
    last_modify_user TEXT    NOT NULL,
    last_modify_time BIGINT  NOT NULL,
    UNIQUE (expression, script_languages)
);

-- The default rules: commands that destroy a host outright, enabled and intercepting (the
-- reasons are in docs/api.md, "Dangerous-command rules"). Administrators may change or delete
-- them like any rule; a deleted one does not come back.
INSERT INTO dangerous_rule
    (expression, script_languages, description, action, status, creator, create_time,
     last_modify_user, last_modify_time)
VALUES
    ('\brm\s+(?:[^\s;&|]+\s+)*?(?:(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)\s+(?:[^\s;&|]+\s+)*?["'']?/["'']?\*?["'']?(?:[\s;&|)`]|$)|["'']?/["'']?\*?["'']?\s+(?:[^\s;&|]+\s+)*?(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:[\s;&|)`"'']|$))',
     '1,3,4', 'rm -rf /: removes the whole file system', 2, 1, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    ('\b(?:mkfs(?:\.\w+)?|mke2fs)\b[^;&|]*\s/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|md|dm-|mapper/|disk/)',
     '1,3,4', 'mkfs on a disk: formats a block device', 2, 1, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    (':\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}',
     '1,3,4', 'fork bomb: exhausts the host''s processes', 2, 1, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    ('\bdd\b[^;&|]*\bof=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|md|dm-|mapper/|disk/)',
     '1,3,4', 'dd onto a disk: overwrites a block device', 2, 1, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000, 'fleetrun', CAST(strftime('%s', 'now') AS INTEGER) * 1000);
