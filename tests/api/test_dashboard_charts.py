"""The dashboard's SVG charts: one point per bucket per model, totals and point values equal to
the activity they draw, every point inside the plot, short axis labels."""

from __future__ import annotations

from decimal import Decimal

from api.dashboard.charts import OTHER_MODELS, format_value, line_chart
from store.dashboard import Activity, ActivityPoint


def point(model: str | None, start: int, requests: int, cost: str = "0") -> ActivityPoint:
    return ActivityPoint(
        model=model,
        start=start,
        requests=requests,
        failed=0,
        cache_hits=0,
        billed_tokens=10 * requests,
        cost_usd=Decimal(cost),
        discarded_answers=0,
    )


ACTIVITY = Activity(
    since=6000,
    until=6600,
    bucket_seconds=60,
    models=["m-a", None],
    points=[point("m-a", 6000, 3, "0.000120"), point("m-a", 6240, 7, "0.5"), point(None, 6540, 2)],
)


def test_a_series_per_model_with_a_point_per_bucket_and_exact_totals() -> None:
    chart = line_chart(ACTIVITY, "requests", chart_id="requests", title="Requests finished", unit="requests")
    assert [s.name for s in chart.series] == ["m-a", OTHER_MODELS]
    assert [s.model for s in chart.series] == ["m-a", ""]
    first, other = chart.series
    assert len(first.points) == len(ACTIVITY.bucket_starts) == 10
    assert [p.value for p in first.points] == ["3", "0", "0", "0", "7", "0", "0", "0", "0", "0"]
    assert (first.total, other.total) == ("10", "2")
    assert first.points[4].title == "m-a, 01:44 UTC: 7 requests"
    for series in chart.series:
        for p in series.points:
            assert chart.left <= p.x <= chart.right
            assert chart.top <= p.y <= chart.bottom
    # The highest point is under the axis' top (a rounded-up ceiling), zero on the axis.
    assert first.points[4].y >= chart.top
    assert first.points[1].y == chart.bottom
    assert [label for _, label in chart.y_ticks] == ["0", "5", "10"]
    assert "m-a 10 requests" in chart.description


def test_costs_stay_exact_and_an_empty_window_says_so() -> None:
    chart = line_chart(
        ACTIVITY, "cost_usd", chart_id="cost", title="Cost", unit="USD", exact=lambda v: f"{Decimal(v):f}"
    )
    assert chart.series[0].total == "0.500120"
    assert chart.series[0].total_text == "$0.50012"
    assert format_value(Decimal("1234.5"), "USD") == "$1,234.50"
    empty = Activity(since=0, until=600, bucket_seconds=60, models=[], points=[])
    nothing = line_chart(empty, "requests", chart_id="requests", title="Requests finished", unit="requests")
    assert nothing.empty
    assert "nothing in this window" in nothing.description
