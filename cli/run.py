"""``tokenmill run``: a batch on this machine, or on the cluster's workers.

With no broker configured (or with ``--local`` / ``--simulate``) it runs embedded: the
whole batch on this machine through the same chunk runner the workers use, with the settings'
database (SQLite by default) and cache (a directory by default). With ``TOKENMILL_BROKER_URL`` set,
it submits the batch to the cluster's ledger and broker instead, follows the workers' progress and
writes the output when they are done. Run again with the same input and database, it resumes the
same batch: what finished is not sent again, and what was in flight when it stopped is answered
from the cache if it had completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from cli.upstream import local_upstream
from cli.worker import CONCURRENCY_HELP

__all__ = ["run"]

_LOCAL_TENANT = "local"
_RUN_METADATA_KEY = "tokenmill_run_input"


def _input_digest(path: Path, model: str | None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"\0model={model or ''}".encode())
    return digest.hexdigest()[:32]


def _embedded_owner() -> str:
    return f"embedded:{socket.gethostname()}:{os.getpid()}"


def _release_dead_embedded_leases(engine: Any, batch_id: str) -> int:
    """Requests an earlier ``tokenmill run`` on this host held when it died go back to the queue."""
    import sqlalchemy as sa

    from store import Request, RequestStatus, release_requests

    prefix = f"embedded:{socket.gethostname()}:"
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Request.id, Request.lease_owner).where(
                Request.batch_id == batch_id,
                Request.status == RequestStatus.RUNNING,
                Request.lease_owner.like(f"{prefix}%"),
            )
        ).all()
    by_owner: dict[str, list[str]] = {}
    for row in rows:
        pid = int(row.lease_owner.rsplit(":", 1)[1])
        if pid == os.getpid() or not _pid_alive(pid):
            by_owner.setdefault(row.lease_owner, []).append(row.id)
    return sum(release_requests(engine, ids, owner) for owner, ids in by_owner.items())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _find_or_ingest(engine: Any, input_path: Path, model: str | None, default_model: str) -> tuple[str, bool]:
    """(batch id, resumed): the batch an earlier run made of this input, else a new one."""
    from store import create_tenant, get_tenant, ingest_batch, list_batches

    if get_tenant(engine, _LOCAL_TENANT) is None:
        with contextlib.suppress(Exception):  # another run created it meanwhile
            create_tenant(engine, "local", tenant_id=_LOCAL_TENANT)
    digest = _input_digest(input_path, model)
    after: str | None = None
    while True:
        page = list_batches(engine, _LOCAL_TENANT, after=after, limit=100)
        for batch in page.data:
            if (batch.batch_metadata or {}).get(_RUN_METADATA_KEY) == digest and batch.status != "failed":
                return batch.id, True
        if not page.has_more:
            break
        after = page.last_id
    with input_path.open("rb") as source:
        report = ingest_batch(
            engine,
            source,
            tenant_id=_LOCAL_TENANT,
            defaults={"model": model or default_model},
            metadata={_RUN_METADATA_KEY: digest, "input": input_path.name[:200]},
        )
    if report.accepted == 0 or str(report.status) == "failed":
        lines = "; ".join(f"line {e.line}: {e.message}" for e in report.errors[:10])
        raise typer.BadParameter(f"{input_path} was rejected: {lines}", param_hint="INPUT")
    return report.batch_id, False


def _write_lines(target: IO[bytes], lines: Iterator[bytes]) -> int:
    count = 0
    for line in lines:
        target.write(line)
        count += 1
    return count


def run(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT.jsonl",
            exists=True,
            dir_okay=False,
            help='OpenAI batch lines, or short ones: {"prompt": ...}.',
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the OpenAI-format output lines go.")],
    errors: Annotated[
        Path | None, typer.Option("--errors", help="Failed requests go here instead of into --output.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model for lines that name none (default: TOKENMILL_DEFAULT_MODEL).")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-n", min=1, help=CONCURRENCY_HELP + " Default 64 (local runs)."),
    ] = None,
    simulate: Annotated[
        bool, typer.Option(help="Answer from the bundled simulator: no key, no network (a local run).")
    ] = False,
    local: Annotated[
        bool, typer.Option("--local", help="Run here even when TOKENMILL_BROKER_URL names a cluster.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run a batch and write its results; resumable. Here, or with TOKENMILL_BROKER_URL set, on the
    cluster's workers (this command then submits, follows and writes the output)."""
    from config import get_settings
    from store import make_engine, upgrade_to_head

    settings = get_settings()
    on_cluster = settings.broker_url is not None and not (local or simulate)
    if on_cluster and concurrency is not None and not quiet:
        typer.echo("--concurrency applies to local runs: the workers run with their own.", err=True)
    # On a cluster the workers hold the provider's key: none is needed here.
    upstream: contextlib.AbstractContextManager[dict[str, str]] = (
        contextlib.nullcontext({}) if on_cluster else local_upstream(simulate)
    )
    with upstream as client_env:
        upgrade_to_head(settings.database_url)
        engine = make_engine(settings.database_url)
        try:
            batch_id, resumed = _find_or_ingest(engine, input_path, model, settings.default_model)
            released = 0 if on_cluster else _release_dead_embedded_leases(engine, batch_id)
            if resumed and not quiet:
                typer.echo(f"resuming {batch_id} ({released} interrupted request(s) back in line)", err=True)
            try:
                if on_cluster:
                    _run_on_cluster(engine, batch_id, quiet)
                else:
                    # What is loaded now lives as long as the run: kept out of full collections,
                    # which otherwise stall the event loop (see workers.app's worker_process_init).
                    gc.freeze()
                    asyncio.run(_run_embedded(engine, batch_id, client_env, concurrency or 64, quiet))
            except KeyboardInterrupt:
                goes_on = " (it goes on on the workers)" if on_cluster else ""
                typer.echo(
                    f"\ninterrupted: run the same command again to resume {batch_id}{goes_on}", err=True
                )
                raise typer.Exit(130) from None
            from store import iter_error_lines, iter_output_lines

            with output.open("wb") as target:
                written = _write_lines(target, iter_output_lines(engine, batch_id))
                if errors is None:
                    failed = _write_lines(target, iter_error_lines(engine, batch_id))
                else:
                    with errors.open("wb") as error_target:
                        failed = _write_lines(error_target, iter_error_lines(engine, batch_id))
            if not quiet:
                where = f" ({failed} failed -> {errors or output})" if failed else ""
                typer.echo(f"{written} results -> {output}{where}", err=True)
        finally:
            engine.dispose()


