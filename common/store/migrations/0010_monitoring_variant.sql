-- Per-variant monitoring: a monitor run judges each variant live in its window (the
-- champion, a challenger taking a share of the traffic, a shadow scored on a copy) against
-- its own version's reference, and keeps one run and its numbers per variant. Rows written
-- before variants existed, and every single-variant run, are the champion's.
-- Columns only: the grants of 0004 and the row-level security policies of 0004/0005 are
-- per table and hold for the new column as they stand.

ALTER TABLE monitoring_runs ADD COLUMN variant text NOT NULL DEFAULT 'champion'
    CHECK (variant IN ('champion', 'challenger', 'shadow'));
ALTER TABLE monitoring_metrics ADD COLUMN variant text NOT NULL DEFAULT 'champion'
    CHECK (variant IN ('champion', 'challenger', 'shadow'));

-- Dashboards chart one metric over time, a series per variant.
DROP INDEX monitoring_metrics_chart_idx;
CREATE INDEX monitoring_metrics_chart_idx
    ON monitoring_metrics (model_name, metric, variant, window_end);
