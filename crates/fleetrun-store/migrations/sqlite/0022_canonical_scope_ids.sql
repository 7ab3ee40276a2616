-- Scope ids are stored as a number writes them (`"2"`, never `"02"`), so that every row of a
-- scope is found by one text comparison. Rows stored before that kept the id as the request
-- sent it: jobs were still found (their scope is compared as a number), but the script
-- library's look-ups compare text in SQL, so a script saved under `"02"` was not found under
-- business 2. Ids of digits with leading zeros are rewritten (all zeros become `"0"`); any other
-- text is left as it is.
UPDATE script
   SET bk_scope_id = CASE WHEN ltrim(bk_scope_id, '0') = '' THEN '0'
                          ELSE ltrim(bk_scope_id, '0') END
 WHERE bk_scope_id GLOB '0[0-9]*' AND bk_scope_id NOT GLOB '*[^0-9]*';
UPDATE job_instance
   SET bk_scope_id = CASE WHEN ltrim(bk_scope_id, '0') = '' THEN '0'
                          ELSE ltrim(bk_scope_id, '0') END
 WHERE bk_scope_id GLOB '0[0-9]*' AND bk_scope_id NOT GLOB '*[^0-9]*';
