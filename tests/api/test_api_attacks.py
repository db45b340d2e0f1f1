"""A hostile tenant against a live ``tokenmill api``: what the hardening still let through, each
found by trying it over HTTP (the official ``openai`` SDK, raw httpx where the SDK would hide the
answer)."""

from __future__ import annotations

import httpx

from tests.api.conftest import LiveAPI
from tests.api.test_api_input import client, jsonl


def agent_line(custom_id: str, tools: list[str]) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/agent_runs",
        "body": {"model": "sim-model", "tools": tools, "input": "What is 2+2?"},
    }


def test_agent_run_lines_naming_an_unknown_tool_are_refused_at_ingest_by_line(live_api: LiveAPI) -> None:
    """``POST /v1/agent_runs`` refused an unknown tool name, but the same run as a batch line was
    queued, and failed on a worker at run time (after a batch was billed for its other lines)."""
    key = live_api.new_key("batch-tools")
    headers = {"Authorization": f"Bearer {key}"}
    lines = jsonl(
        agent_line("good", ["calculator"]),
        agent_line("bad", ["calculator", "rm_rf"]),
        {"custom_id": "short", "prompt": "hi", "tools": ["curl_internal"]},
        {"custom_id": "broken", "prompt": "hi", "max_tool_iterations": "many"},
    )
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", lines), purpose="batch")
    for skip_invalid, status in ((False, "failed"), (True, "in_progress")):
        answer = httpx.post(
            f"{live_api.base_url}/batches",
            headers=headers,
            json={
                "input_file_id": uploaded.id,
                "endpoint": "/v1/agent_runs",
                "model": "sim-model",
                "skip_invalid": skip_invalid,
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        batch = answer.json()
        assert batch["status"] == status, batch
        errors = {(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]}
        assert errors == {
            (2, "unknown_tool", "body.tools"),
            (3, "unknown_tool", "tools"),
            (4, "invalid_agent_run", None),
        }, batch["errors"]
        assert "rm_rf" in batch["errors"]["data"][0]["message"]
        assert batch["request_counts"]["total"] == (1 if skip_invalid else 0)
