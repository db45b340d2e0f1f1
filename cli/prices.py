"""``tokenmill prices``: the model prices usage is costed at."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import store
from cli.ledger import console, ledger_engine

__all__ = ["prices_app"]

prices_app = typer.Typer(help="See and set the model prices usage is costed at.", no_args_is_help=True)


@prices_app.command("list")
def prices_list() -> None:
    """The prices ``usage`` and ``/v1/usage`` cost tokens at (US dollars per million tokens)."""
    table = Table("model", "input", "cached input", "output", "set at (UTC)")
    for name, price in sorted(store.get_prices(ledger_engine()).items()):
        table.add_row(
            name,
            f"{price.input_per_million:g}",
            f"{price.cached_input_per_million:g}",
            f"{price.output_per_million:g}",
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(price.updated_at)),
        )
    Console().print(table)


@prices_app.command("set")
def prices_set(
    model: Annotated[str, typer.Argument(help="model name; also prices its dated versions")],
    input_price: Annotated[float, typer.Option("--input", min=0, help="$ per million prompt tokens")],
    output_price: Annotated[float, typer.Option("--output", min=0, help="$ per million completion tokens")],
    cached_input_price: Annotated[
        float | None,
        typer.Option("--cached-input", min=0, help="$ per million cached prompt tokens (default: --input)"),
    ] = None,
) -> None:
    """Set MODEL's price, e.g. from the provider's pricing page; the seeded ones may be dated.

    Example: tokenmill prices set gpt-4o-mini --input 0.15 --cached-input 0.075 --output 0.6
    """
    cached = input_price if cached_input_price is None else cached_input_price
    try:
        store.set_price(ledger_engine(), model, input_price, cached, output_price)
    except ValueError as e:  # e.g. finer than a micro-dollar: prices are kept exact
        raise typer.BadParameter(str(e)) from None
    console.print(
        f"{model}: ${input_price:g} in, ${cached:g} cached in, ${output_price:g} out per million tokens"
    )
