"""The log-spaced histogram every latent shares: its fixed bins, and activation quantiles read back from a
latent's counts. (`FeatureConfig`, what the store holds, is with the other configs in saekit/config.py.)"""

from __future__ import annotations

import numpy as np

from ..config import FeatureConfig

__all__ = ["FeatureConfig", "BINS_PER_DECADE", "HIST_BINS", "HIST_HI", "HIST_LO", "hist_edges", "hist_quantiles"]


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
