"""Line charts as inline SVG, drawn here: no charting library, no script, nothing to vendor.

``line_chart`` turns one figure of ``store.dashboard.Activity`` (requests, tokens, cost per time
bucket and model) into geometry the template writes out as ``<svg>``: a polyline and a point per
bucket for each model, axes with a few ticks. Every point carries its exact value (``data-value``)
and a ``<title>`` ("gpt-4o-mini, 08:41 UTC: 40 requests") that browsers show on hover and screen
readers read; each series carries its total (``data-total``). Model names are the tenants'
strings: the template escapes them, and CSS classes come from the series' position, never from a
name.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from store.dashboard import Activity

__all__ = ["Chart", "ChartPoint", "ChartSeries", "format_value", "line_chart"]

WIDTH = 720
HEIGHT = 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 28
_X_TICKS = 6
OTHER_MODELS = "other models"


@dataclass(frozen=True, slots=True)
class ChartPoint:
    x: float
    y: float
    value: str  # exact, for data-value
    title: str


@dataclass(frozen=True, slots=True)
class ChartSeries:
    name: str  # the model, or OTHER_MODELS
    model: str  # data-model: the model's name, "" for the other models
    css_class: str
    points: list[ChartPoint]
    total: str  # exact, for data-total
    total_text: str

    @property
    def polyline(self) -> str:
        return " ".join(f"{point.x:.1f},{point.y:.1f}" for point in self.points)


@dataclass(frozen=True, slots=True)
class Chart:
    id: str
    title: str
    unit: str
    description: str
    series: list[ChartSeries]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    right: int = WIDTH - _RIGHT
    top: int = _TOP
    bottom: int = HEIGHT - _BOTTOM

    @property
    def empty(self) -> bool:
        return not self.series


def format_value(value: Any, unit: str) -> str:
    """A figure as people read it: counts with thousands separators, dollars to the cent when
    large and exact below (a cheap model's minute costs fractions of a cent)."""
    if unit == "USD":
        amount = Decimal(value)
        return f"${amount:,.2f}" if amount >= 1 else f"${_plain(amount)}"
    return f"{int(value):,} {unit}"


def _plain(amount: Decimal) -> str:
    """A Decimal without exponent or trailing zeros (``0.000123``, not ``1.23E-4``)."""
    text = f"{amount.normalize():f}"
    return text if text != "-0" else "0"


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (an axis maximum)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 5, 10) if step * magnitude >= value)


def _clock(seconds: int, bucket_seconds: int) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.strftime("%H:%M") if bucket_seconds < 3600 else moment.strftime("%d %H:%M")


def line_chart(
    activity: Activity,
    attribute: str,
    *,
    chart_id: str,
    title: str,
    unit: str,
    exact: Callable[[Any], str] = str,
) -> Chart:
    """``attribute`` of ``activity`` (``requests``, ``billed_tokens``, ``cost_usd``...) per bucket,
    one series per model (busiest first, the rest as one), zero where a model had nothing."""
    starts = activity.bucket_starts
    span = max(1, len(starts) - 1)
    values_by_model = {
        model: [getattr(activity.series(model).get(start), attribute, 0) for start in starts]
        for model in activity.models
    }
    highest = max((float(value) for values in values_by_model.values() for value in values), default=0.0)
    ceiling = _nice_ceiling(highest)
    left, right, top, bottom = _LEFT, WIDTH - _RIGHT, _TOP, HEIGHT - _BOTTOM

    def x_of(index: int) -> float:
        return left + (right - left) * index / span

    def y_of(value: Any) -> float:
        return bottom - (bottom - top) * float(value) / ceiling

    series = []
    for position, (model, values) in enumerate(values_by_model.items()):
        name = model if model is not None else OTHER_MODELS
        points = [
            ChartPoint(
                x=x_of(index),
                y=y_of(value),
                value=exact(value),
                title=f"{name}, {_clock(start, activity.bucket_seconds)} UTC: {format_value(value, unit)}",
            )
            for index, (start, value) in enumerate(zip(starts, values, strict=True))
        ]
        total = activity.model_total(attribute, model)
        series.append(
            ChartSeries(
                name=name,
                model=model or "",
                css_class=f"series-{position}" if model is not None else "series-other",
                points=points,
                total=exact(total),
                total_text=format_value(total, unit),
            )
        )
    y_ticks = [(y_of(ceiling * share), _tick_label(ceiling * share, unit)) for share in (0, 0.5, 1)]
    every = max(1, len(starts) // _X_TICKS)
    x_ticks = [(x_of(index), _clock(start, activity.bucket_seconds)) for index, start in enumerate(starts)][
        ::every
    ]
    minutes = activity.bucket_seconds // 60
    bucket = f"{minutes} min" if minutes < 60 else f"{minutes // 60} h"
    description = (
        f"{title} per {bucket}, by model, from {_clock(activity.since, 3600)} to "
        f"{_clock(activity.until, 3600)} UTC: " + "; ".join(f"{s.name} {s.total_text}" for s in series)
        if series
        else f"{title}: nothing in this window"
    )
    return Chart(
        id=chart_id,
        title=f"{title} per {bucket}",
        unit=unit,
        description=description,
        series=series,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
    )


def _tick_label(value: float, unit: str) -> str:
    """An axis label, short enough for the margin: ``2.5k``, ``$0.0005`` (the unit is in the title)."""
    if unit == "USD":
        return f"${_plain(Decimal(str(round(value, 6))))}"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"
