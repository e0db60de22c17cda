"""The one dispatch for sparse SAE work: TopK encode and sparse decode, with sparse backward passes.

CUDA tensors go to the Triton kernels in `saekit.kernels`; CPU tensors to the torch path below.
`SAEKIT_KERNELS=auto|triton|torch` overrides the choice, and `backend()` tells which path ran last,
so no caller silently gets the slow path.

Why custom autograd: a dense TopK SAE spends 12·d·n FLOPs per token; the only dense work we need is
the encoder forward GEMM (2·d·n). Everything after TopK touches k latents per token.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_last_backend: str | None = None


def requested_backend() -> str:
    choice = os.environ.get("SAEKIT_KERNELS", "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"SAEKIT_KERNELS must be auto, triton or torch, not {choice!r}")
    return choice


def _pick(device: torch.device) -> str:
    """Dispatch on the tensor's device, not on whether triton imports (it imports on CPU-only hosts)."""
    global _last_backend
    choice = requested_backend()
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("SAEKIT_KERNELS=triton needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter).")
    _last_backend = choice
    return choice


def _triton_available() -> bool:
    try:
        from .kernels import available
    except ImportError:
        return False
    return available()


def backend() -> str | None:
    """Which path the last sparse op ran on: 'triton' or 'torch' (None before any op)."""
    return _last_backend


# ----------------------------------------------------------------------------- decode

def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j values[t, j] · W_dec[indices[t, j]] (+ b_dec). values/indices [N, k], W_dec [n, d]."""
    if _pick(values.device) == "triton":
        from .kernels import sparse_decode as triton_decode
        out = triton_decode(values, indices, W_dec)
    else:
        # embedding_bag's backward is already sparse: per-sample-weight grads are k dot products per
        # token, and the weight grad is an index_add over the k selected rows.
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


# ----------------------------------------------------------------------------- encode

def topk_preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the pre-activations (x − b_dec)·W_enc + b_enc, no grad, no ReLU. Used at inference."""
    if _pick(x.device) == "triton":
        from .kernels import fused_encode_topk
        return fused_encode_topk(x - b_dec, W_enc, b_enc, k)
    pre = torch.addmm(b_enc, x - b_dec, W_enc)
    return pre.topk(k, dim=-1, sorted=False)


class _EncodeTopK(torch.autograd.Function):
    """TopK encoder whose backward touches only the selected latents.

    Forward: pre = (x − b_dec)·W_enc + b_enc; values, indices = topk(pre, k); values = relu(values).
    Optionally also the top-k_aux pre-activations among `aux_mask` latents (AuxK's dead latents),
    from the same GEMM. Backward (G = sparse grad of the kept pre-activations, [N, n] with k+k_aux
    non-zeros per row):
      grad_x     = G · W_encᵀ          as an embedding_bag over W_encᵀ rows (no N×k×d temporary)
      grad_W_enc = (x − b_dec)ᵀ · G    as a COO sparse mm (≈20× faster than index_add on CPU)
      grad_b_enc = column sums of G    grad_b_dec = −Σ_t grad_x[t]
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_mask, k_aux: int):
        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, W_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu()
        aux_values = aux_indices = None
        if aux_mask is not None and k_aux > 0:
            masked = pre.masked_fill_(~aux_mask, float("-inf"))  # pre no longer needed: reuse its memory
            aux_values, aux_indices = masked.topk(k_aux, dim=-1, sorted=False)
            aux_values = aux_values.relu()
        del pre
        ctx.save_for_backward(xc, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices)
        if aux_indices is not None:
            ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux_values, _gai):
        xc, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        grads = [grad_values * (values > 0)]
        idx = [indices]
        if aux_indices is not None and grad_aux_values is not None:
            grads.append(grad_aux_values * (aux_values > 0))
            idx.append(aux_indices)
        g = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
        i = torch.cat(idx, dim=1) if len(idx) > 1 else idx[0]
        return (*sparse_encoder_backward(g, i, xc, W_enc), None, None, None)


def sparse_encoder_backward(grad: torch.Tensor, indices: torch.Tensor, xc: torch.Tensor,
                            W_enc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) from the k-sparse latent gradient."""
    n = W_enc.shape[1]
    grad = grad.to(xc.dtype)
    if _pick(xc.device) == "triton":
        from .kernels import encoder_backward
        return encoder_backward(grad, indices, xc, W_enc)
    grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
    N, k = indices.shape
    rows = torch.arange(N, device=xc.device).repeat_interleave(k)
    G_t = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), grad.reshape(-1), (n, N),
                                  check_invariants=False)
    grad_W_enc = torch.sparse.mm(G_t, xc).t()
    grad_b_enc = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, indices.reshape(-1), grad.reshape(-1))
    grad_b_dec = -grad_x.sum(0)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec


def encode_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0):
    """Differentiable TopK encode: (values [N,k], indices [N,k], aux_values, aux_indices).

    aux_* are None unless `aux_mask` ([n] bool, True = eligible) and k_aux > 0 are given.
    """
    if _pick(x.device) == "triton":
        from .kernels import encode_topk as triton_encode_topk
        return triton_encode_topk(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)
    if aux_mask is not None:
        k_aux = min(k_aux, int(aux_mask.sum()))
        aux_mask = aux_mask.expand(x.shape[0], -1) if k_aux > 0 else None
    return _EncodeTopK.apply(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)
