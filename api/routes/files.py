"""OpenAI's Files API: upload a batch input file, read it back, list and delete.

A batch's output and error files are files too: their content is generated from the ledger when
read, so they can be downloaded while the batch is still running (the lines finished so far)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import store
from api.deps import AfterCursor, EngineDep, ObjectId, SettingsDep, TenantDep
from api.errors import InvalidRequest, NotFound, not_stored, over_quota
from config import Settings
from store.export import in_chunks
from store.input_checks import quote_input
from store.tables import MAX_FILENAME_CHARS

__all__ = ["file_object", "router"]

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("batch",)


def file_object(file: store.File) -> dict[str, Any]:
    """The file as OpenAI's file object; a batch output / error file's ``bytes`` as measured by
    ``store.with_bytes``."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": None,
    }


class _ReadWithin:
    """``source`` read as it is, until it passes what ``room`` leaves: then ``QuotaExceeded``."""

    def __init__(self, source: IO[bytes], room: store.StoredBytes) -> None:
        self.source = source
        self.room = room
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.read_bytes += len(chunk)
        left = self.room.left
        if left is not None and self.read_bytes > left:
            raise store.stored_bytes_exceeded(self.room)
        return chunk


def _save(
    source: IO[bytes], files_dir: Path, tenant_id: str, file_id: str, room: store.StoredBytes
) -> tuple[Path, int]:
    """The upload written to its file; an ``APIError`` if the files directory cannot take it, and
    ``QuotaExceeded`` once it passes what the tenant's cap leaves (``room``): either way no part of
    it left behind (on a full disk, a half-written file kept its space for good)."""
    destination = files_dir.absolute() / tenant_id / file_id
    partial = destination.with_suffix(".partial")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as out:
            shutil.copyfileobj(_ReadWithin(source, room), out, length=1024 * 1024)
        size = partial.stat().st_size
        partial.replace(destination)  # a crash mid-copy never leaves a file that looks complete
    except BaseException as error:
        with contextlib.suppress(OSError):  # no directory to hold it, no partial file either
            partial.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        raise not_stored(error, "the files directory") from error
    return destination, size


@router.post("")
async def upload_file(
    request: Request, tenant: TenantDep, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any]:
    """Upload a JSONL file (multipart field ``file``) with ``purpose=batch``. Over the tenant's cap
    on stored bytes: 400 ``file_storage_quota_exceeded`` and nothing kept."""
    try:
        return await _upload(request, tenant, engine, settings)
    except store.QuotaExceeded as error:
        raise over_quota(error) from error


async def _upload(
    request: Request, tenant: store.Tenant, engine: Engine, settings: Settings
) -> dict[str, Any]:
    # The tenant's room, unlocked: a tenant at its cap is refused before its body is read, and a
    # file is cut where it passes what was left. The row is added under the tenant's lock
    # (store.create_file), which counts concurrent uploads: together they never pass the cap.
    default_cap = settings.default_max_stored_bytes
    room = await run_in_threadpool(store.stored_bytes, engine, tenant.id, default_cap)
    if room.left == 0:
        raise store.stored_bytes_exceeded(room)
    try:
        # The parser spools a large part to a temporary file: the disk can refuse it here first.
        form = await request.form(max_files=1, max_fields=10)
    except OSError as error:
        raise not_stored(error, "a temporary file") from error
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("missing the multipart field 'file' with the JSONL content", param="file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {', '.join(PURPOSES)}; got {quote_input(purpose)}", param="purpose"
            )
        filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME_CHARS]
        file_id = f"file-{secrets.token_hex(12)}"
        path, size = await run_in_threadpool(_save, upload.file, settings.files_dir, tenant.id, file_id, room)
        if size == 0:
            await run_in_threadpool(path.unlink, missing_ok=True)
            raise InvalidRequest("the uploaded file is empty", param="file", code="empty_file")
        try:
            row = await run_in_threadpool(
                store.create_file,
                engine,
                tenant.id,
                filename,
                purpose,
                size,
                str(path),
                "processed",
                file_id,
                default_max_stored_bytes=default_cap,
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return file_object(row)
    finally:
        await form.close()


def _tenant_file(engine: EngineDep, tenant: store.Tenant, file_id: str) -> store.File:
    file = store.get_file(engine, file_id, tenant.id)
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return file


@router.get("")
def list_files(
    tenant: TenantDep,
    engine: EngineDep,
    purpose: Annotated[str | None, Query(pattern=r"^[a-z_-]{1,32}$")] = None,
    after: AfterCursor = None,
    limit: int = Query(100, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    files = store.list_files(
        engine, tenant.id, purpose=purpose, after=after, limit=limit + 1, newest_first=order == "desc"
    )
    page = files[:limit]
    return {
        "object": "list",
        "data": [file_object(file) for file in store.with_bytes(engine, page)],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(files) > limit,
    }


@router.get("/{file_id}")
def retrieve_file(file_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    [file] = store.with_bytes(engine, [_tenant_file(engine, tenant, file_id)])
    return file_object(file)


@router.get("/{file_id}/content", response_model=None)
def file_content(file_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> FileResponse | StreamingResponse:
    file = _tenant_file(engine, tenant, file_id)
    if file.kind == store.FileKind.UPLOAD:
        if file.storage_path is None or not Path(file.storage_path).exists():
            raise NotFound(f"the content of {file_id} is no longer on this server", param="file_id")
        return FileResponse(file.storage_path, media_type="application/octet-stream", filename=file.filename)
    if file.batch_id is None:
        raise NotFound(f"the content of {file_id} is not available", param="file_id")
    lines = (
        store.iter_output_lines(engine, file.batch_id)
        if file.kind == store.FileKind.BATCH_OUTPUT
        else store.iter_error_lines(engine, file.batch_id)
    )
    return StreamingResponse(in_chunks(lines), media_type="application/jsonl")


@router.delete("/{file_id}")
def delete_file(file_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    file = store.delete_file(engine, file_id, tenant.id)
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    if file.storage_path:
        Path(file.storage_path).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
