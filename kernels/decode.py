"""Sparse decode: out[t] = Σ_j v[t, j] · W[i[t, j]], and its backward.

Three kernels, each also used by the encoder backward (encode.py):
  gather_rows   out[t] = Σ_j c[t, j] · W[i[t, j]]            (decode forward; encoder grad_x)
  row_dots      out[t, j] = ⟨g[t], W[i[t, j]]⟩               (grad of the decode values)
  segment_rows  out[m] += Σ_{e: lat[e] = m} c[e] · X[tok[e]]  (grad of W_dec / W_enc)
segment_rows reduces the (token, slot) pairs sorted by latent (sorted COO, as in OpenAI's kernels): each
program takes a contiguous chunk, a running sum over it, and adds to the output only at segment
(latent) boundaries, so atomics happen per segment, not per entry, and no N×k×d temporary exists.
All accumulate in fp32 whatever the storage dtype (fp32 or bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    from triton import knobs  # triton ≥ 3.3 (both 3.6 and 3.9)
    return bool(knobs.runtime.interpret)


@triton.jit
def _gather_rows_kernel(c_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_w,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        idx = tl.load(idx_ptr + t * K + offs_k, mask=kmask, other=0)
        c = tl.load(c_ptr + t * K + offs_k, mask=kmask, other=0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_w + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        acc += tl.sum(w * c[:, None], axis=0)
    tl.store(out_ptr + t * D + offs_d, acc, mask=dmask)


@triton.jit
def _row_dots_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_w,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    idx = tl.load(idx_ptr + t * K + offs_k, mask=kmask, other=0)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        g = tl.load(g_ptr + t * D + offs_d, mask=dmask, other=0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_w + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + t * K + offs_k, acc, mask=kmask)


@triton.jit
def _segment_rows_kernel(lat_ptr, tok_ptr, c_ptr, x_ptr, out_ptr, bias_ptr, E, D, stride_x,
                         CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    # A chunk of sorted entries at once: S = running sum of the rows c·X[tok]. A segment (one latent)
    # ending at entry e adds S[e] to its latent's row, and the segment after it (same chunk) starts by
    # subtracting S[e]: the sums telescope to each segment's total, with two atomic adds per segment
    # boundary and none per entry. All CHUNK rows load in parallel (no serial walk).
    offs_e = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    emask = offs_e < E
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lat = tl.load(lat_ptr + offs_e, mask=emask, other=-1)
    nxt = tl.load(lat_ptr + offs_e + 1, mask=offs_e + 1 < E, other=-1)
    chunk_last = tl.arange(0, CHUNK) == CHUNK - 1
    end = emask & ((lat != nxt) | chunk_last)  # closes its segment's part in this chunk
    opens = end & (nxt >= 0) & ~chunk_last     # … and the next entry, in this chunk, opens another
    c = tl.load(c_ptr + offs_e, mask=emask, other=0).to(tl.float32)
    tok = tl.load(tok_ptr + offs_e, mask=emask, other=0)
    x = tl.load(x_ptr + tok[:, None] * stride_x + offs_d[None, :], mask=emask[:, None] & dmask[None, :], other=0)
    S = tl.cumsum(c[:, None] * x.to(tl.float32), axis=0)
    tl.atomic_add(out_ptr + lat[:, None] * D + offs_d[None, :], S, mask=end[:, None] & dmask[None, :])
    tl.atomic_add(out_ptr + nxt[:, None] * D + offs_d[None, :], -S, mask=opens[:, None] & dmask[None, :])
    if HAS_BIAS:  # Σ c per latent, the same way (first d-block only)
        Sc = tl.cumsum(c, axis=0)
        first_d = (tl.arange(0, CHUNK) * 0 + pid_d) == 0
        tl.atomic_add(bias_ptr + lat, Sc, mask=end & first_d)
        tl.atomic_add(bias_ptr + nxt, -Sc, mask=opens & first_d)


def _check(c: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> None:
    if c.shape != indices.shape or c.dim() != 2:
        raise ValueError(f"values {tuple(c.shape)} and indices {tuple(indices.shape)} must both be [N, k]")
    if W.dim() != 2 or W.stride(1) != 1:
        raise ValueError("W must be a 2-D tensor with contiguous rows")


def _blocks(K: int, D: int) -> tuple[int, int]:
    return min(triton.next_power_of_2(K), 32), min(triton.next_power_of_2(D), 256)


def gather_rows(c: torch.Tensor, indices: torch.Tensor, W: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j c[t, j] · W[indices[t, j]] → [N, D] in W's dtype (or written into `out`)."""
    _check(c, indices, W)
    N, K = c.shape
    D = W.shape[1]
    if out is None:
        out = torch.empty(N, D, device=W.device, dtype=W.dtype)
    if N and D:
        if K == 0:
            return out.zero_()
        BK, BD = _blocks(K, D)
        _gather_rows_kernel[(N, triton.cdiv(D, BD))](c.contiguous(), indices.contiguous(), W, out, K, D,
                                                    W.stride(0), BLOCK_K=BK, BLOCK_D=BD)
    return out


