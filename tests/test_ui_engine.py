"""The web page's Engine page in a real browser (tests/ui_support.py): /metrics read every
few seconds while shown (and only then), cards and charts that move with real traffic, the
resident models from /api/ps, a visible error that keeps trying, pause and resume; and the
Prometheus text parser (js/prom.js) run in the browser."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.ui_support import tiny_registry, ui_session


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]):
    return tiny_registry(tmp_path / "registry", tiny_models, tmp_path)


def _count_metrics(page) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if r.url.endswith("/metrics") else None)
    return seen


async def test_engine_page_moves_with_traffic_and_polls_only_when_shown(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        seen = _count_metrics(page)
        await ui.open("engine")
        await expect(page.locator("#engine-charts svg.chart")).to_have_count(4)
        await expect(page.locator("#engine-figures .card")).to_have_count(7)
        await expect(page.locator("#engine-tokens")).to_have_text("0")
        await expect(page.locator("#engine-ps-empty")).to_be_visible()
        await expect(page.locator("#engine-interval")).to_have_value("3")
        await page.select_option("#engine-interval", "1")

        r = await ui.http.post(
            "/api/generate",
            json={
                "model": "tiny",
                "prompt": "Once upon a time",
                "stream": False,
                "options": {"num_predict": 32},
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["eval_count"] >= 2
        await expect(page.locator("#engine-tokens")).to_have_text(re.compile(r"^[1-9]\d*$"))
        await expect(page.locator("#engine-rate-note")).to_have_text(
            re.compile(r"peak (0\.\d*[1-9]|[1-9][\d.]*) tokens/s")
        )
        await expect(page.locator("#engine-finished")).to_have_text(re.compile(r"^[1-9]"))
        await expect(page.locator("#engine-ttft-note")).to_contain_text(" ms")
        await expect(page.locator("#engine-ps-body tr")).to_have_count(1)
        await expect(page.locator("#engine-ps-body tr td").first).to_contain_text("tiny")
        await expect(page.locator("#engine-ps-empty")).to_be_hidden()
        await expect(page.locator("#engine-models")).to_have_text("1")
        await expect(page.locator("#engine-rate-chart path.line")).to_have_count(1)
        await ui.shot("engine")

        # polls every second while shown...
        before = len(seen)
        await asyncio.sleep(2.5)
        assert len(seen) - before >= 2, seen
        # ...not at all on another page
        await page.click("nav a[data-page=chat]")
        await expect(page.locator("#page-engine")).to_be_hidden()
        await asyncio.sleep(0.3)  # a read already on its way may land
        before = len(seen)
        await asyncio.sleep(3)
        assert len(seen) == before, seen[before:]
        # back on the page it reads again at once
        async with page.expect_request(lambda r: r.url.endswith("/metrics")):
            await page.click("nav a[data-page=engine]")

        # paused from the keyboard: no reads until resumed
        await page.focus("#engine-pause")
        await page.keyboard.press("Enter")
        await expect(page.locator("#engine-pause")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator("#engine-status")).to_have_text("Paused")
        await asyncio.sleep(0.3)
        before = len(seen)
        await asyncio.sleep(2.5)
        assert len(seen) == before, seen[before:]
        async with page.expect_request(lambda r: r.url.endswith("/metrics")):
            await page.keyboard.press("Enter")
        await expect(page.locator("#engine-pause")).to_have_text("Pause")


async def test_engine_error_shown_and_retried_on_a_narrow_screen(registry) -> None:
    async with ui_session(registry, width=380, height=800) as ui:
        page = ui.page
        await page.route("**/metrics", lambda route: route.fulfill(status=500, body="boom"))
        await ui.open("engine")
        error = page.locator("#engine-error")
        await expect(error).to_be_visible()
        await expect(error).to_contain_text("boom")
        await expect(error).to_contain_text("trying again")
        await page.unroute("**/metrics")
        await page.select_option("#engine-interval", "1")
        await expect(error).to_be_hidden()
        await expect(page.locator("#engine-tokens")).to_have_text("0")
        # one column, nothing wider than the screen
        wide = await page.evaluate(
            "() => { const s = document.getElementById('page-engine');"
            " return [s.scrollWidth, s.clientWidth]; }"
        )
        assert wide[0] <= wide[1], wide
        boxes = [await c.bounding_box() for c in await page.locator("#engine-charts .card").all()]
        assert len({round(b["x"]) for b in boxes}) == 1, boxes
        await ui.shot("engine-narrow")


METRICS = r"""# HELP ocs_generated_tokens_total Tokens generated
# TYPE ocs_generated_tokens_total counter
ocs_generated_tokens_total 42.0
ocs_generated_tokens_created 1.7e9
# a comment of our own

