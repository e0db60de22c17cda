"""The feature stores of a set of SAEs, found on disk: `saekit browse SET` browses every store up to three folders
below SET — where `saekit analyze SAE_DIR` writes by default (SAE_DIR/../store, so SET/HOOK/store for a set
trained with `saekit train --hooks`), SET/stores/HOOK, SAE_DIR/store, … — one per hook, in layer order.
No streamlit here: `saekit browse` checks a set with it before the server starts."""

from __future__ import annotations

import re
from pathlib import Path

from saekit.errors import SaekitError
from saekit.features.store import MANIFEST, STORE_KIND
from saekit.files import read_json

_LAYER = re.compile(r"blocks\.(\d+)\.")
_KIND_ORDER = ("hook_resid_pre", "attn", "mlp", "hook_resid_post")  # the order a layer's hooks are reached in


def is_store(path: Path) -> bool:
    """A single store (or something that is no folder: opening it as a store says what is wrong)."""
    return (path / MANIFEST).is_file() or not path.is_dir()


def hook_order(hook: str) -> tuple[int, int, str]:
    """Sort key: layer, then resid_pre / attention / MLP / resid_post, then the name."""
    m = _LAYER.search(hook)
    kind = next((i for i, k in enumerate(_KIND_ORDER) if k in hook), len(_KIND_ORDER))
    return (int(m.group(1)) if m else 1 << 30, kind, hook)


def stores_below(root: Path) -> dict[str, Path]:
    """{hook: store folder} of the feature stores up to three folders below `root`, in layer order; two stores on
    one hook are refused (the picker names SAEs by hook)."""
    found: dict[str, Path] = {}
    for manifest in sorted(p for depth in ("*/", "*/*/", "*/*/*/") for p in root.glob(depth + MANIFEST)):
        man = read_json(manifest)
        if man.get("kind") != STORE_KIND:  # e.g. a Neuronpedia export's manifest
            continue
        hook = str(man.get("hook") or manifest.parent.name)
        if hook in found:
            raise SaekitError(f"{root} holds two feature stores on {hook} ({found[hook]} and {manifest.parent}); a set "
                              "is browsed with one store per hook: move one out, or browse each with "
                              "`saekit browse STORE`.")
        found[hook] = manifest.parent
    return dict(sorted(found.items(), key=lambda item: hook_order(item[0])))


def saes_without_store(root: Path, stores: dict[str, Path]) -> list[tuple[str, Path]]:
    """(hook, SAE folder) of the SAEs below `root` whose hook has no store, in layer order."""
    from saekit.runner import dictionaries_in

    try:
        dirs = dictionaries_in(root)
    except SaekitError:  # no SAE below the set: nothing lacks a store
        return []
    lacking = []
    for d in dirs:
        cfg = read_json(d / "cfg.json")
        hook = str(cfg.get("saekit", {}).get("hook") or cfg.get("metadata", {}).get("hook_name") or d.name)
        if hook not in stores:
            lacking.append((hook, d))
    return sorted(lacking, key=lambda item: hook_order(item[0]))


def analyze_commands(lacking: list[tuple[str, Path]]) -> str:
    return "\n".join(f"  saekit analyze {d}" for _, d in lacking)


def open_set(root: str | Path) -> dict[str, Path]:
    """The stores of the set at `root` ({hook: folder}, layer order), or a SaekitError naming the SAEs that lack
    one with the `saekit analyze` command that builds each."""
    root = Path(root)
    stores = stores_below(root)
    if stores:
        return stores
    if lacking := saes_without_store(root, stores):
        raise SaekitError(f"{root} holds no feature store. Its SAEs without one: {', '.join(h for h, _ in lacking)}. "
                          f"Build them (each lands in SAE_DIR/../store, where `saekit browse {root}` finds it):\n"
                          + analyze_commands(lacking))
    raise SaekitError(f"{root} holds neither a feature store nor an SAE: pass a store written by `saekit analyze`, "
                      "or a set folder holding SAEs and their stores.")
