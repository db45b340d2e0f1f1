from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from tests.store.conftest import IngestFn

DAY = 86_400
DAY1 = 20_000 * DAY  # 2024-10-04


def record(request_id: str, model: str, tokens: int, cached: bool = False) -> store.ResultRecord:
    usage = RequestUsage(
        prompt_tokens=tokens, completion_tokens=tokens // 2, cached_prompt_tokens=tokens // 4
    )
    return store.ResultRecord(
        request_id, store.RequestStatus.SUCCEEDED, {}, model=model, usage=usage, cached=cached
    )


def test_usage_per_model_and_day_keeps_billed_and_cached_apart(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    ids = store.pending_request_ids(engine, ingest(5).batch_id)
    store.set_price(engine, "m1", 1.0, 0.5, 2.0)
    store.record_results(
        engine, [record(ids[0], "m1", 100), record(ids[1], "m1", 40, cached=True)], now=DAY1 + 10
    )
    store.record_results(engine, [record(ids[2], "m1", 200), record(ids[3], "m2", 80)], now=DAY1 + DAY + 10)
    store.record_results(
        engine,
        [store.ResultRecord(ids[4], store.RequestStatus.FAILED, error_code="x", model="m2")],
        now=DAY1 + DAY + 20,
    )
    rows = store.usage_report(engine, tenant.id, group_by=("model", "day"))
    by_key = {(row.model, row.day): row for row in rows}
    day1, day2 = dt.date(2024, 10, 4), dt.date(2024, 10, 5)
    assert set(by_key) == {("m1", day1), ("m1", day2), ("m2", day2)}
    first = by_key[("m1", day1)]
    assert (first.requests, first.billed_requests, first.cache_hits) == (2, 1, 1)
    assert (
        first.billed_prompt_tokens,
        first.billed_cached_prompt_tokens,
        first.billed_completion_tokens,
    ) == (
        100,
        25,
        50,
    )
    assert (first.cache_hit_prompt_tokens, first.cache_hit_completion_tokens) == (40, 20)
    assert first.cost_usd == Decimal(75 * 1 + 25 * 0.5 + 50 * 2) / 1_000_000
    m2 = by_key[("m2", day2)]
    assert (m2.requests, m2.billed_prompt_tokens, m2.unpriced_requests, m2.cost_usd) == (2, 80, 2, 0.0)

    totals = store.usage_report(engine, tenant.id, group_by=())
    assert len(totals) == 1
    assert totals[0].billed_prompt_tokens == 100 + 200 + 80
    assert totals[0].cache_hits == 1
    assert (totals[0].model, totals[0].day, totals[0].batch_id) == (None, None, None)


def test_usage_filters_by_time_batch_and_tenant(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    first = ingest(2)
    second = ingest(1)
    ids1 = store.pending_request_ids(engine, first.batch_id)
    ids2 = store.pending_request_ids(engine, second.batch_id)
    store.record_results(engine, [record(ids1[0], "m", 10)], now=DAY1)
    store.record_results(engine, [record(ids1[1], "m", 20), record(ids2[0], "m", 30)], now=DAY1 + 100)
    per_batch = store.usage_report(engine, tenant.id, group_by=("batch",))
    assert {(row.batch_id, row.billed_prompt_tokens) for row in per_batch} == {
        (first.batch_id, 30),
        (second.batch_id, 30),
    }
    window = store.usage_report(engine, tenant.id, group_by=(), since=DAY1 + 1, until=DAY1 + 101)
    assert window[0].billed_prompt_tokens == 50
    assert store.usage_report(engine, tenant.id, group_by=(), batch_id=second.batch_id)[0].requests == 1
    other = store.create_tenant(engine, "other")
    assert store.usage_report(engine, other.id) == []
    with pytest.raises(ValueError, match="cannot group"):
        store.usage_report(engine, tenant.id, group_by=("color",))  # type: ignore[arg-type]


def paid(
    request_id: str, prompt: int, completion: int, answer: str, model: str = "exact-model"
) -> store.ResultRecord:
    usage = RequestUsage(prompt_tokens=prompt, completion_tokens=completion)
    return store.ResultRecord(
        request_id, store.RequestStatus.SUCCEEDED, {}, model=model, usage=usage, upstream_request_id=answer
    )


def unidentified(request_id: str, prompt: int, latency_ms: float) -> store.ResultRecord:
    """A paid answer whose provider sent no id (some OpenAI-compatible servers do not)."""
    usage = RequestUsage(prompt_tokens=prompt, completion_tokens=prompt // 2)
    return store.ResultRecord(
        request_id, store.RequestStatus.SUCCEEDED, {}, model="exact-model", usage=usage, latency_ms=latency_ms
    )


def test_a_paid_answer_without_a_provider_id_is_billed_once_when_discarded(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    """With no provider id to tell answers apart: the kept result written again bills nothing more;
    another delivery's answer (another call, so another latency) is billed as discarded, once
    however often its record is written; so is one that arrives for a cancelled request."""
    batch = ingest(2)
    a, c = store.pending_request_ids(engine, batch.batch_id)
    kept = unidentified(a, 100, latency_ms=12.5)
    assert store.record_results(engine, [kept]).inserted == [a]
    assert store.record_results(engine, [kept]).discarded == []  # the same record, flushed again
    redo = unidentified(a, 90, latency_ms=40.25)
    assert store.record_results(engine, [redo]).discarded == [a]
    assert store.record_results(engine, [redo]).discarded == []
    store.cancel_batch(engine, batch.batch_id)
    late = unidentified(c, 200, latency_ms=7.0)
    assert store.record_results(engine, [late]).discarded == [c]
    assert store.record_results(engine, [late]).discarded == []
    (total,) = store.usage_report(engine, tenant.id, group_by=())
    assert total.discarded_answers == 2
    assert total.billed_prompt_tokens == 100 + 90 + 200
    assert total.billed_completion_tokens == 50 + 45 + 100


def test_cost_is_an_exact_decimal_per_result_and_in_sums(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    """0.15 and 0.6 dollars per million tokens, 100 in and 36 out, three times: in floats the
    cost of one is 3.6599999999999995e-05 and the sum 0.00010979999999999999."""
    ids = store.pending_request_ids(engine, ingest(3).batch_id)
    store.set_price(engine, "exact-model", 0.15, "0.075", Decimal("0.6"))
    price = store.get_prices(engine)["exact-model"]
    assert (price.input_per_million, price.cached_input_per_million, price.output_per_million) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.6"),
    )
    store.record_results(engine, [paid(request_id, 100, 36, f"answer-{request_id}") for request_id in ids])
    with engine.connect() as conn:
        costs = conn.execute(sa.select(store.Result.cost_usd)).scalars().all()
    assert costs == [Decimal("0.0000366")] * 3
    (total,) = store.usage_report(engine, tenant.id, group_by=())
    assert isinstance(total.cost_usd, Decimal)
    assert str(total.cost_usd) == "0.0001098"


@pytest.mark.parametrize("price", ["0.0000001", "-1", "nan", "abc"])
def test_a_price_finer_than_a_micro_dollar_or_not_a_price_is_refused(engine: Engine, price: str) -> None:
    with pytest.raises(ValueError, match="price"):
        store.set_price(engine, "m", price, 0, 0)


def test_a_paid_answer_no_result_kept_is_billed_once_as_discarded(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    """Two deliveries of request A each paid for an answer: the second is a duplicate result, but
    its tokens are still the provider's bill. A redo carrying A's recorded answer (found in the
    cache) paid nothing new. An answer arriving for cancelled request C was paid all the same."""
    batch = ingest(3)
    a, b, c = store.pending_request_ids(engine, batch.batch_id)
    store.set_price(engine, "exact-model", "0.15", "0.075", "0.6")
    first = store.record_results(engine, [paid(a, 100, 36, "answer-1"), paid(b, 10, 10, "answer-b")])
    assert first.discarded == []
    second = store.record_results(engine, [paid(a, 100, 36, "answer-2"), paid(b, 10, 10, "answer-b")])
    assert sorted(second.duplicates) == sorted([a, b])
    assert second.discarded == [a]  # b's was the answer already recorded
    # The same records written again (a flush retried): nothing more is billed.
    again = store.record_results(engine, [paid(a, 100, 36, "answer-2")])
    assert again.discarded == []
    store.cancel_batch(engine, batch.batch_id)
    late = store.record_results(engine, [paid(c, 200, 0, "answer-c")])
    assert late.skipped == [c]
    assert late.discarded == [c]
    with engine.connect() as conn:
        discarded = conn.execute(
            sa.select(store.DiscardedAnswer.request_id, store.DiscardedAnswer.reason).order_by(
                store.DiscardedAnswer.id
            )
        ).all()
    assert [tuple(row) for row in discarded] == [(a, "duplicate"), (c, "cancelled")]
    (total,) = store.usage_report(engine, tenant.id, group_by=())
    assert total.requests == 2  # results: a and b
    assert total.billed_requests == 2
    assert total.discarded_answers == 2
    assert total.billed_prompt_tokens == 100 + 10 + 100 + 200
    assert total.billed_completion_tokens == 36 + 10 + 36
    assert total.cost_usd == (Decimal("0.15") * 410 + Decimal("0.6") * 82) / 1_000_000
