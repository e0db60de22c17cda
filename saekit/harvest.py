"""Activations from transformer-lens hooks: one forward per batch of contexts, several hooks per pass,
`stop_at_layer` just past the deepest hook. Position 0 and special tokens (BOS, document separators,
padding) are dropped: their residual norms are ~100× the rest.

Also here: massive-activation detection (the threshold is computed once, over a harvest, and recorded
in its cache; see cache.py) and a bounded token-level shuffle buffer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .errors import DataError, NonFiniteError


class RowWriter(Protocol):
    """What `harvest_into` needs of its destination, cache.CacheWriter (named here so that the harvest, which the
    cache imports, does not import the cache)."""

    def add(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor,
            context_ids: torch.Tensor) -> None: ...

MASSIVE_MULTIPLE = 10.0


@dataclass
class Harvest:
    """Activations of kept tokens: acts[hook] [N, d], and token id / position / context index [N]."""

    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    positions: torch.Tensor
    context_ids: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    def norms(self, hook: str) -> torch.Tensor:
        return self.acts[hook].norm(dim=-1)

    def massive(self, hook: str, multiple: float = MASSIVE_MULTIPLE) -> torch.Tensor:
        """[N] bool: tokens whose norm exceeds `multiple` × the median norm."""
        return massive_mask(self.norms(hook), multiple)


def massive_mask(norms: torch.Tensor, multiple: float = MASSIVE_MULTIPLE) -> torch.Tensor:
    return norms > multiple * norms.median()


def massive_record(median_norm: float, multiple: float = MASSIVE_MULTIPLE) -> dict[str, float]:
    """The massive-token threshold of a harvest as caches record it: `multiple` × the harvest's median norm."""
    return {"multiple": float(multiple), "median_norm": float(median_norm), "threshold": multiple * median_norm}


def keep_mask(tokens: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """[B, T] bool: positions whose activations are kept (not position 0, not a special token)."""
    keep = ~torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))
    keep[:, 0] = False
    return keep


