"""The on-disk activation cache: safetensors shards + manifest.json, written once by a harvest (by one
process or by every rank of a distributed one) and read by training, evaluation, the feature store and
steering evaluation — whole, as one rank's slice, or shard by shard.

Each shard holds `acts.<hook>` [n, d] plus `token_ids`, `positions` and `context_ids` [n], so analyses can
reuse a harvest without running the model again. The manifest lists the shards in stream order and records,
per hook, the massive-activation threshold computed at harvest time: every later reader uses that one number.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import FileFormatError, NonFiniteError, ShapeError
from .files import describe, read_json, read_tensors, replacing, write_json, write_tensors

if TYPE_CHECKING:
    from .dist import Comm
    from .harvest import Harvest

MANIFEST = "manifest.json"
KIND = "saekit-activations"
SHARD_TOKENS = 65536
INDEX_FIELDS = ("token_ids", "positions", "context_ids")


class ActivationCache:
    """An activation cache on disk, opened by reading (and checking) its manifest."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileFormatError(f"activation cache {self.dir} does not exist; write one with `saekit harvest --out "
                                  f"{self.dir}` (a training run keeps its cache in RUN/activations).")
        if not (self.dir / MANIFEST).is_file():
            what = ("an SAE directory (cfg.json)" if (self.dir / "cfg.json").is_file()
                    else describe(self.dir) if any(self.dir.iterdir()) else "empty")
            raise FileFormatError(f"{self.dir} is not an activation cache: it is {what}. Pass a folder written by "
                                  "`saekit harvest` (a training run keeps its cache in RUN/activations; an SAE's "
                                  "cfg.json names it under saekit.activations).")
        manifest = read_json(self.dir / MANIFEST)
        if manifest.get("kind") != KIND:
            raise FileFormatError(f"{self.dir} is not a saekit activation cache (its manifest's kind is "
                                  f"{manifest.get('kind')!r}); pass a folder written by `saekit harvest`.")
        self.manifest = manifest

    @staticmethod
    def holds_one(directory: str | Path) -> bool:
        """Whether `directory` holds an activation cache (by its manifest's kind)."""
        try:
            return read_json(Path(directory) / MANIFEST).get("kind") == KIND
        except FileFormatError:
            return False

    # ------------------------------------------------------------------ what it holds
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def d_in(self, hook: str) -> int:
        return int(self.manifest["d_in"][hook])

    def massive_threshold(self, hook: str) -> float | None:
        """Norm above which a token of `hook` is massive, as recorded at harvest (None in older caches)."""
        rec = self.manifest.get("massive", {}).get(hook)
        return None if rec is None else float(rec["threshold"])

    def check_hooks(self, hooks: list[str] | None) -> list[str]:
        hooks = list(hooks or self.hooks)
        missing = [h for h in hooks if h not in self.manifest["hooks"]]
        if missing:
            raise ShapeError(f"the cache in {self.dir} holds hooks {self.hooks}, not {missing}.")
        return hooks

    # ------------------------------------------------------------------ reading
    def read(self, hooks: list[str] | None = None) -> Harvest:
        """The whole cache in memory (activations as float32)."""
        from .harvest import Harvest

        hooks = self.check_hooks(hooks)
        parts = list(self.shards(hooks))
        h = Harvest(acts={hk: torch.cat([p[f"acts.{hk}"] for p in parts]).float() for hk in hooks},
                    **{f: torch.cat([p[f] for p in parts]) for f in INDEX_FIELDS}, meta=self.manifest)
        for hk in hooks:
            self._check(hk, h.acts[hk])
        return h

    def shards(self, hooks: list[str] | None = None, index: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Shard by shard, in stream order (a cache can be many GB): `acts.<hook>` and the index fields."""
        hooks = self.check_hooks(hooks)
        need = tuple(f"acts.{h}" for h in hooks) + (INDEX_FIELDS if index else ())
        for s in self.manifest["shards"]:
            yield read_tensors(self.dir / s["file"], required=need)

    def head(self, hook: str, n: int) -> torch.Tensor:
        """The first n activations of `hook`, reading only the shards that hold them."""
        parts, have = [], 0
        for shard in self.shards([hook], index=False):
            parts.append(shard[f"acts.{hook}"].float())
            have += len(parts[-1])
            if have >= n:
                break
        x = torch.cat(parts)[:n]
        self._check(hook, x)
        return x

    def slice(self, lo: int, hi: int, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows [lo, hi) of each hook (one rank's share), reading only the shards and rows that hold them."""
        from safetensors import safe_open

        hooks = self.check_hooks(hooks)
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        start = 0
        for s in self.manifest["shards"]:
            a, b = max(lo, start), min(hi, start + s["tokens"])
            if a < b:
                path = self.dir / s["file"]
                try:
                    with safe_open(str(path), framework="pt") as f:
                        for h in hooks:
                            parts[h].append(f.get_slice(f"acts.{h}")[a - start: b - start].float())
                except Exception as e:
                    raise FileFormatError(f"{path} is missing or unreadable ({e}); re-harvest the cache.") from e
            start += s["tokens"]
        if start != self.tokens:
            raise FileFormatError(f"{self.dir}: the shards hold {start} tokens, the manifest says {self.tokens}.")
        out = {}
        for h in hooks:
            out[h] = torch.cat(parts[h]) if parts[h] else torch.zeros(0, self.d_in(h))
            self._check(h, out[h])
        return out

    def _check(self, hook: str, x: torch.Tensor) -> None:
        if x.shape[1] != self.d_in(hook):
            raise ShapeError(f"cache {self.dir}: {hook} has width {x.shape[1]}, manifest says {self.d_in(hook)}.")
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"cache {self.dir}: activations at {hook} hold NaN/inf; re-harvest.")

    # ------------------------------------------------------------------ writing
    @classmethod
    def write(cls, directory: str | Path, harvest: Harvest, manifest: dict[str, Any],
              massive: dict[str, dict[str, float]] | None = None, comm: Comm | None = None,
              shard_tokens: int = SHARD_TOKENS) -> ActivationCache:
        """Write `harvest` as shards, then the manifest last (each file atomically).

        With a `comm` of several processes each rank passes its own part of the stream: every rank writes
        its shards and rank 0 writes one manifest listing them all in rank order, so the result is an
        ordinary cache. `massive` ({hook: {"multiple", "median_norm", "threshold"}}) is the threshold over
        the whole stream; by default it is computed from `harvest` (one process only).
        """
        from .harvest import massive_record

        directory = Path(directory)
        world, rank = (comm.world, comm.rank) if comm is not None else (1, 0)
        if world > 1 and massive is None:
            raise ValueError("a cache written by several processes needs the stream-wide massive thresholds")
        massive = massive or {h: massive_record(float(harvest.norms(h).median())) for h in harvest.acts}
        # Written beside its place and swapped in whole (rank 0 swaps once every rank's shards are there):
        # an interrupted harvest leaves any old cache intact, and no reader sees shards of two harvests.
        staging = directory.parent / f".{directory.name}.partial"
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        with replacing(directory, staging=staging) if rank == 0 else nullcontext(staging) as into:
            if comm is not None:
                comm.barrier("starting to write the activation cache")
            prefix = f"shard_r{rank:03d}" if world > 1 else "shard"
            shards = []
            for i, lo in enumerate(range(0, len(harvest), shard_tokens)):
                sl = slice(lo, lo + shard_tokens)
                tensors = {f"acts.{h}": a[sl] for h, a in harvest.acts.items()}
                tensors |= {f: getattr(harvest, f)[sl] for f in INDEX_FIELDS}
                name = f"{prefix}_{i:05d}.safetensors"
                write_tensors(into / name, tensors)
                shards.append({"file": name, "tokens": len(harvest.token_ids[sl])})
            everyone = comm.all_gather_object((shards, harvest.meta), "collecting the cache shard lists") \
                if comm is not None else [(shards, harvest.meta)]
            if rank == 0:
                tokens = sum(s["tokens"] for sh, _ in everyone for s in sh)
                meta = harvest.meta if world == 1 else {
                    "tokens": tokens, "seconds": max(m["seconds"] for _, m in everyone), "world_size": world,
                    "tokens_per_s": tokens / max(max(m["seconds"] for _, m in everyone), 1e-9)}
                write_json(into / MANIFEST, {
                    **manifest, "kind": KIND, "hooks": list(harvest.acts),
                    "d_in": {h: int(a.shape[1]) for h, a in harvest.acts.items()}, "tokens": tokens,
                    "shards": [s for sh, _ in everyone for s in sh], "massive": massive, "harvest": meta})
        if comm is not None:
            comm.barrier("waiting for rank 0 to write the cache")
        return cls(directory)
