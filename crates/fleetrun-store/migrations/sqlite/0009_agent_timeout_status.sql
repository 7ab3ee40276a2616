-- An agent that stays silent past a task's timeout was recorded as 303, which bk-job uses for a
-- file task's timeout; bk-job's code for it is 16 (GSE_SCRIPT_TIMEOUT). fleetrun has had no file
-- tasks, so every stored 303 is such a timeout.
UPDATE host_result SET status = 16 WHERE status = 303;
