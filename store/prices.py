"""The price table, and the cost of a call from its tokens, in exact decimals.

A price is US dollars per million tokens to the micro-dollar (``PRICE_SCALE`` places); a cost is
tokens times prices over a million, computed in ``Decimal`` and therefore exact: no call's cost, and
no sum of them, drifts the way float arithmetic does (``0.002160000000000008``).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.clock import now_seconds
from store.engine import dialect_insert, write_transaction
from store.tables import PRICE_SCALE, ModelPrice

__all__ = ["PriceValue", "cost_usd", "exact_price", "get_prices", "price_for", "set_price"]

PriceValue = Decimal | str | int | float
"""A price as given: a float is read as the decimal it prints as (``0.15`` is 0.15, exactly)."""

_ONE_MILLION = Decimal(1_000_000)


def exact_price(value: PriceValue, name: str = "price") -> Decimal:
    """``value`` as an exact ``Decimal`` of at most ``PRICE_SCALE`` places; ``ValueError`` if it is
    negative, not a finite number, or finer than a micro-dollar per million tokens."""
    try:
        price = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    if price != price.quantize(Decimal(1).scaleb(-PRICE_SCALE)):
        raise ValueError(f"{name} {value!r} has more than {PRICE_SCALE} decimal places")
    return price


def set_price(
    engine: Engine,
    model: str,
    input_per_million: PriceValue,
    cached_input_per_million: PriceValue,
    output_per_million: PriceValue,
) -> None:
    """Insert or replace a model's price (US dollars per million tokens, see ``exact_price``)."""
    values = {
        "model": model,
        "input_per_million": exact_price(input_per_million, "input price"),
        "cached_input_per_million": exact_price(cached_input_per_million, "cached input price"),
        "output_per_million": exact_price(output_per_million, "output price"),
        "updated_at": now_seconds(),
    }
    with write_transaction(engine) as conn:
        statement = dialect_insert(conn, ModelPrice).values(values)
        conn.execute(statement.on_conflict_do_update(index_elements=["model"], set_=statement.excluded))


def get_prices(engine: Engine) -> dict[str, ModelPrice]:
    with Session(engine, expire_on_commit=False) as session:
        return {price.model: price for price in session.scalars(sa.select(ModelPrice))}


def price_for(prices: dict[str, ModelPrice], model: str | None) -> ModelPrice | None:
    """The price of ``model``: an exact match, else the longest priced name it starts with followed
    by ``-`` (so ``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``), else None."""
    if model is None:
        return None
    exact = prices.get(model)
    if exact is not None:
        return exact
    best: ModelPrice | None = None
    for name, price in prices.items():
        if model.startswith(name + "-") and (best is None or len(name) > len(best.model)):
            best = price
    return best


def cost_usd(
    price: ModelPrice | None, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int
) -> Decimal | None:
    """Exact dollars for one call; None when the model has no price (its tokens still count).
    ``cached_prompt_tokens`` are part of ``prompt_tokens`` and billed at the cached-input price."""
    if price is None:
        return None
    uncached = max(prompt_tokens - cached_prompt_tokens, 0)
    return (
        uncached * Decimal(price.input_per_million)
        + cached_prompt_tokens * Decimal(price.cached_input_per_million)
        + completion_tokens * Decimal(price.output_per_million)
    ) / _ONE_MILLION
