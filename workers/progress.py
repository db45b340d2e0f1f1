"""The progress bar of ``tokenmill run``: done / failed / cached / billed tokens / rate."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from store import RequestStatus, ResultRecord

__all__ = ["RunProgress"]


class RunProgress:
    """Counts results as they come; draws on stderr when enabled and a terminal is there."""

    def __init__(self, *, total: int, already_done: int = 0, enabled: bool = True) -> None:
        self.total = total
        self.done = already_done
        self.failed = 0
        self.cached = 0
        self.tokens = 0
        self._new = 0
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]tokenmill"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def _detail(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return (
            f"failed {self.failed}  cached {self.cached}  tokens {self.tokens:,}  "
            f"{self._new / elapsed:,.1f} req/s"
        )

    def add(self, record: ResultRecord) -> None:
        """One result, as this process records it (embedded runs)."""
        self.done += 1
        self._new += 1
        if record.status is RequestStatus.FAILED:
            self.failed += 1
        elif record.cached:
            self.cached += 1
        else:
            self.tokens += record.usage.total_tokens
        self._redraw()

    def show(self, *, done: int, failed: int, cached: int, tokens: int) -> None:
        """Counts read from the ledger (a batch that workers elsewhere run)."""
        self._new += done - self.done
        self.done, self.failed, self.cached, self.tokens = done, failed, cached, tokens
        self._redraw()

    def _redraw(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.done, detail=self._detail())

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(
                "run", total=self.total, completed=self.done, detail=self._detail()
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self.done, detail=self._detail())
            self._progress.stop()
