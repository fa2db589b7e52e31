"""Commands the tests run to completion, each in a process group of its own, so that nothing
it started outlives it when it is stopped or times out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send `sig` to a process group; gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def run_group(
    cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run` in a session of its own: on a timeout the whole group is killed (a
    timed-out `scripts.loop` left its `bentoml serve` loading the cores for the rest of the
    run), and the failure quotes what it printed."""
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(
                f"{' '.join(cmd)} timed out after {timeout:.0f} s; its last output:\n"
                f"{out[-4000:]}\n{err[-4000:]}"
            ) from None
        except BaseException:
            kill_group(proc.pid)
            raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
