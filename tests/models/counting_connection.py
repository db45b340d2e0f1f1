"""A real Redis connection that counts what it sends: one send is one round trip."""

from __future__ import annotations

from typing import Any

import redis.asyncio


class CountingConnection(redis.asyncio.Connection):
    """Counts, per class, the packed commands sent through connections of this class, and
    records the name of each command packed (the connection's own handshake included)."""

    sent = 0
    commands: list[str] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        await super().send_packed_command(command, check_health)

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        type(self).commands.append(name.decode() if isinstance(name, bytes) else str(name))
        return super().pack_command(*args)
