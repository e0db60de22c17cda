"""The feature store: every latent's dashboard data from ONE streaming pass over a token budget.

  config     FeatureConfig; the fixed log-spaced histogram bins and quantiles read from them
  builder    FeatureBuilder: the one-pass reductions over sparse codes (counts, histogram, top examples,
             a uniform sample for quantile groups, token profile)
  weights    statistics of the weights alone: logit effects, decoder neighbours, the 2D map
  store      the directory format, write_store, and FeatureStore (the app's lazy reader)
  analysis   analyze: the pass over a model + dataset or a cached harvest
Token bytes and display (Vocab, display_token) live in saekit.tokens.
"""

from ..tokens import Vocab, display_token
from .analysis import analyze
from .builder import FeatureBuilder
from .config import BINS_PER_DECADE, HIST_BINS, HIST_HI, HIST_LO, FeatureConfig, hist_edges, hist_quantiles
from .store import (
    FORMAT_VERSION,
    STORE_KIND,
    Example,
    Feature,
    FeatureStore,
    QuantileGroup,
    open_store,
    write_store,
)
from .weights import decoder_neighbours, feature_map, logit_effects

__all__ = [
    "BINS_PER_DECADE", "FORMAT_VERSION", "HIST_BINS", "HIST_HI", "HIST_LO", "STORE_KIND", "Example", "Feature",
    "FeatureBuilder", "FeatureConfig", "FeatureStore", "QuantileGroup", "Vocab", "analyze",
    "decoder_neighbours", "display_token", "feature_map", "hist_edges", "hist_quantiles", "logit_effects",
    "open_store", "write_store",
]
