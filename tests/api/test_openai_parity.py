"""Field by field what OpenAI answers (the official ``openai`` SDK's types are the reference), against
a live API: a batch's files, batch creation's arguments, a stream's chunks, an empty answer."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.api.conftest import LiveAPI

pytestmark = pytest.mark.slow


def batch_line(custom_id: str, content: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "sim-model", "messages": [{"role": "user", "content": content}]},
    }


@pytest.mark.parametrize("window", ["1h", "48h", "7d", ""])
def test_a_completion_window_other_than_24h_is_refused_naming_it(live_api: LiveAPI, window: str) -> None:
    """OpenAI takes ``completion_window: "24h"`` only (the SDK's ``Literal["24h"]``) and answers
    anything else 400 naming the param. Any ``<n>h`` used to be taken (a "1h" batch then expired
    after an hour), and other values refused with a message of tokenmill's own."""
    with openai.OpenAI(
        base_url=live_api.base_url, api_key=live_api.new_key(f"window-{window}"), max_retries=0
    ) as sdk:
        uploaded = sdk.files.create(
            file=("in.jsonl", json.dumps(batch_line("a", "hi")).encode()), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window=window,  # type: ignore[arg-type]
            )
        assert refused.value.param == "completion_window"
        assert refused.value.type == "invalid_request_error"
        assert "24h" in refused.value.message
        assert sdk.batches.list().data == []  # nothing was created
