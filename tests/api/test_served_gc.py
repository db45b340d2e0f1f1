"""The app ``tokenmill api`` serves leaves what startup made out of the garbage collector's passes:
a full collection no longer walks some 200 000 objects that live as long as the process (400 ms at
16 concurrent calls on 2 cores, the whole API stopped meanwhile), and young collections wait for
more than a request's transient objects (``api.app.create_served_app``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import store
from tests.cluster import ROOT

# In a process of its own: the collector's settings are the process's.
PROBE = """
import gc, json, time
from uvicorn.importer import import_from_string
from cli.serve import APP_FACTORY

def full_collection() -> float:
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started

before = min(full_collection() for _ in range(2))
app = import_from_string(APP_FACTORY)()
after = min(full_collection() for _ in range(2))
app.state.engine.dispose()
print(json.dumps({"before": before, "after": after, "frozen": gc.get_freeze_count(),
                  "thresholds": gc.get_threshold()}))
"""


def _run(script: str, postgres_url: str) -> dict[str, Any]:
    """What ``script`` printed last (JSON), run in a process of its own against a migrated ledger."""
    store.upgrade_to_head(postgres_url)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENMILL_DATABASE_URL": postgres_url}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_served_app_freezes_its_startup_objects_out_of_the_collectors_passes(postgres_url: str) -> None:
    probe = _run(PROBE, postgres_url)
    assert probe["frozen"] > 100_000
    assert tuple(probe["thresholds"]) == (700, 10, 10)  # Python's: see the test below
    # The startup objects alone took most of a full collection (200 ms on a busy machine).
    assert probe["after"] < probe["before"] / 5, probe


# Refused requests, each leaving a cycle (exception, traceback, frames) that holds its 1 MB body.
REFUSED = """
import asyncio, gc, json, tracemalloc
import httpx
from uvicorn.importer import import_from_string
from cli.serve import APP_FACTORY

app = import_from_string(APP_FACTORY)()

async def refuse(count: int) -> set[int]:
    body = b'{"junk": "' + b"x" * 1_000_000  # unclosed: not JSON
    statuses = set()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for _ in range(count):
            answer = await client.post(
                "/v1/chat/completions", content=body, headers={"Authorization": "Bearer not-a-key"}
            )
            statuses.add(answer.status_code)
    return statuses

tracemalloc.start()
statuses = asyncio.run(refuse(150))
_, peak = tracemalloc.get_traced_memory()
app.state.engine.dispose()
print(json.dumps({"statuses": sorted(statuses), "peak": peak}))
"""


def test_a_keyless_client_cannot_pile_up_refused_bodies_between_collections(postgres_url: str) -> None:
    """150 refused 1 MB bodies: what the served API holds at its peak stays a few bodies' worth
    (a young-collection threshold of 20 000 held over a hundred of them, 200+ MB)."""
    probe = _run(REFUSED, postgres_url)
    assert probe["statuses"] == [401], probe
    assert probe["peak"] < 40 * 1024 * 1024, probe
