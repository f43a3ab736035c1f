"""Real parts for dashboard tests: a uvicorn server on a free loopback port in
the test's event loop, and headless Chromium (Debian's ``chromium`` through
``chromedriver``) driven by Selenium.

Selenium's calls block, so :class:`Browser` runs each in a thread: the
server, the App and any worker keep running in the test's loop meanwhile.
Chromium starts once (about 2 s) and serves test after test: between two,
:func:`browser` blanks the page and clears cookies, cache and storage.
Screenshots go under the test's output directory (``--basetemp``) and, when
``TASKQ_SCREENSHOTS`` names a directory, there too (the docs use them).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS_ENV = "TASKQ_SCREENSHOTS"


@contextlib.asynccontextmanager
async def serve(asgi: Any, *, root_path: str = "") -> AsyncIterator[str]:
    """Serve ``asgi`` over real HTTP on 127.0.0.1; yields the base URL."""
    config = uvicorn.Config(
        asgi,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        root_path=root_path,
        # Open event streams never end by themselves: cut them after this long.
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 20 s")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


def browser_available() -> str | None:
    """Why no browser test can run here, or None when they can."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return (
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def need_browser() -> None:
    """Skip (locally) when there is no browser; in CI a missing browser is a failure."""
    reason = browser_available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run: {reason}")
    pytest.skip(reason)


class Browser:
    """Headless Chromium; every method runs the blocking WebDriver call in a thread."""

    def __init__(self, base_url: str, shots: Path, *, width: int = 1400, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--metrics-recording-only",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)
        self.size = (width, height)
        self.begin(base_url, shots)

    def begin(self, base_url: str, shots: Path) -> None:
        """Start a test: its server, its screenshots, the default window, no old log lines."""
        self.base_url = base_url
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)
        self.driver.set_window_size(*self.size)
        self.driver.get_log("browser")  # reading the log empties it

    def clear(self) -> None:
        """End a test: a blank page (its event streams closed), one window, nothing kept."""
        from selenium.common.exceptions import NoAlertPresentException

        with contextlib.suppress(NoAlertPresentException):
            self.driver.switch_to.alert.dismiss()
        for handle in self.driver.window_handles[1:]:
            self.driver.switch_to.window(handle)
            self.driver.close()
        self.driver.switch_to.window(self.driver.window_handles[0])
        self.driver.get("about:blank")
        # Cookies are per host, not per port: the next test's server is on 127.0.0.1 too.
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        self.driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        self.driver.execute_cdp_cmd(
            "Storage.clearDataForOrigin", {"origin": self.base_url, "storageTypes": "all"}
        )

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    async def get(self, path: str) -> None:
        await self.call(self.driver.get, self.base_url + path)

    async def url(self) -> str:
        return str(await self.call(lambda: self.driver.current_url))

    async def source(self) -> str:
        return str(await self.call(lambda: self.driver.page_source))

    def _on_fresh(self, css: str, use: Callable[[Any], Any]) -> Any:
        """``use`` on the element ``css`` finds, found again if a live update replaced it."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        for _ in range(4):
            with contextlib.suppress(StaleElementReferenceException):
                return use(self.driver.find_element(By.CSS_SELECTOR, css))
        return use(self.driver.find_element(By.CSS_SELECTOR, css))

    async def text(self, css: str = "body") -> str:
        return str(await self.call(self._on_fresh, css, lambda e: e.text))

    async def count(self, css: str) -> int:
        from selenium.webdriver.common.by import By

        return len(await self.call(self.driver.find_elements, By.CSS_SELECTOR, css))

    async def click(self, css: str) -> None:
        await self.call(self._on_fresh, css, lambda e: e.click())

    async def fill(self, css: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        def do() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(value)

        await self.call(do)

    async def accept_alert(self) -> None:
        await self.call(lambda: self.driver.switch_to.alert.accept())

    async def script(self, js: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, js, *args)

    async def wait_text(
        self, css: str, want: str | Callable[[str], bool], timeout: float = 10
    ) -> str:
        """Wait until the element's text contains ``want`` (or satisfies it)."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            with contextlib.suppress(Exception):
                last = await self.text(css)
                if want(last) if callable(want) else want in last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{css!r} never showed {want!r} within {timeout}s; last: {last!r}"
                )
            await asyncio.sleep(0.1)

    async def screenshot(self, name: str) -> Path:
        """A full-page PNG under the test's output (and $TASKQ_SCREENSHOTS)."""
        path = self.shots / f"{name}.png"

        def shoot() -> None:
            height = self.driver.execute_script(
                "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
            )
            size = self.driver.get_window_size()
            self.driver.set_window_size(size["width"], min(max(int(height) + 20, 600), 4000))
            self.driver.save_screenshot(str(path))
            self.driver.set_window_size(size["width"], size["height"])

        def copy() -> None:
            extra = os.environ.get(SCREENSHOTS_ENV)
            if extra:
                Path(extra).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(extra) / path.name)

        await self.call(shoot)
        await self.call(copy)
        return path

    async def console_errors(self) -> list[str]:
        """Errors the page logged (a CSP violation shows up here)."""
        logs = await self.call(self.driver.get_log, "browser")
        return [e["message"] for e in logs if e.get("level") == "SEVERE"]

    def quit(self) -> None:
        self.driver.quit()


#: Browsers between two tests, cleared.
_idle: list[Browser] = []


@atexit.register
def _quit_idle() -> None:
    while _idle:
        _idle.pop().quit()


@contextlib.asynccontextmanager
async def browser(base_url: str, shots: Path) -> AsyncIterator[Browser]:
    """A browser for one test; kept for the next one if the test passed and clearing works."""
    need_browser()
    if _idle:
        b = _idle.pop()
        await anyio.to_thread.run_sync(b.begin, base_url, shots)
    else:
        b = await anyio.to_thread.run_sync(Browser, base_url, shots)
    keep = False
    try:
        yield b
        # A browser that cannot be cleared is not the test's failure: it is quit instead.
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(b.clear)
            keep = True
    finally:
        if keep:
            _idle.append(b)
        else:
            await anyio.to_thread.run_sync(b.quit)


async def csrf_form(client: httpx.AsyncClient, page: str) -> dict[str, str]:
    """GET ``page`` (setting the CSRF cookie) and return its form token field."""
    import re

    response = await client.get(page)
    response.raise_for_status()
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', response.text)
    if found is None:
        raise AssertionError(f"no CSRF token on {page}")
    return {"csrf_token": found.group(1)}
