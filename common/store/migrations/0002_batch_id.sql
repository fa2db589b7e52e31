-- Batch scoring logs its rows with the batch they came from; online predictions have none.
ALTER TABLE predictions ADD COLUMN batch_id text;

CREATE INDEX predictions_batch_idx ON predictions (batch_id) WHERE batch_id IS NOT NULL;
