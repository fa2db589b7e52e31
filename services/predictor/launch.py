"""`make serve`: the predictor on the champion, on 127.0.0.1:3000 by default.

It listens on the loopback interface only unless told otherwise (`--host 0.0.0.0`, or
`make serve SERVE_HOST=0.0.0.0`): every API call needs a key, but a service reachable from the
network should be a decision. With DATABASE_URL unset it starts an embedded PostgreSQL
under MLOPS_HOME/postgres for the prediction log (kept across restarts) and stops it again
on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

from common.errors import UserError, run_cli
from common.health import http_ok
from common.localpg import prediction_db
from common.settings import Settings, get_settings
from common.store import roles
from services.predictor.package import bundle

SERVICE = "services.predictor.service:Predictor"
HOST = "127.0.0.1"


@contextmanager
def serving(
    settings: Settings,
    port: int,
    timeout: float = 120,
    host: str = HOST,
    service: str = SERVICE,
) -> Iterator[subprocess.Popen[bytes]]:
    """Bundle the champion, start `bentoml serve` on host:port, wait for /readyz; stop it
    all afterwards."""
    with prediction_db(settings, role=roles.PREDICTOR) as database_url:
        print(f"bundled {bundle(settings)}")
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "OMP_NUM_THREADS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", service, "--host", host]
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, start_new_session=True)
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{f'[{local}]' if ':' in local else local}:{port}"
        try:
            deadline = time.monotonic() + timeout
            while not http_ok(f"{url}/readyz"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise UserError(
                        f"`bentoml serve` did not become ready on {url}; see its output above."
                    )
                time.sleep(0.5)
            print(
                f"predictor ready on {url} (POST /predict, POST /feedback, GET /predictions, "
                "GET /model, /metrics; every call but /metrics needs an API key: "
                "mlops tenants keys create default)"
            )
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every descendant: BentoML's workers start sessions of their own."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument(
        "--host",
        default=HOST,
        help=f"interface to listen on (default {HOST}: this machine only; 0.0.0.0: every one)",
    )
    args = parser.parse_args()

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        with serving(get_settings(), args.port, host=args.host) as proc:
            proc.wait()
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    run_cli(main)
