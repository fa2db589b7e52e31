"""One retrain of a model at a time, and none again within a cooldown after one ends.

Drift verdicts come hourly, per tenant; a retrain takes longer than that can, and two of
one model at once race on the DVC lock, the export file and the aliases. `turn` takes a
non-blocking lock named for the registered model before training:

- with DATABASE_URL (the full stack, workers on any machine): a PostgreSQL session
  advisory lock on a connection held for the whole retrain; the connection's
  `application_name` names the holder's flow run, `backend_start` says since when;
- without (the embedded default, every process on one machine): an exclusive `flock` on
  MLOPS_HOME/locks/retrain-<model>.lock, whose content names the holder.

Either is released by the operating system or the server when its holder dies, so a
crashed retrain never leaves the model locked. The cooldown is the registered model's tag
`retrain.last_end` in MLflow (the state every worker shares), written when a retrain ends,
failed or not (a retrain that fails every hour is the storm the cooldown stops too).
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.settings import Settings
from common.store.connection import connect

LAST_END = "retrain.last_end"
"""Registered-model tag: when the last retrain of the model ended (ISO 8601, UTC)."""

_LOCK_SPACE = 0x7274_726E  # "rtrn": the first key of pg_try_advisory_lock(int, int)
_HOLDER_PREFIX = "retrain "


@dataclass(frozen=True)
class Turn:
    """The outcome of asking for a model's turn: `skipped` says why not (None: go ahead)."""

    model: str
    skipped: str | None = None


@contextmanager
def turn(
    settings: Settings,
    client: MlflowClient,
    model: str,
    holder: str,
    *,
    cooldown: timedelta,
    force: bool = False,
    now: datetime | None = None,
) -> Iterator[Turn]:
    """This retrain's turn at `model`: held for the block, `retrain.last_end` set after it.

    The Turn is skipped when another retrain of `model` holds the lock, or (unless `force`)
    when the last one ended less than `cooldown` ago; the block then runs nothing and no
    end is recorded. `holder` names this retrain (its flow run id) to the others.
    """
    with _lock(settings, model, holder) as busy:
        if busy is not None:
            yield Turn(model, f"skipped: retrain of {model} already running {busy}")
            return
        wait = None if force else _cooling(client, model, cooldown, now or _now())
        if wait is not None:
            yield Turn(model, wait)
            return
        try:
            yield Turn(model)
        finally:
            record_end(client, model)


def record_end(client: MlflowClient, model: str, at: datetime | None = None) -> None:
    """Start `model`'s cooldown now (or `at`); a model not registered yet has none to start."""
    stamp = (at or _now()).isoformat(timespec="seconds")
    with suppress(_NotRegisteredError):
        _call(client.set_registered_model_tag, model, LAST_END, stamp)


def last_end(client: MlflowClient, model: str) -> datetime | None:
    """When the last retrain of `model` ended, if one is recorded."""
    try:
        tags = _call(client.get_registered_model, model).tags
    except _NotRegisteredError:
        return None
    value = tags.get(LAST_END)
    return datetime.fromisoformat(value) if value else None


def _cooling(client: MlflowClient, model: str, cooldown: timedelta, now: datetime) -> str | None:
    ended = last_end(client, model)
    if ended is None or now - ended >= cooldown:
        return None
    until = (ended + cooldown).isoformat(timespec="seconds")
    return (
        f"skipped: {model} was retrained at {ended.isoformat(timespec='seconds')}; "
        f"cooldown ({_minutes(cooldown)}) until {until} (force=True runs it anyway)"
    )


@contextmanager
def _lock(settings: Settings, model: str, holder: str) -> Iterator[str | None]:
    """Hold `model`'s lock for the block (yields None), or yield who holds it."""
    if settings.database_url:
        with _pg_lock(settings.database_url, model, holder) as busy:
            yield busy
    else:
        with _file_lock(settings.mlops_home / "locks", model, holder) as busy:
            yield busy


@contextmanager
def _pg_lock(database_url: str, model: str, holder: str) -> Iterator[str | None]:
    key = _key(model)
    name = f"{_HOLDER_PREFIX}{holder}"[:63]  # PostgreSQL keeps 63 bytes of application_name
    with connect(database_url, application_name=name) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_SPACE, key)).fetchone()
        if row and row[0]:
            try:
                yield None
            finally:
                with suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_SPACE, key))
            return
        found = conn.execute(
            "SELECT a.application_name, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 2",
            (_LOCK_SPACE, key),
        ).fetchone()
    if found is None:  # released between the two statements
        yield "(elsewhere, just now)"
        return
    other = str(found[0]).removeprefix(_HOLDER_PREFIX) or "unknown"
    yield f"since {found[1].astimezone(UTC).isoformat(timespec='seconds')} (flow run {other})"


@contextmanager
def _file_lock(folder: Path, model: str, holder: str) -> Iterator[str | None]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"retrain-{model}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _file_holder(file)
            return
        try:
            file.seek(0)
            file.truncate()
            file.write(json.dumps({"flow_run": holder, "since": _now().isoformat()}))
            file.flush()
            yield None
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _file_holder(file: IO[str]) -> str:
    try:
        seen: dict[str, Any] = json.loads(file.read() or "{}")
    except json.JSONDecodeError:
        seen = {}
    since = seen.get("since", "just now")
    if since != "just now":
        since = datetime.fromisoformat(since).isoformat(timespec="seconds")
    return f"since {since} (flow run {seen.get('flow_run', 'unknown')})"


def _key(model: str) -> int:
    """The model's advisory-lock key: a stable 31-bit hash of its name."""
    return zlib.crc32(model.encode()) & 0x7FFF_FFFF


def _minutes(cooldown: timedelta) -> str:
    return f"{cooldown.total_seconds() / 60:g} min"


def _now() -> datetime:
    return datetime.now(UTC)


class _NotRegisteredError(Exception):
    pass


def _call(method: Any, *args: Any) -> Any:
    """An MLflow client call; a missing registered model is _NotRegisteredError."""
    try:
        return method(*args)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise _NotRegisteredError from exc
        raise
