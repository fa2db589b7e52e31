"""The closed loop of `make demo`, on the embedded default, after `dvc repro` made the models.

`dvc repro` trained the shared champion and acme's own model (params.yaml `tenants.acme`,
from acme's own data, gated against the shared champion on acme's holdout); globex has no
model of its own and is served the shared one.

1. serve (BentoML, prediction log in an embedded PostgreSQL); the example tenants acme and
   globex exist (added if missing), each with a fresh key of its own; each is answered by
   its own champion, else the shared one;
2. each tenant sends its own traffic with its own key; globex tries to label and to read
   acme's predictions (refused); `monitor` runs once per tenant, on that tenant's rows
   against the model serving it: no drift;
3. acme's traffic drifts (the generator's covariate shift and concept drift), its true
   labels arriving afterwards through /feedback, while globex's stays as it was; `monitor`
   per tenant: drift in acme's only (alert, event naming acme);
4. run `retrain` for acme (what the event triggers in the full stack): acme's labelled
   rows join acme's data, acme's pipeline registers a new version, acme's gate passes it
   and, acme's new versions going through a canary (params.yaml `tenants.acme.rollout`),
   makes it acme's `challenger`;
5. each tenant submits a job of a few hundred of its records (`POST /jobs`), worker
   processes score them with the champion and end by themselves, each job is polled until
   done (`scripts.loop_jobs`);
6. the canary (`scripts.loop_canary`): the rollout flow gives the challenger 10% of acme's
   customers, then 50%, then all, each step judged on live numbers (error rate, latency,
   accuracy and ROC AUC from the labels acme's client sends back) and printed per variant,
   and promotes it through the one promotion path; a client of each tenant sends requests
   throughout: no failed request, globex's keeps the shared champion;
7. print a summary table and the commands that open the UIs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from common import registry
from common.errors import run_cli
from common.params import Params, load_params
from common.registry import tags as tag
from common.settings import Settings, get_settings
from common.store import connect, tenants
from flows.monitor import Outcome, monitor
from flows.retrain import retrain
from models.generate import EXAMPLE_TENANTS, Drift, ExampleTenant
from scripts import loop_canary, loop_jobs
from services.predictor.demo import admin_url, demo_key, show_answers
from services.predictor.launch import serving

console = Console(highlight=False, markup=False)
"""Plain text: what the loop prints is data (column lists in [...], paths), never rich markup."""

JOB_RECORDS = 300
"""Records of each tenant's job in step 5."""
CANARY_ROWS = 4000
"""Distinct customers (rows) acme's client cycles through during the canary of step 6."""

DRIFT = Drift(
    covariate={"tenure_months": -0.8, "monthly_charges": 0.8, "contract_type": 0.3},
    concept=1.0,
)


