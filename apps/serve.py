"""`saekit browse STORE [--port P]`: serve the Streamlit feature browser on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from saekit.errors import SaekitError
from saekit.features import FeatureStore

SCRIPT = Path(__file__).with_name("browse.py")


def streamlit_command(store: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(SCRIPT),
            "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
            "--browser.serverAddress", "127.0.0.1", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--", "--store", str(store)]


def browse(store: str | Path, port: int = 8501) -> NoReturn:
    store = Path(store).resolve()
    FeatureStore(store)  # a missing or foreign store fails here, with what to do, not inside the app
    try:
        import streamlit  # noqa: F401
    except ImportError as e:
        raise SaekitError("the browser needs streamlit: pip install 'saekit[app]'") from e
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise SaekitError(f"port {port} on 127.0.0.1 is in use; pass another with --port.") from e
    print(f"saekit: browsing {store} at http://127.0.0.1:{port}  (Ctrl-C stops)", flush=True)
    env = {**os.environ, "SAEKIT_STORE": str(store), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    # Become the server rather than its parent: a SIGTERM to `saekit browse` (a supervisor, a test fixture)
    # then stops streamlit too, where a child would be left running.
    cmd = streamlit_command(store, port)
    os.execve(cmd[0], cmd, env)
