"""Operations on the full stack: MLflow schema upgrade, backup, verify and restore.

    python -m scripts.ops db-upgrade          # back up MLflow's database, then `mlflow db upgrade`
    python -m scripts.ops backup [--dest D]   # dumps + bucket objects + state files, a manifest
    python -m scripts.ops verify DIR          # the files match the manifest; each dump reads
    python -m scripts.ops restore DIR         # verify, restore beside, check counts, swap in
    python -m scripts.ops start-clients       # after a failed restore left them stopped

By default they act on the stack `make up` started (MLOPS_HOME/stack): its services that
use the databases are stopped for a restore or an upgrade and started again once it
succeeded (after a failure they stay stopped, and the message says how to start them).
For another deployment (e.g. compose with the Postgres port published) pass --pg-url and
--s3-endpoint (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), --state-dir
evidently=PATH for the Evidently workspace if it is reachable, and stop the clients
yourself: `docker compose stop mlflow prefect-server prefect-worker evidently predictor worker`.

The URL's user is a superuser (it reads every database); each database keeps its owner
(the service role that owns it) through a restore or an upgrade, so the services can
still use it. Passwords reach pg_dump, pg_restore and `mlflow db upgrade` as PGPASSWORD,
never on their command lines.
"""
