"""The directory where a worker's pool processes keep their metric values (prometheus-client's
multiprocess mode), prepared by ``tokenmill worker`` before anything imports prometheus_client:
the client reads ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported.

Why multiprocess mode rather than a port per pool process: one scrape target per worker whatever
its ``--processes``, no ports to hand out, and a pool process SIGKILLed mid-chunk loses none of
what it counted (its files stay; Celery forks a new process that writes files of its own). The
directory belongs to one worker: made fresh (a temporary directory, or the operator's
``PROMETHEUS_MULTIPROC_DIR`` emptied) at start and removed at exit, so that a restarted worker
starts its counters from zero, as Prometheus expects of a restarted target.

No prometheus_client import here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MULTIPROC_ENV", "prepare_multiprocess_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this process and those it forks; returns it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # a previous run's values
            stale.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="tokenmill-metrics-"))
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # not from a forked pool process exiting
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
