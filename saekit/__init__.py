"""saekit: harvest activations, train TopK sparse autoencoders, evaluate, browse and steer features."""

__version__ = "0.1.0"

from .config import DataConfig, EvalConfig, HarvestConfig, SaeConfig, TrainConfig  # noqa: E402
from .errors import SaekitError  # noqa: E402
from .sae import SparseAutoencoder, load_sae  # noqa: E402
from .train import Trainer  # noqa: E402

__all__ = ["SparseAutoencoder", "load_sae", "Trainer", "SaeConfig", "TrainConfig", "DataConfig", "HarvestConfig",
           "EvalConfig", "SaekitError", "__version__"]
