-- Asynchronous jobs: a job row per submission, its records in the tenant's request queue
-- (pgmq, installed by 0006_pgmq), one result row per chunk, and a message in the tenant's
-- response queue when the job ends. Written by common/store/jobs.py.
--
-- Each tenant has three queues: jobs_req_<t> (chunks to score), jobs_res_<t> (jobs that
-- ended) and jobs_dlq_<t> (chunks that failed JOB_MAX_TRIES times, with the reason); a '-'
-- in the tenant id becomes '_' (ids have no '_', so names stay distinct). A queue is two
-- tables, pgmq.q_<queue> and pgmq.a_<queue>; who may reach them is plain table privileges:
-- the predictor sends into request queues, the workers read them and send into response
-- and dead-letter queues, a tenant's own SQL role (tenant_<id>) reads only its response
-- queue. Jobs and results are row-level secured like the prediction log.

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    -- No foreign key (as predictions): removing a tenant keeps its rows unless purged.
    tenant_id       text NOT NULL,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'done', 'failed')),
    records         integer NOT NULL CHECK (records > 0),
    chunks          integer NOT NULL CHECK (chunks > 0),
    chunks_done     integer NOT NULL DEFAULT 0,
    error           text,
    -- The last failure of a chunk still being retried (the dead-letter reason if it ends there).
    last_error      text,
    idempotency_key text,
    callback_url    text,
    key_id          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    callback_status text,
    UNIQUE (tenant_id, idempotency_key)
);

CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- One row per chunk whatever the redeliveries: the primary key makes a replay a no-op.
CREATE TABLE job_results (
    job_id        uuid NOT NULL REFERENCES jobs ON DELETE CASCADE,
    chunk         integer NOT NULL,
    tenant_id     text NOT NULL,
    first_record  integer NOT NULL,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    answers       jsonb NOT NULL,
    scored_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, chunk)
);

-- The workers' role (compose's initdb and `make up` give it LOGIN and a password).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlops_worker') THEN
        BEGIN
            CREATE ROLE mlops_worker NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this cluster created it meanwhile
        END;
    END IF;
END
$$;

REVOKE ALL ON jobs, job_results FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mlops_worker;
GRANT SELECT ON schema_migrations, tenants TO mlops_worker;
GRANT USAGE ON SCHEMA pgmq TO mlops_predictor, mlops_worker, mlops_admin, mlops_tenant_reader;

-- The predictor records and reads jobs; the workers score them and log their predictions.
GRANT SELECT, INSERT ON jobs TO mlops_predictor;
GRANT SELECT ON job_results TO mlops_predictor;
GRANT SELECT, UPDATE, DELETE ON jobs TO mlops_worker;
GRANT SELECT, INSERT ON job_results TO mlops_worker;
GRANT SELECT, INSERT ON predictions TO mlops_worker;
-- Only for the prediction writer's staging tables (LIKE feedback): no policy lets it see a row.
GRANT SELECT ON feedback TO mlops_worker;
GRANT SELECT ON jobs, job_results TO mlops_tenant_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, job_results TO mlops_admin;

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs FORCE ROW LEVEL SECURITY;
ALTER TABLE job_results ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_results FORCE ROW LEVEL SECURITY;

CREATE POLICY one_tenant ON jobs TO mlops_predictor
    USING (tenant_id = current_setting('mlops.tenant', true));
CREATE POLICY one_tenant ON job_results TO mlops_predictor
    USING (tenant_id = current_setting('mlops.tenant', true));
CREATE POLICY listed_tenants ON jobs TO mlops_worker, mlops_admin
    USING (tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
CREATE POLICY listed_tenants ON job_results TO mlops_worker, mlops_admin
    USING (tenant_id = ANY (string_to_array(current_setting('mlops.tenant', true), ',')));
ALTER POLICY listed_tenants ON predictions TO mlops_flows, mlops_admin, mlops_worker;
CREATE POLICY own_rows ON jobs FOR SELECT TO mlops_tenant_reader
    USING (current_user = 'tenant_' || tenant_id);
CREATE POLICY own_rows ON job_results FOR SELECT TO mlops_tenant_reader
    USING (current_user = 'tenant_' || tenant_id);

-- A tenant's queues, created with the tenant (the trigger below) and granted to whom may
-- reach them. SECURITY DEFINER: the operator's CLI adds tenants without owning pgmq.
CREATE FUNCTION mlops_queue_name(p_kind text, p_tenant text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'jobs_' || p_kind || '_' || replace(p_tenant, '-', '_')
$$;

CREATE FUNCTION mlops_tenant_queues(p_tenant text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    req text := mlops_queue_name('req', p_tenant);
    res text := mlops_queue_name('res', p_tenant);
    dlq text := mlops_queue_name('dlq', p_tenant);
    reader text := 'tenant_' || p_tenant;
BEGIN
    PERFORM pgmq.create(req);
    PERFORM pgmq.create(res);
    PERFORM pgmq.create(dlq);
    -- pgmq.send is INSERT ... RETURNING msg_id, so a sender needs SELECT too.
    EXECUTE format('GRANT SELECT, INSERT ON pgmq.%I TO mlops_predictor', 'q_' || req);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON pgmq.%I TO mlops_worker', 'q_' || req);
    -- pgmq.metrics (queue depth for autoscalers) reads the queue's sequence too.
    EXECUTE format('GRANT SELECT ON SEQUENCE pgmq.%I TO mlops_worker', 'q_' || req || '_msg_id_seq');
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON pgmq.%I, pgmq.%I TO mlops_worker',
                   'q_' || res, 'q_' || dlq);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq.%I, pgmq.%I, pgmq.%I TO mlops_admin',
                   'q_' || req, 'q_' || res, 'q_' || dlq);
    -- The tenant's own SQL role (if it has one) consumes its response queue, nothing else.
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = reader) THEN
        EXECUTE format('GRANT SELECT, UPDATE, DELETE ON pgmq.%I TO %I', 'q_' || res, reader);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION mlops_tenant_queues(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mlops_tenant_queues(text) TO mlops_admin;

CREATE FUNCTION mlops_tenant_added() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mlops_tenant_queues(NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_queues AFTER INSERT ON tenants
    FOR EACH ROW EXECUTE FUNCTION mlops_tenant_added();

SELECT mlops_tenant_queues(id) FROM tenants;
