-- Job callbacks are delivered at least once: a job that ends with a callback_url is due for
-- a POST at once (callback_due); a worker claims it by moving callback_due a lease ahead and
-- counting the attempt, so a worker that dies before the POST, or a receiver that fails,
-- leaves it to the next claim. Delivered (or given up) clears callback_due.
ALTER TABLE jobs ADD COLUMN callback_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN callback_due timestamptz;
CREATE INDEX jobs_callback_due_idx ON jobs (callback_due) WHERE callback_due IS NOT NULL;
