"""The dashboard's rules over HTTP, against a live ``tokenmill api`` (no workers): the session
cookie and its flags, the key never in a URL or a page, CSRF checks on login and logout, the
security headers, tenants apart and what an operator sees. The browser test
(``test_dashboard_browser``) drives the same pages in chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from tests import services
from tests.api.conftest import api_env, start_api, stop_api, submit_batch
from tests.cluster import run_cli

COOKIE = "__Host-tokenmill-session"
HOSTILE = "<script>document.title='pwned'</script>"


@dataclass
class Dashboard:
    root: str
    keys: dict[str, str]  # tenant -> API key

    def login(self, tenant: str, **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.root}/ui/login",
            data={"api_key": self.keys[tenant]},
            headers={"Origin": self.root, **headers},
        )

    def session(self, tenant: str) -> dict[str, str]:
        """The Cookie header of a fresh login of ``tenant``."""
        answer = self.login(tenant)
        assert answer.status_code == 303, answer.text
        return {"Cookie": f"{COOKIE}={cookie_value(answer)}"}

    def batch(self, tenant: str, metadata: dict[str, str], lines: int = 2) -> str:
        line = {
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
        }
        return submit_batch(
            self.root,
            self.keys[tenant],
            [{"custom_id": f"{HOSTILE}-{i}", **line} for i in range(lines)],
            metadata,
        )


def cookie_value(answer: httpx.Response) -> str:
    found = re.search(rf"{COOKIE}=([^;]+)", answer.headers["set-cookie"])
    assert found, answer.headers
    return found.group(1)


@pytest.fixture(scope="module")
def dashboard(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    tmp_path = tmp_path_factory.mktemp("dashboard")
    with services.fresh_postgres_database() as postgres_url:
        broker_url = services.private_database_url(redis_url, "api")
        broker = redis.Redis.from_url(broker_url)
        broker.flushdb()
        env = api_env(
            postgres_url,
            broker_url,
            tmp_path,
            TOKENMILL_DASHBOARD_OPERATOR_TENANTS='["ops"]',
            TOKENMILL_FLOWER_URL="https://flower.example/",
        )
        assert run_cli(env, "db", "upgrade").returncode == 0
        keys = {}
        for tenant in ("acme", "globex", "ops", "probe"):
            made = run_cli(env, "keys", "create", tenant)
            assert made.returncode == 0, made.stderr
            keys[tenant] = made.stdout.strip()
        process, root = start_api(env, tmp_path / "api.log")
        try:
            yield Dashboard(root, keys)
        finally:
            stop_api(process)
            broker.flushdb()
            broker.close()
            log = (tmp_path / "api.log").read_text()
            # The access log lists every URL asked for: no key is ever in one (but the probe's,
            # which a test puts in a URL on purpose).
            for tenant, key in keys.items():
                assert tenant == "probe" or key not in log


def test_login_sets_a_strict_session_cookie_and_never_shows_the_key(dashboard: Dashboard) -> None:
    assert httpx.get(f"{dashboard.root}/ui").headers["location"] == "/ui/login"
    answer = dashboard.login("acme")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui"
    set_cookie = answer.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag.lower() in set_cookie.lower()
    assert dashboard.keys["acme"] not in set_cookie
    assert "Domain" not in set_cookie  # a __Host- cookie is this host's only
    page = httpx.get(f"{dashboard.root}/ui", headers={"Cookie": f"{COOKIE}={cookie_value(answer)}"})
    assert page.status_code == 200
    assert dashboard.keys["acme"] not in page.text
    # A key in the URL logs nobody in: the form posts it.
    by_url = httpx.get(f"{dashboard.root}/ui/login", params={"api_key": dashboard.keys["probe"]})
    assert "set-cookie" not in by_url.headers
    assert by_url.status_code == 200  # the login form, again
    wrong = httpx.post(
        f"{dashboard.root}/ui/login", data={"api_key": "tm-wrong"}, headers={"Origin": dashboard.root}
    )
    assert wrong.status_code == 401
    assert "set-cookie" not in wrong.headers
    assert "tm-wrong" not in wrong.text


def test_every_page_has_a_strict_content_security_policy(dashboard: Dashboard) -> None:
    cookie = dashboard.session("acme")
    batch_id = dashboard.batch("acme", {"n": "1"})
    for path in (
        "/ui/login",
        "/ui",
        "/ui/batches",
        f"/ui/batches/{batch_id}",
        f"/ui/progress?batch={batch_id}",
    ):
        answer = httpx.get(f"{dashboard.root}{path}", headers=cookie if path != "/ui/login" else {})
        assert answer.status_code == 200, (path, answer.text)
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
        assert "<script>" not in answer.text.replace(
            '<script src="/ui/static/dashboard.js" defer></script>', ""
        )


def test_login_and_logout_from_another_site_are_refused(dashboard: Dashboard) -> None:
    forged = dashboard.login("acme", Origin="https://evil.example")
    assert forged.status_code == 403
    assert "set-cookie" not in forged.headers
    no_origin = httpx.post(f"{dashboard.root}/ui/login", data={"api_key": dashboard.keys["acme"]})
    assert no_origin.status_code == 403

    cookie = dashboard.session("acme")
    for headers, form in (
        ({"Origin": "https://evil.example"}, {"csrf_token": "x"}),
        ({"Origin": dashboard.root}, {"csrf_token": "not-the-token"}),
        ({"Origin": dashboard.root}, {}),
    ):
        refused = httpx.post(f"{dashboard.root}/ui/logout", data=form, headers={**cookie, **headers})
        assert refused.status_code == 403
        assert httpx.get(f"{dashboard.root}/ui", headers=cookie).status_code == 200  # still logged in

    page = httpx.get(f"{dashboard.root}/ui", headers=cookie).text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found
    out = httpx.post(
        f"{dashboard.root}/ui/logout",
        data={"csrf_token": found.group(1)},
        headers={**cookie, "Origin": dashboard.root},
    )
    assert out.status_code == 303
    assert out.headers["location"] == "/ui/login"
    assert "Max-Age=0" in out.headers["set-cookie"] or "expires=" in out.headers["set-cookie"].lower()
    # The session is gone on the server: the copied cookie no longer works.
    assert httpx.get(f"{dashboard.root}/ui", headers=cookie).headers["location"] == "/ui/login"
    assert httpx.get(f"{dashboard.root}/ui/progress", headers=cookie).status_code == 401


def test_a_tenant_sees_its_own_batches_and_an_operator_every_one(dashboard: Dashboard) -> None:
    mine = dashboard.batch("acme", {"owner": "acme-only"})
    theirs = dashboard.batch("globex", {"owner": "globex-secret"})
    acme, ops = dashboard.session("acme"), dashboard.session("ops")

    listing = httpx.get(f"{dashboard.root}/ui/batches", headers=acme).text
    assert mine in listing
    assert theirs not in listing
    assert "globex-secret" not in httpx.get(f"{dashboard.root}/ui", headers=acme).text
    unknown = httpx.get(f"{dashboard.root}/ui/batches/{theirs}", headers=acme)
    never = httpx.get(f"{dashboard.root}/ui/batches/batch_0000000000000000000000000000000", headers=acme)
    assert unknown.status_code == never.status_code == 404
    polled = httpx.get(f"{dashboard.root}/ui/progress", params={"batch": [mine, theirs]}, headers=acme).json()
    assert [b["id"] for b in polled["data"]] == [mine]
    overview = httpx.get(f"{dashboard.root}/ui", headers=acme).text
    assert "flower.example" not in overview  # Flower is the operators'
    assert 'aria-label="Workers"' not in overview

    every = httpx.get(f"{dashboard.root}/ui/batches", headers=ops).text
    assert mine in every
    assert theirs in every
    assert httpx.get(f"{dashboard.root}/ui/batches/{theirs}", headers=ops).status_code == 200
    polled = httpx.get(f"{dashboard.root}/ui/progress", params={"batch": [mine, theirs]}, headers=ops).json()
    assert [b["id"] for b in polled["data"]] == [mine, theirs]
    overview = httpx.get(f"{dashboard.root}/ui", headers=ops).text
    assert 'href="https://flower.example/"' in overview
    assert 'aria-label="Workers"' in overview


def test_tenant_strings_are_escaped_in_every_page(dashboard: Dashboard) -> None:
    batch_id = dashboard.batch("acme", {"note": HOSTILE, "<b>key</b>": "x"})
    for tenant in ("acme", "ops"):
        cookie = dashboard.session(tenant)
        for path in ("/ui", "/ui/batches", f"/ui/batches/{batch_id}"):
            text = httpx.get(f"{dashboard.root}{path}", headers=cookie).text
            assert HOSTILE not in text
            assert "<b>key</b>" not in text
            assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in text


def test_bad_parameters_get_a_named_error_not_a_crash(dashboard: Dashboard) -> None:
    cookie = dashboard.session("acme")
    too_many = {"batch": [f"batch_{i}" for i in range(101)]}
    for path, params in (
        ("/ui", {"window": "10y"}),
        ("/ui/batches", {"after": "<x>"}),
        ("/ui/progress", too_many),
    ):
        refused = httpx.get(f"{dashboard.root}{path}", params=params, headers=cookie)
        assert refused.status_code == 400, (path, refused.text)
        assert refused.json()["error"]["param"], refused.text  # names what was wrong
    assert httpx.get(f"{dashboard.root}/ui/static/../app.py", headers=cookie).status_code == 404
    assert httpx.get(f"{dashboard.root}/ui/static/pages.py", headers=cookie).status_code == 404
