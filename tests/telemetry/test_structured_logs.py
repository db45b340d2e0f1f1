"""Log lines are JSON objects naming the request they were logged for, text on a terminal, and
never carry what a database error quoted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import subprocess
import sys
from collections.abc import Iterator

import pydantic
import pytest

from models.events import LLMCall
from telemetry.context import RequestScope, enter_request
from telemetry.logs import formatter

SECRET = "Zq7-SECRET-PROMPT-Wx4"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    logger = logging.getLogger("tests.telemetry.structured")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_line_is_one_json_object_with_the_ids_of_its_request(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    async def request(number: int) -> None:
        enter_request(RequestScope(f"batch_{number}", f"req_{number}", f"tenant_{number}", "sim-model"))
        logger.info("working on %s", number)

    await asyncio.gather(request(1), request(2))
    logger.warning("outside any request")
    first, second, outside = lines(stream)
    assert (first["batch_id"], first["request_id"], first["tenant"]) == ("batch_1", "req_1", "tenant_1")
    assert (second["batch_id"], second["request_id"]) == ("batch_2", "req_2")
    assert first["event"] == "working on 1"
    assert first["level"] == "info"
    assert first["logger"] == "tests.telemetry.structured"
    assert str(first["timestamp"]).endswith("Z")
    assert "request_id" not in outside  # a request's ids never leak to the next line
    assert outside["level"] == "warning"


def test_a_model_event_is_a_line_of_its_own_fields(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    enter_request(RequestScope("batch_x", "req_x", None, "sim-model"))
    logger.info(LLMCall(model="sim-model", provider="openai", prompt_tokens=12, request_id="chatcmpl-1"))
    (line,) = lines(stream)
    assert line["event"] == "LLMCall"
    assert line["prompt_tokens"] == 12
    assert line["request_id"] == "req_x"  # ours; the provider's id apart
    assert line["upstream_request_id"] == "chatcmpl-1"


def test_an_error_quoting_a_prompt_is_logged_without_it(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    prompt = f"{SECRET} tell me"
    try:
        pydantic.TypeAdapter(int).validate_python(prompt)  # its message quotes the input
    except pydantic.ValidationError:
        logger.exception("the body was refused")
    text = stream.getvalue()
    assert "the body was refused" in text
    assert "ValidationError" in text
    assert SECRET not in text
    assert len(lines(stream)) == 1  # the traceback is inside the one line


def test_a_terminal_gets_readable_text() -> None:
    main, terminal = pty.openpty()
    script = (
        "import logging; from telemetry.logs import configure_logging; configure_logging('INFO');"
        "logging.getLogger('demo').warning('hello %s', 'operator')"
    )
    try:
        completed = subprocess.run(
            [sys.executable, "-c", script], stderr=terminal, stdout=subprocess.DEVNULL, timeout=60, check=True
        )
        assert completed.returncode == 0
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(main)
        if terminal != -1:
            os.close(terminal)
    text = output.decode()
    assert "hello operator" in text
    assert "warning" in text
    assert not text.lstrip().startswith("{")
