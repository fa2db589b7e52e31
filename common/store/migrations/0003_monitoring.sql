-- Monitoring results: one row per monitor run, and its headline numbers in long form
-- (metric, column, value) so any dashboard tool can chart them over time.
-- Written by common/store/monitoring.py from flows/monitor.py.

CREATE TABLE monitoring_runs (
    run_id          uuid PRIMARY KEY,
    ts              timestamptz NOT NULL DEFAULT now(),
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    current_rows    integer NOT NULL,
    labelled_rows   integer NOT NULL,
    enough_rows     boolean NOT NULL,
    drift_detected  boolean NOT NULL,
    summary         text NOT NULL,
    mlflow_run_id   text,
    report_uri      text,
    evidently_project text
);

CREATE INDEX monitoring_runs_model_ts_idx ON monitoring_runs (model_name, window_end);

CREATE TABLE monitoring_metrics (
    run_id        uuid NOT NULL REFERENCES monitoring_runs ON DELETE CASCADE,
    window_end    timestamptz NOT NULL,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    metric        text NOT NULL,
    column_name   text NOT NULL DEFAULT '',
    value         double precision NOT NULL,
    PRIMARY KEY (run_id, metric, column_name)
);

CREATE INDEX monitoring_metrics_chart_idx ON monitoring_metrics (model_name, metric, window_end);