class Harvester:
    """Runs the model over contexts and yields the kept tokens' activations at `hooks`."""

    def __init__(self, model, hooks: list[str], device: str | torch.device | None = None):
        from .lm import check_hooks, stop_layer
        from .tokens import special_ids

        check_hooks(model, hooks)
        self.model, self.hooks = model, list(hooks)
        self.stop = stop_layer(model, self.hooks)
        self.special = special_ids(model.tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{hook: [B, T, d]} for one batch of contexts, running no further than needed."""
        store: dict[str, torch.Tensor] = {}

        def saver(name: str):  # hook.name may be the bridge's canonical alias, so close over ours
            def save(act, hook):
                store[name] = act.detach()
            return save

        self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=[(h, saver(h)) for h in self.hooks],
                                  stop_at_layer=self.stop)
        return store

    def batches(self, contexts: torch.Tensor, batch_contexts: int = 16, start: int = 0
                ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (acts {hook: [n, d]}, token_ids [n], positions [n], context_ids [n]) per forward."""
        for lo in range(start, len(contexts), batch_contexts):
            chunk = contexts[lo: lo + batch_contexts]
            acts = self.forward(chunk)
            keep = keep_mask(chunk, self.special).to(self.device)
            ctx, pos = keep.nonzero(as_tuple=True)
            out = {h: a[keep].float() for h, a in acts.items()}
            for h, a in out.items():
                if not torch.isfinite(a).all():
                    raise NonFiniteError(f"the model produced NaN/inf activations at {h} (contexts {lo}–{lo + len(chunk)}); "
                                         "check the model's dtype and weights.")
            yield out, chunk.to(self.device)[keep], pos, ctx + lo

    def rows(self, contexts: torch.Tensor, hook: str, tokens: int, batch_contexts: int = 16,
             max_norm: float | None = None) -> Iterator[torch.Tensor]:
        """Stream exactly `tokens` activation rows of one hook (rows with norm > max_norm dropped first)."""
        have = 0
        for acts, *_ in self.batches(contexts, batch_contexts):
            a = acts[hook]
            if max_norm is not None:
                a = a[a.norm(dim=1) <= max_norm]
            a = a[: tokens - have]
            have += len(a)
            yield a
            if have >= tokens:
                return
        raise DataError(f"the dataset gave only {have} usable tokens but {tokens} were asked for; "
                        "lower --tokens or use more text.")

    def take(self, contexts: torch.Tensor, tokens: int, batch_contexts: int = 16, progress: bool = True
             ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`batches` trimmed to exactly `tokens` kept tokens from the first contexts needed (in order), with a
        progress bar; a DataError when the contexts hold fewer."""
        have = 0
        with tqdm(total=tokens, desc="harvest", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
            for acts, ids, pos, ctx in self.batches(contexts, batch_contexts):
                take = min(len(ids), tokens - have)
                yield {h: a[:take] for h, a in acts.items()}, ids[:take], pos[:take], ctx[:take]
                have += take
                bar.update(take)
                if have >= tokens:
                    return
        raise DataError(f"the dataset gave only {have} usable tokens but {tokens} were asked for; "
                        "lower --tokens or use more text.")

    def harvest(self, contexts: torch.Tensor, tokens: int, batch_contexts: int = 16, progress: bool = True) -> Harvest:
        """Exactly `tokens` activations per hook from the first contexts needed (in order), in memory."""
        start = time.perf_counter()
        parts = list(self.take(contexts, tokens, batch_contexts, progress))
        seconds = time.perf_counter() - start
        return Harvest(
            acts={hk: torch.cat([p[0][hk] for p in parts]) for hk in self.hooks},
            token_ids=torch.cat([p[1] for p in parts]).cpu(),
            positions=torch.cat([p[2] for p in parts]).cpu(),
            context_ids=torch.cat([p[3] for p in parts]).cpu(),
            meta=harvest_meta(tokens, seconds, int(parts[-1][3][-1]) + 1 if parts else 0),
        )

    def harvest_into(self, writer: RowWriter, contexts: torch.Tensor, tokens: int, batch_contexts: int = 16,
                     progress: bool = True) -> dict[str, Any]:
        """The same harvest streamed into a cache writer a batch at a time (memory: one shard, not the harvest);
        returns its meta."""
        start, last = time.perf_counter(), 0
        for acts, ids, pos, ctx in self.take(contexts, tokens, batch_contexts, progress):
            writer.add(acts, ids, pos, ctx)
            last = int(ctx[-1]) + 1 if len(ctx) else last
        return harvest_meta(tokens, time.perf_counter() - start, last)


def harvest_meta(tokens: int, seconds: float, contexts_used: int) -> dict[str, Any]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "contexts_used": contexts_used}


class ShuffleBuffer:
    """Token-level mixing across many contexts with bounded memory (`capacity` rows).

    Rows from one context are correlated; batches drawn from a buffer of many contexts are not. Pushes
    fill the buffer; once full, each pop returns `batch` random rows and frees their slots.
    """

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[torch.Tensor] = []
        self.data: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def push(self, rows: torch.Tensor) -> None:
        self.data = rows if self.data is None else torch.cat([self.data, rows])

    def ready(self, batch: int) -> bool:
        return len(self) >= max(batch, self.capacity)

    def pop(self, batch: int) -> torch.Tensor:
        n = len(self)
        take = torch.randperm(n, generator=self.gen)[: min(batch, n)]
        keep = torch.ones(n, dtype=torch.bool)
        keep[take] = False
        assert self.data is not None
        out, self.data = self.data[take], self.data[keep]
        return out

    def stream(self, source: Iterator[torch.Tensor], batch: int) -> Iterator[torch.Tensor]:
        """Shuffled batches of `batch` rows from a stream of row blocks, draining at the end."""
        for rows in source:
            self.push(rows)
            while self.ready(batch):
                yield self.pop(batch)
        while len(self) >= batch:
            yield self.pop(batch)
