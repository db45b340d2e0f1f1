"""The dashboard in a real headless browser: Debian's ``chromium`` driven by Playwright, against a
live ``tokenmill api``, a worker and the simulator. Logs in with a key, watches a running batch's
progress bar move, reads the charts and figures and finds them equal to the ledger, checks that a
hostile tenant's strings run nowhere (their own view, the operator's), that another tenant's batch
is not visible, and logs out. Screenshots are kept in ``test-artifacts/dashboard/`` (git-ignored;
the path is printed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import store
from tests.api.conftest import start_api, stop_api, submit_batch
from tests.cluster import ROOT, Cluster, run_cli

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
MODEL = "gpt-4o-mini"  # priced in the seeded table, so the cost chart has a figure
# Strings a hostile tenant chooses; any of them running sets window.__xss.
HOSTILE_METADATA = "<script>window.__xss='metadata'</script>"
HOSTILE_CUSTOM_ID = "<img src=x onerror=\"window.__xss='custom_id'\">"
HOSTILE_MODEL = "<svg onload=\"window.__xss='model'\">"


@dataclass
class Deployment:
    root: str
    keys: dict[str, str]
    database_url: str

    def submit(self, tenant: str, lines: list[dict[str, Any]], metadata: dict[str, str] | None = None) -> str:
        return submit_batch(self.root, self.keys[tenant], lines, metadata)


def chat(custom_id: str, content: str, model: str = MODEL) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 20},
    }


@pytest.fixture
def deployment(cluster: Callable[..., Cluster], tmp_path: Path) -> Iterator[Deployment]:
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    c.env["TOKENMILL_DASHBOARD_OPERATOR_TENANTS"] = '["ops"]'
    c.env["TOKENMILL_FLOWER_URL"] = "http://127.0.0.1:5555/"
    migrated = run_cli(c.env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    keys = {}
    for tenant in ("acme", "globex", "ops"):
        made = run_cli(c.env, "keys", "create", tenant)
        assert made.returncode == 0, made.stderr
        keys[tenant] = made.stdout.strip()
    # Few requests in flight, so that a batch of slow answers takes seconds to run.
    c.worker("w1", concurrency=4)
    process, root = start_api(c.env, tmp_path / "api.log")
    try:
        yield Deployment(root, keys, c.settings.database_url)
    finally:
        stop_api(process)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh chromium profile; fails (never skips) when Debian's chromium is missing."""
    if not CHROMIUM.exists():
        pytest.fail(f"Debian's chromium is needed at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def screenshots(request: pytest.FixtureRequest) -> Iterator[Callable[[Any, str], None]]:
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    taken: list[str] = []

    def shoot(page: Any, name: str) -> None:
        page.screenshot(path=str(folder / f"{len(taken):02d}-{name}.png"), full_page=True)
        taken.append(name)

    yield shoot
    print(f"\ndashboard screenshots: {folder}")


def log_in(page: Any, root: str, key: str) -> None:
    page.goto(f"{root}/ui")
    assert page.url == f"{root}/ui/login"
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{root}/ui")


def test_a_tenant_watches_its_batch_and_reads_the_ledgers_figures(
    deployment: Deployment, browser: Any, screenshots: Callable[[Any, str], None]
) -> None:
    root = deployment.root
    # The globex batch first: it must never show in acme's pages.
    theirs = deployment.submit("globex", [chat("g0", "globex question")], {"owner": "globex-secret"})
    slow = [chat(f"slow-{i}", f"question {i} [[delay 0.4]]") for i in range(48)]
    hostile = [
        chat(HOSTILE_CUSTOM_ID, "refused [[status 400]]"),
        chat("hostile-model", "any", model=HOSTILE_MODEL),
    ]
    mine = deployment.submit("acme", slow + hostile, {"note": HOSTILE_METADATA})

    page = browser.new_page()
    visited: list[str] = []
    page.on("request", lambda request: visited.append(request.url))
    policy_violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            policy_violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    page.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message}"))

    log_in(page, root, deployment.keys["acme"])
    (cookie,) = [c for c in browser.cookies() if c["name"] == "__Host-tokenmill-session"]
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
    screenshots(page, "overview-after-login")

    # The running batch: its bar moves while we watch, to the end.
    page.goto(f"{root}/ui/batches/{mine}")
    bar = f'tr[data-progress-batch="{mine}"] progress'
    first = int(page.eval_on_selector(bar, "bar => bar.value"))
    total = int(page.eval_on_selector(bar, "bar => bar.max"))
    assert (first, total) < (len(slow), len(slow) + len(hostile)), "the batch ended before it was watched"
    page.wait_for_function(
        "([selector, first]) => document.querySelector(selector).value > first",
        arg=[bar, first],
        timeout=60_000,
    )
    moved = int(page.eval_on_selector(bar, "bar => bar.value"))
    assert first < moved
    screenshots(page, "batch-running")
    page.wait_for_function(
        "id => document.querySelector(`tr[data-progress-batch='${id}']`).dataset.status === 'completed'",
        arg=mine,
        timeout=90_000,
    )
    assert int(page.eval_on_selector(bar, "bar => bar.value")) == total
    assert page.inner_text(f'tr[data-progress-batch="{mine}"] [data-field="status"]') == "completed"

    # Its first errors, escaped: the hostile custom_id is text, not an element.
    page.reload()
    errors = page.locator("table.errors tbody tr")
    assert errors.count() >= 1
    assert HOSTILE_CUSTOM_ID in page.inner_text("table.errors")
    assert HOSTILE_METADATA in page.inner_text("dl.metadata")
    screenshots(page, "batch-completed-with-errors")

    # A few lines again: cache hits, so the hit rate has something to show.
    again = deployment.submit("acme", slow[:6])
    page.goto(f"{root}/ui/batches/{again}")
    page.wait_for_function(
        "id => document.querySelector(`tr[data-progress-batch='${id}']`).dataset.status === 'completed'",
        arg=again,
        timeout=60_000,
    )

    # The overview: charts and figures equal to the ledger's.
    page.goto(f"{root}/ui")
    ledger = ledger_figures(deployment.database_url, "acme")
    requests_series = page.locator(f'svg[data-chart="requests"] g.series[data-model="{MODEL}"]')
    assert int(requests_series.get_attribute("data-total") or "-1") == ledger["requests_by_model"][MODEL]
    points = page.locator(f'svg[data-chart="requests"] g.series[data-model="{MODEL}"] circle')
    assert (
        sum(int(v) for v in points.evaluate_all("cs => cs.map(c => c.dataset.value)"))
        == (ledger["requests_by_model"][MODEL])
    )
    assert (page.locator('svg[data-chart="requests"] > title').text_content() or "").startswith(
        "Requests finished"
    )
    cost = Decimal(page.get_attribute('[data-figure="cost"]', "data-value") or "-1")
    assert cost == ledger["cost"]
    assert cost > 0
    cost_series = page.locator(f'svg[data-chart="cost"] g.series[data-model="{MODEL}"]')
    assert Decimal(cost_series.get_attribute("data-total") or "-1") == ledger["cost_by_model"][MODEL]
    assert int(page.inner_text('[data-figure="requests"]')) == ledger["requests"]
    hits = int(page.get_attribute('[data-figure="cache-hit-rate"]', "data-cache-hits") or "-1")
    assert hits == ledger["cache_hits"]
    assert hits >= 6
    assert page.inner_text('[data-figure="cache-hit-rate"]') == f"{hits / ledger['requests']:.1%}"
    # The hostile model name is a series' name, as text.
    assert (
        page.locator(f'svg[data-chart="requests"] g.series[data-model={json.dumps(HOSTILE_MODEL)}]').count()
        == 1
    )
    assert HOSTILE_MODEL in page.inner_text("#chart-requests figcaption")
    # Tenants apart: nothing of globex's here or in the list, and its page is an unknown batch.
    assert theirs not in page.content()
    assert page.locator('[aria-label="Workers"]').count() == 0
    screenshots(page, "overview-with-charts")
    page.goto(f"{root}/ui/batches")
    assert mine in page.content()
    assert theirs not in page.content()
    missing = page.goto(f"{root}/ui/batches/{theirs}")
    assert missing is not None
    assert missing.status == 404
    assert "globex-secret" not in page.content()

    assert page.evaluate("window.__xss") is None
    assert page.locator("script").count() == 1  # ours, from this origin
    assert policy_violations == []

    # Log out: the cookie is gone, and the session with it (a copy of the cookie opens nothing).
    page.goto(f"{root}/ui")
    page.click("form.logout button")
    page.wait_for_url(f"{root}/ui/login")
    assert [c for c in browser.cookies() if c["name"] == "__Host-tokenmill-session"] == []
    browser.add_cookies([cookie])
    page.goto(f"{root}/ui")
    assert page.url == f"{root}/ui/login"
    screenshots(page, "logged-out")

    # The key never went into a URL.
    assert not [url for url in visited if deployment.keys["acme"] in url]

    # The operator sees every tenant's batches, the workers and Flower, and the hostile strings
    # as text in their own browser too.
    log_in(page, root, deployment.keys["ops"])
    assert page.locator('[aria-label="Workers"]').count() == 1
    assert page.get_attribute('a[data-link="flower"]', "href") == "http://127.0.0.1:5555/"
    page.goto(f"{root}/ui/batches")
    assert mine in page.content()
    assert theirs in page.content()
    assert HOSTILE_METADATA in page.inner_text("table.batches")
    page.goto(f"{root}/ui/batches/{mine}")
    assert HOSTILE_CUSTOM_ID in page.inner_text("table.errors")
    page.goto(f"{root}/ui")
    assert HOSTILE_MODEL in page.inner_text("#chart-requests figcaption")
    screenshots(page, "operator-overview")
    assert page.evaluate("window.__xss") is None
    assert policy_violations == []


def ledger_figures(database_url: str, tenant_id: str) -> dict[str, Any]:
    """What the ledger says of the tenant's last hour: results per model, cost, cache hits."""
    engine = store.make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(store.Result.model, sa.func.count())
                .where(store.Result.tenant_id == tenant_id)
                .group_by(store.Result.model)
            ).all()
            hits = conn.execute(
                sa.select(sa.func.count()).where(
                    store.Result.tenant_id == tenant_id, store.Result.cached.is_(True)
                )
            ).scalar_one()
        usage = store.usage_report(engine, tenant_id, group_by=("model",))
    finally:
        engine.dispose()
    return {
        "requests_by_model": {model: int(count) for model, count in rows},
        "requests": sum(int(count) for _, count in rows),
        "cache_hits": int(hits),
        "cost": sum((row.cost_usd for row in usage), Decimal(0)),
        "cost_by_model": {row.model: row.cost_usd for row in usage},
    }
