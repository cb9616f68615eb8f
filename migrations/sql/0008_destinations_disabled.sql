-- A destination that answered 410 Gone is disabled: deliveries to it stop at once (the
-- read fails with the reason) until it is created again. Nullable columns: no rewrite.
ALTER TABLE destinations ADD COLUMN disabled_at timestamptz, ADD COLUMN disabled_reason text;
