"""How a single call's failure, as the ledger keeps it, is answered to its caller: the status, the
code and whether OpenAI's SDK may ask again (``x-should-retry``). The ledger's record is built as
the lane builds it (``workers.runner.failed_record``, ``workers.lane.outcome_of``) from the error
the provider's answer maps to."""

from __future__ import annotations

import json

from api.errors import SHOULD_RETRY_HEADER, api_error_response
from api.routes.chat import _error_for
from models.errors import QuotaExceeded, RateLimited
from models.types import RequestUsage
from store import RequestStatus, ResultRecord
from store.results import UNRECORDABLE
from workers.lane import outcome_of
from workers.result_writer import _unrecordable
from workers.runner import failed_record


def test_the_providers_insufficient_quota_is_no_rate_limit_of_the_caller() -> None:
    """The operator's provider account out of credit (429 ``insufficient_quota``, permanent): a 502
    naming the provider, ``x-should-retry: false``, as a refusal of tokenmill's credentials is. It
    was answered as the caller's own 429 (``openai.RateLimitError`` with the provider's "You
    exceeded your current quota"), which the SDK retries twice, each a new call refused again."""
    error = QuotaExceeded(
        "You exceeded your current quota, please check your plan and billing details.",
        status_code=429,
        code="insufficient_quota",
    )
    response = api_error_response(_error_for(outcome_of(failed_record("req_1", error, attempts=1))))
    assert response.status_code == 502
    body = json.loads(bytes(response.body))["error"]
    assert (body["type"], body["code"]) == ("upstream_error", "insufficient_quota")
    assert "model provider" in body["message"]
    assert response.headers[SHOULD_RETRY_HEADER] == "false"
    assert response.headers["x-request-id"] == "req_1"


def test_a_rate_limit_past_the_calls_budget_stays_a_retryable_429() -> None:
    """The provider's refusal for load past the call's budget: a 429 the SDK may ask again."""
    error = RateLimited("Rate limit reached for requests.", status_code=429, code="rate_limit_exceeded")
    response = api_error_response(_error_for(outcome_of(failed_record("req_2", error, attempts=3))))
    assert response.status_code == 429
    assert json.loads(bytes(response.body))["error"]["code"] == "rate_limit_exceeded"
    assert SHOULD_RETRY_HEADER not in response.headers
    assert "retry-after" not in response.headers  # the provider said nothing of when


def test_a_rate_limit_past_the_calls_budget_says_the_providers_retry_after() -> None:
    """The provider's last Retry-After, kept with the failure in the ledger, is the 429's: as the
    lane pushes it, and as the ledger gives it back (``failed_record`` to ``outcome_of``)."""
    error = RateLimited("Slow down.", status_code=429, code="rate_limit_exceeded", retry_after=2.25)
    response = api_error_response(_error_for(outcome_of(failed_record("req_4", error, attempts=3))))
    assert response.status_code == 429
    assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == ("3", "2250")


def test_an_answer_the_ledger_refused_is_not_asked_again() -> None:
    """A paid answer whose record the database refused (``result_not_recordable``, its spend kept):
    asked again, it is paid again, so the 502 says ``x-should-retry: false`` as an unreadable
    answer's does. It had no such header: OpenAI's SDK asked twice more."""
    answer = ResultRecord(
        request_id="req_3",
        status=RequestStatus.SUCCEEDED,
        response_body={"choices": []},
        status_code=200,
        model="gpt-4o",
        usage=RequestUsage(prompt_tokens=10, completion_tokens=5),
    )
    refused = _unrecordable(answer, ValueError("value too long for type character varying(200)"))
    response = api_error_response(_error_for(outcome_of(refused)))
    assert response.status_code == 502
    assert json.loads(bytes(response.body))["error"]["code"] == UNRECORDABLE
    assert response.headers[SHOULD_RETRY_HEADER] == "false"
