"""What the feature store holds (`FeatureConfig`) and the log-spaced histogram every latent shares: its fixed
bins, and activation quantiles read back from a latent's counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


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
    massive_multiple: float | None = None
    """Massive tokens are left out: by default those above the threshold recorded at harvest (in the cache, else
    the SAE); a number instead leaves out norms above this multiple of the first batch's median (0 keeps all)."""
    seed: int = 0
    """Seed of the random sample behind the quantile groups."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


# Histogram bins are the same for every latent and every run: log10 value in [HIST_LO, HIST_HI), BINS_PER_DECADE
# bins per decade (6.6% wide). Fixed edges make the histogram independent of batching; values outside are clamped.
HIST_LO, HIST_HI, BINS_PER_DECADE = -4, 5, 36
HIST_BINS = (HIST_HI - HIST_LO) * BINS_PER_DECADE


def hist_edges() -> np.ndarray:
    return 10.0 ** (HIST_LO + np.arange(HIST_BINS + 1) / BINS_PER_DECADE)


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
