"""The one-pass builder: every per-latent statistic of the store, accumulated batch by batch from sparse codes.

A TopK SAE fires ≤ k latents per token, so a pass over N tokens is N·k (token, latent, value) triples,
and every statistic below is a cheap reduction over them. Per batch of contexts:
  count, Σ value, max                     index_add / scatter_reduce over latents
  histogram (log-spaced, fixed edges)     index_add over latent·bins + bin
  top-N examples, at most one per context the best (context, latent) pairs of the batch merged into a
                                          running per-latent top-N; the winner's window of activations is
                                          cut from the same batch's triples, so no second pass is needed
  a uniform sample of firings             the same merge with a random key per firing (Efraimidis–Spirakis:
                                          the max of m uniforms picks a uniform one of a context's m firings)
                                          → quantile groups: bands between the latent's activation quantiles
                                          (read from its histogram), filled with sampled examples
  token profile                           (latent, token) pair counts, compacted with torch.unique;
                                          ranked by the harmonic mean of rate = fires / (token count + prior)
                                          (normalised by token frequency) and share = fires / latent's firings
`finish` then adds the statistics of the weights alone (weights.py).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .config import BINS_PER_DECADE, HIST_BINS, HIST_LO, FeatureConfig
from .weights import (
    MAP_NEIGHBOURS,
    MAP_RECALL_K,
    decoder_neighbours,
    feature_map,
    logit_effects,
    map_neighbour_recall,
    single_thread,
)


class _TopBuffer:
    """Per latent, the `size` entries with the largest score, at most one per context, each with the
    window of the latent's activations around its position. Slots are unsorted and entries never move:
    a merge only writes the new winners into the slots they free (sorted once, at the end)."""

    def __init__(self, n: int, size: int, window: int, device: torch.device):
        self.size, self.window = size, window
        self.score = torch.full((n, size), -math.inf, device=device)
        self.value = torch.zeros(n, size, device=device)
        self.ctx = torch.full((n, size), -1, dtype=torch.int32, device=device)
        self.pos = torch.zeros(n, size, dtype=torch.int32, device=device)
        self.acts = torch.zeros(n, size, window, dtype=torch.float16, device=device)
        self.floor = torch.full((n,), -math.inf, device=device)  # each row's smallest score

    def merge(self, cand_score: torch.Tensor, cand_value: torch.Tensor, cand_pos: torch.Tensor, ctx0: int,
              key: torch.Tensor, pos: torch.Tensor, val: torch.Tensor, before: int) -> None:
        """cand_*: [B, n], the batch's best entry per (context, latent) (score -inf where none).
        key/pos/val: the batch's triples (key = local context · n + latent) to cut new windows from."""
        B, n = cand_score.shape
        S, W = self.size, self.window
        cs = cand_score.t()
        rows = (cs > self.floor[:, None]).any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        top = torch.cat([self.score[rows], cs[rows]], 1).topk(S, dim=1, sorted=False)
        idx = top.indices
        is_new = (idx >= S) & (top.values > -math.inf)
        kept = torch.zeros(len(rows), S + B, dtype=torch.bool, device=cs.device).scatter_(1, idx, True)[:, :S]
        free_first = kept.to(torch.int8).argsort(dim=1, stable=True)  # evicted/empty slots first
        r_i, s_i = is_new.nonzero(as_tuple=True)
        rank = (is_new.cumsum(1) - 1)[r_i, s_i]
        dest = free_first[r_i, rank]
        lat, b = rows[r_i], idx[r_i, s_i] - S
        p = cand_pos[b, lat]
        self.score[lat, dest] = cs[lat, b]
        self.value[lat, dest] = cand_value[b, lat]
        self.ctx[lat, dest] = (b + ctx0).int()
        self.pos[lat, dest] = p.int()
        # the new winners' windows, cut from this batch's triples
        entry = torch.full((B * n,), -1, dtype=torch.long, device=key.device)
        entry[b * n + lat] = torch.arange(len(lat), device=key.device)
        e = entry[key]
        hit = e >= 0
        e = e[hit]
        off = pos[hit] - p[e] + before
        ok = (off >= 0) & (off < W)
        win = torch.zeros(len(lat), W, device=key.device)
        win[e[ok], off[ok]] = val[hit][ok]
        self.acts[lat, dest] = win.clamp(max=65504).half()
        self.floor[rows] = self.score[rows].min(1).values

    def sorted_by_value(self) -> dict[str, torch.Tensor]:
        order = torch.where(self.ctx >= 0, self.value, -math.inf).argsort(dim=1, descending=True, stable=True)
        g = lambda t: t.gather(1, order)  # noqa: E731
        return {"value": g(self.value), "ctx": g(self.ctx), "pos": g(self.pos),
                "acts": self.acts.gather(1, order[..., None].expand(-1, -1, self.window))}


