"""The feature store: every latent's dashboard data from ONE streaming pass over a token budget.

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
After the pass, from the weights alone: logit effects (W_dec ⊙ final-norm weight) · W_U, decoder-cosine
neighbours in row chunks, and a 2D map (UMAP when `umap-learn` is installed, else PCA; the manifest says
which).

Sources: the model + SAE over the SAE's dataset (`saekit analyze SAE_DIR`), or a cached harvest
(`--activations DIR`: no model forward at all). Both batch contexts identically, so they build the same store.

Store directory (the app reads the big arrays lazily, one latent's rows at a time):
  manifest.json            SAE hash, model, hook, dataset, tokens, config, saekit version, map method
  stats.safetensors        small per-latent arrays the overview needs at once
  features.safetensors     per-latent rows: histogram, examples + windows, sample, logits, profile, neighbours
  contexts.safetensors     token ids of every analysed context (example windows index into it)
  vocab.safetensors        each token's bytes, so pieces display correctly (multi-byte characters merged)
  labels.sqlite            labels and notes written by the app (kept when the store is rebuilt)
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError, FileFormatError, ShapeError
from .files import read_json, write_json, write_tensors

STORE_KIND = "saekit-feature-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS, FEATURES, CONTEXTS, VOCAB = "stats.safetensors", "features.safetensors", "contexts.safetensors", "vocab.safetensors"

# Histogram bins are the same for every latent and every run: log10 value in [HIST_LO, HIST_HI), BINS_PER_DECADE
# bins per decade (6.6% wide). Fixed edges make the histogram independent of batching; values outside are clamped.
HIST_LO, HIST_HI, BINS_PER_DECADE = -4, 5, 36
HIST_BINS = (HIST_HI - HIST_LO) * BINS_PER_DECADE


def hist_edges() -> np.ndarray:
    return 10.0 ** (HIST_LO + np.arange(HIST_BINS + 1) / BINS_PER_DECADE)


@dataclass
class FeatureConfig:
    """What the feature store holds and over how many tokens it is computed."""

    tokens: int = 300_000
    """Tokens to analyse (position 0 and separators never count; massive tokens are then left out)."""
    top_n: int = 20
    """Top activating examples kept per latent (at most one per context)."""
    window_before: int = 24
    """Tokens shown before an example's activating token."""
    window_after: int = 8
    """Tokens shown after an example's activating token."""
    sample_size: int = 40
    """Random firings kept per latent (at most one per context) to fill the quantile groups."""
    quantile_groups: int = 5
    """Quantile bands of each latent's activations (equal shares of its firings, not equal-width bins)."""
    profile_tokens: int = 10
    """Tokens kept in each latent's token profile."""
    profile_prior: float = 2.0
    """Token profile rank = harmonic mean of rate = fires on token / (token count + prior) and share = fires on
    token / the latent's firings: frequent tokens it rarely fires on and rare tokens seen once both rank low."""
    logit_tokens: int = 10
    """Top and bottom tokens of each latent's logit effect."""
    neighbours: int = 10
    """Nearest latents by decoder cosine."""
    map: Literal["auto", "umap", "pca"] = "auto"
    """2D map of decoder directions: umap (needs umap-learn), pca, or auto (umap if installed)."""
    batch_contexts: int = 16
    """Contexts per model forward (and per bookkeeping batch)."""
    massive_multiple: float = 10.0
    """Leave out tokens whose activation norm exceeds this multiple of the first batch's median (0 keeps all)."""
    seed: int = 0
    """Seed of the random sample behind the quantile groups."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


# ----------------------------------------------------------------------------- token display

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_bytes(tokenizer) -> list[bytes]:
    """Each token id's raw bytes, undoing the tokenizer's byte-level (or SentencePiece byte-fallback) encoding.
    Decoding tokens one at a time garbles characters split across tokens; joining bytes does not."""
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    kind = ""
    try:
        dec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kind = json.dumps(dec)
    except Exception:  # slow tokenizers have no backend; fall back to decoding each id
        pass
    byte_level = '"ByteLevel"' in kind
    byte_fallback = '"ByteFallback"' in kind or '"Metaspace"' in kind or "\u2581" in kind
    table = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes] = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            out.append(b"")
        elif i in special:
            out.append(piece.encode())
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif byte_fallback or byte_level:
            out.append(piece.replace("\u2581", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    return out


def display_token(s: str) -> str:
    """A token shown on its own: spaces as ␣, newline ↵, tab ⇥, other control characters as \\xNN."""
    s = s.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


class Vocab:
    """Token bytes as stored in the feature store: token strings and display pieces without a tokenizer."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, special: np.ndarray):
        self.blob, self.offsets, self.special = blob.tobytes(), offsets, special

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Vocab:
        bs = vocab_bytes(tokenizer)
        offsets = np.zeros(len(bs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in bs])
        special = np.zeros(len(bs), dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < len(bs)]] = True
        return cls(np.frombuffer(b"".join(bs) or b"\0", dtype=np.uint8), offsets, special)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bytes": torch.from_numpy(np.frombuffer(self.blob, dtype=np.uint8).copy()),
                "offsets": torch.from_numpy(self.offsets), "special": torch.from_numpy(self.special)}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def token_bytes(self, i: int) -> bytes:
        return self.blob[self.offsets[i]: self.offsets[i + 1]] if 0 <= i < len(self) else b""

    def token_str(self, i: int) -> str:
        """One token on its own; bytes of a partial character are shown as \\xNN escapes."""
        return self.token_bytes(int(i)).decode("utf-8", errors="backslashreplace")

    def pieces(self, ids) -> list[str]:
        """Display strings for a token sequence: bytes are decoded as one stream, so each token shows the
        characters that end in it (a character split over two tokens appears whole on the second)."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = [dec.decode(self.token_bytes(int(i))) for i in ids]
        if out:
            out[-1] += dec.decode(b"", final=True)
        return out

    @cached_property
    def strings(self) -> list[str]:
        return [self.token_str(i) for i in range(len(self))]


# ----------------------------------------------------------------------------- the one-pass builder

@contextmanager
def single_thread(enabled: bool = True):
    """Run small CPU tensor ops (and small LAPACK calls) on one thread; restores the thread count after."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        feats |= decoder_neighbours(W_dec, cfg.neighbours)
        info["neighbour_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xy, info["map_method"] = feature_map(W_dec, cfg.map, cfg.seed)
        info["map_seconds"] = time.perf_counter() - t0
        stats = {"count": self.count, "act_sum": self.total, "act_max": self.max, "map_xy": xy,
                 "top_tokens": prof["profile_token"][:, :3].clone(), "token_count": self.token_count}
        cpu = {k: v.detach().cpu().contiguous() for k, v in stats.items()}
        return cpu, {k: v.detach().cpu().contiguous() for k, v in feats.items()}, info


# ----------------------------------------------------------------------------- weight-only statistics

@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None, n_tokens: int = 10,
                  chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Top and bottom tokens of (W_dec[f] ⊙ w_norm) · W_U for every latent, in chunks of latents."""
    W_U = W_U.float().to(W_dec.device)
    w = norm_weight.float().to(W_dec.device) if norm_weight is not None else None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("logit_top_token", "logit_top_value", "logit_bottom_token",
                                                           "logit_bottom_value")}
    for lo in range(0, W_dec.shape[0], chunk):
        d = W_dec[lo: lo + chunk].float()
        logits = (d * w if w is not None else d) @ W_U
        top, bot = logits.topk(n_tokens, dim=1), logits.topk(n_tokens, dim=1, largest=False)
        out["logit_top_token"].append(top.indices.int())
        out["logit_top_value"].append(top.values)
        out["logit_bottom_token"].append(bot.indices.int())
        out["logit_bottom_value"].append(bot.values)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, k: int = 10, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """The k latents whose decoder rows have the highest cosine with each latent's (never itself).
    Row chunks keep memory at chunk × d_sae, so 32k+ latents fit."""
    W = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n = W.shape[0]
    k = min(k, n - 1)
    ids, cos = [], []
    for lo in range(0, n, chunk):
        sims = W[lo: lo + chunk] @ W.t()
        r = torch.arange(sims.shape[0], device=W.device)
        sims[r, r + lo] = -math.inf
        top = sims.topk(k, dim=1)
        ids.append(top.indices.int())
        cos.append(top.values)
    return {"neighbour_id": torch.cat(ids), "neighbour_cos": torch.cat(cos)}


def feature_map(W_dec: torch.Tensor, method: str = "auto", seed: int = 0) -> tuple[torch.Tensor, str]:
    """2D coordinates of the decoder directions: UMAP (cosine) when available/asked, else PCA."""
    W = torch.nn.functional.normalize(W_dec.float(), dim=1).cpu()
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise DataError("--map umap needs umap-learn: pip install 'saekit[umap]' (or use --map pca).") from None
        else:
            xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(W.numpy())
            return torch.as_tensor(xy, dtype=torch.float32), "umap"
    Wc = (W - W.mean(0)).double()
    with single_thread():  # a d×d eigh: 0.2 s on one thread, 14 s on two on a loaded 2-core machine (measured)
        _, vecs = torch.linalg.eigh(Wc.t() @ Wc)  # d×d covariance: far cheaper than an SVD of the n×d matrix
    return (Wc @ vecs[:, -2:].flip(1)).float().contiguous(), "pca"


# ----------------------------------------------------------------------------- quantile groups

def hist_quantiles(counts: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Activation values at quantiles `qs` of a latent's firings, from its log-spaced histogram
    (geometric interpolation inside the bin: exact to within one bin, 6.6%)."""
    edges = hist_edges()
    total = counts.sum()
    if total == 0:
        return np.zeros(len(qs))
    cum = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for q in qs:
        target = q * total
        b = int(np.clip(np.searchsorted(cum, target, side="left") - 1, 0, len(counts) - 1))
        frac = (target - cum[b]) / max(counts[b], 1)
        lo, hi = np.log(edges[b]), np.log(edges[b + 1])
        out.append(float(np.exp(lo + np.clip(frac, 0, 1) * (hi - lo))))
    return np.array(out)


# ----------------------------------------------------------------------------- running the pass

def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _massive_keep(acts: torch.Tensor, ref: list[float], multiple: float) -> torch.Tensor:
    """Keep mask: drop tokens whose norm exceeds `multiple` × the first batch's median norm."""
    norms = acts.norm(dim=1)
    if not ref:
        ref.append(float(norms.median()) if len(norms) else 0.0)
    if multiple <= 0 or not ref[0]:
        return torch.ones(len(acts), dtype=torch.bool, device=acts.device)
    return norms <= multiple * ref[0]


def _sae_context(sae_dir: str | Path):
    from .sae import load_sae

    sae = load_sae(sae_dir)
    if not sae.hook:
        raise FileFormatError(f"{sae_dir}/cfg.json records no hook; the feature store needs to know where the SAE reads.")
    return sae


def analyze(sae_dir: str | Path, out: str | Path, cfg: FeatureConfig | None = None, activations: str | Path | None = None,
            model=None, model_arg: str | None = None, dataset: str | None = None, progress: bool = True) -> Path:
    """Build the feature store for the SAE in `sae_dir` into `out` (one pass; see module doc).

    `activations`: a cache written by `saekit harvest`/`train` (no model forward). Otherwise `model` (or
    `model_arg`, default the SAE's recorded model) runs over the SAE's dataset (or `dataset`).
    """
    from . import __version__
    from .lm import load_model, unembedding

    cfg = cfg or FeatureConfig()
    device = _resolve_device(cfg.device)
    sae_dir, out = Path(sae_dir), Path(out)
    sae = _sae_context(sae_dir).to(device)
    info = sae.info
    hook = sae.hook
    chosen_model = model_arg
    model_arg = model_arg or info.get("model_arg", "default")
    data = {"dataset": dataset or info.get("dataset", "default"), "text_column": info.get("text_column", "text"),
            "context_size": int(info.get("context_size", 128)), "heldout_fraction": info.get("heldout_fraction", 0.05),
            "seed": info.get("seed", 0)}
    cache = None
    if activations is not None:
        from .harvest import read_cache

        cache = read_cache(activations, hooks=[hook])
        if cache.acts[hook].shape[1] != sae.cfg.d_in:
            raise ShapeError(f"the cache in {activations} has width {cache.acts[hook].shape[1]} at {hook}, "
                             f"but the SAE's d_in is {sae.cfg.d_in}.")
        if cache.meta.get("model") and info.get("model") and cache.meta["model"] != info["model"]:
            raise DataError(f"the cache in {activations} holds activations of {cache.meta['model']}, but the SAE was "
                            f"trained on {info['model']}; use a cache of the SAE's model (or drop --activations).")
        model_arg = chosen_model or cache.meta.get("model_arg", model_arg)
        data |= {k: cache.meta[k] for k in data if k in cache.meta and not (k == "dataset" and dataset)}
    if model is None:
        print(f"saekit: loading model {model_arg!r}", flush=True)
        model = load_model(model_arg, device=device if cache is None else "cpu")
    tokenizer = model.tokenizer
    vocab = Vocab.from_tokenizer(tokenizer)
    W_U, norm_weight = unembedding(model)
    vocab_size = max(W_U.shape[1], len(vocab))
    builder = FeatureBuilder(sae.cfg.d_sae, vocab_size, cfg, device)
    ref: list[float] = []
    budget = cfg.tokens
    seen = massive = 0
    forward_s = 0.0
    t_data = time.perf_counter()
    contexts = _contexts_for(tokenizer, data) if cache is None else None
    data_s = time.perf_counter() - t_data
    start = time.perf_counter()
    bar = tqdm(total=budget, desc="analyze", unit="tok", disable=not progress, dynamic_ncols=True)

    def consume(acts, ids, pos, ctx) -> bool:
        nonlocal seen, massive
        take = min(len(ids), budget - seen)
        acts, ids, pos, ctx = acts[:take], ids[:take], pos[:take], ctx[:take]
        seen += take
        keep = _massive_keep(acts, ref, cfg.massive_multiple)
        massive += int((~keep).sum())
        values, indices = sae.encode(acts[keep].to(device))
        builder.add(values, indices, ids[keep], pos[keep], ctx[keep])
        bar.update(take)
        return seen >= budget

    if cache is None:
        from .harvest import Harvester

        harvester = Harvester(model, [hook], device=device)
        gen = harvester.batches(contexts, cfg.batch_contexts)
        while True:
            t0 = time.perf_counter()
            batch = next(gen, None)
            forward_s += time.perf_counter() - t0
            if batch is None:
                break
            acts, ids, pos, ctx = batch
            if consume(acts[hook], ids, pos, ctx):
                break
        source = {"source": "model"}
    else:
        group = cache.context_ids // cfg.batch_contexts
        cuts = torch.nonzero(group[1:] != group[:-1]).squeeze(1) + 1
        bounds = [0, *cuts.tolist(), len(group)]
        for lo, hi in zip(bounds, bounds[1:]):
            if consume(cache.acts[hook][lo:hi], cache.token_ids[lo:hi], cache.positions[lo:hi], cache.context_ids[lo:hi]):
                break
        source = {"source": "activations", "activations": str(Path(activations).resolve())}
        try:  # tokenizing only: the windows show the very contexts the cache was harvested from
            packed = _contexts_for(tokenizer, data)
        except DataError:
            packed = None
        contexts = _contexts_from_cache(cache, packed, tokenizer, data["context_size"])
    bar.close()
    if seen < budget:
        print(f"saekit: the {'cache' if cache is not None else 'dataset'} gave {seen:,} tokens, fewer than the "
              f"{budget:,} asked; analysing those.")
    if builder.tokens == 0:
        raise DataError("no tokens to analyse; check the dataset or the activation cache.")
    pass_s = time.perf_counter() - start
    stats, feats, finfo = builder.finish(sae.W_dec.detach(), W_U.to(device), None if norm_weight is None else norm_weight.to(device))
    n_ctx = int(max(int(feats["top_ctx"].max()), int(feats["sample_ctx"].max()), 0)) + 1
    used_contexts = contexts[: max(n_ctx, 1)].to(torch.int32)
    from .lm import model_id

    manifest = {
        "kind": STORE_KIND, "format_version": FORMAT_VERSION, "saekit_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sae_dir": str(sae_dir.resolve()), "sae_weights_sha256": sae.weights_hash(),
        "sae": dataclasses.asdict(sae.cfg), "hook": hook, "model": info.get("model") or model_id(model),
        "model_arg": model_arg, **data, "split": "train", **source,
        "tokens": builder.tokens, "tokens_seen": seen, "massive_excluded": massive,
        "massive_median_norm": ref[0] if ref else None, "d_sae": sae.cfg.d_sae, "vocab_size": vocab_size,
        "config": dataclasses.asdict(cfg), "map_method": finfo.pop("map_method"),
        "hist": {"log10_lo": HIST_LO, "log10_hi": HIST_HI, "bins_per_decade": BINS_PER_DECADE},
        "final_norm_applied": norm_weight is not None,
        "timings": {"data_seconds": data_s, "pass_seconds": pass_s, "forward_seconds": forward_s if cache is None else 0.0,
                    "tokens_per_s": seen / max(pass_s, 1e-9), **finfo,
                    "total_seconds": time.perf_counter() - start},
    }
    write_store(out, manifest, stats, feats, used_contexts, vocab, started=start)
    print(f"feature store: {builder.tokens:,} tokens ({massive} massive left out), {sae.cfg.d_sae} latents, "
          f"{seen / max(pass_s, 1e-9):,.0f} tokens/s, map {manifest['map_method']} → {out}")
    return out


def _contexts_for(tokenizer, data: dict[str, Any]) -> torch.Tensor:
    from .data import load_contexts

    train, _ = load_contexts(tokenizer, data["dataset"], data["context_size"], data["heldout_fraction"], data["seed"],
                             data["text_column"])
    return train.tokens


def _contexts_from_cache(cache, contexts: torch.Tensor | None, tokenizer, T: int) -> torch.Tensor:
    """The token contexts the cache came from: the re-packed dataset when it agrees with the cached token
    ids, else rebuilt from them (dropped positions become BOS at 0 and the separator elsewhere)."""
    n_ctx = int(cache.context_ids.max()) + 1 if len(cache) else 0
    ctx, pos, ids = cache.context_ids.long(), cache.positions.long(), cache.token_ids.long()
    if contexts is not None and len(contexts) >= n_ctx and contexts.shape[1] == T:
        if torch.equal(contexts[ctx, pos], ids):
            return contexts[:n_ctx]
    print("saekit: the dataset no longer matches the activation cache; example windows show the cached tokens "
          "only (dropped positions appear as separators).")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    out = torch.full((n_ctx, T), sep, dtype=torch.long)
    out[:, 0] = bos
    out[ctx, pos] = ids
    return out


def write_store(out: str | Path, manifest: dict[str, Any], stats: dict[str, torch.Tensor],
                feats: dict[str, torch.Tensor], contexts: torch.Tensor, vocab: Vocab, started: float | None = None) -> Path:
    """Write every array (atomically), then the manifest last; labels.sqlite in `out` is left alone.
    With `started` (a perf_counter time), the manifest's timings get the write time and the total."""
    out = Path(out)
    t0 = time.perf_counter()
    write_tensors(out / STATS, stats)
    write_tensors(out / FEATURES, feats)
    write_tensors(out / CONTEXTS, {"tokens": contexts.to(torch.int32)})
    write_tensors(out / VOCAB, vocab.tensors())
    if started is not None:
        manifest["timings"] |= {"write_seconds": time.perf_counter() - t0, "total_seconds": time.perf_counter() - started}
    write_json(out / MANIFEST, manifest)
    return out


# ----------------------------------------------------------------------------- reading a store

@dataclass
class Example:
    """One activating context: the window's tokens, display pieces and the latent's activation on each."""

    value: float
    context: int
    position: int
    tokens: list[int]
    pieces: list[str]
    acts: list[float]
    focus: int  # index in the window of the token the example was chosen for


@dataclass
class QuantileGroup:
    q_lo: float
    q_hi: float
    lo: float
    hi: float
    examples: list[Example]


@dataclass
class Feature:
    id: int
    count: int
    tokens: int
    density: float
    mean: float
    max: float
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    top: list[Example]
    groups: list[QuantileGroup]
    logits_top: list[tuple[int, str, float]]
    logits_bottom: list[tuple[int, str, float]]
    profile: list[dict[str, Any]]
    neighbours: list[tuple[int, float]]


class FeatureStore:
    """Read-only view of a store directory. Small arrays load once; a feature's rows load on demand
    (safetensors slices: only that latent's bytes are read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        man_path = self.path / MANIFEST
        if not man_path.is_file():
            raise FileFormatError(f"{self.path} is not a feature store (no {MANIFEST}); build one with "
                                  "`saekit analyze SAE_DIR --out STORE`.")
        self.manifest = read_json(man_path)
        if self.manifest.get("kind") != STORE_KIND:
            raise FileFormatError(f"{self.path}/{MANIFEST} is not a saekit feature store manifest.")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise FileFormatError(f"{self.path} was written by a newer saekit (format {self.manifest['format_version']}); "
                                  "upgrade saekit.")
        self.d_sae = int(self.manifest["d_sae"])
        self.tokens = int(self.manifest["tokens"])
        self._local = threading.local()  # safetensors handles per thread: app sessions are threads

    def _open(self, name: str):
        from safetensors import safe_open

        handles = self._local.__dict__.setdefault("handles", {})
        if name not in handles:
            path = self.path / name
            if not path.is_file():
                raise FileFormatError(f"{path} is missing; rebuild the store with `saekit analyze`.")
            handles[name] = safe_open(str(path), framework="pt")
        return handles[name]

    def _all(self, name: str) -> dict[str, torch.Tensor]:
        f = self._open(name)
        return {k: f.get_tensor(k) for k in f.keys()}

    def _row(self, key: str, i: int) -> torch.Tensor:
        return self._open(FEATURES).get_slice(key)[i: i + 1][0]

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        s = {k: v.numpy() for k, v in self._all(STATS).items()}
        count = s["count"]
        s["density"] = count / max(self.tokens, 1)
        s["mean"] = np.where(count > 0, s["act_sum"] / np.maximum(count, 1), 0.0)
        return s

    @cached_property
    def vocab(self) -> Vocab:
        v = self._all(VOCAB)
        return Vocab(v["bytes"].numpy(), v["offsets"].numpy(), v["special"].numpy())

    @cached_property
    def feature_keys(self) -> set[str]:
        return set(self._open(FEATURES).keys())

    def column(self, key: str) -> np.ndarray:
        """A whole per-latent array from features.safetensors (e.g. for search)."""
        return self._open(FEATURES).get_tensor(key).numpy()

    def top_tokens_text(self, i: int, n: int = 3) -> str:
        ids = self.stats["top_tokens"][i][:n]
        return " · ".join(display_token(self.vocab.token_str(t)) for t in ids if t >= 0)

    def _examples(self, prefix: str, i: int, keep=None) -> list[Example]:
        value, ctx, pos, acts = (self._row(f"{prefix}_{k}", i) for k in ("value", "ctx", "pos", "acts"))
        tokens_slice = self._open(CONTEXTS).get_slice("tokens")
        cfg = self.manifest["config"]
        before, W = cfg["window_before"], cfg["window_before"] + 1 + cfg["window_after"]
        T = tokens_slice.get_shape()[1]
        out = []
        for j in range(len(ctx)):
            c = int(ctx[j])
            if c < 0 or (keep is not None and j not in keep):
                continue
            p = int(pos[j])
            lo, hi = max(0, p - before), min(T, p - before + W)
            ids = tokens_slice[c: c + 1, lo:hi][0].tolist()
            a = acts[j, lo - (p - before): hi - (p - before)].float().tolist()
            out.append(Example(float(value[j]), c, p, ids, self.vocab.pieces(ids), a, p - lo))
        return out

    def feature(self, i: int, groups: int | None = None, per_group: int = 5) -> Feature:
        """Everything a feature page shows for latent i."""
        if not 0 <= i < self.d_sae:
            raise IndexError(f"feature {i} is out of range (the store has {self.d_sae} latents).")
        s = self.stats
        count = int(s["count"][i])
        hist = self._row("hist", i).numpy()
        groups = groups or int(self.manifest["config"]["quantile_groups"])
        vs = self.vocab
        logits_top = logits_bottom = []
        if "logit_top_token" in self.feature_keys:
            logits_top = [(int(t), vs.token_str(t), float(v)) for t, v in
                          zip(self._row("logit_top_token", i), self._row("logit_top_value", i))]
            logits_bottom = [(int(t), vs.token_str(t), float(v)) for t, v in
                             zip(self._row("logit_bottom_token", i), self._row("logit_bottom_value", i))]
        prof = [{"token": int(t), "string": vs.token_str(t), "fires": int(f), "token_count": int(c),
                 "rate": int(f) / max(int(c), 1), "share": int(f) / max(count, 1), "mean_act": float(m)}
                for t, f, c, m in zip(*(self._row(k, i) for k in ("profile_token", "profile_fires",
                                                                   "profile_token_count", "profile_mean")))
                if int(t) >= 0]
        return Feature(
            id=i, count=count, tokens=self.tokens, density=count / max(self.tokens, 1),
            mean=float(s["mean"][i]), max=float(s["act_max"][i]), hist_edges=hist_edges(), hist_counts=hist,
            top=self._examples("top", i), groups=self._groups(i, hist, groups, per_group),
            logits_top=logits_top, logits_bottom=logits_bottom, profile=prof,
            neighbours=[(int(j), float(c)) for j, c in zip(self._row("neighbour_id", i), self._row("neighbour_cos", i))],
        )

    def _groups(self, i: int, hist: np.ndarray, groups: int, per_group: int) -> list[QuantileGroup]:
        """Bands between activation quantiles (from all firings), filled from the uniform sample."""
        if hist.sum() == 0:
            return []
        qs = np.linspace(0, 1, groups + 1)
        edges = hist_quantiles(hist, qs)
        edges[0], edges[-1] = 0.0, np.inf
        value, ctx = self._row("sample_value", i).numpy(), self._row("sample_ctx", i).numpy()
        valid = ctx >= 0
        out = []
        for g in range(groups - 1, -1, -1):  # highest band first, like the top examples above it
            lo, hi = edges[g], edges[g + 1]
            idx = np.nonzero(valid & (value >= lo) & (value < hi))[0]
            if len(idx) > per_group:  # spread over the band: idx is sorted by value (descending)
                idx = idx[np.linspace(0, len(idx) - 1, per_group).round().astype(int)]
            out.append(QuantileGroup(float(qs[g]), float(qs[g + 1]), float(lo), float(hi),
                                     self._examples("sample", i, keep=set(idx.tolist()))))
        return out

    def search_tokens(self, query: str, exact: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Latents whose token profile or top logit tokens hold a token matching `query` (stripped,
        case-insensitive; `exact` or substring)."""
        if not query:
            return []
        q = query.lower()
        qs = q.strip() or q  # a query of only whitespace looks for whitespace tokens
        strings = self.vocab.strings
        match = np.array([(s.lower().strip() == qs or s.lower() == q) if exact else (qs in s.lower())
                          for s in strings], dtype=bool)
        if not match.any():
            return []
        rows: dict[int, dict[str, Any]] = {}
        prof = self.column("profile_token")
        rate = self.column("profile_fires") / np.maximum(self.column("profile_token_count"), 1)
        hit = (prof >= 0) & match[np.clip(prof, 0, len(match) - 1)]
        for f, j in zip(*np.nonzero(hit)):
            r = rows.setdefault(int(f), {"feature": int(f), "profile_rate": 0.0, "logit": None, "tokens": set()})
            r["profile_rate"] = max(r["profile_rate"], float(rate[f, j]))
            r["tokens"].add(strings[prof[f, j]])
        if "logit_top_token" in self.feature_keys:
            lt, lv = self.column("logit_top_token"), self.column("logit_top_value")
            hit = match[np.clip(lt, 0, len(match) - 1)]
            for f, j in zip(*np.nonzero(hit)):
                r = rows.setdefault(int(f), {"feature": int(f), "profile_rate": 0.0, "logit": None, "tokens": set()})
                r["logit"] = max(r["logit"] or -np.inf, float(lv[f, j]))
                r["tokens"].add(strings[lt[f, j]])
        out = sorted(rows.values(), key=lambda r: (-r["profile_rate"], -(r["logit"] or -np.inf)))[:limit]
        for r in out:
            r["tokens"] = " · ".join(sorted(display_token(t) for t in r["tokens"]))
            r["density"] = float(self.stats["density"][r["feature"]])
        return out


def open_store(path: str | Path) -> FeatureStore:
    return FeatureStore(path)


# ----------------------------------------------------------------------------- CLI

def cmd_analyze(values: dict[str, Any]) -> int:
    """`saekit analyze SAE_DIR [--out STORE] [--activations DIR] [--tokens N] …`"""
    cfg = FeatureConfig(**{f.name: values[f.name] for f in dataclasses.fields(FeatureConfig)
                           if values.get(f.name) is not None})
    sae_dir = Path(values["sae_dir"])
    out = Path(values.get("out") or sae_dir.parent / "store")
    analyze(sae_dir, out, cfg, activations=values.get("activations"), model_arg=values.get("model"),
            dataset=values.get("dataset"))
    print(f"browse it with:  saekit browse {out}")
    return 0
