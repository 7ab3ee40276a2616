-- One row the writer rewrites to learn whether the database accepts writes again after they
-- failed, when it has nothing else to write.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
