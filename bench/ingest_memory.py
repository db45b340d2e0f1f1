"""Peak memory of ingest, whatever the lines (run by hand; prints figures).

    .venv/bin/python -m bench.ingest_memory [--file-mb 195] [--database-url URL]

Without ``--database-url`` it uses a scratch PostgreSQL database (created and dropped through
``tests.services``). Each case writes a JSONL file of about ``--file-mb`` MB (the API's upload
limit is 200 MB) shaped to stress one thing, then ingests it in a fresh process and prints how far
that process's peak RSS rose above its RSS just before ``ingest_batch``, next to the same figure for
the baseline, a 1,000-line file of small lines. Target (issue "No line poisons its neighbours"):
growth <= 64 MB per ingest for every file within the limits, and the three concurrent ingests of
one file <= 3 x 64 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import store
from bench.ingest import database

LINE_BYTES = 1024 * 1024  # the API's default per-line limit (max_request_body_bytes)
TARGET_MB = 64


def _chat(custom_id: str, content: object, url: str = "/v1/chat/completions") -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def small_lines(limit: int) -> Iterator[str]:
    for i in range(1000):
        yield _chat(f"r{i}", f"Summarize document number {i} in one sentence.")


def megabyte_lines(limit: int) -> Iterator[str]:
    for i in range(limit // LINE_BYTES):
        yield _chat(f"r{i}", "x" * (LINE_BYTES - 200))


def megabyte_lines_of_tiny_arrays(limit: int) -> Iterator[str]:
    # A parsed body many times its text: ~330,000 empty lists a line, 56+ bytes each.
    tiny = ",".join(["[]"] * ((LINE_BYTES - 300) // 3))
    for i in range(limit // LINE_BYTES):
        yield f'{{"custom_id": "r{i}", "prompt": "p", "model": "m", "extra": [{tiny}]}}'


def megabyte_bad_urls(limit: int) -> Iterator[str]:
    # Every line invalid, each naming a 1 MB url (all echoed into the batch's errors once).
    for i in range(limit // LINE_BYTES):
        yield _chat(f"r{i}", "hi", url="/v1/" + "u" * (LINE_BYTES - 300))


def long_custom_ids(limit: int) -> Iterator[str]:
    # As many lines as fit, each with a 500-character custom_id (duplicate detection keeps them).
    line = _chat("x" * 500, "hi")
    for i in range(min(limit // (len(line) + 1), 1_000_000)):
        yield _chat(f"{i:0500d}", "hi")


def a_million_short_lines(limit: int) -> Iterator[str]:
    for _ in range(1_000_000):
        yield '{"prompt": "hi"}'


CASES: dict[str, Callable[[int], Iterator[str]]] = {
    "baseline: 1,000 small lines": small_lines,
    "1 MB lines": megabyte_lines,
    "1 MB lines of tiny arrays": megabyte_lines_of_tiny_arrays,
    "1 MB bad urls (rejected)": megabyte_bad_urls,
    "500-character custom_ids": long_custom_ids,
    "1,000,000 short-form lines": a_million_short_lines,
}
CONCURRENT = 3


def write_file(path: Path, lines: Iterator[str]) -> tuple[int, int]:
    count = 0
    with path.open("w") as out:
        for line in lines:
            out.write(line + "\n")
            count += 1
    return count, path.stat().st_size


def _rss_kb(field: str) -> int:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(f"{field}:"):
            return int(row.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(database_url: str, path: str, concurrent: int) -> None:
    """Ingest ``path`` ``concurrent`` times at once in this (fresh) process; print JSON figures."""
    engine = store.make_engine(database_url)
    tenant = store.create_tenant(engine, "bench")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux)
    before = _rss_kb("VmRSS")
    reports: list[store.IngestReport] = []

    def ingest() -> None:
        with open(path, "rb") as source:
            reports.append(
                store.ingest_batch(
                    engine,
                    source,
                    tenant_id=tenant.id,
                    defaults={"model": "gpt-4o-mini"},
                    max_body_bytes=LINE_BYTES,
                    max_lines=1_000_000,
                )
            )

    started = time.perf_counter()
    threads = [threading.Thread(target=ingest) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    engine.dispose()
    print(
        json.dumps(
            {
                "growth_mb": (_rss_kb("VmHWM") - before) / 1024,
                "seconds": elapsed,
                "accepted": [report.accepted for report in reports],
                "errors": [report.invalid_lines for report in reports],
            }
        )
    )


def measure(database_url: str, path: Path, concurrent: int = 1) -> dict[str, object]:
    command = [sys.executable, "-m", "bench.ingest_memory", "--child", str(path)]
    done = subprocess.run(
        [*command, "--concurrent", str(concurrent), "--database-url", database_url],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise SystemExit(f"ingest of {path.name} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file-mb", type=int, default=195)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.database_url, args.child, args.concurrent)
        return
    limit = args.file_mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp, database(args.database_url) as url:
        store.upgrade_to_head(url)
        baseline: float | None = None
        print(f"{'case':<32} {'lines':>9} {'file MB':>8} {'peak RSS growth MB':>19} {'s':>6}")
        for name, lines in CASES.items():
            path = Path(tmp) / "batch.jsonl"
            count, size = write_file(path, lines(limit))
            runs = [1, CONCURRENT] if name == "1 MB lines" else [1]
            for concurrent in runs:
                figures = measure(url, path, concurrent)
                growth = float(str(figures["growth_mb"]))
                label = name if concurrent == 1 else f"{name}, {concurrent} at once"
                target = TARGET_MB * concurrent
                if baseline is None:
                    baseline = growth
                    verdict = "(baseline)"
                else:
                    verdict = f"{growth / max(baseline, 1):.1f}x baseline; target <= {target} MB"
                    verdict += "" if growth <= target else "  OVER"
                print(
                    f"{label:<32} {count:>9,} {size / 1e6:>8.1f} {growth:>19.1f} "
                    f"{float(str(figures['seconds'])):>6.1f}  {verdict}"
                )
            path.unlink()


if __name__ == "__main__":
    main()
