"""The batch state machine, and the batch object as the API and webhooks show it.

OpenAI's lifecycle (:data:`ALLOWED_TRANSITIONS`)::

    validating  -> in_progress | failed | cancelling | expired
    in_progress -> finalizing | cancelling | expired
    finalizing  -> completed | expired
    cancelling  -> cancelled

Every change of a batch's status is one :func:`move_batches`, which moves a batch only from a
status that may reach the target and stamps the target's ``<status>_at`` column. A batch ends
(:data:`ENDED_STATUSES`) in a status nothing leaves.

The last request of a running batch settles in a transaction that also finalizes the batch
(:func:`finalize_batches`): it becomes ``finalizing`` (``finalizing_at``) while its output and error
file rows are written, then ``completed``. Those files' content is generated from the results when
read, so producing them is two rows: a reader never finds a batch in ``finalizing``, nor does a
crash leave one there. ``cancelling`` becomes ``cancelled`` in the same way, once nothing runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.tables import Batch, BatchStatus, File, FileKind
from store.usage import exact_decimal as _exact

__all__ = [
    "ALLOWED_TRANSITIONS",
    "ENDED_STATUSES",
    "STOPPED_BATCH_STATUSES",
    "all_finished",
    "attach_result_files",
    "batch_file_ids",
    "batch_object",
    "finalize_batches",
    "may_move_to",
    "move_batches",
]

_S = BatchStatus
ALLOWED_TRANSITIONS: Mapping[BatchStatus, frozenset[BatchStatus]] = MappingProxyType(
    {
        _S.VALIDATING: frozenset({_S.IN_PROGRESS, _S.FAILED, _S.CANCELLING, _S.EXPIRED}),
        _S.IN_PROGRESS: frozenset({_S.FINALIZING, _S.CANCELLING, _S.EXPIRED}),
        _S.FINALIZING: frozenset({_S.COMPLETED, _S.EXPIRED}),
        _S.CANCELLING: frozenset({_S.CANCELLED}),
        _S.COMPLETED: frozenset(),
        _S.FAILED: frozenset(),
        _S.CANCELLED: frozenset(),
        _S.EXPIRED: frozenset(),
    }
)
# The statuses nothing leaves: the batch owes its webhook, its files exist, a watcher may stop.
ENDED_STATUSES = frozenset(status for status, targets in ALLOWED_TRANSITIONS.items() if not targets)
# A worker starts no new request of a batch that ended or is being cancelled.
STOPPED_BATCH_STATUSES = ENDED_STATUSES | {_S.CANCELLING}

# The column each status stamps when a batch enters it (``validating`` is a batch's first status,
# stamped by ``created_at``).
_ENTERED_AT: Mapping[BatchStatus, str] = MappingProxyType(
    {
        _S.IN_PROGRESS: "in_progress_at",
        _S.FINALIZING: "finalizing_at",
        _S.COMPLETED: "completed_at",
        _S.FAILED: "failed_at",
        _S.CANCELLING: "cancelling_at",
        _S.CANCELLED: "cancelled_at",
        _S.EXPIRED: "expired_at",
    }
)


def _sources(target: BatchStatus) -> list[BatchStatus]:
    """The statuses that may become ``target`` (in the enum's order: one SQL text per target)."""
    return [status for status in BatchStatus if target in ALLOWED_TRANSITIONS[status]]


def may_move_to(target: BatchStatus) -> sa.ColumnElement[bool]:
    """A batch's condition: its status may become ``target``."""
    return Batch.status.in_(_sources(target))


def move_batches(
    conn: Connection, target: BatchStatus, now: int, *where: sa.ColumnElement[bool], **values: Any
) -> list[tuple[str, str]]:
    """Move the batches matching ``where`` whose status may become ``target`` to it, stamping its
    ``<status>_at`` with ``now`` and setting ``values`` besides; returns the (id, tenant id) of
    each batch moved, by id. Runs inside the caller's transaction."""
    if target not in _ENTERED_AT:
        raise ValueError(f"no batch moves to {target.value!r}")
    moved = conn.execute(
        sa.update(Batch)
        .where(may_move_to(target), *where)
        .values({_ENTERED_AT[target]: now, **values, "status": target})
        .returning(Batch.id, Batch.tenant_id)
    ).all()
    return sorted((row.id, row.tenant_id) for row in moved)


def all_finished() -> sa.ColumnElement[bool]:
    """A batch's condition: every one of its requests has finished."""
    return Batch.completed_count + Batch.failed_count + Batch.cancelled_count >= Batch.total_count


def finalize_batches(conn: Connection, batch_ids: Sequence[str], now: int) -> list[str]:
    """End those of ``batch_ids`` whose requests have all finished: ``in_progress`` goes through
    ``finalizing`` (its files are written) to ``completed``, ``cancelling`` becomes ``cancelled``.
    Returns the ids ended. Runs inside the caller's transaction."""
    if not batch_ids:
        return []
    ids = sorted(set(batch_ids))
    # On the path of every single call's result: the statement that moves a batch to finalizing
    # says whether it is hidden (no files to attach, no look-up for it), and a batch that moved
    # was in progress, not cancelling (no cancel to look for when every batch moved).
    rows = conn.execute(
        sa.update(Batch)
        .where(Batch.status.in_(_sources(_S.FINALIZING)), Batch.id.in_(ids), all_finished())
        .values({_ENTERED_AT[_S.FINALIZING]: now, "status": _S.FINALIZING})
        .returning(Batch.id, Batch.tenant_id, Batch.hidden)
    ).all()
    finalizing = sorted((row.id, row.tenant_id) for row in rows)
    _insert_result_files(conn, sorted((row.id, row.tenant_id) for row in rows if not row.hidden), now)
    completed = (
        move_batches(conn, _S.COMPLETED, now, Batch.id.in_([batch_id for batch_id, _ in finalizing]))
        if finalizing
        else []
    )
    moved = {row.id for row in rows}
    rest = [batch_id for batch_id in ids if batch_id not in moved]
    cancelled = move_batches(conn, _S.CANCELLED, now, Batch.id.in_(rest), all_finished()) if rest else []
    attach_result_files(conn, cancelled, now)
    return [batch_id for batch_id, _ in [*completed, *cancelled]]


_OUTPUT_FILE_PREFIX = "file-out-"
_ERROR_FILE_PREFIX = "file-err-"


def batch_file_ids(batch_id: str) -> tuple[str, str]:
    """(output file id, error file id) of a batch: ``file-out-<hex>`` and ``file-err-<hex>``."""
    suffix = batch_id.removeprefix("batch_")
    return _OUTPUT_FILE_PREFIX + suffix, _ERROR_FILE_PREFIX + suffix


def attach_result_files(conn: Connection, batches: Sequence[tuple[str, str]], now: int) -> None:
    """Give ending batches (id, tenant id) their output / error file rows (content is generated
    on read). Hidden batches (single calls) get none: their one answer went to the caller, and
    nothing of theirs is listed among the tenant's files."""
    if not batches:
        return
    hidden = set(
        conn.execute(
            sa.select(Batch.id).where(Batch.id.in_([batch_id for batch_id, _ in batches]), Batch.hidden)
        ).scalars()
    )
    _insert_result_files(
        conn, [(batch_id, tenant_id) for batch_id, tenant_id in batches if batch_id not in hidden], now
    )


def _insert_result_files(conn: Connection, batches: Sequence[tuple[str, str]], now: int) -> None:
    """The output / error file rows of batches known not to be hidden."""
    if not batches:
        return
    files = []
    for batch_id, tenant_id in batches:
        output_id, error_id = batch_file_ids(batch_id)
        for file_id, kind, purpose, name in (
            (output_id, FileKind.BATCH_OUTPUT, "batch_output", "output"),
            (error_id, FileKind.BATCH_ERROR, "batch_output", "errors"),
        ):
            files.append(
                {
                    "id": file_id,
                    "tenant_id": tenant_id,
                    "filename": f"{batch_id}_{name}.jsonl",
                    "purpose": purpose,
                    "bytes": None,  # measured when first read (store.export.with_bytes)
                    "created_at": now,
                    "status": "processed",
                    "kind": kind,
                    "storage_path": None,
                    "batch_id": batch_id,
                }
            )
        conn.execute(
            sa.update(Batch)
            .where(Batch.id == batch_id)
            .values(output_file_id=output_id, error_file_id=error_id)
        )
    conn.execute(sa.insert(File), files)


def batch_object(engine: Engine, batch: Batch) -> dict[str, Any]:
    """The batch as OpenAI's batch object, plus tokenmill's ``usage`` and ``webhook``: what the
    batch routes answer and what a completion webhook carries as its ``data``."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        # tokenmill adds total_count: data holds the first errors (store.MAX_STORED_ERRORS).
        "errors": (
            {"object": "list", "data": batch.errors, "total_count": batch.error_count}
            if batch.errors
            else None
        ),
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": str(batch.status),
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {
            "total": batch.total_count,
            "completed": batch.completed_count,
            "failed": batch.failed_count,
        },
        "metadata": batch.batch_metadata,
        "usage": _usage(batch),
        "webhook": _webhook(batch),
    }


def _usage(batch: Batch) -> dict[str, Any] | None:
    """What the batch cost so far, in OpenAI's usage shape: billed tokens only (a cache hit is
    free), plus tokenmill's ``cache_hits`` and ``cost_usd``. From the batch's own counters, which
    the transactions writing its results and discarded answers move (they sum what
    ``store.usage.usage_report`` sums for the batch): a poll costs one row, not the batch's
    results. None until it has a result or a discarded answer."""
    if batch.completed_count + batch.failed_count + batch.discarded_answer_count == 0:
        return None
    return {
        "input_tokens": batch.billed_prompt_tokens,
        "input_tokens_details": {"cached_tokens": batch.billed_cached_prompt_tokens},
        "output_tokens": batch.billed_completion_tokens,
        "output_tokens_details": {"reasoning_tokens": batch.billed_reasoning_tokens},
        "total_tokens": batch.billed_prompt_tokens + batch.billed_completion_tokens,
        "cache_hits": batch.cache_hits,
        # A JSON number that prints as the exact decimal.
        "cost_usd": float(_exact(batch.billed_cost_usd)),
    }


def _webhook(batch: Batch) -> dict[str, Any] | None:
    """Where the completion event goes and how its delivery went (the last error is bounded)."""
    if batch.webhook_url is None:
        return None
    return {
        "url": batch.webhook_url,
        "attempts": batch.webhook_attempts,
        "delivered_at": batch.webhook_delivered_at,
        "next_attempt_at": None if batch.webhook_delivered_at else batch.webhook_next_at,
        "last_error": batch.webhook_last_error,
    }
