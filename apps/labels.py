"""Labels and notes for features, in a SQLite file beside the store's arrays (STORE/labels.sqlite).

Several browser sessions (threads of one Streamlit server, or several servers) may write at once:
WAL journal (readers never block the writer), a busy timeout instead of "database is locked" errors,
one short connection per operation, and every save in a BEGIN IMMEDIATE transaction that checks the
row's version, so an edit made from a stale page never silently overwrites a newer one.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from saekit.features.store import LABELS

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    feature    INTEGER PRIMARY KEY,
    label      TEXT NOT NULL DEFAULT '',
    notes      TEXT NOT NULL DEFAULT '',
    version    INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Entry:
    feature: int
    label: str = ""
    notes: str = ""
    version: int = 0  # 0: never saved
    updated_at: float = 0.0


class Conflict(Exception):
    """The row changed since the caller read it; `current` is what is stored now."""

    def __init__(self, current: Entry):
        super().__init__(f"feature {current.feature} was changed by another session (version {current.version})")
        self.current = current


class Labels:
    def __init__(self, store_dir: str | Path, sae_hash: str | None = None):
        self.path = Path(store_dir) / LABELS
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)
            if sae_hash is not None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('sae_weights_sha256', ?)", (sae_hash,))
        self.sae_hash = self.meta("sae_weights_sha256")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; transactions explicit
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def meta(self, key: str) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def get(self, feature: int) -> Entry:
        with closing(self._connect()) as db:
            row = db.execute("SELECT feature, label, notes, version, updated_at FROM labels WHERE feature = ?",
                             (int(feature),)).fetchone()
        return Entry(*row) if row else Entry(int(feature))

    def save(self, feature: int, label: str, notes: str, expected_version: int | None = None) -> Entry:
        """Write label and notes; with `expected_version`, raise Conflict if someone saved in between."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock before reading the version
            try:
                row = db.execute("SELECT feature, label, notes, version, updated_at FROM labels WHERE feature = ?",
                                 (int(feature),)).fetchone()
                current = Entry(*row) if row else Entry(int(feature))
                if expected_version is not None and current.version != expected_version:
                    raise Conflict(current)
                new = Entry(int(feature), label.strip(), notes.strip(), current.version + 1, time.time())
                db.execute("INSERT INTO labels (feature, label, notes, version, updated_at) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT(feature) DO UPDATE SET label = excluded.label, notes = excluded.notes, "
                           "version = excluded.version, updated_at = excluded.updated_at",
                           (new.feature, new.label, new.notes, new.version, new.updated_at))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return new

    def stamp(self) -> tuple[int, int]:
        """Changes whenever any label is saved (for caching what shows labels)."""
        with closing(self._connect()) as db:
            return tuple(db.execute("SELECT COUNT(*), COALESCE(SUM(version), 0) FROM labels").fetchone())

    def all_labels(self) -> dict[int, str]:
        with closing(self._connect()) as db:
            return dict(db.execute("SELECT feature, label FROM labels WHERE label != ''").fetchall())

    def search(self, text: str, limit: int = 200) -> list[Entry]:
        """Features whose label or notes contain `text` (case-insensitive)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with closing(self._connect()) as db:
            rows = db.execute("SELECT feature, label, notes, version, updated_at FROM labels "
                              "WHERE label LIKE ? ESCAPE '\\' OR notes LIKE ? ESCAPE '\\' "
                              "ORDER BY updated_at DESC LIMIT ?", (pattern, pattern, limit)).fetchall()
        return [Entry(*r) for r in rows]
