-- The prediction log: one row per answered request, and the true labels that arrive later.
-- Written by common/store (log.py, batch.py); read by the monitoring flow.

CREATE TABLE predictions (
    request_id    uuid PRIMARY KEY,
    ts            timestamptz NOT NULL,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    inputs        jsonb NOT NULL,
    predicted     text NOT NULL,
    probabilities jsonb NOT NULL,
    latency_ms    real NOT NULL
);

-- Monitoring reads windows of time, overall and per served model version.
CREATE INDEX predictions_ts_idx ON predictions (ts);
CREATE INDEX predictions_model_ts_idx ON predictions (model_name, model_version, ts);

-- No foreign key to predictions: a label may arrive while its prediction is still buffered.
CREATE TABLE feedback (
    request_id  uuid PRIMARY KEY,
    label       text NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX feedback_ts_idx ON feedback (ts);
