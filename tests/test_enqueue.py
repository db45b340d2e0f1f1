"""The enqueue side (``workers.enqueue``): producers send work without loading the worker, and a
broker that does not answer leaves a submitted batch queued for the sweeper, its id given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from store import batch_progress, make_engine
from tests import services
from tests.cluster import ROOT, run_cli

WORKER_SIDE = ("workers.tasks", "workers.runner", "workers.context", "workers.clients", "openai", "agents")


def test_the_enqueue_side_loads_no_task_runner_or_model_client() -> None:
    statement = "import workers.enqueue, workers.app"
    report = "print(json.dumps(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", f"import json, sys; {statement}; {report}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    assert set(json.loads(loaded)) & set(WORKER_SIDE) == set()


def test_submit_with_the_broker_down_gives_the_id_of_a_batch_left_queued(
    postgres_url: str, tmp_path: Path
) -> None:
    dead_broker = f"redis://127.0.0.1:{services.free_port()}/0"
    _submit_leaves_its_batch_queued(postgres_url, dead_broker, tmp_path)


def test_submit_with_the_broker_refusing_writes_gives_the_id_of_a_batch_left_queued(
    postgres_url: str, tmp_path: Path
) -> None:
    """A broker that answers but refuses every write (``maxmemory`` reached with ``noeviction``:
    OOM; a Redis replica after a failover: READONLY; a full disk: MISCONF) is as good as down: the
    batch, already in the ledger, waits for the sweeper, and the producer is told its id. It
    crashed with a traceback instead, without the id, and a producer that ran it again paid for a
    second batch."""
    url = services._start_redis(services.redis_server_binary())
    assert url is not None
    broker = redis.Redis.from_url(url)
    try:
        broker.config_set("maxmemory-policy", "noeviction")
        broker.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            broker.set("probe", "1")
        _submit_leaves_its_batch_queued(postgres_url, url, tmp_path)
    finally:
        broker.shutdown(nosave=True)
        broker.close()


def _submit_leaves_its_batch_queued(postgres_url: str, broker_url: str, tmp_path: Path) -> None:
    """``tokenmill submit`` of 3 lines with ``broker_url`` refusing its messages: it exits 0 and
    prints the id of a batch whose 3 requests wait queued for the sweeper."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TOKENMILL_DATABASE_URL": postgres_url,
        "TOKENMILL_BROKER_URL": broker_url,
    }
    assert run_cli(env, "db", "upgrade").returncode == 0
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(3)))
    submitted = run_cli(env, "submit", str(source), "--model", "sim-model")
    assert submitted.returncode == 0, submitted.stderr
    assert "`tokenmill beat` sends it" in " ".join(submitted.stderr.split())
    batch_id = submitted.stdout.strip()
    engine = make_engine(postgres_url)
    try:
        progress = batch_progress(engine, batch_id)
    finally:
        engine.dispose()
    assert (progress.total, progress.queued) == (3, 3)