class FeatureBuilder:
    """Accumulates every per-latent statistic from sparse codes, batch by batch (see module doc).

    `add` takes the kept tokens of whole consecutive contexts: codes (values, indices) [n, K], token ids,
    positions and global context ids [n]. `finish` adds the weight-only statistics and returns arrays."""

    def __init__(self, d_sae: int, vocab_size: int, cfg: FeatureConfig, device: torch.device | str = "cpu"):
        self.n, self.V, self.cfg = d_sae, vocab_size, cfg
        self.device = torch.device(device)
        dev = self.device
        self.tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, device=dev)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.max = torch.zeros(d_sae, device=dev)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int32, device=dev)
        self.token_count = torch.zeros(vocab_size, dtype=torch.long, device=dev)
        self.top = _TopBuffer(d_sae, cfg.top_n, cfg.window, dev)
        self.sample = _TopBuffer(d_sae, cfg.sample_size, cfg.window, dev)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        self._pair_keys: list[torch.Tensor] = []
        self._pair_vals: list[torch.Tensor] = []
        self._pending = 0
        self.pairs = (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                      torch.zeros(0, dtype=torch.float64, device=dev))

    @torch.no_grad()
    def add(self, values: torch.Tensor, indices: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
            context_ids: torch.Tensor) -> None:
        """One batch of whole consecutive contexts (see class doc)."""
        # Every op here touches ~100k elements: thread hand-offs cost more than they save (measured 10×
        # slower with 2 threads on a loaded 2-core machine), so run them on one thread.
        with single_thread(self.device.type == "cpu"):
            self._add(values, indices, token_ids, positions, context_ids)

    def _add(self, values: torch.Tensor, indices: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
             context_ids: torch.Tensor) -> None:
        dev, n = self.device, self.n
        values, indices = values.to(dev).float(), indices.to(dev).long()
        token_ids, positions, context_ids = token_ids.to(dev).long(), positions.to(dev).long(), context_ids.to(dev).long()
        self.tokens += len(token_ids)
        self.token_count += torch.bincount(token_ids, minlength=self.V)[: self.V]
        on = values > 0
        if not bool(on.any()):
            return
        t, j = on.nonzero(as_tuple=True)  # one compaction, row-major like indices[on]
        lat, val = indices[t, j], values[t, j]
        tok, pos, ctx = token_ids[t], positions[t], context_ids[t]

        self.count.index_add_(0, lat, torch.ones_like(lat))
        self.total.index_add_(0, lat, val.double())
        self.max.scatter_reduce_(0, lat, val, "amax")
        b = ((torch.log10(val) - HIST_LO) * BINS_PER_DECADE).floor().clamp(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, lat * HIST_BINS + b, torch.ones_like(b, dtype=torch.int32))

        self._pair_keys.append(lat * self.V + tok)
        self._pair_vals.append(val)
        self._pending += len(lat)
        if self._pending > 4_000_000:
            self._compact()

        ctx0 = int(context_ids.min())
        cl = ctx - ctx0
        B = int(cl.max()) + 1
        key = cl * n + lat
        order = torch.arange(len(val), device=dev)
        u = torch.rand(len(val), generator=self.gen, device=dev)
        for buf, score in ((self.top, val), (self.sample, u)):
            best = torch.full((B * n,), -math.inf, device=dev).scatter_reduce_(0, key, score, "amax")
            hit = score == best[key]
            first = torch.full((B * n,), len(val), dtype=torch.long, device=dev)
            first.scatter_reduce_(0, key[hit], order[hit], "amin")  # one triple per pair, deterministic
            has = first < len(val)
            fi = first.clamp(max=len(val) - 1)
            cand_val = torch.where(has, val[fi], 0.0).view(B, n)
            cand_pos = torch.where(has, pos[fi], 0).view(B, n)
            buf.merge(best.view(B, n), cand_val, cand_pos, ctx0, key, pos, val, self.cfg.window_before)

    def _compact(self) -> None:
        if not self._pair_keys:
            return
        keys, counts, sums = self.pairs
        keys = torch.cat([keys, *self._pair_keys])
        counts = torch.cat([counts, torch.ones(self._pending, dtype=torch.long, device=self.device)])
        sums = torch.cat([sums, *(v.double() for v in self._pair_vals)])
        uniq, inv = torch.unique(keys, return_inverse=True)
        self.pairs = (uniq, torch.zeros(len(uniq), dtype=torch.long, device=self.device).index_add_(0, inv, counts),
                      torch.zeros(len(uniq), dtype=torch.float64, device=self.device).index_add_(0, inv, sums))
        self._pair_keys, self._pair_vals, self._pending = [], [], 0

    def profile(self) -> dict[str, torch.Tensor]:
        """Per latent, the `profile_tokens` tokens with the highest harmonic mean of rate (fires / (token count
        + prior), normalised by frequency) and share (fires / the latent's firings)."""
        self._compact()
        keys, counts, sums = self.pairs
        P, n = self.cfg.profile_tokens, self.n
        lat, tok = keys // self.V, keys % self.V
        tc = self.token_count[tok]
        rate = counts / (tc + self.cfg.profile_prior)
        share = counts / self.count[lat].clamp_min(1)
        score = 2 * rate * share / (rate + share)
        order = score.argsort(descending=True, stable=True)
        order = order[lat[order].argsort(stable=True)]  # by latent, best first within each latent
        lat_o = lat[order]
        start = torch.searchsorted(lat_o, torch.arange(n, device=lat.device))
        rank = torch.arange(len(order), device=lat.device) - start[lat_o]
        keep = rank < P
        sel, r, lk = order[keep], rank[keep], lat_o[keep]
        out = {"profile_token": torch.full((n, P), -1, dtype=torch.int32), "profile_fires": torch.zeros(n, P, dtype=torch.int32),
               "profile_token_count": torch.zeros(n, P, dtype=torch.int32), "profile_mean": torch.zeros(n, P)}
        cpu = lambda t: t.cpu()  # noqa: E731
        lk, r = cpu(lk), cpu(r)
        out["profile_token"][lk, r] = cpu(tok[sel]).int()
        out["profile_fires"][lk, r] = cpu(counts[sel]).int()
        out["profile_token_count"][lk, r] = cpu(tc[sel]).int()
        out["profile_mean"][lk, r] = cpu(sums[sel] / counts[sel]).float()
        return out

    @torch.no_grad()
    def finish(self, W_dec: torch.Tensor, W_U: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """(stats arrays, per-latent feature arrays, info) after the pass."""
        cfg, n = self.cfg, self.n
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        prof = self.profile()
        info["profile_seconds"] = time.perf_counter() - t0
        top, sample = self.top.sorted_by_value(), self.sample.sorted_by_value()
        feats = {"hist": self.hist.view(n, HIST_BINS),
                 **{f"top_{k}": v for k, v in top.items()}, **{f"sample_{k}": v for k, v in sample.items()}, **prof}
        t0 = time.perf_counter()
        if W_U is not None:
            feats |= logit_effects(W_dec, W_U, norm_weight, cfg.logit_tokens)
        info["logit_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # one neighbour search serves the store (cfg.neighbours) and the map (UMAP's graph, MAP_NEIGHBOURS - 1)
        near = decoder_neighbours(W_dec, max(cfg.neighbours, MAP_NEIGHBOURS - 1))
        feats |= {k: v[:, : cfg.neighbours].contiguous() for k, v in near.items()}
        info["neighbour_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xy, info["map_method"], info["map_note"] = feature_map(W_dec, cfg.map, cfg.seed, near)
        info["map_seconds"] = time.perf_counter() - t0
        info["map_neighbour_recall"] = map_neighbour_recall(xy, near["neighbour_id"], MAP_RECALL_K)
        stats = {"count": self.count, "act_sum": self.total, "act_max": self.max, "map_xy": xy,
                 "top_tokens": prof["profile_token"][:, :3].clone(), "token_count": self.token_count}
        cpu = {k: v.detach().cpu().contiguous() for k, v in stats.items()}
        return cpu, {k: v.detach().cpu().contiguous() for k, v in feats.items()}, info
