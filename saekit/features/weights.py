"""Per-latent statistics from the weights alone: logit effects (W_dec ⊙ final-norm weight) · W_U, decoder-cosine
neighbours in row chunks, a 2D map of the decoder directions (UMAP; PCA when asked, or declared when umap-learn is
missing) and how many decoder neighbours the map keeps.
Also `single_thread`, for the small CPU tensor ops here and in the builder."""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch

from ..errors import DataError


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


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None, n_tokens: int = 10,
                  chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Top and bottom tokens of (W_dec[f] ⊙ w_norm) · W_U for every row f of W_dec, in chunks of rows (a slice
    such as `sae.W_dec[f:f + 1]` serves one latent). Token ids are int32, on W_dec's device."""
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


MAP_NEIGHBOURS = 15  # UMAP's n_neighbors (the point itself included): its default, local structure first
MAP_RECALL_K = 10  # the map's check: of each latent's 10 nearest map neighbours, how many are decoder neighbours
MAP_EPOCHS = 200  # UMAP's own choice above 10k points; its 500 below that tripled the layout time for no visible gain


def feature_map(W_dec: torch.Tensor, method: str = "auto", seed: int = 0,
                neighbours: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, str, str]:
    """2D coordinates of the decoder directions, the method that ran ("umap" | "pca") and a note saying why.

    auto and umap: UMAP (cosine, `seed`, one thread so the seed fixes the map) on the exact cosine neighbours
    (`decoder_neighbours` with ≥ MAP_NEIGHBOURS - 1 per row; computed here when not given), which spares
    pynndescent's approximate search and its numba compile. auto falls back to PCA only when umap-learn is
    missing or there are too few latents, and the note says so; umap raises instead."""
    n = W_dec.shape[0]
    W = torch.nn.functional.normalize(W_dec.float(), dim=1).cpu()
    if method not in ("auto", "umap", "pca"):
        raise DataError(f"unknown map method {method!r}: use auto, umap or pca.")
    note = "PCA: asked for (--map pca)"
    if method != "pca":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise DataError("--map umap needs umap-learn: pip install umap-learn (or use --map pca).") from None
            note = "PCA: umap-learn is not installed (pip install umap-learn, then rebuild the store for a UMAP map)"
        else:
            if n > MAP_NEIGHBOURS:
                if neighbours is None or neighbours["neighbour_id"].shape[1] < MAP_NEIGHBOURS - 1:
                    neighbours = decoder_neighbours(W_dec, MAP_NEIGHBOURS - 1)
                return _umap(umap, W, seed, neighbours), "umap", (
                    f"UMAP: cosine, {MAP_NEIGHBOURS} exact neighbours, {MAP_EPOCHS} epochs, seed {seed}")
            if method == "umap":
                raise DataError(f"--map umap needs more than {MAP_NEIGHBOURS} latents (this SAE has {n}); use --map pca.")
            note = f"PCA: {n} latents are too few for UMAP (it needs more than {MAP_NEIGHBOURS})"
    Wc = (W - W.mean(0)).double()
    with single_thread():  # a d×d eigh: 0.2 s on one thread, 14 s on two on a loaded 2-core machine (measured)
        _, vecs = torch.linalg.eigh(Wc.t() @ Wc)  # d×d covariance: far cheaper than an SVD of the n×d matrix
    return (Wc @ vecs[:, -2:].flip(1)).float().contiguous(), "pca", note


def _umap(umap, W: torch.Tensor, seed: int, neighbours: dict[str, torch.Tensor]) -> torch.Tensor:
    import warnings

    import numpy as np

    k, n = MAP_NEIGHBOURS - 1, W.shape[0]
    ids = torch.cat([torch.arange(n)[:, None], neighbours["neighbour_id"][:, :k].long().cpu()], 1)  # self first
    dist = torch.cat([torch.zeros(n, 1), (1 - neighbours["neighbour_cos"][:, :k].float().cpu()).clamp_min(0)], 1)
    _cache_umap_jit()
    with warnings.catch_warnings():  # we never transform new points, so UMAP's search index is not needed
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        xy = umap.UMAP(n_neighbors=MAP_NEIGHBOURS, metric="cosine", n_epochs=MAP_EPOCHS, random_state=seed, n_jobs=1,
                       precomputed_knn=(ids.numpy().astype(np.int32), dist.numpy().astype(np.float32), None),
                       ).fit_transform(W.numpy())
    return torch.as_tensor(xy, dtype=torch.float32)


@functools.cache
def _cache_umap_jit() -> None:
    """umap-learn's graph and layout kernels are numba functions without cache=True, so every process compiled
    them again: 9 s of CPU a map (4,608 latents: 12 s the first map, 3.5 s once cached; benchmarks/feature_map.py).
    Numba's on-disk cache keeps them, so only the first map after an install pays (`make setup` pays it). Only a
    speed matter: a umap-learn that renames them compiles as before."""
    from umap import layouts, umap_

    for fn in (getattr(umap_, "smooth_knn_dist", None), getattr(umap_, "compute_membership_strengths", None),
               getattr(layouts, "_nb_optimize_layout_euclidean_single_epoch", None)):
        if hasattr(fn, "enable_caching"):
            fn.enable_caching()


@torch.no_grad()
def map_neighbour_recall(xy: torch.Tensor, neighbour_id: torch.Tensor, k: int = 10, rows: int = 4096,
                         chunk: int = 1024) -> float:
    """How much of the decoder geometry the map keeps: the mean fraction of each latent's k nearest map neighbours
    (Euclidean in 2D) that are among its k nearest decoder-cosine neighbours (`neighbour_id`, self excluded).
    1 is perfect; a random map scores about k / n. Over at most `rows` latents (a fixed random sample beyond: the
    mean's standard error stays under 1%, and 32k latents cost 2 s instead of 18)."""
    xy = xy.float().cpu()
    n = xy.shape[0]
    k = min(k, n - 1, neighbour_id.shape[1])
    if k < 1:
        return float("nan")
    ids = torch.arange(n) if n <= rows else torch.randperm(n, generator=torch.Generator().manual_seed(0))[:rows]
    hits = 0
    for lo in range(0, len(ids), chunk):
        rs = ids[lo: lo + chunk]
        d = torch.cdist(xy[rs], xy)
        d[torch.arange(len(rs)), rs] = math.inf
        near = d.topk(k, dim=1, largest=False).indices
        hits += int((near[:, :, None] == neighbour_id[rs, :k].long()[:, None, :]).any(2).sum())
    return hits / (len(ids) * k)
