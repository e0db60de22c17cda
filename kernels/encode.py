"""TopK encoder: a GEMM that keeps only a running top-k (never writing the [N, n] pre-activations), and
its sparse backward.

Forward (`fused_encode_topk`): program (m, s) computes the pre-activation tiles xc[rows]·W_enc[:, cols] +
b_enc for the column tiles of split s, one tile at a time, and folds each tile into a running top-k of its
rows. Every element of the global top-k is in the top-k of its split, so a second small step (a torch.topk
over n_splits·k candidates per row) is exact. AuxK (top-k_aux among masked, dead latents): when many are
eligible, the same tile feeds a second running top-k (no second GEMM); when few (≤ n/4, the usual case),
a second launch over just their columns is cheaper than carrying a k_aux-wide top-k through every tile.

Top-k in registers: a value and its column are packed into one int64 key (order-preserving bits of the
fp32 value in the high word, the column in the low word), so selecting keys selects values and indices
together. The selection is a bitonic top-k (Shanbhag et al., "Efficient top-k query processing on massively
parallel hardware"): sort runs of KP in alternating directions, then repeatedly take the elementwise max of
neighbouring runs (a bitonic sequence holding the top-KP of both) and re-merge. The running top-KP
(descending) against a tile's top-KP (ascending) merges the same way. Our compare-exchange uses min/max
over a size-2 axis rather than tl.sort/tl.topk's xor_sum, which the interpreter runs element by element
(~1 s per call) — so the code the tests interpret is the code the GPU runs.

Backward (`encoder_backward`), G the k-sparse gradient of the pre-activations:
  grad_x     = G·W_encᵀ   a gather of k rows of W_encᵀ per token (decode.gather_rows)
  grad_W_enc = xcᵀ·G      sorted-COO segmented reduction over tokens (decode.segment_rows), no N×k×d tensor
  grad_b_enc = Σ_t G      in the same pass
  grad_b_dec = −Σ_t grad_x[t] = −W_enc·grad_b_enc   (reduced over the batch first: one d×n mat-vec)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _interpreting, gather_rows, segment_rows, sort_by_latent

SENTINEL: tl.constexpr = tl.constexpr(-0x7FFFFFFFFFFFFFFF)  # below every packed key, −inf included


@triton.jit
def _pack(v, cols):
    """fp32 [BM, BN] and int columns [BN] → int64 keys ordered like the values."""
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits so ints order like floats
    return (bits.to(tl.int64) << 32) | cols.to(tl.int64)[None, :]


@triton.constexpr_function
def _log2(i: int) -> int:
    return int(i).bit_length() - 1


@triton.jit
def _cas(x, S: tl.constexpr, PERIOD: tl.constexpr, DESC: tl.constexpr):
    """One bitonic compare-exchange stage at stride S along the last axis of x [BM, L]. Position i sorts
    ascending when (i // PERIOD) is even, flipped by DESC."""
    BM: tl.constexpr = x.shape[0]
    L: tl.constexpr = x.shape[1]
    B: tl.constexpr = L // (2 * S)
    y = tl.reshape(x, [BM, B, 2, S])
    lo = tl.min(y, axis=2, keep_dims=True)
    hi = tl.max(y, axis=2, keep_dims=True)
    b = tl.arange(0, B)[None, :, None, None]
    r = tl.arange(0, 2)[None, None, :, None]
    flip = ((b * (2 * S) // PERIOD) & 1) ^ DESC
    return tl.reshape(tl.where((r ^ flip) == 1, hi, lo), [BM, L])


@triton.jit
def _bitonic_merge(x, DESC: tl.constexpr, ALTERNATE: tl.constexpr):
    """Sort bitonic rows of x [BM, L] (descending if DESC); with ALTERNATE > 0, each run of ALTERNATE
    elements is bitonic and sorts in alternating directions instead."""
    L: tl.constexpr = x.shape[1]
    RUN: tl.constexpr = ALTERNATE if ALTERNATE > 0 else L
    PERIOD: tl.constexpr = ALTERNATE if ALTERNATE > 0 else 2 * L
    for j in tl.static_range(_log2(RUN)):
        x = _cas(x, RUN >> (j + 1), PERIOD, DESC)
    return x


@triton.jit
def _topk_rows(x, KP: tl.constexpr, DESC: tl.constexpr):
    """The top-KP of each row of x [BM, L] (L, KP powers of two, KP ≤ L), sorted (descending if DESC)."""
    L: tl.constexpr = x.shape[1]
    BM: tl.constexpr = x.shape[0]
    LOG_KP: tl.constexpr = _log2(KP)
    LOG_C: tl.constexpr = _log2(L // KP)
    # runs of KP, alternating ascending/descending (or the final order when the row is one run)
    for p in tl.static_range(1, LOG_KP + 1):
        for j in tl.static_range(p):
            if p == LOG_KP and LOG_C == 0:
                x = _cas(x, 1 << (p - 1 - j), 2 * L, DESC)
            else:
                x = _cas(x, 1 << (p - 1 - j), 1 << p, 0)
    # halve the number of runs: max of an ascending and a descending run is bitonic with their top-KP
    for c in tl.static_range(LOG_C):
        x = tl.reshape(x, [BM, (L // KP) >> (c + 1), 2, KP])
        x = tl.reshape(tl.max(x, axis=2), [BM, ((L // KP) >> (c + 1)) * KP])
        if c == LOG_C - 1:
            x = _bitonic_merge(x, DESC, 0)
        else:
            x = _bitonic_merge(x, 0, KP)
    return x


@triton.jit
def _merge_topk(best, keys, KP: tl.constexpr):
    """Top-KP of best ∪ keys, descending; best [BM, KP] is descending, keys [BM, BN ≥ KP] any order."""
    top = _topk_rows(keys, KP, 0)  # ascending
    return _bitonic_merge(tl.maximum(best, top), 1, 0)


@triton.jit
def _encode_topk_kernel(x_ptr, w_ptr, b_ptr, mask_ptr, key_ptr, akey_ptr,
                        N, D, n, n_tiles, tiles_per_split, stride_x, stride_wd, stride_wn,
                        KP: tl.constexpr, KPA: tl.constexpr, HAS_AUX: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    best = tl.full([BM, KP], SENTINEL, tl.int64)
    abest = tl.full([BM, KPA], SENTINEL, tl.int64)
    # Fixed trip count with a guard, not range(first, min(...)): the interpreters (3.6, 3.9) disagree on
    # the shape of scalar min/if results and cannot range() over them.
    for t in range(0, tiles_per_split):
        tile = pid_s * tiles_per_split + t
        if tile < n_tiles:
            cols = tile * BN + tl.arange(0, BN)
            cmask = cols < n
            acc = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < D
                a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0)
                b = tl.load(w_ptr + ks[:, None].to(tl.int64) * stride_wd + cols[None, :].to(tl.int64) * stride_wn,
                            mask=kmask[:, None] & cmask[None, :], other=0)
                if UPCAST:  # the interpreter's bf16 dot is wrong
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            acc += tl.load(b_ptr + cols, mask=cmask, other=0).to(tl.float32)[None, :]
            keys = tl.where(cmask[None, :], _pack(acc, cols), SENTINEL)
            best = _merge_topk(best, keys, KP)
            if HAS_AUX:
                eligible = tl.load(mask_ptr + cols, mask=cmask, other=0) != 0
                abest = _merge_topk(abest, tl.where(eligible[None, :], keys, SENTINEL), KPA)
    out_rows = rows[:, None].to(tl.int64) * n_splits + pid_s  # candidates laid out [N, n_splits, KP]
    tl.store(key_ptr + out_rows * KP + tl.arange(0, KP)[None, :], best, mask=rmask[:, None])
    if HAS_AUX:
        tl.store(akey_ptr + out_rows * KPA + tl.arange(0, KPA)[None, :], abest, mask=rmask[:, None])


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = (keys >> 32).to(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _kp(k: int) -> int:
    return max(2, triton.next_power_of_2(k))  # ≥ 2: the sorting network's stages split runs in two


def _config(N: int, n: int, kp_max: int, device: torch.device) -> dict[str, int]:
    """Tile sizes and the number of column splits. Untuned (no GPU to autotune on when written): the
    running top-k lives in registers, so wide k shrinks the row block."""
    BN = max(128 if n >= 128 else 32, kp_max)
    BM = 16 if BN >= 512 else 32 if BN >= 256 else 64
    BK = 32
    n_tiles = triton.cdiv(n, BN)
    m_blocks = triton.cdiv(N, BM)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(n_tiles, max(1, triton.cdiv(target, m_blocks)))
    else:
        splits = min(n_tiles, 2)  # the interpreter: few programs, but still exercise the split merge
    return dict(BM=BM, BN=BN, BK=BK, splits=splits)


def _candidates(xc: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, mask: torch.Tensor | None,
                k_aux: int, config: dict[str, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel: packed candidate keys [N, splits·KP] (and [N, splits·KPA] with a mask)."""
    N, D = xc.shape
    n = W.shape[1]
    KP, KPA = _kp(k), _kp(k_aux) if mask is not None else 2
    cfg = {**_config(N, n, max(KP, KPA), xc.device), **(config or {})}
    cfg["BN"] = max(cfg["BN"], KP, KPA)  # the tile must be at least as wide as the kept set
    n_tiles = triton.cdiv(n, cfg["BN"])
    splits = min(cfg["splits"], n_tiles)
    keys = torch.empty(N, splits * KP, device=xc.device, dtype=torch.int64)
    akeys = torch.empty(N, splits * KPA, device=xc.device, dtype=torch.int64) if mask is not None else None
    interp = _interpreting()
    if N:
        _encode_topk_kernel[(triton.cdiv(N, cfg["BM"]), splits)](
            xc, W, b, keys if mask is None else mask, keys, keys if akeys is None else akeys,
            N, D, n, n_tiles, triton.cdiv(n_tiles, splits), xc.stride(0), W.stride(0), W.stride(1),
            KP=KP, KPA=KPA, HAS_AUX=mask is not None, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
            UPCAST=interp and xc.dtype != torch.float32,
            PRECISION="ieee" if interp or not torch.backends.cuda.matmul.allow_tf32 else "tf32",
            num_warps=8 if cfg["BM"] * cfg["BN"] >= 8192 else 4)
    return keys, akeys


def _select(keys: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge step: exact top-k of the candidates (keys order like values), unpacked."""
    values, indices = _unpack(keys.topk(k, dim=1, sorted=False).values)
    return values.to(dtype), indices


def fused_encode_topk(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                      aux_mask: torch.Tensor | None = None, k_aux: int = 0, config: dict[str, int] | None = None):
    """Top-k of the pre-activations xc·W_enc + b_enc without writing them: (values, indices[, aux_values,
    aux_indices]). Values are raw pre-activations (no ReLU) in the inputs' dtype, unsorted.

    aux_mask [n] (bool, True = eligible) with k_aux > 0 adds the top-k_aux among eligible latents; k_aux
    must not exceed the number eligible. Few eligible (AuxK's dead latents, ≤ n/4): a second pass over
    just their columns, which costs less than carrying a k_aux-wide running top-k (k_aux ≈ d/2) through
    every tile of the main pass. Many: one pass, the tile feeding both running top-k's.
    `config` overrides the tiling (tests: BM, BN, BK, splits).
    """
    N, D = xc.shape
    n = W_enc.shape[1]
    if W_enc.shape[0] != D or b_enc.shape != (n,):
        raise ValueError(f"shapes: xc {tuple(xc.shape)}, W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], not {k}")
    dtype = torch.result_type(xc, W_enc)
    xc, W_enc = xc.to(dtype).contiguous(), W_enc.to(dtype)
    if aux_mask is None or k_aux <= 0:
        keys, _ = _candidates(xc, W_enc, b_enc, k, None, 0, config)
        return _select(keys, k, dtype)
    eligible = aux_mask.nonzero().squeeze(1)
    if not 1 <= k_aux <= eligible.numel():
        raise ValueError(f"k_aux must be in [1, {eligible.numel()}] (the eligible latents), not {k_aux}")
    if 4 * eligible.numel() <= n:
        keys, _ = _candidates(xc, W_enc, b_enc, k, None, 0, config)
        akeys, _ = _candidates(xc, W_enc.index_select(1, eligible), b_enc[eligible], k_aux, None, 0, config)
        aux_values, aux_local = _select(akeys, k_aux, dtype)
        return (*_select(keys, k, dtype), aux_values, eligible[aux_local])
    keys, akeys = _candidates(xc, W_enc, b_enc, k, aux_mask.to(torch.int8).contiguous(), k_aux, config)
    return (*_select(keys, k, dtype), *_select(akeys, k_aux, dtype))


def encoder_backward(grad: torch.Tensor, indices: torch.Tensor, xc: torch.Tensor, W_enc: torch.Tensor,
                     need_grad_x: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) from the gradient `grad` [N, K] of the pre-activations
    at `indices` [N, K] (duplicates allowed: they add), for pre = (x − b_dec)·W_enc + b_enc. grad_x is None
    when not needed (training: x is data)."""
    n = W_enc.shape[1]
    grad = grad.float().contiguous()
    grad_x = None
    if need_grad_x:  # rows of W_encᵀ: a token's k gathers read k contiguous rows instead of k strided columns
        grad_x = gather_rows(grad, indices, W_enc.t().contiguous()).to(xc.dtype)
    lat, tok, c = sort_by_latent(indices, grad)
    grad_W_t, grad_b_enc = segment_rows(lat, tok, c, xc, n, with_bias=True)
    grad_b_dec = -(W_enc.float() @ grad_b_enc)
    return grad_x, grad_W_t.t().to(W_enc.dtype), grad_b_enc.to(W_enc.dtype), grad_b_dec.to(xc.dtype)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


class EncodeTopK(torch.autograd.Function):
    """Same contract as saekit.ops._EncodeTopK (relu'd top-k values, optional AuxK set; both get
    gradients), with the fused forward and the sparse kernel backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_mask, k_aux: int):
        xc = x - b_dec
        a, w = xc, W_enc
        if (dt := _autocast_dtype(x.device)) is not None:  # match torch's autocast of the dense GEMM
            a, w = xc.to(dt), W_enc.to(dt)
        has_aux = aux_mask is not None and k_aux > 0
        out = fused_encode_topk(a, w, b_enc, k, aux_mask if has_aux else None, k_aux)
        values, indices = out[0].relu(), out[1]
        aux_values, aux_indices = (out[2].relu(), out[3]) if has_aux else (None, None)
        ctx.save_for_backward(xc, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices)
        if has_aux:
            ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux_values, _gai):
        xc, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        g, i = grad_values * (values > 0), indices
        if aux_indices is not None and grad_aux_values is not None:
            g = torch.cat([g, grad_aux_values * (aux_values > 0)], dim=1)
            i = torch.cat([i, aux_indices], dim=1)
        return (*encoder_backward(g, i, xc, W_enc, need_grad_x=ctx.needs_input_grad[0]), None, None, None)


def encode_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0):
    """Differentiable TopK encode: (values [N, k], indices, aux_values [N, k_aux] | None, aux_indices | None).

    aux_mask: [n] bool (True = eligible, e.g. dead latents); k_aux is clamped to the number eligible.
    """
    if aux_mask is not None:
        k_aux = min(k_aux, int(aux_mask.sum()))
    return EncodeTopK.apply(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)
