"""``tokenmill agent run --simulate``: one assistant run in-process, against the bundled simulator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.cluster import CLI, ROOT


def test_agent_run_prints_the_answer_and_with_json_the_transcript(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TOKENMILL_DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}",
        "TOKENMILL_CACHE_URL": str(tmp_path / "cache"),
    }
    question = 'What is 6*7? [[call calculator {"expression": "6*7"}]]'
    done = subprocess.run(
        [
            *CLI,
            "agent",
            "run",
            "--simulate",
            "--json",
            "--model",
            "gpt-4o-mini",
            "--system",
            "Use tools.",
            "--tool",
            "calculator",
            question,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert "calculator=42" in run["output"]
    assert [m["type"] for m in run["transcript"]] == [
        "UserMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
    ]
    assert len(run["model_calls"]) == 2
    assert run["usage"]["prompt_tokens"] == sum(c["usage"]["prompt_tokens"] for c in run["model_calls"]) > 0
