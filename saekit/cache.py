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
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import FileFormatError, NonFiniteError, ShapeError
from .files import describe, read_json, read_tensors, replacing, write_json, write_tensors
from .harvest import Harvest, massive_record


class Comm(Protocol):
    """What writing a cache from several processes needs of dist.Comm (named here so the cache, below dist in the
    import order, does not import it)."""

    rank: int
    world: int

    def barrier(self, what: str) -> None: ...

    def all_gather_object(self, obj: Any, what: str) -> list[Any]: ...

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
              shard_tokens: int = SHARD_TOKENS, dtype: torch.dtype = torch.float32) -> ActivationCache:
        """Write a harvest held in memory (see `CacheWriter`; `massive` by default from `harvest`, one process)."""
        if (comm is not None and comm.world > 1) and massive is None:
            raise ValueError("a cache written by several processes needs the stream-wide massive thresholds")
        with CacheWriter(directory, manifest, comm, shard_tokens, dtype) as writer:
            writer.add(harvest.acts, harvest.token_ids, harvest.positions, harvest.context_ids)
            return writer.close(harvest.meta, massive or {h: massive_record(float(harvest.norms(h).median()))
                                                          for h in harvest.acts})


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheWriter:
    """Writes a cache while the harvest runs: rows are buffered and written a shard at a time, so a harvest of
    many hooks never holds more than one shard in memory. Also keeps every row's norm per hook (4 bytes a row),
    from which the caller takes the massive thresholds.

    With a `comm` of several processes each rank passes its own part of the stream: every rank writes its shards
    and rank 0 writes one manifest listing them all in rank order, so the result is an ordinary cache. Shards are
    written beside the cache's place and swapped in whole once every rank's are there: an interrupted harvest
    leaves any old cache intact, and no reader sees shards of two harvests. Activations are stored as `dtype`
    (recorded in the manifest); readers get float32."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], comm: Comm | None = None,
                 shard_tokens: int = SHARD_TOKENS, dtype: torch.dtype = torch.float32):
        self.dir, self.manifest, self.comm, self.dtype = Path(directory), manifest, comm, dtype
        self.world, self.rank = (comm.world, comm.rank) if comm is not None else (1, 0)
        self.shard_tokens = shard_tokens
        self.prefix = f"shard_r{self.rank:03d}" if self.world > 1 else "shard"
        self.shards: list[dict[str, Any]] = []
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_rows = 0
        self.norms: dict[str, list[torch.Tensor]] = {}
        self.widths: dict[str, int] = {}
        self._stack = ExitStack()

    def __enter__(self) -> CacheWriter:
        staging = self.dir.parent / f".{self.dir.name}.partial"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.into = self._stack.enter_context(replacing(self.dir, staging=staging) if self.rank == 0
                                              else nullcontext(staging))
        if self.comm is not None:
            self.comm.barrier("starting to write the activation cache")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def add(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor,
            context_ids: torch.Tensor) -> None:
        """Append rows (in stream order); full shards are written at once."""
        for h, a in acts.items():
            self.norms.setdefault(h, []).append(a.float().norm(dim=1).cpu())
            self.widths[h] = int(a.shape[1])
        rows = {f"acts.{h}": a.to(self.dtype).cpu() for h, a in acts.items()}
        rows |= {"token_ids": token_ids.cpu(), "positions": positions.cpu(), "context_ids": context_ids.cpu()}
        self.pending.append(rows)
        self.pending_rows += len(token_ids)
        while self.pending_rows >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        joined = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
        name = f"{self.prefix}_{len(self.shards):05d}.safetensors"
        write_tensors(self.into / name, {k: v[:n] for k, v in joined.items()})
        self.shards.append({"file": name, "tokens": n})
        rest = len(joined["token_ids"]) - n
        self.pending = [{k: v[n:] for k, v in joined.items()}] if rest else []
        self.pending_rows = rest

    def hook_norms(self, hook: str) -> torch.Tensor:
        """Norms of every row of `hook` added so far (this process's)."""
        return torch.cat(self.norms[hook])

    def close(self, meta: dict[str, Any], massive: dict[str, dict[str, float]]) -> ActivationCache:
        """Write the last shard and the manifest (`massive`: the stream-wide thresholds per hook); the cache is
        swapped into place when the `with` block ends."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        comm = self.comm
        everyone = comm.all_gather_object((self.shards, meta), "collecting the cache shard lists") \
            if comm is not None else [(self.shards, meta)]
        hooks = list(self.norms)
        if self.rank == 0:
            tokens = sum(s["tokens"] for sh, _ in everyone for s in sh)
            meta = meta if self.world == 1 else {
                "tokens": tokens, "seconds": max(m["seconds"] for _, m in everyone), "world_size": self.world,
                "tokens_per_s": tokens / max(max(m["seconds"] for _, m in everyone), 1e-9)}
            write_json(self.into / MANIFEST, {
                **self.manifest, "kind": KIND, "hooks": hooks,
                "d_in": self.widths, "tokens": tokens,
                "storage_dtype": str(self.dtype).removeprefix("torch."),
                "shards": [s for sh, _ in everyone for s in sh], "massive": massive, "harvest": meta})
        self._stack.close()  # swaps the finished cache into place (rank 0)
        if comm is not None:
            comm.barrier("waiting for rank 0 to write the cache")
        return ActivationCache(self.dir)
