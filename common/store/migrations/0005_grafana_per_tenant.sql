-- Grafana is the operator's dashboard: it charts every model's monitoring numbers, the shared
-- model's and each tenant's own (drift scores and row counts, per window), with a tenant
-- variable. It still reads no prediction, no label, no key and no tenant record.
DROP POLICY shared_model ON monitoring_runs;
DROP POLICY shared_model ON monitoring_metrics;
CREATE POLICY every_model ON monitoring_runs FOR SELECT TO mlops_grafana USING (true);
CREATE POLICY every_model ON monitoring_metrics FOR SELECT TO mlops_grafana USING (true);
