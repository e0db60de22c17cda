"""saekit: harvest activations, train TopK sparse autoencoders, evaluate, browse and steer features."""

import sys
from pathlib import Path


def _import_hf_kernels() -> None:
    """transformers ≥ 5 imports Hugging Face's `kernels` package as it loads. A saekit checkout's top-level
    kernels/ folder (installed as saekit.kernels) and benchmarks/kernels.py shadow it whenever the checkout is on
    sys.path (`python -m saekit` in it, `python benchmarks/X.py`): import the real one first, where it could be."""
    root = Path(__file__).resolve().parents[1]
    shadows = {root, root / "benchmarks"}
    saved = sys.path[:]
    kept = [p for p in saved if Path(p or ".").resolve() not in shadows]
    if len(kept) == len(saved) or "kernels" in sys.modules:
        return
    sys.path[:] = kept
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass  # an older transformers without it: nothing to shadow
    finally:
        sys.path[:] = saved


_import_hf_kernels()

from .config import DataConfig, EvalConfig, HarvestConfig, SaeConfig, TrainConfig  # noqa: E402 (after the kernels guard)
from .errors import SaekitError  # noqa: E402 (after the kernels guard)
from .sae import SparseAutoencoder, load_sae  # noqa: E402 (after the kernels guard)
from .train import Trainer  # noqa: E402 (after the kernels guard)
from .version import __version__  # noqa: E402 (after the kernels guard)

__all__ = ["SparseAutoencoder", "load_sae", "Trainer", "SaeConfig", "TrainConfig", "DataConfig", "HarvestConfig",
           "EvalConfig", "SaekitError", "__version__"]
