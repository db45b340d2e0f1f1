"""What keeps a worker's leases alive while it runs something: a heartbeat on a thread of its own
(a busy event loop, a synchronous tool, a slow collection must not starve it, and with short
leases a heartbeat on the loop would), and the one way a delivery names itself as a lease owner.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

__all__ = ["Heartbeat", "lease_owner"]

_logger = logging.getLogger(__name__)


def lease_owner(hostname: str | None = None) -> str:
    """A lease owner for one execution (``host/pid/random``): a redelivered message is another
    owner, even in this process. ``hostname`` is Celery's worker name when there is one."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds on a thread of its own until stopped; a beat
    that raises is logged and the next one tries again (the database may be restarting: the
    leases outlive a few beats)."""

    def __init__(self, name: str, interval: float, beat: Callable[[], object]) -> None:
        self._interval = interval
        self._beat = beat
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._beat()
            except Exception:
                _logger.exception("a heartbeat (%s) failed; trying again", self._thread.name)
