"""A real `saekit browse` server and Debian's chromium, driven by the playwright pip package (never a
downloaded browser): what every real-browser test shares."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage"]


def skip_reason() -> str | None:
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


@contextmanager
def serving(cmd: list[str], health_url: str, what: str, timeout_s: float = 60) -> Iterator[None]:
    """Run `cmd` until the block ends, entered once `health_url` answers 200 (the test fails, with the process's
    output, if it exits first or does not answer within timeout_s); the process is stopped on the way out."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)

        def output() -> str:
            out.seek(0)
            return out.read()[-3000:]

        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{what} exited early:\n{output()}")
                try:
                    if urllib.request.urlopen(health_url, timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} did not answer at {health_url} within {timeout_s:.0f} s:\n{output()}")
                time.sleep(0.3)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def browse_server(store: str | Path, *args: str, timeout_s: float = 60) -> Iterator[str]:
    """`saekit browse STORE [ARGS]` on a free port until the block ends: its URL (the test skips without
    chromium)."""
    if reason := skip_reason():
        pytest.skip(reason)
    port = free_port()
    saekit = shutil.which("saekit", path=str(Path(sys.executable).parent)) or "saekit"
    url = f"http://127.0.0.1:{port}"
    with serving([saekit, "browse", str(store), "--port", str(port), *args], url + "/_stcore/health",
                 "saekit browse", timeout_s):
        yield url


@contextmanager
def chromium_page(width: int = 1500, height: int = 1800):
    """A page in headless chromium whose actions and assertions wait up to 60 s (a loaded 2-core CI is slow)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            yield page
        finally:
            browser.close()
