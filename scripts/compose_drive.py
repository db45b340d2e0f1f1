"""Drive a running docker-compose.yml stack from the host, as a user would (scripts/compose-check).

Talks to the published API with the openai SDK and to Flower over HTTP; runs the compose command
given after ``--`` to create a key, scale the workers and find their containers, and ``docker
kill`` to kill one mid-batch. Exits non-zero with the reason on the first thing that is wrong.

    python scripts/compose_drive.py --api URL --flower URL --flower-auth USER:PASS -- docker compose -p X ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import openai

MODEL = "gpt-4o-mini"
T = TypeVar("T")


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"compose-drive: {message}", file=sys.stderr, flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_until(probe: Callable[[], T | None], seconds: float, what: Callable[[], str]) -> T:
    """Poll ``probe`` until it returns something other than None/False; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"after {seconds:.0f} s: {what()}")
        time.sleep(0.5)


class Stack:
    def __init__(self, compose: list[str], api: str, flower: str, flower_auth: str) -> None:
        self.compose = compose
        self.api = api
        self.flower = flower
        user, _, password = flower_auth.partition(":")
        self.flower_auth = (user, password)
        self.key = ""

    def run(self, *args: str) -> str:
        done = subprocess.run([*self.compose, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise CheckFailed(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api}/v1", api_key=self.key, max_retries=0, timeout=60)

    def flower_get(self, path: str, *, auth: bool = True) -> httpx.Response:
        return httpx.get(f"{self.flower}{path}", auth=self.flower_auth if auth else None, timeout=30)

    def worker_containers(self) -> dict[str, str]:
        """Celery node name (tokenmill@<container hostname>) -> container id, for running workers."""
        ids = self.run("ps", "-q", "worker").split()
        nodes: dict[str, str] = {}
        for container in ids:
            state, hostname = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Status}} {{.Config.Hostname}}", container],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            if state == "running":
                nodes[f"tokenmill@{hostname}"] = container
        return nodes

    def online_workers(self) -> set[str]:
        answer = self.flower_get("/api/workers?status=true")
        check(answer.status_code == 200, f"Flower /api/workers answered {answer.status_code}")
        return {name for name, online in answer.json().items() if online}

    def leases_held(self, batch_id: str) -> dict[str, int]:
        """Celery node name -> how many of the batch's requests run under its lease, read from the
        ledger as an operator would (psql in the postgres container)."""
        query = (
            "SELECT split_part(lease_owner, '/', 1), count(*) FROM requests "
            f"WHERE batch_id = '{batch_id}' AND status = 'running' GROUP BY 1"
        )
        rows = self.run(
            "exec", "-T", "postgres", "psql", "-U", "tokenmill", "-d", "tokenmill", "-tAF,", "-c", query
        )
        held: dict[str, int] = {}
        for row in rows.splitlines():
            if row.strip():
                owner, count = row.rsplit(",", 1)
                held[owner] = int(count)
        return held

    def usage(self, batch_id: str) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.api}/v1/usage",
            params={"group_by": "batch", "batch_id": batch_id},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
        )
        check(answer.status_code == 200, f"/v1/usage answered {answer.status_code}: {answer.text[:500]}")
        rows = answer.json()["data"]
        check(len(rows) == 1, f"/v1/usage for {batch_id}: {rows}")
        row: dict[str, Any] = rows[0]
        return row


def batch_line(custom_id: str, content: str) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 30}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode()


