"""Triton kernels for sparse SAE work, installed as `saekit.kernels`.

Only `available()` lives here; the kernels are imported on first use (PEP 562 `__getattr__`) because
`@triton.jit` decides at decoration time whether to compile or interpret: a test can set
`TRITON_INTERPRET=1` after `import saekit` and still get the interpreter.

    sparse_decode(values, indices, W_dec)               differentiable  (decode.py)
    fused_encode_topk(xc, W_enc, b_enc, k, ...)         no grad         (encode.py)
    encoder_backward(grad, indices, xc, W_enc)          sparse backward (encode.py)
    encode_topk(x, W_enc, b_enc, b_dec, k, ...)         differentiable  (encode.py)
"""

from __future__ import annotations

import importlib
import os
from typing import Any

_EXPORTS = {
    "sparse_decode": "decode",
    "gather_rows": "decode",
    "row_dots": "decode",
    "segment_rows": "decode",
    "fused_encode_topk": "encode",
    "encoder_backward": "encode",
    "encode_topk": "encode",
}

__all__ = ["available", *_EXPORTS]


def available() -> bool:
    """Triton imports and can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
