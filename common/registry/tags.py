"""The model-version tags this project writes: one name for each, so writers and readers agree.

Stored registries, dashboards and the MLflow UI read these exact strings: never rename one.
The train stage also sets the lineage tags (git, dvc, onnx, prefect) on its MLflow run,
where register reads `dvc.raw_md5` back from.

One promotion record: every move of `champion` (the register stage's gate, the promote
flow, a rollback, a rollout) goes through `common.registry.promotion.move_champion`, which
writes the same tags on the version it now points at: `alias.champion.set_by` (who or
what decided), `.set_at` (when), `.reason` (why), `.evidence` (on what), `.previous` (the
champion replaced), and `promote.decision` with `promote.decided_by/_at/reason`. A
promotion sets `.previous`; a rollback keeps the restored version's own `.previous` (so a
second rollback walks one further back) and marks the version it left `rolled back`.
`gate.*` stays the register stage's verdict, written whatever it decided.

A rollout (flows/rollout.py) records each step it judged on the challenger version
(`rollout.step.<n>`) and how it ended (`rollout.outcome`); the end itself is the one
promotion record again (`promoted` through `move_champion`), or `promote.decision: rolled
back` / `held` on the challenger. With params.yaml `rollout.canary`, a version that passes
the gate while a champion exists becomes `challenger` (`gate.decision: canary`, the gate's
evidence in `alias.challenger.evidence`) and the rollout decides.

tag                          written by       means
---------------------------  ---------------  ----------------------------------------------------
git.commit                   train, register  HEAD when trained (`-dirty`: tracked files changed)
dvc.raw_md5                  train, register  DVC md5 of the raw table it was trained from (a
                                              tenant's: its snapshot, data/tenants/<id>/)
tenant                       train, register  the tenant whose own model this is (its data only)
data.source                  register         a tenant's source as params.yaml declares it (the
                                              path, or the query and its URL's variable name)
dvc.train_md5                train, register  DVC md5 of data/prepared/train.parquet
dvc.holdout_md5              register         DVC md5 of the holdout it was scored on
params.train                 register         params.yaml's `train` section, JSON
metrics                      register         every holdout metric, JSON
metric.<name>                register         one holdout metric
onnx.parity                  train, register  `passed`/`failed`: ONNX agrees with sklearn; only
                                              a `passed` version is served through ONNX
onnx.max_abs_diff            register         largest ONNX-vs-sklearn probability gap
mlflow.run_id                register         the MLflow run that trained it
model.manifest_sha256        register         SHA-256 of the version's manifest.json (every file's
                             (from train)     sha256 and size, models.manifest): no loader reads a
                                              file of a version whose files differ from it
prefect.flow_run_id          train, register  the Prefect flow run that trained it, if any
gate.decision                register         the gate's verdict: `promoted`/`held`/`rejected`/
                                              `canary` (passed; challenger for a rollout)
gate.reason                  register         why
gate.decided_by              register         who (the register stage)
promote.decision             promotion        the latest decision about this version:
                                              `promoted`/`restored` (champion again by a
                                              rollback)/`rolled back`/`rejected`/`held`
promote.decided_by           promotion        who or what decided
promote.decided_at           promotion        when (UTC)
promote.reason               promotion        why
alias.<alias>.set_by         move_alias       who pointed <alias> at this version
alias.<alias>.set_at         move_alias       when (UTC)
alias.<alias>.reason         move_alias       why
alias.champion.previous      promotion        the champion it replaced: where rollback goes
alias.champion.evidence      promotion        JSON: what the move rested on (the gate's or the
                                              promote flow's policy, metrics and comparison,
                                              the reviewer; a rollback's `rolled_back_from`;
                                              a rollout's live numbers per variant)
alias.challenger.evidence    register         JSON: the gate's evidence for a canary (canary)
rollout.step.<n>             rollout flow     JSON: step n judged: the weight, the verdict
                                              (`advance`/`promote`/`roll back`/`hold`), why,
                                              both variants' live numbers, the comparisons
rollout.outcome              rollout flow     how the rollout ended: `promoted`/`rolled back`/
                                              `held` (no verdict in time: weight 0, kept)
rollout.champion             rollout flow     the champion version it was compared with
monitor.last_run             monitor flow     MLflow run of the latest monitoring report
monitor.last_window_end      monitor flow     end of that report's window (UTC)
monitor.last_drift           monitor flow     `true`/`false`: did that window drift
retrain.trigger              retrain flow     the event that started its training
retrain.monitor_run          retrain flow     the monitoring run that found the drift
retrain.report               retrain flow     that run's Evidently report (URI)
data.production_rows         retrain flow     labelled production rows added to its training

Environments (common.registry.environments): a version promoted to staging or prod is a copy
of the files of the version before it, registered anew in the target environment's model; it
keeps the source's lineage tags (git.*, dvc.*, metrics, onnx.*, gate.*, mlflow.run_id, ...)
and adds where it came from and who let it in:

tag                          written by       means
---------------------------  ---------------  ----------------------------------------------------
env.source                   environments     the environment it was copied from (dev, staging)
env.source_model             environments     that environment's registered model
env.source_version           environments     the version copied
env.source_run_id            environments     the source version's MLflow run (the copy's own run
                                              holds the copied files)
env.lineage                  environments     JSON: every version it descends from, nearest first
                                              ([{"env", "model", "version"}, ...] back to dev)
env.gate_metrics             environments     JSON: the holdout metrics the source's gate passed on
env.promoted_at              environments     when it was copied (UTC)
approval.reviewer            environments     the registered reviewer whose signature let it in
approval.decision            environments     `approve` (a rejection copies nothing)
approval.expires             environments     the signed approval's expiry (UTC)
approval.signature           environments     the Ed25519 signature (base64) over the request
approval.flow_run_id         environments     the Prefect flow run the approval was signed for
"""