def run_batch(stack: Stack, lines: list[bytes], name: str) -> str:
    client = stack.client()
    uploaded = client.files.create(file=(f"{name}.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
    check(uploaded.bytes > 0, f"upload of {name} has no bytes: {uploaded}")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    check(batch.status in ("validating", "in_progress"), f"new batch is {batch.status}")
    return batch.id


def wait_done(stack: Stack, batch_id: str, seconds: float) -> Any:
    client = stack.client()

    def ended() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_until(ended, seconds, lambda: f"{client.batches.retrieve(batch_id)}")
    check(batch.status == "completed", f"batch {batch_id} ended {batch.status}: {batch.errors}")
    return batch


def check_results_once(stack: Stack, batch: Any, custom_ids: list[str]) -> None:
    """One output line per custom_id, each a success, and usage billed once for it."""
    client = stack.client()
    counts = batch.request_counts
    check(
        (counts.total, counts.completed, counts.failed) == (len(custom_ids), len(custom_ids), 0),
        f"request counts {counts}",
    )
    check(batch.output_file_id is not None, "no output file")
    output = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
    seen = [item["custom_id"] for item in output]
    check(len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} custom_id(s) written twice")
    check(sorted(seen) == sorted(custom_ids), f"{len(set(custom_ids) - set(seen))} custom_id(s) missing")
    for item in output:
        check(item["error"] is None and item["response"]["status_code"] == 200, f"a failed line: {item}")
    paid = [item for item in output if not item["response"]["body"].get("tokenmill", {}).get("cached")]
    prompt_tokens = sum(item["response"]["body"]["usage"]["prompt_tokens"] for item in paid)
    completion_tokens = sum(item["response"]["body"]["usage"]["completion_tokens"] for item in paid)
    usage = stack.usage(batch.id)
    billed, hits = usage["billed"], usage["cache_hits"]
    log(
        f"batch {batch.id}: {len(output)} lines, {len(paid)} paid; usage billed "
        f"{billed['requests']} requests, {billed['prompt_tokens']}+{billed['completion_tokens']} tokens, "
        f"{hits['requests']} cache hits, {billed['discarded_answers']} discarded answers; output lines "
        f"{prompt_tokens}+{completion_tokens} tokens"
    )
    check(billed["requests"] == len(paid), f"billed requests {billed['requests']} != {len(paid)} paid lines")
    check(hits["requests"] == len(output) - len(paid), f"cache hits {hits['requests']}")
    # A second delivery's answer, paid upstream but not kept, is billed on top (design.md,
    # "bill follows the payer"); without one, the bill is exactly the output's usage.
    if billed["discarded_answers"] == 0:
        check(
            (billed["prompt_tokens"], billed["completion_tokens"]) == (prompt_tokens, completion_tokens),
            "billed tokens differ from the output lines' usage",
        )
    else:
        check(billed["prompt_tokens"] > prompt_tokens, "discarded answers were not billed")


def check_flower(stack: Stack) -> None:
    health = httpx.get(f"{stack.flower}/healthcheck", timeout=30)
    check(health.status_code == 200, f"Flower /healthcheck from the host: {health.status_code}")
    anonymous = stack.flower_get("/api/workers", auth=False)
    check(anonymous.status_code == 401, f"Flower without credentials answered {anonymous.status_code}")
    wrong = httpx.get(f"{stack.flower}/api/workers", auth=(stack.flower_auth[0], "wrong"), timeout=30)
    check(wrong.status_code == 401, f"Flower with a wrong password answered {wrong.status_code}")
    page = stack.flower_get("/")
    check(page.status_code == 200, f"Flower with its credentials answered {page.status_code}")
    log("Flower: reachable from the host, 401 without credentials, 200 with them")


def check_sync_completion(stack: Stack) -> None:
    completion = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello from compose-check"}]
    )
    check(bool(completion.choices[0].message.content), f"empty completion: {completion}")
    check(completion.usage is not None and completion.usage.prompt_tokens > 0, "no usage on the completion")
    log("POST /v1/chat/completions answered through the workers")


def check_small_batch(stack: Stack) -> None:
    ids = [f"small-{i}" for i in range(20)]
    batch_id = run_batch(stack, [batch_line(i, f"small question {i}") for i in ids], "small")
    check_results_once(stack, wait_done(stack, batch_id, 120), ids)
    log("upload, batch, poll, results: every line once")


def check_worker_killed_mid_batch(stack: Stack) -> None:
    stack.run("up", "--detach", "--no-deps", "--no-build", "--scale", "worker=2", "worker")
    wait_until(
        lambda: len(stack.online_workers()) == 2 or None,
        120,
        lambda: f"Flower sees workers {stack.online_workers()}",
    )
    nodes = stack.worker_containers()
    check(len(nodes) == 2, f"worker containers: {nodes}")
    log(f"two workers online: {sorted(nodes)}")

    # Slow lines (the simulator's delay directive), unique so no line is another's cache hit.
    ids = [f"kill-{i}" for i in range(600)]
    batch_id = run_batch(stack, [batch_line(i, f"question {i} [[delay 2]]") for i in ids], "kill")
    client = stack.client()

    def victim() -> tuple[str, int] | None:
        """The worker holding the most of the batch's running requests, once some are finished."""
        counts = client.batches.retrieve(batch_id).request_counts
        if counts is None or not counts.total // 10 <= counts.completed < counts.total // 2:
            return None
        held = stack.leases_held(batch_id)
        busiest = max(nodes, key=lambda node: held.get(node, 0))
        return (busiest, held[busiest]) if held.get(busiest) else None

    node, stranded = wait_until(
        victim, 120, lambda: f"no worker busy mid-batch: {client.batches.retrieve(batch_id)}"
    )
    subprocess.run(["docker", "kill", nodes[node]], check=True, capture_output=True)
    killed_at = time.monotonic()
    log(f"killed {node} while it held {stranded} running request(s) of the batch")
    # Its leases expire unrenewed and the sweeper hands the requests to the other worker.
    wait_until(
        lambda: stack.leases_held(batch_id).get(node, 0) == 0,
        120,
        lambda: f"the killed worker still holds {stack.leases_held(batch_id)}",
    )
    log(f"its requests were running elsewhere or done {time.monotonic() - killed_at:.1f} s after the kill")
    batch = wait_done(stack, batch_id, 300)
    log(f"the batch completed {time.monotonic() - killed_at:.1f} s after the kill")
    state = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Status}}, restarted {{.RestartCount}} time(s)", nodes[node]],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    log(f"the killed worker's container: {state}")
    check_results_once(stack, batch, ids)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api", required=True, help="the API's published root, http://127.0.0.1:PORT")
    parser.add_argument("--flower", required=True, help="Flower's published root")
    parser.add_argument("--flower-auth", required=True, help="Flower's user:password")
    parser.add_argument("compose", nargs="+", help="the compose command, with its project options")
    args = parser.parse_args()
    stack = Stack(args.compose, args.api.rstrip("/"), args.flower.rstrip("/"), args.flower_auth)
    try:
        stack.key = stack.run("exec", "-T", "api", "tokenmill", "keys", "create", "compose-check").strip()
        check(stack.key.startswith("tm-"), "keys create printed no key")
        check_flower(stack)
        check_sync_completion(stack)
        check_small_batch(stack)
        check_worker_killed_mid_batch(stack)
    except CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    log("the deployment works as written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
