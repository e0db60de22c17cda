"""Output folders are claimed before any work and replaced whole: nothing the user had is lost."""

from __future__ import annotations

import json
import os

import pytest

from saekit.errors import OutputError
from saekit.files import claim_output, removed_on_failure, replacing


def artifact(path, kind="saekit-activations", extra=("shard_00000.safetensors",)):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"kind": kind}))
    for name in extra:
        (path / name).write_bytes(b"x")
    return path


def is_cache(p):
    return (p / "manifest.json").is_file() and json.loads((p / "manifest.json").read_text()).get("kind") == "saekit-activations"


def test_new_empty_and_same_kind_places_are_claimed(tmp_path):
    assert claim_output(tmp_path / "a" / "b", "a cache", is_cache) == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    claim_output(tmp_path / "empty", "a cache", is_cache)
    claim_output(artifact(tmp_path / "c"), "a cache", is_cache)
    assert not (tmp_path / "a").exists()  # claiming creates nothing


def test_a_path_under_a_file_or_onto_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("keep me")
    with pytest.raises(OutputError, match="lies under .*f, which is a file"):
        claim_output(tmp_path / "f" / "sub", "a cache", is_cache)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        claim_output(tmp_path / "f", "a cache", is_cache)
    assert (tmp_path / "f").read_text() == "keep me"


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    # the tests may run as root, for whom chmod does not bite: ask os.access as an unprivileged user would be answered
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(OutputError, match="permission denied"):
        claim_output(tmp_path / "new", "a cache", is_cache, flag="--out")


def test_another_kind_or_another_config_needs_overwrite_and_foreign_folders_are_never_replaced(tmp_path):
    store = artifact(tmp_path / "store", kind="saekit-feature-store")
    with pytest.raises(OutputError, match=r"already holds saekit-feature-store \(2 entries.*not a cache; pass --overwrite"):
        claim_output(store, "a cache", is_cache)
    claim_output(store, "a cache", is_cache, overwrite=True)
    cache = artifact(tmp_path / "cache")
    with pytest.raises(OutputError, match=r"made differently \(tokens 1 → 2\); pass --overwrite"):
        claim_output(cache, "a cache", is_cache, differs=lambda p: "tokens 1 → 2")
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="choose an empty or new --out"):
            claim_output(mine, "a cache", is_cache, overwrite=overwrite)


def test_replacing_swaps_whole_keeps_named_files_and_a_failure_changes_nothing(tmp_path):
    old = artifact(tmp_path / "store", kind="saekit-feature-store", extra=("labels.sqlite", "stale.json"))
    with pytest.raises(RuntimeError):
        with replacing(old) as staged:
            (staged / "manifest.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in old.iterdir()) == ["labels.sqlite", "manifest.json", "stale.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no staging folder left
    with replacing(old, keep=("labels.sqlite",)) as staged:
        (staged / "manifest.json").write_text('{"kind": "new"}')
    assert sorted(p.name for p in old.iterdir()) == ["labels.sqlite", "manifest.json"]  # stale.json went with the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_failed_command_leaves_no_empty_folder_it_made(tmp_path):
    with pytest.raises(ValueError):
        with removed_on_failure(tmp_path / "a" / "b" / "c") as out:
            out.mkdir(parents=True)
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        with removed_on_failure(tmp_path / "run") as out:
            out.mkdir()
            (out / "checkpoint.pt").write_bytes(b"x")  # work worth keeping stays
            raise ValueError
    assert (tmp_path / "run" / "checkpoint.pt").exists()
