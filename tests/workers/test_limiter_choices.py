"""A call asking for ``n`` choices books ``n`` times its ``max_tokens``: it booked one choice's,
so a tenant sending ``n=128`` could take 128 times its share of a global token limit before the
charge at release caught up (and push the provider into 429s that slow every tenant)."""

from __future__ import annotations

from config import ModelLimits
from models.cancellation import CancellationToken
from models.retry import RetryPolicy
from models.types import UserMessage
from simulator.testing import SimulatorServer
from workers.clients import openai_client_factory
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LocalRateLimiter, Slot


class BookingsSeen(LocalRateLimiter):
    """The local limiter, noting what each acquire books."""

    booked: list[int]

    async def acquire(
        self,
        endpoint: str,
        model: str,
        *,
        estimated_tokens: int,
        cancellation_token: CancellationToken | None = None,
        max_wait: float | None = None,
    ) -> Slot:
        self.booked.append(estimated_tokens)
        return await super().acquire(
            endpoint,
            model,
            estimated_tokens=estimated_tokens,
            cancellation_token=cancellation_token,
            max_wait=max_wait,
        )


async def test_a_call_for_n_choices_books_n_times_its_max_tokens(simulator: SimulatorServer) -> None:
    limiter = BookingsSeen({"sim-model": ModelLimits(tpm=1_000_000, max_output_tokens=500)})
    limiter.booked = []
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10), limiter, RetryPolicy()
    )
    messages = [UserMessage(content="Say hello", source="user")]
    one = await pipeline.call("sim-model", messages, extra_create_args={"max_tokens": 100})
    many = await pipeline.call("sim-model", messages, extra_create_args={"max_tokens": 100, "n": 8})
    clamped = await pipeline.call("sim-model", messages, extra_create_args={"max_tokens": 10**6, "n": 3})
    assert one.error is None
    assert many.error is None
    assert clamped.error is None
    single, eight, three = limiter.booked
    prompt = single - 100
    assert eight == prompt + 8 * 100
    assert three == prompt + 3 * 500  # each choice clamped to the model's output limit
    await pipeline.close()
