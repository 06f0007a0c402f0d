-- Filtering dead letters by error text (`error=`, a case-insensitive substring) stays fast at
-- 100,000 dead letters only with a trigram index: without one, a text that matches a few rows
-- scans the table (the benchmark measured p99 231 ms for one match in 100,000). pg_trgm ships
-- with PostgreSQL and is a trusted extension (the database owner may create it); where it can't
-- be created (no privilege, a build without contrib, a concurrent creation) the service still
-- starts and the filter still works, by scanning.
DO $$
BEGIN
    -- In public, not in notify's own schema: a schema dropped with CASCADE would take the
    -- extension, and every other schema's index on it, along.
    CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): filtering dead letters by error text scans them', SQLERRM;
END $$;

-- Wherever the extension lives (its schema need not be on the search path).
DO $$
DECLARE
    ns text;
BEGIN
    SELECT n.nspname INTO ns
      FROM pg_opclass c JOIN pg_namespace n ON n.oid = c.opcnamespace
     WHERE c.opcname = 'gin_trgm_ops' AND c.opcmethod = (SELECT oid FROM pg_am WHERE amname = 'gin')
     LIMIT 1;
    IF ns IS NOT NULL THEN
        EXECUTE format(
            'CREATE INDEX dead_letters_last_error_trgm_idx ON dead_letters USING gin (last_error %I.gin_trgm_ops)
              WHERE status IN (''dead'', ''replaying'')', ns);
    END IF;
END $$;
