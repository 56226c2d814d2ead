"""A headless Chromium driven over the Chrome DevTools Protocol with aiohttp's WebSocket client.

Just what the dashboard test needs: load a page, evaluate JavaScript, type, click with real input
events, take a full-page screenshot. The browser runs in its own process group and profile directory
and is killed, with all its children, on exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 15.0


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or ``None``."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class CdpError(Exception):
    """A CDP call failed, or the page threw."""


class Browser:
    """One headless Chromium with one page; ``async with Browser(path, tmp_dir) as page: ...``."""

    def __init__(self, executable: str, profile_dir: Path, *, width: int = 1360, height: int = 900) -> None:
        self.executable = executable
        self.profile_dir = profile_dir
        self.width = width
        self.height = height
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.exceptions: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        log = (self.profile_dir / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                f"--window-size={self.width},{self.height}",
                f"--user-data-dir={self.profile_dir}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as one on close
        )
        log.close()
        port = await self._debugging_port()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        page_ws = await self._page_ws_url(port)
        self.ws = await self.session.ws_connect(page_ws, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def _debugging_port(self) -> int:
        """Chromium writes the port it chose to ``DevToolsActivePort`` in the profile directory."""
        active = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}: {self._log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(active.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise CdpError(f"chromium did not open its debugging port in {START_TIMEOUT_S}s: {self._log_tail()}")

    async def _page_ws_url(self, port: int) -> str:
        assert self.session is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    pages = [t for t in await resp.json() if t.get("type") == "page"]
                    if pages:
                        return pages[0]["webSocketDebuggerUrl"]
            await asyncio.sleep(0.05)
        raise CdpError("chromium opened no page")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.profile_dir / "chromium.log").read_text(errors="replace")[-2000:]
        return ""

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result."""
        assert self.ws is not None
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer["result"]

    # --- page helpers ---------------------------------------------------------------------------

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", what=url)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0, what: str = "") -> None:
        """Poll ``expression`` until it is truthy; fail with the page's state after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if await self.evaluate(f"!!({expression})"):  # a DOM node comes back by value as {}
                return
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}; page:\n{body}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()"""
        )
        if box is None:
            raise CdpError(f"no element {selector}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input."""
        focused = await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
            "if (!el) return false; el.focus(); return document.activeElement === el; })()"
        )
        if not focused:
            raise CdpError(f"cannot focus {selector}")
        await self.call("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page."""
        metrics = await self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # the browser, or helpers that outlived it
                os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 5)
