#!/bin/sh
# Runs once, on the first start of an empty volume: the services' roles and databases
# (roles.psql, which `make up` runs too). A missing password stops the container here.
set -eu
: "${POSTGRES_OWNER_PASSWORD:?}" "${POSTGRES_PREDICTOR_PASSWORD:?}" "${POSTGRES_FLOWS_PASSWORD:?}"
: "${POSTGRES_GRAFANA_PASSWORD:?}" "${POSTGRES_MLFLOW_PASSWORD:?}" "${POSTGRES_PREFECT_PASSWORD:?}"
: "${POSTGRES_WORKER_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
  -f /docker-entrypoint-initdb.d/roles.psql