from __future__ import annotations

from collections.abc import Mapping

# lineage: what the version was made from
GIT_COMMIT = "git.commit"
DVC_RAW_MD5 = "dvc.raw_md5"
DVC_TRAIN_MD5 = "dvc.train_md5"
DVC_HOLDOUT_MD5 = "dvc.holdout_md5"
PARAMS_TRAIN = "params.train"
MLFLOW_RUN_ID = "mlflow.run_id"
MANIFEST_SHA256 = "model.manifest_sha256"
"""SHA-256 of the version's manifest.json, set at registration, outside its artifacts."""
PREFECT_FLOW_RUN_ID = "prefect.flow_run_id"
TENANT = "tenant"
DATA_SOURCE = "data.source"

# evaluation
METRICS = "metrics"
METRIC_PREFIX = "metric."
ONNX_PARITY = "onnx.parity"
ONNX_MAX_ABS_DIFF = "onnx.max_abs_diff"
PARITY_PASSED = "passed"
PARITY_FAILED = "failed"

# decisions
GATE_DECISION = "gate.decision"
GATE_REASON = "gate.reason"
GATE_DECIDED_BY = "gate.decided_by"
PROMOTE_DECISION = "promote.decision"
PROMOTE_DECIDED_BY = "promote.decided_by"
PROMOTE_DECIDED_AT = "promote.decided_at"
PROMOTE_REASON = "promote.reason"

# alias moves: alias_tag(alias, key)
ALIAS_PREFIX = "alias."
ALIAS_SET_BY = "set_by"
ALIAS_SET_AT = "set_at"
ALIAS_REASON = "reason"
ALIAS_PREVIOUS = "previous"
ALIAS_EVIDENCE = "evidence"

# rollouts: the challenger's live steps (flows/rollout.py); rollout_step_tag(n)
ROLLOUT_STEP_PREFIX = "rollout.step."
ROLLOUT_OUTCOME = "rollout.outcome"
ROLLOUT_CHAMPION = "rollout.champion"
GATE_CANARY = "canary"
"""`gate.decision` of a version that passed while `rollout.canary` is on: a challenger."""

# the loop after serving
MONITOR_LAST_RUN = "monitor.last_run"
MONITOR_LAST_WINDOW_END = "monitor.last_window_end"
MONITOR_LAST_DRIFT = "monitor.last_drift"
RETRAIN_TRIGGER = "retrain.trigger"
RETRAIN_MONITOR_RUN = "retrain.monitor_run"
RETRAIN_REPORT = "retrain.report"
DATA_PRODUCTION_ROWS = "data.production_rows"

# environments: a version copied from the environment before it (dev -> staging -> prod)
ENV_SOURCE = "env.source"
ENV_SOURCE_MODEL = "env.source_model"
ENV_SOURCE_VERSION = "env.source_version"
ENV_SOURCE_RUN_ID = "env.source_run_id"
ENV_LINEAGE = "env.lineage"
ENV_GATE_METRICS = "env.gate_metrics"
ENV_PROMOTED_AT = "env.promoted_at"
APPROVAL_REVIEWER = "approval.reviewer"
APPROVAL_DECISION = "approval.decision"
APPROVAL_EXPIRES = "approval.expires"
APPROVAL_SIGNATURE = "approval.signature"
APPROVAL_FLOW_RUN_ID = "approval.flow_run_id"

LINEAGE = (
    GIT_COMMIT,
    DVC_RAW_MD5,
    DVC_TRAIN_MD5,
    METRICS,
    ONNX_PARITY,
    GATE_DECISION,
    GATE_REASON,
    MLFLOW_RUN_ID,
    ENV_SOURCE,
    ENV_SOURCE_VERSION,
    ENV_LINEAGE,
    APPROVAL_REVIEWER,
)
"""The tags the predictor's /model shows as the served version's lineage, in this order (a
version promoted from another environment: where from, every version back to dev, who
approved)."""


def alias_tag(alias: str, key: str) -> str:
    """`alias.<alias>.<key>`, e.g. alias_tag("champion", ALIAS_PREVIOUS)."""
    return f"{ALIAS_PREFIX}{alias}.{key}"


def rollout_step_tag(step: int) -> str:
    """`rollout.step.<step>`: what step `step` (1-based) of a rollout decided."""
    return f"{ROLLOUT_STEP_PREFIX}{step}"


def metric_tag(metric: str) -> str:
    """`metric.<metric>`: one holdout metric of the version."""
    return f"{METRIC_PREFIX}{metric}"


def parity(passed: bool) -> str:
    """The `onnx.parity` value for a parity check's result."""
    return PARITY_PASSED if passed else PARITY_FAILED


def onnx_ok(tags: Mapping[str, str]) -> bool:
    """Whether the version's ONNX export may serve: its parity check passed."""
    return tags.get(ONNX_PARITY) == PARITY_PASSED