ocs_finished_requests_total{reason="stop"} 3
ocs_finished_requests_total{reason="length",model="say \"hi\", a\\b\nc"} 2 1700000000000
ocs_queue_length NaN
ttft_bucket{le="0.1"} 1
ttft_bucket{le="+Inf"} 4
ttft_bucket{le="0.5"} 3
ttft_count 4
x{a="}",b="{"} -Inf
"""


async def test_prometheus_parser_in_the_browser(registry) -> None:
    async with ui_session(registry) as ui:
        page = ui.page
        await ui.open("engine")
        samples = await page.evaluate(
            "(text) => import('/ui/js/prom.js').then((m) => m.parse(text))", METRICS
        )
        by = [(s["name"], s["labels"]) for s in samples]
        assert ("ocs_generated_tokens_total", {}) in by
        assert samples[0]["value"] == 42.0 and samples[1]["value"] == 1.7e9
        assert samples[2] == {
            "name": "ocs_finished_requests_total",
            "labels": {"reason": "stop"},
            "value": 3,
        }
        assert samples[3]["labels"] == {"reason": "length", "model": 'say "hi", a\\b\nc'}
        assert samples[3]["value"] == 2  # the timestamp is not the value
        assert math.isnan(samples[4]["value"])
        inf = next(s for s in samples if s["labels"].get("le") == "+Inf")
        assert inf["value"] == 4
        assert samples[-1] == {"name": "x", "labels": {"a": "}", "b": "{"}, "value": -math.inf}
        assert len(samples) == 10  # comments, HELP / TYPE and the blank line skipped
        figures = await page.evaluate(
            """(text) => import('/ui/js/prom.js').then((m) => {
                const s = m.parse(text);
                const b = m.buckets(s, 'ttft');
                return {
                    le: b.map((x) => x.le),
                    p50: m.quantile(0.5, b),
                    p99: m.quantile(0.99, b),
                    delta: m.bucketDelta(b, [{le: 0.1, count: 1}, {le: 0.5, count: 1},
                                             {le: Infinity, count: 1}]).map((x) => x.count),
                    restarted: m.bucketDelta(b, [{le: 0.1, count: 9}]).map((x) => x.count),
                    finished: m.byLabel(s, 'ocs_finished_requests_total', 'reason'),
                    total: m.total(s, 'ocs_finished_requests_total'),
                    none: m.quantile(0.5, []),
                };
            })""",
            METRICS,
        )
        assert figures["le"] == [0.1, 0.5, math.inf]  # sorted, +Inf last
        assert figures["p50"] == pytest.approx(0.1 + 0.4 * (2 - 1) / (3 - 1))
        assert figures["p99"] == 0.5  # in the +Inf bucket: the highest finite bound
        assert figures["delta"] == [0, 2, 3]
        assert figures["restarted"] == [1, 3, 4]
        assert figures["finished"] == {"stop": 3, "length": 2}
        assert figures["total"] == 5
        assert figures["none"] is None


async def test_engine_page_with_a_key(registry) -> None:
    async with ui_session(registry, api_key="s3cret-key") as ui:
        page = ui.page
        await ui.open("engine")
        dialog = page.locator("#key-dialog")
        await dialog.wait_for(state="visible")  # asked once for both reads
        await page.keyboard.press("Escape")  # no key: the page pauses instead of asking again
        await expect(page.locator("#engine-error")).to_contain_text("resume to try again")
        await expect(page.locator("#engine-pause")).to_have_attribute("aria-pressed", "true")
        await expect(dialog).to_be_hidden()
        await page.click("#engine-pause")  # resume: asked again
        await dialog.wait_for(state="visible")
        await page.fill("#key-input", "s3cret-key")
        await page.press("#key-input", "Enter")
        await dialog.wait_for(state="hidden")
        await expect(page.locator("#engine-tokens")).to_have_text("0")
        await expect(page.locator("#engine-error")).to_be_hidden()
        await expect(page.locator("#engine-status")).to_contain_text("Updated")
