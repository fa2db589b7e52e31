-- Tenants (customers), their API keys, and row-level security on every table that holds a
-- tenant's data. Written by common/store/tenants.py; read by the predictor's key check.
--
-- Isolation is the database's job, not only the code's: the service roles below are not
-- owners and not superusers, RLS is FORCED, and a tenant is seen only when the transaction
-- has set it (`set_config('mlops.tenant', id, true)`, see tenants.scope). A forgotten WHERE
-- or a forgotten scope returns no rows.

CREATE TABLE tenants (
    id         text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,32}$'),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The traffic of a single-team install, and every row logged before tenants existed.
INSERT INTO tenants (id, name) VALUES ('default', 'Default tenant');

-- A key is `mlops_<key_id>_<secret>`: key_id finds the row, only the secret's SHA-256 is
-- kept (keys are 256-bit random, so a fast hash is enough), the key is shown once.
CREATE TABLE api_keys (
    key_id        text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
    tenant_id     text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    secret_sha256 bytea NOT NULL,
    scopes        text[] NOT NULL CHECK (scopes <@ ARRAY['predict', 'feedback', 'admin']),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- A rotation keeps the old key working until expires_at; revoking ends it at once.
    expires_at    timestamptz,
    revoked_at    timestamptz
);

CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

-- Every tenant-owned row names its tenant; existing rows are the default tenant's.
ALTER TABLE predictions ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE predictions ALTER COLUMN tenant_id DROP DEFAULT;
CREATE INDEX predictions_tenant_ts_idx ON predictions (tenant_id, ts, request_id);

-- A label is one tenant's, keyed per tenant, and records which key sent it.
ALTER TABLE feedback ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE feedback ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE feedback ADD COLUMN source text;
ALTER TABLE feedback DROP CONSTRAINT feedback_pkey;
ALTER TABLE feedback ADD PRIMARY KEY (tenant_id, request_id);

-- Monitoring rows of one tenant's model name it; NULL is the shared model over all traffic.
ALTER TABLE monitoring_runs ADD COLUMN tenant_id text;
ALTER TABLE monitoring_metrics ADD COLUMN tenant_id text;

-- The roles services log in as (compose's initdb and `make up` create them with LOGIN and
-- a password first; here they are created without, if missing). mlops_admin is the
-- operator's (migrations, the tenants CLI); mlops_tenant_reader the group of per-tenant
-- read-only SQL roles named tenant_<id>.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['mlops_predictor', 'mlops_flows', 'mlops_grafana',
                             'mlops_admin', 'mlops_tenant_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database of this cluster created it meanwhile
            END;
        END IF;
    END LOOP;
    IF NOT pg_has_role(current_user, 'mlops_admin', 'MEMBER') THEN
        EXECUTE format('GRANT mlops_admin TO %I', current_user);
    END IF;
END
$$;

REVOKE ALL ON predictions, feedback, monitoring_runs, monitoring_metrics, tenants, api_keys,
    schema_migrations FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mlops_predictor, mlops_flows, mlops_grafana, mlops_admin,
    mlops_tenant_reader;
GRANT SELECT ON schema_migrations TO mlops_predictor, mlops_flows, mlops_grafana, mlops_admin;

-- The predictor: logs predictions and labels, reads its own tenant's back.
GRANT SELECT, INSERT ON predictions TO mlops_predictor;
GRANT SELECT, INSERT, UPDATE ON feedback TO mlops_predictor;
-- The flows: read the log (monitor, retrain), log batch predictions, write monitoring results.
GRANT SELECT, INSERT ON predictions TO mlops_flows;
GRANT SELECT ON feedback TO mlops_flows;
GRANT SELECT, INSERT, DELETE ON monitoring_runs, monitoring_metrics TO mlops_flows;
GRANT SELECT ON tenants TO mlops_flows;
-- Grafana: reads monitoring numbers, never a prediction or a label.
GRANT SELECT ON monitoring_runs, monitoring_metrics TO mlops_grafana;
-- A tenant's SQL consumers: its own predictions and labels, read only.
GRANT SELECT ON predictions, feedback TO mlops_tenant_reader;
-- The operator: everything, still through the policies below.
GRANT SELECT, INSERT, UPDATE, DELETE ON predictions, feedback, monitoring_runs,
    monitoring_metrics, tenants, api_keys TO mlops_admin;

-- The key check: the predictor may ask "whose key is this", never read the key table.
CREATE FUNCTION mlops_authenticate(p_key_id text, p_secret_sha256 bytea)
RETURNS TABLE (tenant_id text, scopes text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT k.tenant_id, k.scopes FROM public.api_keys k
    WHERE k.key_id = p_key_id AND k.secret_sha256 = p_secret_sha256
      AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
$$;
REVOKE ALL ON FUNCTION mlops_authenticate(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mlops_authenticate(text, bytea) TO mlops_predictor, mlops_admin;

-- Caches of key checks drop a key the moment it is revoked, rotated out or removed.
CREATE FUNCTION mlops_api_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mlops_api_keys', OLD.key_id);
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION mlops_api_keys_changed();

-- Row-level security, enabled and forced (the table owner is held to it too).
ALTER TABLE predictions ENABLE ROW LEVEL SECURITY;
ALTER TABLE predictions FORCE ROW LEVEL SECURITY;
ALTER TABLE feedback ENABLE ROW LEVEL SECURITY;
ALTER TABLE feedback FORCE ROW LEVEL SECURITY;
ALTER TABLE monitoring_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE monitoring_runs FORCE ROW LEVEL SECURITY;
ALTER TABLE monitoring_metrics ENABLE ROW LEVEL SECURITY;
ALTER TABLE monitoring_metrics FORCE ROW LEVEL SECURITY;

-- The predictor works for one tenant per transaction.
CREATE POLICY one_tenant ON predictions TO mlops_predictor
    USING (tenant_id = current_setting('mlops.tenant', true));
CREATE POLICY one_tenant ON feedback TO mlops_predictor
    USING (tenant_id = current_setting('mlops.tenant', true));

-- Flows and the operator may name several tenants (the shared model's monitor reads all of
-- its traffic): a comma-separated list; tenant ids cannot contain a comma.
CREATE POLICY listed_tenants ON predictions TO mlops_flows, mlops_admin
    USING (tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
CREATE POLICY listed_tenants ON feedback TO mlops_flows, mlops_admin
    USING (tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
CREATE POLICY listed_tenants ON monitoring_runs TO mlops_flows, mlops_admin
    USING (tenant_id IS NULL
           OR tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
CREATE POLICY listed_tenants ON monitoring_metrics TO mlops_flows, mlops_admin
    USING (tenant_id IS NULL
           OR tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));

-- Grafana charts the shared model's monitoring; a tenant's own numbers are not its to read.
CREATE POLICY shared_model ON monitoring_runs FOR SELECT TO mlops_grafana
    USING (tenant_id IS NULL);
CREATE POLICY shared_model ON monitoring_metrics FOR SELECT TO mlops_grafana
    USING (tenant_id IS NULL);

-- A tenant's SQL role (tenant_<id>) reads its own rows; it cannot choose another tenant by
-- setting mlops.tenant, since its policy looks only at who it is.
CREATE POLICY own_rows ON predictions FOR SELECT TO mlops_tenant_reader
    USING (current_user = 'tenant_' || tenant_id);
CREATE POLICY own_rows ON feedback FOR SELECT TO mlops_tenant_reader
    USING (current_user = 'tenant_' || tenant_id);
