"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, installed with MLflow): open a
page, run JavaScript in it, take a screenshot. For the tests that look at the MLflow UI and the report as a person
would, and for screenshots: `python tests/browser.py URL out.png [--width 1600 --height 1000] [--wait 8]`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab of a headless Chromium; every method waits for its answer."""

    def __init__(self, width: int = 1600, height: int = 1000):
        # Chromium's helper processes (renderer, crashpad) can still write into the profile after the main one
        # exits: they run in their own process group so close() can end them all before the folder is removed.
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={self.profile.name}",
                                      "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 300  # fails at once if chromium exits; the bound is for a hang
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = port_file.read_text().split("\n")[0]
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect(port))
        self.ids = 0

    async def _connect(self, port: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self.ids += 1
        await self.ws.send_str(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.ids:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 300.0):
        """Poll a JavaScript expression until it is truthy (the page's own progress, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page never satisfied: {expression}")

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue
            break
        # A helper can outlive the main process by a moment; retry until the folder stays removed.
        for _ in range(50):
            shutil.rmtree(self.profile.name, ignore_errors=True)
            if not Path(self.profile.name).exists():
                break
            time.sleep(0.1)
        self.profile.cleanup()

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=8.0, help="seconds to let the page render")
    parser.add_argument("--js", action="append", default=[], help="JavaScript to run after loading (repeatable)")
    args = parser.parse_args()
    with Page(args.width, args.height) as page:
        page.goto(args.url)
        time.sleep(args.wait)
        for expression in args.js:
            page.js(expression)
            time.sleep(2)
        print(page.screenshot(args.out))


if __name__ == "__main__":
    main()
