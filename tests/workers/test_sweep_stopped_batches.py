"""The sweep finishes a cancel whose process died between its chunks (``store.batches``): the
batch does not sit in ``cancelling`` with queued requests that no stop will end."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import store
import store.batches
from tests.cluster import Cluster
from tests.workers.support import Ledger, add_batch, statuses
from workers.sweeper import sweep


class Died(Exception):
    """Stands for the cancel's process dying after its first chunk."""


def _die_after_first_chunk(chunk: int) -> None:
    if chunk == 1:
        raise Died


def test_a_sweep_finishes_a_cancel_that_died_after_its_first_chunk(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store.batches, "STOP_CHUNK_LINES", 2)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, _ = add_batch(led, [f"question {i}" for i in range(5)])
    with pytest.raises(Died):
        store.cancel_batch(led.engine, batch_id, after_chunk=_die_after_first_chunk)
    assert statuses(led.engine, batch_id) == {"cancelled": 2, "queued": 3}

    report = sweep(c.dispatcher, grace_seconds=30)

    assert statuses(led.engine, batch_id) == {"cancelled": 5}
    assert report.stopped_batches_finished == 1
    batch = store.get_batch(led.engine, batch_id)
    assert batch is not None
    assert (batch.status, batch.cancelled_count) == (store.BatchStatus.CANCELLED, 5)
