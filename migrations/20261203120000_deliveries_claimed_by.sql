-- Which copy of a message made the current claim. Two copies of one notification can be in
-- flight at once: a request with an Idempotency-Key whose publish timed out (503) may land
-- after all, while the caller's retry publishes the same id again. A claim that finds the row
-- `delivering` by another copy must not count it as a crash and send again (that delivered
-- twice); a claim by the same copy (its redelivery after a crash) still does. NULL: a claim
-- that named no copy (rows from before this column), treated as before.
ALTER TABLE deliveries ADD COLUMN claimed_by text;
