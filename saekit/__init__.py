"""saekit: harvest activations, train TopK sparse autoencoders, evaluate, browse and steer features."""

from .config import DataConfig, EvalConfig, HarvestConfig, SaeConfig, TrainConfig
from .errors import SaekitError
from .sae import SparseAutoencoder, load_sae
from .train import Trainer
from .version import __version__

__all__ = ["SparseAutoencoder", "load_sae", "Trainer", "SaeConfig", "TrainConfig", "DataConfig", "HarvestConfig",
           "EvalConfig", "SaekitError", "__version__"]
