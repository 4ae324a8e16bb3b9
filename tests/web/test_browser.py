"""The web view in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven through Selenium, with JavaScript switched off, against ``metronome-watcher demo``.

Selenium rather than Playwright: Debian ships ``chromedriver`` built from the same source as its
``chromium``, so the driver always matches the browser, and WebDriver is a W3C standard; Playwright
supports only the browser builds it downloads itself (which this network cannot fetch) and drives
any other Chromium on a best-effort basis.

``.ci/run`` installs both packages when they are missing. ``WATCHER_SCREENSHOTS=DIR`` keeps the
screenshots (``docs/web-view.png`` in the README is one of them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

#: The flags this machine's Chromium needs: no sandbox as root, no GPU, and nothing that reaches
#: for the network on its own (the network is closed).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


class Demo:
    """``metronome-watcher demo`` in a subprocess: its web address, its token and what it printed."""

    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "demo", "--for", "300", "--seed", "18", "--customers", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=tmp,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_for(lambda: next((x for x in self.lines if x.startswith("web view: ")), None))
        match = re.match(
            r"web view: (http://127\.0\.0\.1:\d+)/  \(user name: anything, password: (\S+)\)", line
        )
        assert match, line
        self.url, self.token = match.groups()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, found: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (value := found()) is not None:
                return value
            assert self.proc.poll() is None, "the demo stopped:\n" + "\n".join(self.lines[-30:])
            time.sleep(0.1)
        raise AssertionError("timed out; the demo printed:\n" + "\n".join(self.lines[-30:]))

    def events(self) -> list[tuple[int, str]]:
        """(sequence, type) of every event the demo's console sink printed."""
        return [(int(m[1]), m[2]) for x in self.lines if (m := re.match(r"\s+#(\d+)\s+(\S+)", x))]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("demo"))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # The pages must work without JavaScript: it is off for the whole test.
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot(driver: webdriver.Chrome, tmp: Path, name: str) -> Path:
    path = tmp / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    if keep := os.environ.get("WATCHER_SCREENSHOTS"):
        shutil.copy(path, Path(keep) / name)
    return path


def row_types(driver: webdriver.Chrome) -> list[str]:
    return [b.get_attribute("title") or "" for b in driver.find_elements(By.CSS_SELECTOR, "tr.event .badge")]


def test_the_pages_in_a_real_browser_with_javascript_off(
    demo: Demo, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    host = demo.url.removeprefix("http://")

    # Without the token there is nothing to see.
    browser.get(demo.url + "/")
    assert "Recent changes" not in browser.page_source

    # The demo's changes arrive within seconds; wait until it has printed two kinds.
    demo.wait_for(lambda: True if len({t for _, t in demo.events()}) >= 2 else None)
    browser.get(f"http://demo:{demo.token}@{host}/")
    assert browser.title == "Changes · metronome-watcher"
    shown = [int(r.get_attribute("id")[1:]) for r in browser.find_elements(By.CSS_SELECTOR, "tr.event")]
    printed = dict(demo.events())
    assert shown and shown == sorted(shown, reverse=True)
    # Every row the list shows is an event the demo delivered (it may show newer ones too).
    newest_printed = max(printed)
    assert [printed[s] for s in shown if s <= newest_printed] == [
        t for s, t in zip(shown, row_types(browser), strict=True) if s <= newest_printed
    ]
    assert len(set(row_types(browser))) >= 2
    screenshot(browser, tmp_path, "web-view.png")

    # The type filter: a plain form, submitted by its button.
    Select(browser.find_element(By.NAME, "type")).select_by_value("customer.updated")
    browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    # A click returns once the navigation has started; under load the next page can come later.
    WebDriverWait(browser, 20).until(EC.url_contains("type=customer.updated"))
    narrowed = row_types(browser)
    assert narrowed and set(narrowed) == {"customer.updated"}
    screenshot(browser, tmp_path, "web-view-updated.png")

    # A customer's page: the record as last seen and that customer's history.
    link = browser.find_element(By.CSS_SELECTOR, "tr.event td.who a")
    name = link.text
    cid = link.get_attribute("href").rsplit("/", 1)[-1]
    link.click()
    WebDriverWait(browser, 20).until(EC.url_contains(f"/customers/{cid}"))
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(name)
    assert cid in browser.find_element(By.CSS_SELECTOR, "p.ids").text
    history = [int(r.get_attribute("id")[1:]) for r in browser.find_elements(By.CSS_SELECTOR, "tr.event")]
    assert history
    screenshot(browser, tmp_path, "web-view-customer.png")
    # The same events as the list filtered by this customer, each of them about this customer.
    browser.find_element(By.LINK_TEXT, "This customer in the list of changes").click()
    WebDriverWait(browser, 20).until(EC.url_contains("customer="))
    listed = browser.find_elements(By.CSS_SELECTOR, "tr.event")
    assert [int(r.get_attribute("id")[1:]) for r in listed][: len(history)] == history
    assert {a.get_attribute("href").rsplit("/", 1)[-1] for a in browser.find_elements(
        By.CSS_SELECTOR, "tr.event td.who a")} == {cid}  # fmt: skip

    # The status page draws its chart without a script.
    browser.find_element(By.LINK_TEXT, "Status").click()
    WebDriverWait(browser, 20).until(EC.url_contains("/status"))
    assert browser.find_elements(By.CSS_SELECTOR, "figure.chart svg rect.bar")
    screenshot(browser, tmp_path, "web-view-status.png")
