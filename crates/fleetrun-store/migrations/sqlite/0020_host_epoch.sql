-- Fencing the writers of a host's run. `epoch` counts the times another controller took the
-- (step, host) over (a handover, a take-over at a claim or a deadline, a job's take-up, a retry,
-- an interrupted end): the writer of its output, status and checkpoint carries the epoch it took
-- the host at, and each of those writes is applied only while the row still has it, so a
-- controller that stalled and came back cannot write over what the taker recorded.
ALTER TABLE host_result ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
