"""GCRA and AIMD as pure logic, on a clock the test holds (the backends' tests run them live)."""

from __future__ import annotations

import pytest

from workers.rate_limits.aimd import AimdCap, admits
from workers.rate_limits.gcra import GcraSchedule, clamp_tokens


def test_gcra_spaces_calls_by_the_rate_and_books_no_further_than_the_horizon() -> None:
    schedule = GcraSchedule()
    waits = [schedule.try_schedule(100.0, rpm=60, tpm=0, tokens=0, horizon=2.0) for _ in range(3)]
    assert waits == [(True, 0.0), (True, 1.0), (True, 2.0)]
    # The fourth would leave 3 s from now: one second past the horizon, asked back in one second.
    assert schedule.try_schedule(100.0, rpm=60, tpm=0, tokens=0, horizon=2.0) == (False, pytest.approx(1.0))
    assert schedule.tat_requests == 103.0  # a denial books nothing


def test_gcra_charges_an_excess_at_once_and_never_refunds_into_the_past() -> None:
    schedule = GcraSchedule()
    assert schedule.try_schedule(0.0, rpm=0, tpm=600, tokens=100, horizon=1.0) == (True, 0.0)
    assert schedule.tat_tokens == 10.0
    schedule.correct_tokens(4.0, tpm=600, booked=100, used=160)
    assert schedule.tat_tokens == 16.0
    schedule.correct_tokens(5.0, tpm=600, booked=100, used=0)
    assert schedule.tat_tokens == 6.0
    schedule.correct_tokens(8.0, tpm=600, booked=100, used=0)
    assert schedule.tat_tokens == 8.0  # the refund stops at now
    schedule.correct_tokens(9.0, tpm=600, booked=100, used=None)
    assert schedule.tat_tokens == 8.0  # unknown usage changes nothing
    assert clamp_tokens(5000, 600) == 600
    assert clamp_tokens(-3, 600) == 0
    assert clamp_tokens(5000, 0) == 5000


def test_aimd_halves_once_per_cooldown_grows_by_one_over_cap_and_recovers() -> None:
    cap = AimdCap()
    assert cap.limit(0) is None
    assert cap.limit(8) == 8
    tuning = {"factor": 0.5, "cooldown": 1.0, "recovery": 60.0}
    # An unset cap starts from the calls in flight, never above the configured limit.
    cap.on_rate_limited(10.0, in_flight=20, max_in_flight=8, **tuning)
    assert cap.cap == 4.0
    cap.on_rate_limited(10.5, in_flight=4, max_in_flight=8, **tuning)
    assert cap.cap == 4.0  # the same overload answering several calls
    cap.on_rate_limited(11.0, in_flight=4, max_in_flight=8, **tuning)
    assert cap.cap == 2.0
    assert cap.limit(8) == 2.0
    assert admits(1, cap.limit(8))
    assert not admits(2, cap.limit(8))
    cap.on_success(max_in_flight=8)
    assert cap.cap == 2.5
    cap.expire(70.9)
    assert cap.cap == 2.5
    cap.expire(71.0)
    assert cap.cap is None
    # Without a configured limit, successes grow the cap until it expires.
    cap.on_rate_limited(80.0, in_flight=1, max_in_flight=0, **tuning)
    assert cap.cap == 1.0  # never below one call
    cap.on_success(max_in_flight=0)
    assert cap.cap == 2.0


def test_aimd_drops_the_cap_on_reaching_the_configured_limit() -> None:
    cap = AimdCap(cap=3.9, cap_until=100.0, decreased_at=1.0)
    cap.on_success(max_in_flight=4)
    assert cap.cap is None
    assert cap.decreased_at == float("-inf")  # the next 429 decreases at once
