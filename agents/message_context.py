"""What a message handler knows about the message it is handling, besides the message itself."""

from __future__ import annotations

from dataclasses import dataclass

from agents.ids import AgentId, TopicId
from models.cancellation import CancellationToken

__all__ = ["MessageContext"]


@dataclass
class MessageContext:
    """AutoGen's ``MessageContext``.

    ``sender`` is ``None`` when the message came from outside any agent; ``is_rpc`` is true for
    ``send_message`` (the sender awaits the handler's return value); ``cancellation_token`` is
    cancelled when the sender gives up, and handlers pass it on to model calls.
    """

    sender: AgentId | None
    topic_id: TopicId | None
    is_rpc: bool
    cancellation_token: CancellationToken
    message_id: str
