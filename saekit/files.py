"""Atomic writes and checked reads: nothing the user had is lost if a write is interrupted, and a corrupt or
foreign file gives a `FileFormatError` instead of a raw traceback.

Whole output folders follow the same rule. A command first *claims* its output (`claim_output`) before any
work: the place must be writable and must not hold something the command would destroy (another kind of
artifact, or the same kind made with another config) unless the user passed --overwrite. It then writes the
folder beside its final place and swaps it in when complete (`replacing`), so a reader sees the old folder or
the new one, never a mix, and a failure leaves no half-made folder (`removed_on_failure`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FileFormatError, OutputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file in the same directory, then `os.replace` it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}); restore it or re-create the directory.") from e
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path} should hold a JSON object, not {type(obj).__name__}.")
    return obj


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_tensors(path: str | Path, required: tuple[str, ...] = (), device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file ({e}).") from e
    missing = [k for k in required if k not in tensors]
    if missing:
        raise FileFormatError(f"{path} lacks tensors {missing}; it holds {sorted(tensors)}. Is it a saekit file?")
    return tensors


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A short content hash of named tensors, recorded in manifests so figures trace to weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- output folders

def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def describe(path: Path) -> str:
    """What a folder holds, for messages: its manifest's kind (saekit artifacts record one) and some names."""
    names = sorted(p.name for p in path.iterdir())
    kind = None
    try:
        kind = json.loads((path / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        pass
    shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
    return f"{kind or 'files'} ({len(names)} entries: {shown})"


def claim_output(path: str | Path, what: str, mine: Callable[[Path], bool], overwrite: bool = False,
                 differs: Callable[[Path], str | None] = lambda p: None, flag: str = "--out") -> Path:
    """Check, before any work, that `what` can be written at `path` without destroying anything.

    Refused with an OutputError (naming what is there and what to do): a path under a regular file, a place
    this process cannot write, an existing file, a non-empty folder that does not hold this kind of artifact
    (`mine`), and one that does but made with another config (`differs` says how) unless `overwrite`.
    A folder of files saekit did not write (no manifest.json or cfg.json) is never replaced."""
    path = Path(path)
    base = _nearest_existing(path)
    if not base.is_dir():
        where = "is a file, not a folder" if base == path else f"lies under {base}, which is a file"
        raise OutputError(f"{flag} {path} {where}; choose another {flag}.")
    if base == path and not os.access(_nearest_existing(path.parent), os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {path.parent} (permission denied); choose another {flag}.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {base} (permission denied); choose another {flag}.")
    if base != path or not any(path.iterdir()):
        return path
    if not mine(path):
        if overwrite and any((path / n).exists() for n in ("manifest.json", "cfg.json", "checkpoint.pt")):
            return path
        hint = ("pass --overwrite to replace it, or choose another " + flag
                if any((path / n).exists() for n in ("manifest.json", "cfg.json", "checkpoint.pt"))
                else f"choose an empty or new {flag}")
        raise OutputError(f"{flag} {path} already holds {describe(path)}, not {what}; {hint}.")
    why = differs(path)
    if why and not overwrite:
        raise OutputError(f"{flag} {path} already holds {what} made differently ({why}); pass --overwrite to "
                          f"replace it, or choose another {flag}.")
    return path


@contextmanager
def removed_on_failure(path: str | Path) -> Iterator[Path]:
    """Folders on the way to `path` that this block creates are removed again if it fails and they are
    still empty: an early error leaves no empty output folder behind."""
    path = Path(path)
    new = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield path
    except BaseException:
        for p in new:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
        raise


@contextmanager
def replacing(path: str | Path, keep: tuple[str, ...] = (), staging: Path | None = None) -> Iterator[Path]:
    """A fresh folder beside `path` to write into. When the block succeeds it takes `path`'s place (files named
    in `keep`, such as the user's labels, are carried over from the old folder first) and the old folder is
    removed; when it fails the new folder is removed and `path` is as it was. `staging` names the folder when
    several processes must agree on it."""
    path = Path(path)
    with removed_on_failure(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging or Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        tmp.mkdir(exist_ok=True)
        try:
            yield tmp
            swap_in(tmp, path, keep)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(new: Path, path: Path, keep: tuple[str, ...] = ()) -> None:
    """Put the complete folder `new` at `path`, replacing what was there (two renames; the old folder is
    deleted only once the new one is in place)."""
    for name in keep:
        if (path / name).exists() and not (new / name).exists():
            shutil.copy2(path / name, new / name)
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
