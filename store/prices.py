"""The price table, and the cost of a call from its tokens."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.engine import dialect_insert, write_transaction
from store.ids import now_seconds
from store.tables import ModelPrice

__all__ = ["cost_usd", "get_prices", "price_for", "set_price"]


def set_price(
    engine: Engine,
    model: str,
    input_per_million: float,
    cached_input_per_million: float,
    output_per_million: float,
) -> None:
    """Insert or replace a model's price (US dollars per million tokens)."""
    values = {
        "model": model,
        "input_per_million": input_per_million,
        "cached_input_per_million": cached_input_per_million,
        "output_per_million": output_per_million,
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
) -> float | None:
    """Dollars for one call; None when the model has no price (its tokens are still counted).
    ``cached_prompt_tokens`` are part of ``prompt_tokens`` and billed at the cached-input price."""
    if price is None:
        return None
    uncached = max(prompt_tokens - cached_prompt_tokens, 0)
    return (
        uncached * price.input_per_million
        + cached_prompt_tokens * price.cached_input_per_million
        + completion_tokens * price.output_per_million
    ) / 1_000_000
