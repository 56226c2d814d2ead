"""The dashboard: served without a key, shipped as package data, fed by rolling figures in cluster status,
and driven in a real headless Chromium against a controller with two echo workers behind an API key:
the worker rows appear, a killed worker turns offline, the chat box streams an answer. The browser test
saves ``dashboard.png`` in its pytest tmp dir.

Chromium comes from the Debian ``chromium`` package (``make test`` installs it as root). Without it the
browser test is skipped, except in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cdp import Browser, find_chromium
from cluster_harness import Cluster, RunningController, start_controller, wait_until, with_sections, words
from test_accelerator import M2_MAX
from test_model_fleet import ADMIN, fleet
from test_model_host import MIB
from test_monitoring import SpeculatingEcho

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.controller.http.dashboard import load_page
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import SpeculationCounts
from mlxcluster.worker.accelerator import AcceleratorMonitor, IoregProbe

KEY = "sk-dashboard-test"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def keyed(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    """A controller requiring ``KEY`` and two echo workers (40 ms a token, so streaming shows)."""
    config = with_sections(cluster_config, controller={"api_keys": [KEY]})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w-alpha", token_delay_ms=40)
        await cluster.start_worker("w-beta", token_delay_ms=40)
        controller = await cluster.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 2, what="two workers online")
        yield cluster


def controller_of(cluster: Cluster) -> RunningController:
    assert cluster.controller is not None
    return cluster.controller


async def test_page_is_served_without_a_key(keyed: Cluster) -> None:
    controller = controller_of(keyed)
    for path in ("/", "/dashboard"):
        async with controller.session().get(controller.url + path) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
            page = await resp.text()
            assert "<title>mlxcluster</title>" in page and 'id="workers-body"' in page
    async with controller.session().get(controller.url + "/api/cluster/status") as resp:
        assert resp.status == 401  # the API behind it is not


def test_page_is_package_data_and_self_contained() -> None:
    page = load_page().decode()
    assert "<script>" in page and "<style>" in page
    for reference in ("http://", "https://", "//cdn", "src=", "@import"):
        if reference == "http://":  # the SVG namespace is a name, not a request
            page_without_ns = page.replace("http://www.w3.org/2000/svg", "")
            assert reference not in page_without_ns
        else:
            assert reference not in page, reference


async def test_status_has_rolling_figures(keyed: Cluster) -> None:
    controller = controller_of(keyed)
    client = controller.client(api_key=KEY)
    for i in range(3):
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(i + 2)}])
    async with controller.session().get(controller.url + "/api/cluster/status", headers=BEARER) as resp:
        status = await resp.json()
    assert status["requests"]["completed"] == 3 and status["requests"]["errors"] == 0
    assert len(status["recent"]["ttft_ms"]) == 3 and all(v > 0 for v in status["recent"]["ttft_ms"])
    assert len(status["recent"]["tokens_per_second"]) == 3


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; in CI it must be (make test installs it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium, or make test as root)")
    return path


ROWS = "document.querySelectorAll('#workers-body tr.worker')"
ASSISTANT = "document.querySelector('#chat-log .msg.assistant:last-child')"
RECORD_STREAM = """(() => {
    window.__snapshots = [];
    new MutationObserver(() => {
        const el = document.querySelector('#chat-log .msg.assistant:last-child');
        if (el) window.__snapshots.push(el.textContent);
    }).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});
    return true;
})()"""


def row(worker_id: str) -> str:
    return f"document.querySelector('#workers-body tr.worker[data-id=\"{worker_id}\"]')"


async def test_dashboard_in_a_real_browser(keyed: Cluster, chromium: str, tmp_path: Path) -> None:
    controller = controller_of(keyed)
    async with Browser(chromium, tmp_path / "profile") as page:
        await page.goto(controller.url + "/")
        await page.wait_for("document.getElementById('conn').textContent === 'API key required'", what="a 401")

        # The key, entered once, kept in sessionStorage and sent on every call.
        await page.type("#api-key", KEY)
        await page.click("#save-key")
        await page.wait_for(f"{ROWS}.length === 2", what="two worker rows")
        assert await page.evaluate("sessionStorage.getItem('mlxcluster.apiKey')") == KEY
        assert await page.evaluate("document.getElementById('conn').textContent") == "live"
        assert await page.evaluate("document.getElementById('state').textContent") == "ready"
        assert await page.evaluate("document.getElementById('balancer').textContent")
        statuses = await page.evaluate(f"[...{ROWS}].map(r => [r.dataset.id, r.querySelector('.status').textContent])")
        assert statuses == [["w-alpha", "online"], ["w-beta", "online"]]

        # The chat box streams an answer: the echo engine sends the prompt back one word per token.
        prompt = "streaming from a real browser through the cluster and back again"
        await page.wait_for("[...document.getElementById('chat-model').options].some(o => o.value === 'echo')")
        await page.evaluate(RECORD_STREAM)
        await page.type("#chat-input", prompt)
        await page.click("#chat-send")
        await page.wait_for(f"{ASSISTANT} && {ASSISTANT}.classList.contains('finished')", what="the answer")
        assert await page.evaluate(f"{ASSISTANT}.textContent") == prompt
        assert not await page.evaluate(f"{ASSISTANT}.classList.contains('error')")
        partial = await page.evaluate(f"new Set(window.__snapshots.filter(t => t && t !== {prompt!r})).size")
        assert partial >= 3, "the answer should appear word by word, not all at once"
        assert "tokens" in await page.evaluate("document.getElementById('chat-status').textContent")

        # Some traffic for the rates and sparklines.
        client = controller.client(api_key=KEY)
        for i in range(6):
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(i + 3)}])
        await page.wait_for("document.querySelector('#spark-ttft polyline')", what="the TTFT sparkline")
        await page.wait_for("document.getElementById('success-rate').textContent === '100.0 %'", what="success")

        # A killed worker (no drain, no goodbye) turns offline in the table, visibly.
        await keyed.workers["w-beta"].stop(drain=False)
        await page.wait_for(f"{row('w-beta')}.classList.contains('offline')", timeout=10, what="w-beta offline")
        assert await page.evaluate(f"{row('w-beta')}.querySelector('.status').textContent") == "offline"
        assert await page.evaluate(f"{row('w-alpha')}.querySelector('.status').textContent") == "online"
        offline_bg, online_bg = await page.evaluate(
            f"[{row('w-beta')}, {row('w-alpha')}].map(r => getComputedStyle(r.cells[1]).backgroundColor)"
        )
        assert offline_bg != online_bg
        await page.wait_for("document.getElementById('workers-count').textContent === '1 / 2'")

        shot = await page.screenshot(tmp_path / "dashboard.png")
        assert page.exceptions == [], page.exceptions
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")


async def test_dashboard_shows_prompt_cache_and_speculation_figures(
    cluster_config: Config, nats_server: EmbeddedNatsServer, chromium: str, tmp_path: Path
) -> None:
    counts = SpeculationCounts(steps=4, drafted=10, accepted=7)
    async with Cluster(cluster_config) as cluster:
        gpu = AcceleratorMonitor(mlx=False, gpu=IoregProbe(("cat", str(M2_MAX))), interval_s=0.1)
        await cluster.start_worker(
            "w-cache", engine=SpeculatingEcho(counts, models=["echo"], prompt_cache_entries=16), accelerator=gpu
        )
        await cluster.start_worker(  # not speculating, not taking the chats, no GPU figures
            "w-plain", models=["other"], accelerator=AcceleratorMonitor(mlx=False, gpu=None)
        )
        controller = await cluster.start_controller()
        await controller.wait_online("w-cache", "w-plain")
        client = controller.client()
        messages = [{"role": "system", "content": "a long system prompt " * 40}, {"role": "user", "content": "hi"}]
        reply = await client.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content or ""},
            {"role": "user", "content": "and?"},
        ]
        await client.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]

        async def hit_reported() -> bool:
            workers = {w["id"]: w for w in await controller.workers()}
            cache = workers["w-cache"]["prompt_cache"]
            return bool(cache and cache["hits"] == 1)

        await wait_until(hit_reported, what="the cache hit in a heartbeat")
        async with Browser(chromium, tmp_path / "profile") as page:
            await page.goto(controller.url + "/")
            cache_cell = f"{row('w-cache')}.querySelector('.prompt-cache')"
            await page.wait_for(f"{row('w-cache')} && {cache_cell}.textContent.includes('%')", what="the cache cell")
            assert "1 hits" in await page.evaluate(f"{cache_cell}.title")
            speculation_cell = f"{row('w-cache')}.querySelector('.speculation')"
            assert await page.evaluate(f"{speculation_cell}.textContent") == "70 % · 7 / 10"
            assert "in 4 verify steps" in await page.evaluate(f"{speculation_cell}.title")
            await page.wait_for(f"{row('w-plain')}", what="the plain worker's row")
            assert await page.evaluate(f"{row('w-plain')}.querySelector('.speculation').textContent") == "–"
            gpu_cell = f"{row('w-cache')}.querySelector('.accelerator')"
            await page.wait_for(f"{gpu_cell}.textContent.includes('%')", what="the GPU cell")
            assert await page.evaluate(f"{gpu_cell}.textContent") == "63 % · 38 cores"
            assert "Apple M2 Max" in await page.evaluate(f"{gpu_cell}.title")
            assert await page.evaluate(f"{row('w-plain')}.querySelector('.accelerator').textContent") == "–"
            await page.wait_for("document.getElementById('cache-rate').textContent.endsWith('%')", what="the card")
            assert "index" in await page.evaluate("document.getElementById('cache-sub').textContent")
            assert page.exceptions == [], page.exceptions


async def test_dashboard_manages_workers_and_shows_requests(keyed: Cluster, chromium: str, tmp_path: Path) -> None:
    """The worker buttons drain, resume and forget; the requests panel shows a stream live, then finished;
    each worker row shows its hardware and telemetry."""
    controller = controller_of(keyed)
    async with Browser(chromium, tmp_path / "profile") as page:
        await page.goto(controller.url + "/")
        await page.type("#api-key", KEY)
        await page.click("#save-key")
        await page.wait_for(f"{ROWS}.length === 2", what="two worker rows")
        await page.wait_for(f"{row('w-alpha')}.querySelector('.telemetry')", what="telemetry line")
        telemetry = await page.evaluate(f"{row('w-alpha')}.querySelector('.telemetry').textContent")
        assert "Test CPU 9000" in telemetry and "4 cores" in telemetry and "RSS" in telemetry

        await page.click("#workers-body tr.worker[data-id='w-alpha'] button.drain")
        await page.wait_for(f"{row('w-alpha')}.dataset.status === 'draining'", what="w-alpha draining")
        assert controller.ctx.registry.get("w-alpha").status == "draining"  # type: ignore[union-attr]
        await page.click("#workers-body tr.worker[data-id='w-alpha'] button.resume")
        await page.wait_for(f"{row('w-alpha')}.dataset.status === 'online'", what="w-alpha online again")

        client = controller.client(api_key=KEY)
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": words(60)}], stream=True
        )
        chunks = aiter(stream)
        await anext(chunks)
        await page.wait_for(
            "document.querySelector('#inflight-body tr.request.streaming')", what="the stream in flight"
        )
        assert await page.evaluate("document.querySelector('#inflight-body tr.request').cells[1].textContent") == (
            "api_keys[0]"
        )
        async for _ in chunks:
            pass
        await page.wait_for("document.querySelector('#recent-body tr.request.ok')", what="the finished request")
        assert (
            await page.evaluate("document.querySelector('#recent-body tr.request.ok').cells[9].textContent") == "stop"
        )

        # a second controller joins: the page (on the first) shows the tier and the request served by the second
        second = await start_controller(keyed.config)
        try:
            await wait_until(lambda: second.ctx.registry.stats().online == 2, what="the second sees the workers")
            await second.client(api_key=KEY).chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "via the second"}]
            )
            served = (
                f"document.querySelector('#recent-body tr.request[data-controller=\"{second.ctx.controller_id}\"]')"
            )
            await page.wait_for(served, timeout=10, what="the second controller's request")
            assert "2 controllers" in await page.evaluate("document.getElementById('requests-note').textContent")
            await page.wait_for(
                "document.getElementById('controller-meta').textContent.includes('(1 of 2 controllers)')",
                timeout=10,
                what="the tier in the header",
            )
        finally:
            await second.stop()

        await keyed.workers["w-beta"].stop(drain=False)
        await page.wait_for(f"{row('w-beta')}.dataset.status === 'offline'", timeout=10, what="w-beta offline")
        await page.evaluate("window.confirm = () => true")
        await page.click("#workers-body tr.worker[data-id='w-beta'] button.forget")
        await page.wait_for(f"!{row('w-beta')}", what="w-beta forgotten")
        assert "w-beta" not in controller.ctx.registry
        await page.screenshot(tmp_path / "dashboard-ops.png")
        assert page.exceptions == [], page.exceptions


def model_cell(model: str, worker: str = "w1") -> str:
    return f'document.querySelector(\'#models-body tr.model[data-model="{model}"] td[data-worker="{worker}"]\')'


async def test_dashboard_models_panel_loads_and_unloads(
    cluster_config: Config, bus: Bus, chromium: str, tmp_path: Path
) -> None:
    """The Models panel against the real worker role (echo engines over model dirs of 4, 4 and 20 MiB, a 10 MiB
    budget): the grid shows the catalogue, Load and Unload change a cell and the memory bar, a model larger than
    the budget shows the 409's reason in the panel, and the chat's select marks models not loaded."""
    async with fleet(cluster_config, tmp_path) as controller, Browser(chromium, tmp_path / "profile") as page:
        await page.goto(controller.url + "/")
        await page.type("#api-key", ADMIN)
        await page.click("#save-key")
        await page.wait_for("document.querySelectorAll('#models-body tr.model').length === 3", what="three rows")
        rows = await page.evaluate("[...document.querySelectorAll('#models-body tr.model')].map(r => r.dataset.model)")
        assert rows == ["a", "b", "big"]
        states = await page.evaluate(
            "[...document.querySelectorAll('#models-body td[data-worker=w1]')].map(c => c.dataset.state)"
        )
        assert states == ["available"] * 3
        assert await page.evaluate("document.querySelectorAll('#models-body button.unload').length") == 0
        membar = "document.querySelector('.membar[data-worker=w1]')"
        assert await page.evaluate(f"{membar}.getAttribute('data-budget_bytes')") == str(10 * MIB)
        assert await page.evaluate(f"{membar}.getAttribute('data-weights_bytes')") == "0"
        await page.wait_for("document.querySelector('#chat-model option[value=a]')", what="a in the chat's select")
        assert await page.evaluate("document.querySelector('#chat-model option[value=a]').textContent") == (
            "a (not loaded)"
        )

        await page.click("#models-body tr.model[data-model='a'] td[data-worker='w1'] button.load")
        await page.wait_for(f"{model_cell('a')}.dataset.state === 'loaded'", what="a loaded on w1")
        details = await page.evaluate(f"{model_cell('a')}.querySelector('.details').textContent")
        assert "4.0 MB" in details and "unloads in" in details
        await page.wait_for(f"{membar}.getAttribute('data-weights_bytes') === '{4 * MIB}'", what="a's weights")
        assert "4.0 MB" in await page.evaluate(f"{membar}.querySelector('.legend').textContent")
        assert await page.evaluate("document.getElementById('models-message').className") == "models-message ok"
        await page.wait_for(
            "document.querySelector('#chat-model option[value=a]').textContent === 'a'", what="a loaded in the select"
        )

        await page.click("#models-body tr.model[data-model='a'] td[data-worker='w1'] button.unload")
        await page.wait_for(f"{model_cell('a')}.dataset.state === 'available'", what="a unloaded")
        await page.wait_for(f"{membar}.getAttribute('data-weights_bytes') === '0'", what="the weights freed")

        await page.click("#models-body tr.model[data-model='big'] td[data-worker='w1'] button.load")
        message = "document.getElementById('models-message')"
        await page.wait_for(f"{message}.classList.contains('error') && !{message}.hidden", what="the 409 reason")
        text = await page.evaluate(f"{message}.textContent")
        assert "Model 'big' cannot be loaded" in text and "needs" in text, text
        assert await page.evaluate(f"{model_cell('big')}.dataset.state") == "available"
        assert await page.evaluate(f"{model_cell('big')}.querySelector('button.load').disabled") is False
        await page.screenshot(tmp_path / "dashboard-models.png")
        assert page.exceptions == [], page.exceptions