def row_dots(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t, j] = ⟨g[t], W[indices[t, j]]⟩ → [N, K] fp32 (or written into `out`)."""
    _check(indices, indices, W)
    N, K = indices.shape
    if g.shape != (N, W.shape[1]):
        raise ValueError(f"g {tuple(g.shape)} must be [N, D] = {(N, W.shape[1])}")
    D = W.shape[1]
    if out is None:
        out = torch.empty(N, K, device=W.device, dtype=torch.float32)
    if N and K:
        BK, BD = _blocks(K, D)
        _row_dots_kernel[(N, triton.cdiv(K, BK))](g.contiguous(), indices.contiguous(), W, out, K, D,
                                                 W.stride(0), BLOCK_K=BK, BLOCK_D=BD)
    return out


def sort_by_latent(indices: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (token, slot) pairs as sorted COO: (latent, token, coefficient), sorted by latent."""
    lat, perm = torch.sort(indices.reshape(-1))
    return lat, perm // indices.shape[1], c.reshape(-1)[perm]


def segment_rows(lat: torch.Tensor, tok: torch.Tensor, c: torch.Tensor, X: torch.Tensor, n: int,
                 with_bias: bool = False, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out[m] = Σ_{e: lat[e] = m} c[e] · X[tok[e]] → fp32 [n, D]; with_bias also Σ c[e] per latent → [n].

    `lat` must be sorted. Latents that never occur get exact zeros. `chunk`: entries per program (a power
    of two).
    """
    D = X.shape[1]
    out = torch.zeros(n, D, device=X.device, dtype=torch.float32)
    bias = torch.zeros(n, device=X.device, dtype=torch.float32) if with_bias else None
    E = lat.numel()
    if E and D:
        if X.stride(1) != 1:
            X = X.contiguous()
        # GPU: [16, 128] rows per program (~150 registers, no spills on sm_90; larger tiles spill: the
        # 2-D int64 addresses of the gathers and atomics dominate). The interpreter pays ~ms per program.
        chunk = chunk or (256 if _interpreting() else 16)
        BD = min(triton.next_power_of_2(D), 128)
        _segment_rows_kernel[(triton.cdiv(E, chunk), triton.cdiv(D, BD))](
            lat, tok, c.contiguous(), X, out, out if bias is None else bias, E, D, X.stride(0),
            CHUNK=chunk, BLOCK_D=BD, HAS_BIAS=with_bias)
    return out, bias


class SparseDecode(torch.autograd.Function):
    """out = Σ_j values[:, j] · W_dec[indices[:, j]]; backward: row_dots for the values, sorted segment_rows
    for W_dec (the [N, n] dense codes never exist)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return gather_rows(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            lat, tok, c = sort_by_latent(indices, values)
            grad_W = segment_rows(lat, tok, c, grad_out, W_dec.shape[0])[0].to(W_dec.dtype)
        return grad_values, None, grad_W


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Differentiable sparse decode: values/indices [N, k], W_dec [n, d] → [N, d] in W_dec's dtype."""
    return SparseDecode.apply(values, indices, W_dec)
