"""`python -m services.worker`: score the asynchronous jobs of the tenants this role serves.

    python -m services.worker                      # every tenant granted to mlops_worker
    python -m services.worker --tenant acme --idle-exit 60 --metrics-port 9100

Needs DATABASE_URL (logging in as mlops_worker) and the registry (MLFLOW_TRACKING_URI,
MODEL_NAME); JOB_* settings tune delivery. SIGTERM stops reading, finishes the batch in hand
and exits 0; `--idle-exit` exits 0 after that many seconds without a message (scale to zero).
"""

from __future__ import annotations

import os

# OpenMP's default of one thread per core collapsed sklearn when several processes shared
# two cores; one per worker process unless told otherwise (before numpy/sklearn load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import logging
import signal
import sys
from types import FrameType

from common.errors import UserError, run_cli
from common.settings import get_settings
from common.store.tenants import check_tenant_id
from services.worker import metrics
from services.worker.worker import Options, Worker

log = logging.getLogger("worker")


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m services.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="ID",
        help="serve this tenant (repeat for more); default: every tenant granted to the role",
    )
    parser.add_argument(
        "--idle-exit",
        type=_seconds,
        metavar="SECONDS",
        help="exit 0 after this many seconds without a message",
    )
    parser.add_argument("--batch", type=int, default=32, help="chunks per read (default 32)")
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="the address /metrics listens on (127.0.0.1; 0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--poll", type=_seconds, default=0.5, help="seconds between reads when idle (0.5)"
    )
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch: must be 1 or more")
    try:
        tenants = tuple(dict.fromkeys(check_tenant_id(t) for t in args.tenant))
    except UserError as exc:
        parser.error(f"--tenant: {exc}")
    return Options(
        tenants, args.batch, args.poll, args.idle_exit, args.metrics_port, args.metrics_host
    )


def main(argv: list[str] | None = None) -> None:
    options = _options(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    settings = get_settings()
    if not settings.database_url:
        raise UserError("DATABASE_URL is not set: the worker reads its queues there")
    settings.export_tool_env()
    worker = Worker(settings, options)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.warm()
    if options.metrics_port:
        metrics.serve(options.metrics_port, options.metrics_host)
    log.info(
        "worker %d started: tenants %s, batch %d, visibility timeout %g s, max tries %d%s",
        os.getpid(),
        ", ".join(options.tenants) or "all granted",
        options.batch,
        settings.job_visibility_timeout,
        settings.job_max_tries,
        f", metrics on {options.metrics_host}:{options.metrics_port}"
        if options.metrics_port
        else "",
    )
    try:
        why = worker.run()
    finally:
        worker.close()
    log.info("worker %d exits: %s", os.getpid(), why)


if __name__ == "__main__":
    run_cli(main)
