-- Claims that found the previous claim unfinished (status still 'delivering'): the attempt
-- before died mid-way, e.g. the message crashed the worker. The worker dead-letters a message
-- whose deliveries keep dying (WORKER_CRASH_LIMIT) instead of crashing forever.
ALTER TABLE deliveries ADD COLUMN crashes integer NOT NULL DEFAULT 0;
