# Two commands on a fresh machine: `make demo` (the main job) and `make test` (everything CI runs).
# Both bootstrap uv and the locked virtualenv themselves; plain pip is used only to fetch uv
# itself when it is not installed (its resolver takes >15 min on this dependency set).

SHELL := /bin/bash
.DEFAULT_GOAL := help
export UV_PYTHON_DOWNLOADS ?= never
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
# MLflow's telemetry phones home from a thread that edits os.environ while others read it
# (a KeyError inside requests); a self-hosted stack sends nothing out.
export MLFLOW_DISABLE_TELEMETRY ?= true
# A fresh Prefect ephemeral API migrates its database first; 20 s (the default) is too
# short on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# Test processes: most tests wait on real servers, so more workers than cores pays off.
PYTEST_WORKERS ?= 4

# Environments: `make <target> ENV=staging` (or prod) works in that environment: its
# registered model, database, work pool and, for `make up`, its own copy of the stack on
# its own ports (scripts/stack.py). Only ENV given on the command line counts (a shell's
# own ENV variable is something else); MLOPS_ENV in the environment or .env works too.
ifeq ($(origin ENV),command line)
export MLOPS_ENV := $(ENV)
endif

UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)

# The project's Python: 3.12 where one is installed, else 3.11 (both in the lock). On 3.12
# coverage.py measures through sys.monitoring (PEP 669), which costs the suite's hundreds of
# Python processes a fraction of what 3.11's trace function does. Each candidate is run, since
# a pyenv shim names versions it cannot start; UV_PYTHON given to make or in the environment wins.
PYENV_PYTHONS := $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3.12)
ifeq ($(origin UV_PYTHON),undefined)
UV_PYTHON := $(firstword $(foreach p,python3.12 $(PYENV_PYTHONS) python3.11 python3,$(shell $(p) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13); print(sys.executable)' 2>/dev/null)))
endif
ifneq ($(UV_PYTHON),)
export UV_PYTHON
endif
RUN := $(UV) run --frozen

.PHONY: help bootstrap demo serve bento bench-serving bench-tenants bench-jobs bench-soak up down status pipeline summary test lint format unit integration e2e bench mlflow-ui evidently-ui licenses clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(CURDIR)/.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

bootstrap: .venv/.synced ## install uv (if missing) and the locked environment

# When this make began: the summary tells a version registered before it as unchanged.
STARTED := $(shell date +%s)

demo: bootstrap ## the main job: the closed loop (pipeline, serve, drift, monitor, retrain, gate, live swap)
	$(RUN) dvc repro
	$(RUN) python -m common.summary --since $(STARTED)
	$(RUN) python -m scripts.loop

SERVE_HOST ?= 127.0.0.1

serve: bootstrap ## serve the champion with BentoML on http://127.0.0.1:3000 (SERVE_HOST=0.0.0.0 to listen on every interface; Ctrl-C stops it)
	$(RUN) python -m services.predictor.launch --host $(SERVE_HOST) --port 3000

BENTO_DIR ?= build/bento

bento: bootstrap ## build a Bento of the predictor with the champion inside, unpacked into build/bento/ (the image's build context)
	@mkdir -p build
	$(UV) export --frozen --no-default-groups --group serve --no-hashes --no-emit-project -o build/bento-requirements.txt >/dev/null
	PATH="$(dir $(UV)):$$PATH" $(RUN) python -m services.predictor.package --build --export $(BENTO_DIR)

up: bootstrap ## the full topology as local processes (no Docker): postgres, S3, mlflow, prefect + worker, evidently, predictor
	$(RUN) python scripts/stack.py up

down: bootstrap ## stop everything `make up` started
	$(RUN) python scripts/stack.py down

status: bootstrap ## what `make up` runs and its state
	$(RUN) python scripts/stack.py status

pipeline: bootstrap ## dvc repro only
	$(RUN) dvc repro

summary: bootstrap ## the summary table of the last pipeline run
	$(RUN) python -m common.summary

lint: bootstrap ## ruff (lint + format check) and mypy
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

format: bootstrap ## apply ruff's fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

# Everything CI runs (.ci/run and the GitHub workflow call this and nothing else), in order:
# the pre-commit hooks on every file, the lock against pyproject.toml, the licences, the suite
# with coverage (fail_under in pyproject.toml), then the checkout as clean as it was committed:
# a hook or test that rewrites a tracked file or leaves an untracked one fails the run.
# PYTEST_ARGS narrows the suite, e.g. `make test PYTEST_ARGS='-m unit'`.
# What a run must leave as it found it: tracked changes and the list of untracked files. A
# clean clone (CI) must stay clean; after `make demo` its outputs (dvc.lock, metrics/, ...) stay.
TREE_STATE = { git status --porcelain --untracked-files=all; git diff; }
TREE_BEFORE = $(shell git rev-parse --git-path make-test-tree.before 2>/dev/null)

test: bootstrap ## everything CI runs: pre-commit hooks, uv lock --check, licences, the suite with coverage, an unchanged checkout
	@$(TREE_STATE) > $(TREE_BEFORE)
	@test ! -s $(TREE_BEFORE) || \
		echo "make test: the checkout has uncommitted changes; they are checked too, and the run must add none" >&2
	PATH="$(dir $(UV)):$$PATH" $(RUN) pre-commit run --all-files --show-diff-on-failure
	$(UV) lock --check
	$(RUN) python scripts/check_licenses.py
	$(RUN) pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --cov --cov-report=term:skip-covered --durations=25 $(PYTEST_ARGS)
	@$(TREE_STATE) | diff -u $(TREE_BEFORE) - || { \
		echo "make test: the run changed the checkout (the diff above: - before, + after)" >&2; exit 1; }

unit: bootstrap ## unit tests only
	$(RUN) pytest -m unit

integration: bootstrap ## integration tests only (real PostgreSQL, S3 endpoint, MLflow server)
	$(RUN) pytest -m integration

e2e: bootstrap ## end-to-end tests only
	$(RUN) pytest -m e2e

bench: bootstrap ## benchmarks: prints the pipeline's timings
	$(RUN) python -m benchmarks.pipeline

bench-serving: bootstrap ## serving benchmark: in-process floor vs this service vs mlflow models serve (needs make demo)
	$(RUN) python -m benchmarks.serving

bench-tenants: bootstrap ## 20 tenants' own models on one predictor vs one model vs mlflow models serve (needs make demo)
	$(RUN) python -m benchmarks.tenant_serving

bench-jobs: bootstrap ## async jobs: pgmq alone, then POST /jobs with 1 and 2 workers vs /predict, latency at 100 jobs/s (needs make demo)
	$(RUN) python -m benchmarks.async_jobs

bench-soak: bootstrap ## 10 min of mixed traffic at half capacity with a monitor run and a retrain: errors, p99 and RSS per minute, rows acknowledged vs logged (SOAK_ARGS='--minutes 2')
	$(RUN) python -m benchmarks.soak $(SOAK_ARGS)

mlflow-ui: bootstrap ## MLflow UI on the embedded store (http://127.0.0.1:5000)
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlops/mlflow.db --port 5000 --workers 1

evidently-ui: bootstrap ## Evidently UI on the environment's monitoring workspace (http://127.0.0.1:8000)
	DO_NOT_TRACK=1 $(RUN) evidently ui --workspace $(or $(MLOPS_HOME),$(CURDIR)/.mlops)$(if $(filter-out dev,$(or $(MLOPS_ENV),dev)),/$(MLOPS_ENV))/evidently --host 127.0.0.1 --port 8000

licenses: bootstrap ## fail if a dependency's licence is incompatible with Apache-2.0
	$(RUN) python scripts/check_licenses.py

clean: ## remove the embedded store and pipeline outputs (keeps the DVC cache)
	rm -rf .mlops data/prepared reports metrics plots dvc_plots

# The rollback flow in this process, on the embedded store (or MLFLOW_TRACKING_URI's server).
.PHONY: rollback promote-staging promote-prod rollout
REASON ?= manual rollback (make rollback)

rollback: bootstrap ## move champion back to the version it replaced, through the rollback flow (TENANT=acme: acme's own model; again: one further back)
	@PREFECT_SERVER_ANALYTICS_ENABLED=false $(RUN) python -m flows.promote rollback \
		$(if $(TENANT),--tenant "$(TENANT)") --reason "$(REASON)"

promote-staging: bootstrap ## copy dev's champion (TENANT=acme: acme's own) into staging and make it staging's champion, if its gate passed
	@PREFECT_SERVER_ANALYTICS_ENABLED=false $(RUN) python -m flows.promote promote --to staging \
		$(if $(TENANT),--tenant "$(TENANT)")

promote-prod: bootstrap ## copy staging's champion into prod once a registered reviewer signs an approval (mlops approve <flow-run-id> --key KEY)
	@PREFECT_SERVER_ANALYTICS_ENABLED=false $(RUN) python -m flows.promote promote --to prod \
		$(if $(TENANT),--tenant "$(TENANT)")

rollout: bootstrap ## ramp the challenger on live traffic (params.yaml rollout.steps), then promote or roll it back (TENANT=acme)
	@PREFECT_SERVER_ANALYTICS_ENABLED=false $(RUN) python -m flows.rollout \
		$(if $(TENANT),--tenant "$(TENANT)")

# Prefect: a local server, the deployments of prefect.yaml, and a worker that runs them.
.PHONY: prefect-server deploy worker
POOL ?= local-process$(if $(filter-out dev,$(or $(MLOPS_ENV),dev)),-$(MLOPS_ENV))

prefect-server: bootstrap ## Prefect server and UI on http://127.0.0.1:4200 (SQLite under PREFECT_HOME)
	$(RUN) prefect server start --host 127.0.0.1 --port 4200

deploy: bootstrap ## create the environment's work pool (local-process[-ENV]) if missing, then `prefect deploy --all` to it, and the failed-flow-run alert if MONITOR_WEBHOOK_URL is set (needs PREFECT_API_URL)
	$(RUN) prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(RUN) prefect work-pool create $(POOL) --type process
	MLOPS_PROJECT_DIR=$(CURDIR) PREFECT_WORK_POOL=$(POOL) $(RUN) prefect --no-prompt deploy --all
	$(RUN) python -m common.flow_alerts

worker: bootstrap ## a Prefect worker serving the environment's pool (runs the deployments' flow runs)
	$(RUN) prefect worker start --pool $(POOL)

# Tenants (customers) and their API keys: `uv run mlops tenants --help` for the rest
# (keys create|list|rotate|revoke, remove, sql-role). DATABASE_URL as the owner, else the
# embedded database.
.PHONY: tenant

tenant: bootstrap ## add tenant TENANT (make -s tenant TENANT=acme) and print its first key, once
	$(if $(TENANT),,$(error name the tenant: make tenant TENANT=acme (1-32 of a-z, 0-9, -)))
	@$(RUN) mlops tenants add $(TENANT) --with-key

# Operations on the `make up` stack (scripts/ops.py; --pg-url/--s3-endpoint for another one).
.PHONY: backup ops-verify ops-restore db-upgrade

backup: bootstrap ## dumps of the stack's databases, every bucket object, the Evidently workspace, a manifest with checksums, in .mlops/backups/<UTC time>/
	$(RUN) python -m scripts.ops backup

ops-verify: bootstrap ## check backup BACKUP=DIR against its manifest and read each dump (touches nothing live)
	$(if $(BACKUP),,$(error name the backup: make ops-verify BACKUP=.mlops/backups/<UTC time>))
	$(RUN) python -m scripts.ops verify $(BACKUP)

ops-restore: bootstrap ## verify BACKUP=DIR, restore it beside the live data, check row counts, swap it in
	$(if $(BACKUP),,$(error name the backup: make ops-restore BACKUP=.mlops/backups/<UTC time>))
	$(RUN) python -m scripts.ops restore $(BACKUP)

db-upgrade: bootstrap ## back up MLflow's database, then `mlflow db upgrade` on it (after upgrading MLflow)
	$(RUN) python -m scripts.ops db-upgrade
