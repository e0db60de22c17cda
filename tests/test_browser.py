"""A real browser against a real `saekit browse` server: Debian's chromium driven by the playwright pip package
(never a downloaded browser). Overview → a feature page (examples and logit table shown) → Your text (run the
model) → screenshots under the test's tmp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from saekit.features import FeatureStore

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage"]


def _skip_reason() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Debian chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright pip package is missing (pip install -e '.[dev]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_store):
    if reason := _skip_reason():
        pytest.skip(reason)
    port = free_port()
    saekit = shutil.which("saekit", path=str(Path(sys.executable).parent)) or "saekit"
    proc = subprocess.Popen([saekit, "browse", str(tiny_store["store"]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"saekit browse exited early:\n{proc.stdout.read()}")
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("saekit browse did not answer within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_overview_feature_page_and_your_text(server, tiny_store, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    store = FeatureStore(tiny_store["store"])
    fid = int(np.argsort(-store.stats["count"])[0])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1800})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # assertions wait as long as actions: a loaded 2-core CI is slow
            page.goto(server)
            expect(page.get_by_role("heading", name="Features")).to_be_visible()
            expect(page.locator(".js-plotly-plot").first).to_be_visible()  # density histogram / map

            # overview → feature page
            box = page.get_by_label("Open feature")
            box.fill(str(fid))
            box.press("Enter")
            page.get_by_role("button", name="Open", exact=True).click()
            expect(page.get_by_role("heading", name=f"Feature {fid}")).to_be_visible()
            examples = page.locator(".sk-ex")
            expect(examples.first).to_be_visible()
            assert examples.count() >= 2
            assert "activation" in (examples.first.locator(".sk-t").first.get_attribute("title") or "")
            expect(page.get_by_role("heading", name="Logit effects")).to_be_visible()
            logit_tables = page.locator('[data-testid="stDataFrame"]')
            expect(logit_tables.first).to_be_visible()
            assert logit_tables.count() >= 3  # promoted, suppressed, token profile
            assert "feature" in page.url and str(fid) in page.url
            page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)

            # Your text: runs the model live
            page.get_by_text("Your text", exact=True).click()
            expect(page.get_by_role("heading", name="Your text")).to_be_visible()
            page.get_by_label("Text", exact=True).fill("The central bank raised rates. Le café était fermé.")
            page.get_by_role("button", name="Run", exact=True).click()
            expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=90_000)
            expect(page.get_by_role("heading", name="Features on one token")).to_be_visible()
            page.screenshot(path=str(tmp_path / "your_text.png"), full_page=True)
        finally:
            browser.close()
    for name in ("feature.png", "your_text.png"):
        assert (tmp_path / name).stat().st_size > 10_000
