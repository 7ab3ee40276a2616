-- Nothing changes here: SQLite's audit table is rebuilt around its number in this migration,
-- and its unused indexes dropped. PostgreSQL's primary key already is the one index of the
-- numbers, and PostgreSQL plans the trail's query with the filters' values (its first plans are
-- custom), so `audit_log_at` and `audit_log_app` serve it there.
SELECT 1;
