"""The dashboard at `/` in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against a real
`moedb serve` with an API key: it loads without console errors, asks for the key, the load chart has the
logged queries, and a question typed in the box shows its expert, confidences, explanation and passages.
The test saves a screenshot (benches/out/dashboard.png)."""
from __future__ import annotations

import os
import pathlib

import pytest

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (extra test)")
httpx = pytest.importorskip("httpx", reason="the server extra is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium; .ci/run does)", allow_module_level=True)

from serverkit import KEY, auth, make_db, running_server  # noqa: E402

# benches/out/ is the repository's ignored folder of generated outputs
SHOT = pathlib.Path(__file__).resolve().parents[1] / "benches" / "out" / "dashboard.png"
LOGGED = [("refund to my credit card", "billing"), ("rotate my api keys", "security"),
          ("invoice arrived late", "billing"), ("bake bread at home", "cooking")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-dashboard")
    with running_server(make_db(str(d / "experts.db")), log_path=str(d / "server.log")) as url:
        for q, want in LOGGED:  # some load to draw
            r = httpx.post(url + "/v1/route", headers=auth(), json={"query": q, "top_k": 1}, timeout=60).json()
            assert r["experts"][0]["name"] == want
        yield url


def test_dashboard_shows_load_and_routes_a_query(server):
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(server + "/")
            page.wait_for_selector("#key-box:not([hidden])")  # the service needs a key: the page asks for it
            page.fill("#key-input", KEY)
            page.click("#key-form button")
            page.wait_for_selector("#experts-table tbody tr[data-expert='cooking']")
            # the load chart has the logged queries, one line per busy expert, labelled at its end
            chart = page.locator("#load-chart")
            assert int(chart.get_attribute("data-queries")) == len(LOGGED)
            assert int(chart.get_attribute("data-points")) >= 1
            series = {s.get_attribute("data-series") for s in page.locator("#load-chart .load-line").all()}
            assert {"billing", "security", "cooking"} <= series
            labels = page.locator("#load-chart text").all_text_contents()
            assert "billing" in labels
            bars = {b.get_attribute("data-expert") for b in page.locator("#share-chart .share-bar").all()}
            assert {"billing", "security", "cooking"} <= bars
            billing_row = page.locator("#experts-table tr[data-expert='billing']").inner_text()
            assert "50.0%" in billing_row  # 2 of the 4 logged routes
            assert page.locator("[data-figure='queries'] .value").inner_text() == str(len(LOGGED))
            # a question typed in the box shows its expert, confidences, explanation and passages
            page.fill("#query-input", "how do I enable two-factor authentication?")
            page.press("#query-input", "Enter")
            page.wait_for_selector("#route-result .passage")
            experts = page.locator("#route-result .routed-expert").all()
            assert experts[0].get_attribute("data-expert") == "security"
            assert "confidence" in experts[0].inner_text()
            assert "threshold" in page.locator("#route-result .explanation").inner_text()
            first = page.locator("#route-result .passage").first
            assert first.get_attribute("data-expert") == "security"
            assert "two-factor authentication" in first.inner_text()
            page.wait_for_function("document.querySelectorAll('#recent-table tbody tr').length >= 1")
            assert "two-factor" in page.locator("#recent-table tbody tr").first.inner_text()
            SHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SHOT), full_page=True)
        finally:
            browser.close()
    assert SHOT.stat().st_size > 10_000
    assert problems == []
