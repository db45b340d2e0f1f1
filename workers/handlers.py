"""Which handler runs each request kind: one entry per kind (:data:`KIND_HANDLERS`). The kind's
endpoint and the checks its lines pass at ingest are its entry in ``store.request_kinds``; a new
kind is one entry there and one here.

An entry builds the kind's handler for the runner's ledger (the agent-run handler keeps its
conversation there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from sqlalchemy.engine import Engine

from store import RequestKind
from workers.agent_tasks import agent_run_handler
from workers.runner import RequestHandler, complete_chat

__all__ = ["KIND_HANDLERS", "request_handlers"]

KIND_HANDLERS: Mapping[RequestKind, Callable[[Engine], RequestHandler]] = MappingProxyType(
    {
        RequestKind.CHAT_COMPLETION: lambda engine: complete_chat,
        RequestKind.AGENT_RUN: agent_run_handler,
    }
)


def request_handlers(engine: Engine) -> dict[RequestKind, RequestHandler]:
    """A handler for every registered kind: what a ``ChunkRunner`` runs by default."""
    return {kind: build(engine) for kind, build in KIND_HANDLERS.items()}
