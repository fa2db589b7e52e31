-- Progressive delivery: which variant of a tenant's model answered (champion, challenger,
-- shadow), on every logged prediction, and the requests a variant failed to score.
-- A shadow's predictions are logged too (variant 'shadow'), never returned to a client.

ALTER TABLE predictions ADD COLUMN variant text NOT NULL DEFAULT 'champion'
    CHECK (variant IN ('champion', 'challenger', 'shadow'));
-- The rollout flow and the monitor compare variants over a window of one model.
CREATE INDEX predictions_tenant_model_variant_ts_idx
    ON predictions (tenant_id, model_name, variant, ts);

-- One row per request a variant could not score (its exception, cut short). The client was
-- answered by the champion instead (a challenger's failure) or not at all (the champion's).
CREATE TABLE serving_errors (
    error_id      uuid PRIMARY KEY,
    tenant_id     text NOT NULL,
    ts            timestamptz NOT NULL,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    variant       text NOT NULL CHECK (variant IN ('champion', 'challenger', 'shadow')),
    error         text NOT NULL
);
CREATE INDEX serving_errors_tenant_model_variant_ts_idx
    ON serving_errors (tenant_id, model_name, variant, ts);

REVOKE ALL ON serving_errors FROM PUBLIC;
GRANT SELECT, INSERT ON serving_errors TO mlops_predictor, mlops_worker;
GRANT SELECT ON serving_errors TO mlops_flows, mlops_tenant_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON serving_errors TO mlops_admin;

ALTER TABLE serving_errors ENABLE ROW LEVEL SECURITY;
ALTER TABLE serving_errors FORCE ROW LEVEL SECURITY;
CREATE POLICY one_tenant ON serving_errors TO mlops_predictor
    USING (tenant_id = current_setting('mlops.tenant', true));
CREATE POLICY listed_tenants ON serving_errors TO mlops_flows, mlops_admin, mlops_worker
    USING (tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
CREATE POLICY own_rows ON serving_errors FOR SELECT TO mlops_tenant_reader
    USING (current_user = 'tenant_' || tenant_id);
