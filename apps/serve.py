"""`saekit browse STORE [--port P] [--graphs DIR]`: serve the Streamlit feature browser on 127.0.0.1 (STORE may be a
set folder holding one store per SAE: apps/set_stores.py)."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from saekit.errors import SaekitError
from saekit.features import FeatureStore

SCRIPT = Path(__file__).with_name("browse.py")


def streamlit_command(store: Path, port: int, graphs: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(SCRIPT),
            "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
            "--browser.serverAddress", "127.0.0.1", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",  # a local tool: no Deploy
            "--", "--store", str(store), *(["--graphs", str(graphs)] if graphs is not None else [])]


def check_port(port) -> int:
    """`port` as an int in 1–65535, or a SaekitError naming --port."""
    try:
        value = int(port)
        if value != port and not isinstance(port, str):
            raise ValueError
    except (TypeError, ValueError):
        raise SaekitError(f"--port must be a whole number from 1 to 65535, not {port!r}.") from None
    if not 1 <= value <= 65535:
        raise SaekitError(f"--port must be from 1 to 65535, not {value}; pass e.g. --port 8501.")
    return value


def browse(store: str | Path, port: int = 8501, graphs: str | Path | None = None) -> NoReturn:
    """Serve the browser for `store` (a store, or a set folder of stores, one per hook), and the attribution graphs
    in `graphs` (a graph folder, or a folder of them) on a Graph page. Everything that can be checked is checked before streamlit starts: the port, the store (or each
    store of the set: its manifest and every tensor file's header, FeatureStore.check) and that `graphs` holds graphs, so a missing,
    foreign or damaged store or graph folder is a SaekitError saying what to do, and no server starts."""
    from saekit.apps.graph_live import graph_dirs
    from saekit.apps.set_stores import is_store, open_set

    port = check_port(port)
    store = Path(store).expanduser().resolve()
    for one in [store] if is_store(store) else open_set(store).values():  # a set without stores says which SAEs
        FeatureStore(one)  # lack one; a missing, foreign or damaged store fails here, with what to do, not in the app
    if graphs is not None:
        graphs = Path(graphs).expanduser().resolve()
        graph_dirs(graphs)
    try:
        import streamlit  # noqa: F401
    except ImportError as e:
        raise SaekitError("the browser needs streamlit: pip install 'saekit[app]'") from e
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be opened ({e.strerror or e})"
            raise SaekitError(f"port {port} on 127.0.0.1 {why}; pass another with --port (e.g. --port 8502; "
                              "ports below 1024 need administrator rights).") from e
    print(f"saekit: browsing {store} at http://127.0.0.1:{port}  (Ctrl-C stops)", flush=True)
    env = {**os.environ, "SAEKIT_STORE": str(store), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    env.pop("SAEKIT_GRAPHS", None)  # only --graphs names graphs: a stale variable must not add a page
    if graphs is not None:
        env["SAEKIT_GRAPHS"] = str(graphs)
    # Become the server rather than its parent: a SIGTERM to `saekit browse` (a supervisor, a test fixture)
    # then stops streamlit too, where a child would be left running.
    cmd = streamlit_command(store, port, graphs)
    os.execve(cmd[0], cmd, env)