def _request(
    url: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> Any:
    """The JSON answer of a GET (no body) or POST; an HTTP error status raises."""
    headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _status(url: str, body: dict[str, Any] | None, key: str) -> tuple[int, Any]:
    """(HTTP status, JSON answer or None) of a request that may well be refused."""
    try:
        return 200, _request(url, body, key)
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
        except ValueError:
            answer = None
        return exc.code, answer


def _records(df: pd.DataFrame, features: list[str]) -> list[dict[str, Any]]:
    return [
        {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in df[features].astype(object).to_dict(orient="records")
    ]


def send(url: str, df: pd.DataFrame, features: list[str], key: str, batch: int = 100) -> list[str]:
    """POST the rows to /predict in batches with a tenant's key; the request ids, in row order."""
    ids: list[str] = []
    records = _records(df, features)
    for i in range(0, len(records), batch):
        answer = _request(f"{url}/predict", {"records": records[i : i + batch]}, key)
        ids += [p["request_id"] for p in answer["predictions"]]
    return ids


@dataclass(frozen=True)
class Traffic:
    """One window of requests: each tenant's rows and the request ids its own key got back."""

    frames: dict[str, pd.DataFrame]
    ids: dict[str, list[str]]
    start: datetime

    @classmethod
    def send(
        cls,
        url: str,
        frames: dict[str, pd.DataFrame],
        features: list[str],
        keys: dict[str, str],
        database_url: str,
    ) -> Traffic:
        """Send each tenant's rows with its key; return once the log holds them all."""
        start = datetime.now(UTC)
        ids = {tenant: send(url, df, features, keys[tenant]) for tenant, df in frames.items()}
        traffic = cls(frames, ids, start)
        wait_logged(database_url, start, traffic.total)
        return traffic

    @property
    def total(self) -> int:
        return sum(len(df) for df in self.frames.values())

    @property
    def split(self) -> str:
        """How many rows each tenant sent, for the step's heading."""
        counts = ", ".join(f"{len(df):,} from {tenant}" for tenant, df in self.frames.items())
        return f"{counts}, each with its own key"

    def label(self, url: str, keys: dict[str, str], target: str, share: float) -> int:
        """Send the true labels of a `share` of the rows of each tenant in `keys`, with its
        key; how many."""
        sent = 0
        for tenant, df in self.frames.items():  # labels arrive late, after the predictions
            if tenant not in keys:
                continue
            for i in df.sample(frac=share, random_state=0).index:
                body = {"request_id": self.ids[tenant][i], "label": str(df.loc[i, target])}
                _request(f"{url}/feedback", body, keys[tenant])
                sent += 1
        time.sleep(1.5)  # the feedback rows are logged off the request path too
        return sent


def setup_tenants(database_url: str, examples: Sequence[ExampleTenant]) -> dict[str, str]:
    """Each example tenant (added if missing) and a fresh key for it; its older keys end now.

    A second demo finds the tenants of the first and rotates their keys: the first demo's
    keys were shown to no one, so none is kept working. `database_url` is the owner's.
    """
    known = {t.id for t in tenants.list_tenants(database_url)}
    keys: dict[str, str] = {}
    for example in examples:
        if example.id not in known:
            tenants.add_tenant(database_url, example.id, example.name)
        key, _ = tenants.rotate_key(
            database_url, example.id, tenants.DEFAULT_SCOPES, grace=timedelta(0)
        )
        keys[example.id] = key.secret
    return keys


def read_back(url: str, key: str, start: datetime) -> tuple[int, set[str]]:
    """(HTTP status, request ids) of every prediction `GET /predictions` shows this key.

    Each page is `{"tenant_id", "rows": [...], "next_cursor"}`; the cursor is followed to
    the last page.
    """
    ids: set[str] = set()
    query: dict[str, str] = {"start": start.isoformat(), "limit": "1000"}
    while True:
        status, page = _status(f"{url}/predictions?{urllib.parse.urlencode(query)}", None, key)
        if status != 200 or not isinstance(page, dict):
            return status, ids
        ids |= {str(row["request_id"]) for row in page["rows"]}
        if not page.get("next_cursor"):
            return status, ids
        query["cursor"] = str(page["next_cursor"])


@dataclass(frozen=True)
class Isolation:
    """What tenant `other` could do with tenant `owner`'s predictions, with its own key."""

    owner: str
    other: str
    feedback_status: int
    """`other`'s POST /feedback on one of `owner`'s request ids: 404, as for an unknown id."""
    read_status: int
    """`other`'s GET /predictions: 200."""
    own_rows: int
    """How many of `other`'s own predictions of the window it read back."""
    owner_rows: int
    """How many of `owner`'s predictions of the window it read back: 0."""
    owner_total: int
    foreign_rows: int
    """Rows it read back that are not its own (`owner`'s included): 0."""

    @property
    def cannot_label(self) -> bool:
        return self.feedback_status == 404

    @property
    def cannot_see(self) -> bool:
        return self.read_status == 200 and self.own_rows > 0 and self.foreign_rows == 0

    @property
    def holds(self) -> bool:
        return self.cannot_label and self.cannot_see

    def lines(self) -> list[tuple[str, bool]]:
        """The two lines the demo prints, each with whether its check held.

        Plain text, styled when printed: the console may print markup as it is.
        """
        if self.cannot_label:
            label = f"{self.other} cannot label {self.owner}'s predictions"
        else:
            label = f"NOT ISOLATED: {self.other} could label {self.owner}'s predictions"
        if self.read_status != 200:
            seen = f"{self.other} could not read back its own rows"
        elif self.foreign_rows:
            seen = f"NOT ISOLATED: {self.other} sees rows not its own"
        elif not self.own_rows:
            seen = f"{self.other} read back none of its own rows: this proves nothing"
        else:
            seen = f"{self.other} cannot see {self.owner}'s predictions"
        return [
            (
                f"POST /feedback with {self.other}'s key on one of {self.owner}'s request ids: "
                f"HTTP {self.feedback_status}: {label}",
                self.cannot_label,
            ),
            (
                f"GET /predictions with {self.other}'s key: HTTP {self.read_status}, "
                f"{self.own_rows:,} of {self.other}'s own rows, {self.owner_rows:,} of "
                f"{self.owner}'s {self.owner_total:,}: {seen}",
                self.cannot_see,
            ),
        ]

    def show(self) -> None:
        """Print the lines: green where the check held, bold red where it did not."""
        for text, held in self.lines():
            console.print(text, style="green" if held else "bold red", markup=False)


def check_isolation(
    url: str,
    owner: tuple[str, Sequence[str]],
    other: tuple[str, str, Sequence[str]],
    since: datetime,
) -> Isolation:
    """With `other`'s key, try to label one of `owner`'s predictions and to read them all.

    `owner` is (tenant, its request ids since `since`); `other` is (tenant, key, its ids).
    """
    owner_id, owner_ids = owner
    other_id, other_key, other_ids = other
    feedback, _ = _status(f"{url}/feedback", {"request_id": owner_ids[0], "label": "1"}, other_key)
    read, seen = read_back(url, other_key, since)
    return Isolation(
        owner=owner_id,
        other=other_id,
        feedback_status=feedback,
        read_status=read,
        own_rows=len(seen & set(other_ids)),
        owner_rows=len(seen & set(owner_ids)),
        owner_total=len(set(owner_ids)),
        foreign_rows=len(seen - set(other_ids)),
    )


def wait_logged(database_url: str, since: datetime, expected: int, timeout: float = 60) -> None:
    """Predictions are logged off the request path: wait until the window holds them all."""
    deadline = time.monotonic() + timeout
    while True:
        with connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM predictions WHERE ts >= %s", [since]
            ).fetchone()
        n = int(row[0]) if row else 0
        if n >= expected or time.monotonic() > deadline:
            return
        time.sleep(0.5)


@dataclass
class Watcher:
    """A tenant's client sending one record at a time, noting who answered and any failure."""

    url: str
    record: dict[str, Any]
    key: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = _request(
                    f"{self.url}/predict", {"records": [self.record]}, self.key, timeout=10
                )
                self.answers.append((time.monotonic(), str(answer["model_version"])))
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def versions(self) -> set[str]:
        return {v for _, v in self.answers}

    def wait_for(self, version: str, timeout: float) -> float | None:
        """Seconds until `version` answered, or None if it did not within `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(v == version for _, v in self.answers):
                return time.monotonic() - start
            time.sleep(0.2)
        return None


@dataclass
class LoopResult:
    tenants: list[str]
    served: dict[str, str]
    """Each tenant's model at the start: `name vN`."""
    own_model: dict[str, bool]
    """Whether the tenant was answered by a model of its own."""
    isolation: Isolation
    calm: dict[str, Outcome]
    drifted: dict[str, Outcome]
    retrained: list[str]
    """The tenants whose drift retrained their model (acme)."""
    promoted: bool
    """The retrained version became champion (through the canary)."""
    first_version: str
    """The drifted tenant's version before the retrain."""
    new_version: str
    swap_seconds: float | None
    """From the canary's start to the first answer of the new version."""
    requests: int
    failed: int
    old_after_swap: int
    others_kept: dict[str, list[str]]
    """The versions each other tenant's client was answered by throughout: one each."""
    monitoring_runs: int
    jobs: list[loop_jobs.JobOutcome] = field(default_factory=list)
    """Each tenant's job of step 5."""
    canary: loop_canary.CanaryOutcome | None = None
    """Step 6: the rollout of the retrained version, as the demo saw it."""


def show_verdict(outcome: Outcome) -> None:
    """A monitor run's summary, drifted columns (`[a, b]`) included, exactly as written."""
    console.print(outcome.run.summary, markup=False)


def _monitor_since(start: datetime, tenant: str) -> Outcome:
    end = datetime.now(UTC)
    return monitor(window_hours=(end - start).total_seconds() / 3600 + 1e-6, end=end, tenant=tenant)


def _monitor_each(start: datetime, tenant_ids: Sequence[str]) -> dict[str, Outcome]:
    """One `monitor` run per tenant (as `monitor_tenants` queues them on a pool), shown."""
    outcomes = {}
    for tenant in tenant_ids:
        outcomes[tenant] = _monitor_since(start, tenant)
        console.print(f"{tenant}: ", end="")
        show_verdict(outcomes[tenant])
    return outcomes


def _answered_by(url: str, record: dict[str, Any], key: str) -> tuple[str, str]:
    answer = _request(f"{url}/predict", {"records": [record]}, key)
    return str(answer["model_name"]), str(answer["model_version"])


def run_loop(port: int, calm_rows: int, drift_rows: int, label_share: float) -> LoopResult:
    params = load_params()
    features = params.data.feature_names
    os.environ.setdefault("MODEL_POLL_SECONDS", "2")
    settings = get_settings()
    url = f"http://127.0.0.1:{port}"
    with serving(settings, port):
        # The owner's URL, for the tenants and for counting rows; the flows below find the
        # running cluster themselves and log in as mlops_flows, as a scheduled run does.
        database_url = admin_url(settings)
        keys = setup_tenants(database_url, EXAMPLE_TENANTS)
        ids = [t.id for t in EXAMPLE_TENANTS]
        owner, other = ids[:2]
        probes = {t.id: _records(t.traffic(1, batch=99), features)[0] for t in EXAMPLE_TENANTS}
        served = {t: _answered_by(url, probes[t], keys[t]) for t in ids}
        own = {t: name != settings.model_name for t, (name, _) in served.items()}
        console.rule("1. serving each tenant its model")
        for t, (name, version) in served.items():
            whose = "its own model" if own[t] else "the shared champion"
            console.print(f"{t}: {name} v{version} ({whose})")
        operator = demo_key(database_url)  # the default tenant's, every scope: it reads /model
        try:
            show_answers(url, operator.secret)
        finally:
            tenants.revoke_key(database_url, operator.tenant_id, operator.key_id)
        console.print(
            "tenants: "
            + ", ".join(f"{t.id} ({t.name})" for t in EXAMPLE_TENANTS)
            + ", each with a new key of its own (the previous demo's keys stop working); "
            + f"one for you: uv run mlops tenants keys create {owner}"
        )

        share = len(EXAMPLE_TENANTS)
        calm = Traffic.send(
            url,
            {t.id: t.traffic(calm_rows // share, batch=0) for t in EXAMPLE_TENANTS},
            features,
            keys,
            database_url,
        )
        console.rule(f"2. {calm.total:,} requests ({calm.split}) -> monitor each tenant")
        isolation = check_isolation(
            url, (owner, calm.ids[owner]), (other, keys[other], calm.ids[other]), calm.start
        )
        isolation.show()
        calm_outcomes = _monitor_each(calm.start, ids)

        # acme's subscribers change; globex's do not.
        drifted = Traffic.send(
            url,
            {
                t.id: t.traffic(drift_rows, batch=1, drift=DRIFT)
                if t.id == owner
                else t.traffic(calm_rows // share, batch=2)
                for t in EXAMPLE_TENANTS
            },
            features,
            keys,
            database_url,
        )
        labelled = drifted.label(url, {owner: keys[owner]}, params.data.target, label_share)
        console.rule(
            f"3. {owner}'s traffic drifts ({drifted.split}), {labelled:,} of its labels "
            "later -> monitor each tenant"
        )
        drift_outcomes = _monitor_each(drifted.start, ids)

        watchers = {t: Watcher(url, probes[t], keys[t]) for t in ids}
        for watcher in watchers.values():
            watcher.start()
        retrained, promoted = _retrain_drifted(drift_outcomes, params)
        jobs = _jobs_step(url, settings, database_url, keys, features)
        first = served[owner][1]
        canary = None
        canary_start = time.monotonic()
        if _challenger(served[owner][0]) is not None:
            canary = _canary_step(url, keys[owner], owner, params.model_owner(owner), features)
            promoted |= canary.outcome == "promoted"
        moved_at = time.monotonic()
        new = _current_champion(served[owner][0])
        time.sleep(settings.model_poll_seconds + 1)
        for watcher in watchers.values():
            watcher.stop()
        swap, old_after = _swap(
            watchers[owner], first, new, canary_start, moved_at + settings.model_poll_seconds
        )
        with connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM monitoring_runs").fetchone()
        return LoopResult(
            tenants=ids,
            served={t: f"{name} v{version}" for t, (name, version) in served.items()},
            own_model=own,
            isolation=isolation,
            calm=calm_outcomes,
            drifted=drift_outcomes,
            retrained=retrained,
            promoted=promoted,
            first_version=first,
            new_version=new,
            swap_seconds=swap,
            requests=sum(len(w.answers) + len(w.failures) for w in watchers.values())
            + (canary.requests if canary else 0),
            failed=sum(len(w.failures) for w in watchers.values())
            + (canary.failed if canary else 0),
            old_after_swap=old_after,
            others_kept={t: sorted(w.versions()) for t, w in watchers.items() if t != owner},
            monitoring_runs=int(row[0]) if row else 0,
            jobs=jobs,
            canary=canary,
        )


def _jobs_step(
    url: str, settings: Settings, database_url: str, keys: dict[str, str], features: list[str]
) -> list[loop_jobs.JobOutcome]:
    """Step 5: a job of each tenant's records, scored by workers started for it; shown."""
    ids = [t.id for t in EXAMPLE_TENANTS]
    console.rule(
        f"5. a job of {JOB_RECORDS} records per tenant (POST /jobs) -> {loop_jobs.WORKERS} workers"
    )
    env = {
        **os.environ,
        "DATABASE_URL": loop_jobs.worker_database_url(settings, database_url),
        "OMP_NUM_THREADS": "1",
    }
    outcomes = loop_jobs.run_jobs(
        _request,
        url,
        keys,
        {t.id: _records(t.traffic(JOB_RECORDS, batch=4), features) for t in EXAMPLE_TENANTS},
        lambda: loop_jobs.workers(loop_jobs.worker_command(ids), env),
    )
    for job in outcomes:
        console.print(job.line(), style="green" if job.ok else "bold red", markup=False)
    return outcomes


def _retrain_drifted(outcomes: dict[str, Outcome], params: Params) -> tuple[list[str], bool]:
    """Step 4: retrain the model of each tenant whose traffic drifted; (those tenants,
    whether a new champion was made at once: not for a canary)."""
    retrained = [t for t, o in outcomes.items() if o.run.drift_detected]
    promoted = False
    for tenant in retrained:
        mine = params.model_owner(tenant)
        console.rule(
            f"4. drift in {tenant}'s traffic -> retrain "
            + (f"{tenant}'s own model" if mine else "the shared model")
            + " (its labelled rows join its data) -> gate"
        )
        promoted |= retrain(  # the demo retrains on demand: no cooldown (params.yaml retrain)
            project_dir=".",
            monitor_run_id=outcomes[tenant].run.mlflow_run_id,
            tenant=mine,
            force=True,
        )
    return retrained, promoted


def _swap(
    watcher: Watcher, first: str, new: str, since: float, settled: float
) -> tuple[float | None, int]:
    """Seconds from `since` (the canary's start) to the new version's first answer, and the
    old version's answers after `settled` (one alias poll after champion moved)."""
    seen = next((t for t, v in watcher.answers if v == new and t >= since), None)
    swap = seen - since if seen is not None and new != first else None
    return swap, sum(1 for t, v in watcher.answers if t > settled + 0.5 and v != new)


def _challenger(name: str) -> str | None:
    """The version `name`'s `challenger` alias points at, if it is a canary's (the gate
    passed it with rollout.canary on), else None."""
    client = registry.connect(get_settings())
    mv = registry.version_by_alias(client, name, registry.CHALLENGER)
    if mv is None or mv.tags.get(tag.GATE_DECISION) != tag.GATE_CANARY:
        return None
    return str(mv.version)


def _canary_step(
    url: str, key: str, tenant: str, model_owner: str | None, features: list[str]
) -> loop_canary.CanaryOutcome:
    """Step 6: the rollout flow ramps the challenger while acme's customers call and label."""
    df = next(t for t in EXAMPLE_TENANTS if t.id == tenant).traffic(CANARY_ROWS, 5, DRIFT)
    target = load_params().data.target
    console.rule(
        f"6. canary: {tenant}'s challenger takes 10% of its customers, then 50%, then all, "
        "judged on live numbers"
    )
    client = loop_canary.CanaryClient(
        url,
        key,
        _records(df, features),
        [str(v) for v in df[target]],
        [str(v) for v in df["customer_id"]],
        _request,
    )
    outcome = loop_canary.run_canary(client, model_owner)
    console.print(
        f"{outcome.model_name}: challenger v{outcome.challenger} {outcome.outcome} "
        f"(champion was v{outcome.champion}): {outcome.reason}",
        style="green" if outcome.outcome == "promoted" else "bold red",
        markup=False,
    )
    console.print(
        f"{tenant}'s client: "
        + ", ".join(f"{n:,} answered by the {v}" for v, n in outcome.answered.items())
        + f"; {outcome.failed} of {outcome.requests:,} requests failed",
        markup=False,
    )
    return outcome


def _current_champion(name: str) -> str:
    settings = get_settings()
    mv = registry.version_by_alias(registry.connect(settings), name, settings.model_alias)
    return str(mv.version) if mv else "?"


def print_summary(r: LoopResult) -> None:
    table = Table(title="The closed loop")
    for col in ("step", "result", "where"):
        table.add_column(col)
    evid = get_settings().evidently_target
    table.add_row(
        "serve",
        "; ".join(
            f"{t}: {r.served[t]} ({'own model' if r.own_model[t] else 'shared'})" for t in r.tenants
        ),
        "POST /predict, /feedback",
    )
    iso = r.isolation
    table.add_row(
        "tenants",
        f"{', '.join(r.tenants)}, a key each; {iso.other} "
        + (
            f"can neither label (HTTP {iso.feedback_status}) nor see (0 of "
            f"{iso.owner_total:,}) {iso.owner}'s predictions"
            if iso.holds
            else f"NOT ISOLATED from {iso.owner}: feedback HTTP {iso.feedback_status}, "
            f"read HTTP {iso.read_status}, {iso.foreign_rows:,} rows not its own"
        ),
        "POST /feedback, GET /predictions\nmlops tenants list",
    )
    for label, outcomes in (("monitor (calm)", r.calm), ("monitor (acme drifts)", r.drifted)):
        for tenant, o in outcomes.items():
            run = o.run
            verdict = (
                "DRIFT" if run.drift_detected else ("no drift" if run.enough_rows else "too few")
            )
            table.add_row(
                f"{label}: {tenant}",
                f"{verdict}: {o.share_drifted:.0%} of features drifted, "
                f"{run.current_rows:,} rows ({run.labelled_rows:,} labelled), "
                f"{run.model_name} v{run.model_version}",
                f"MLflow run {run.mlflow_run_id}\n{run.report_uri}/report.html\n"
                f"Evidently project {run.evidently_project}",
            )
    table.add_row(
        "retrain + gate",
        (f"{', '.join(r.retrained)} only: " if r.retrained else "nothing drifted: ")
        + (
            f"v{r.canary.challenger} passed the gate: challenger for a canary"
            if r.canary
            else f"v{r.new_version} promoted"
            if r.promoted
            else "no new champion"
        ),
        "MLflow registry: gate.* and alias.* tags on the version",
    )
    kept = "; ".join(
        f"{t} answered by v{', v'.join(versions)} throughout"
        for t, versions in r.others_kept.items()
    )
    if r.jobs:
        table.add_row(
            "async jobs",
            "; ".join(
                f"{j.tenant}: {j.records:,} records by {', '.join(j.models) or 'no model'} "
                + (f"in {j.seconds:.1f} s" if j.ok else f"NOT DONE ({j.status})")
                for j in r.jobs
            ),
            "POST /jobs, GET /jobs/{id}\npython -m services.worker",
        )
    table.add_row(
        "canary",
        (
            f"v{r.canary.challenger}: "
            + " -> ".join(f"{s['weight']:g}% {s['action']}" for s in r.canary.steps)
            + f": {r.canary.outcome}; "
            + ", ".join(f"{n:,} by the {v}" for v, n in r.canary.answered.items())
            if r.canary
            else "no canary"
        )
        + (
            f"; v{r.first_version} -> v{r.new_version}, {r.old_after_swap} old-version answers "
            "one alias poll after the move"
            if r.new_version != r.first_version
            else ""
        )
        + f"; {kept}; {r.failed} of {r.requests:,} requests failed",
        "make rollout, GET /model\nrollout.step.<n> tags on the version",
    )
    console.print(table)
    console.print(f"Evidently workspace: {evid}")
    console.print(
        "Open the UIs: make mlflow-ui (http://127.0.0.1:5000) | make evidently-ui "
        "(http://127.0.0.1:8000) | make prefect-server (http://127.0.0.1:4200: the flow runs "
        "above, from Prefect's local database)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--calm-rows", type=int, default=3000, help="split between the tenants")
    parser.add_argument("--drift-rows", type=int, default=4000, help="acme's drifted requests")
    parser.add_argument("--label-share", type=float, default=0.8)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run_loop(args.port, args.calm_rows, args.drift_rows, args.label_share)
    print_summary(result)
    if args.json:
        args.json.write_text(json.dumps(result, default=_as_json, indent=1))


def _as_json(o: Any) -> Any:
    """A monitor Outcome as its flat payload, any other dataclass as its fields."""
    return o.payload() if isinstance(o, Outcome) else o.__dict__


if __name__ == "__main__":
    run_cli(main)
