-- An Idempotency-Key keeps the notification id of its first request, also when that request
-- failed (503): a retry with the same key publishes under the same id, so if the first publish
-- landed after all, the worker's send guard delivers it once. A failed key is `failed`, not
-- deleted.
ALTER TABLE idempotency_keys ADD COLUMN notification_id uuid;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_state_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_state_check
    CHECK (state IN ('pending', 'completed', 'failed'));
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_check
    CHECK (state <> 'completed' OR (response_status IS NOT NULL AND response_body IS NOT NULL));
