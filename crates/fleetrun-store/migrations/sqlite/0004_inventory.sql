-- The inventory as numbered revisions of its document (the inventory file's format). The latest
-- is the current one; `source_digest` identifies the file (or configuration) text imported last,
-- carried forward by revisions made through the admin API, so that a start can tell whether the
-- file changed since.
CREATE TABLE inventory_revision (
    revision      INTEGER PRIMARY KEY,
    text          TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    source_digest TEXT    NOT NULL,
    operator      TEXT    NOT NULL,
    summary       TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);