def _run_on_cluster(engine: Any, batch_id: str, quiet: bool) -> None:
    """Send the batch's queued requests to the workers and follow the ledger until none is left."""
    import time

    import redis

    from config import get_settings
    from store import batch_progress, get_batch
    from workers.app import make_celery
    from workers.enqueue import BROKER_UNREACHABLE, enqueue_batch, make_dispatcher
    from workers.progress import RunProgress

    settings = get_settings()
    assert settings.broker_url is not None
    celery = make_celery(settings)
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        # On a resume some may have messages still queued: a second one is a no-op (leases).
        enqueue_batch(make_dispatcher(celery, engine, broker, settings), batch_id)
        if not quiet and not celery.control.ping(timeout=1.0):
            typer.echo("no worker answered: the batch waits until `tokenmill worker` runs", err=True)
    except BROKER_UNREACHABLE as e:
        typer.echo(
            f"cannot reach the broker (TOKENMILL_BROKER_URL): {str(e).rstrip('.')}. The batch "
            f"{batch_id} is in the ledger: run again once the broker is up, or add --local to run it here.",
            err=True,
        )
        raise typer.Exit(2) from e
    finally:
        broker.close()
    progress = batch_progress(engine, batch_id)
    display = RunProgress(total=progress.total, already_done=progress.finished, enabled=not quiet)
    with display:
        while True:
            progress = batch_progress(engine, batch_id)
            # The batch's own counters: a sum over its results each second slowed as it ran.
            batch = get_batch(engine, batch_id)
            assert batch is not None
            display.show(
                done=progress.finished,
                failed=progress.failed,
                cached=batch.cache_hits,
                tokens=batch.billed_prompt_tokens + batch.billed_completion_tokens,
            )
            if progress.queued == 0 and progress.running == 0:
                return
            time.sleep(1.0)


async def _run_embedded(
    engine: Any, batch_id: str, client_env: dict[str, str], concurrency: int, quiet: bool
) -> None:
    from config import get_settings
    from store import ResultRecord, batch_progress, pending_request_ids
    from workers.clients import build_pipeline
    from workers.progress import RunProgress
    from workers.runner import ChunkRunner, RunnerConfig

    settings = get_settings()
    progress = batch_progress(engine, batch_id)
    display = RunProgress(total=progress.total, already_done=progress.finished, enabled=not quiet)

    def on_result(record: ResultRecord) -> None:
        display.add(record)

    pipeline = build_pipeline(settings, client_env=client_env)
    config = RunnerConfig(
        owner=_embedded_owner(),
        lease_seconds=settings.lease_seconds,
        in_flight=concurrency,
        max_deliveries=settings.max_attempts,
        rate_limit_retry_seconds=settings.rate_limit_retry_seconds,
    )
    runner = ChunkRunner(engine, pipeline, config, on_result=on_result)
    chunk = max(1000, concurrency * 20)
    try:
        with display:
            while True:
                ids = await asyncio.to_thread(pending_request_ids, engine, batch_id, chunk)
                if not ids:
                    left = await asyncio.to_thread(batch_progress, engine, batch_id)
                    if left.queued == 0 and left.running == 0:
                        break
                    await asyncio.sleep(0.5)  # released with a not_before (a long Retry-After)
                    continue
                report = await runner.run(ids)
                if report.claimed == 0:
                    await asyncio.sleep(0.5)
    finally:
        await pipeline.close()
