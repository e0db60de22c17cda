"""The one dispatch for sparse SAE work: TopK encode and sparse decode, with sparse backward passes.

CUDA tensors go to the Triton kernels in `saekit.kernels`; CPU tensors to the torch path below.
`SAEKIT_KERNELS=auto|triton|torch` overrides the choice, and `backend()` tells which path ran last,
so no caller silently gets the slow path.

Why custom autograd: a dense TopK SAE spends 12·d·n FLOPs per token; the only dense work we need is
the encoder forward GEMM (2·d·n). Everything after TopK touches k latents per token.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

_last_backend: str | None = None


def requested_backend() -> str:
    choice = os.environ.get("SAEKIT_KERNELS", "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"SAEKIT_KERNELS must be auto, triton or torch, not {choice!r}")
    return choice


def _pick(device: torch.device) -> str:
    """The path for `device`, recorded for backend()."""
    global _last_backend
    _last_backend = _choose(device)
    return _last_backend


def _choose(device: torch.device) -> str:
    """Dispatch on the tensor's device, not on whether triton imports (it imports on CPU-only hosts)."""
    choice = requested_backend()
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("SAEKIT_KERNELS=triton needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter).")
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


def training_path(device: torch.device | str) -> str:
    """The path fp32 training takes on `device`, in words (shown by the trainer, kept in the manifest)."""
    device = torch.device(device)
    sample = torch.empty(0, device=device)
    if _choose(device) == "triton":
        return "triton kernels"
    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}
    dtype = selection_dtype(sample)
    return f"torch sparse ops, {names[dtype]} {'shortlist, exact fp32 pick' if dtype == torch.bfloat16 else 'top-k selection'}"


# ----------------------------------------------------------------------------- sparse products (torch path)

def _row_dots(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out[t, j] = ⟨g[t], W[indices[t, j]]⟩: a sampled dense-dense product (SDDMM) on the CSR pattern of
    the codes; no [N, k, d] gather."""
    N, K = indices.shape
    crow = torch.arange(0, N * K + 1, K, device=indices.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, indices.reshape(-1), torch.zeros(N * K, dtype=W.dtype, device=W.device),
                                          (N, W.shape[0]), check_invariants=False)
        out = torch.sparse.sampled_addmm(pattern, g.to(W.dtype), W.t(), beta=0.0)
    return out.values().view(N, K)


def _latent_rows(lat: torch.Tensor, tok: torch.Tensor, coef: torch.Tensor, X: torch.Tensor, n: int) -> torch.Tensor:
    """out[m] = Σ_{e: lat[e] = m} coef[e] · X[tok[e]] → [n, d] (the gradient of W_dec, and of W_enc transposed),
    as an embedding_bag over X's rows with the entries grouped by latent: each output row is written once, by
    every core. MKL's CSR × dense product, the alternative, zero-fills its result and copies it: 14.6 vs 4.8 ms at
    d 576, n 4608, k 32, 4096 tokens, 2 threads (AMD Zen 4); a COO product runs on one core. The sort is stable,
    so the sums' order, and the result, do not vary between runs."""
    grouped, order = lat.sort(stable=True)
    offsets = torch.searchsorted(grouped, torch.arange(n, device=lat.device))
    return F.embedding_bag(tok[order], X, offsets, per_sample_weights=coef[order].to(X.dtype), mode="sum")


def _transposed(R: torch.Tensor, strip: int = 512) -> torch.Tensor:
    """R.t() as a contiguous tensor, for a tall R (a [n, d] gradient whose parameter is [d, n]): copied in strips of
    rows, each strip's transpose written while it is in cache. 1.3–1.7 vs 3–5 ms for `R.t().contiguous()` at
    [4608, 576] fp32 (AMD Zen 4, 2 threads); autograd's own copy of a transposed gradient took 7 ms in the step.
    (For a wide R the strips gain nothing: use `.t().contiguous()`.)"""
    out = R.new_empty(R.shape[1], R.shape[0])
    for i in range(0, R.shape[0], strip):
        out[:, i:i + strip].copy_(R[i:i + strip].t())
    return out


def _flat(indices: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[N, K] codes as COO entries (latent, token, coefficient)."""
    N, K = indices.shape
    return indices.reshape(-1), torch.arange(N, device=indices.device).repeat_interleave(K), coef.reshape(-1)


class _SparseDecode(torch.autograd.Function):
    """out = embedding_bag(indices, W_dec, values); backward: _row_dots for the values, _latent_rows for
    W_dec (embedding_bag's own backward is 2-3× slower on CPU)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _row_dots(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _latent_rows(*_flat(indices, values), grad_out, W_dec.shape[0]).to(W_dec.dtype)
        return grad_values, None, grad_W


# ----------------------------------------------------------------------------- decode

def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j values[t, j] · W_dec[indices[t, j]] (+ b_dec). values/indices [N, k], W_dec [n, d]."""
    if _pick(values.device) == "triton":
        from .kernels import sparse_decode as triton_decode
        out = triton_decode(values, indices, W_dec)
    else:
        out = _SparseDecode.apply(values, indices, W_dec)
    return out if b_dec is None else out + b_dec


# ----------------------------------------------------------------------------- encode

TOPK_GROUPS = 8
"""Columns in each of `rows_topk`'s strided groups."""


def rows_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values and their columns, unsorted: the same values as `x.topk(k, dim=-1)` (ties
    may pick either of equal columns), found with less of torch's per-element top-k work on wide rows.

    The columns form n/8 groups (column j with j + n/8, j + 2n/8, …) and a group's maximum is one elementwise
    max over 8 row slices. The k groups with the largest maxima hold the row's top k: those k maxima are k values
    ≥ the k-th largest group maximum T, so the row's k-th value is ≥ T, and every other group's values are ≤ T.
    The top k is then taken among those k groups' 8k values. On CPU, [4096, 4608] fp32 or bf16, 2 threads, this
    measured 27 vs 40 ms at k 48 and 27 vs 34 ms at k 32 (AMD Zen 4), and no slower where rows are
    narrower than 32·k (then torch's top-k runs)."""
    N, n = x.shape
    if x.device.type != "cpu" or n % TOPK_GROUPS or n < 32 * k:
        return x.topk(k, dim=-1, sorted=False)
    g = n // TOPK_GROUPS
    strided = x.reshape(N, TOPK_GROUPS, g)
    _, groups = strided.amax(1).topk(k, dim=-1, sorted=False)  # a NaN wins both, as in torch's top-k
    members = strided.gather(2, groups.unsqueeze(1).expand(N, TOPK_GROUPS, k)).reshape(N, TOPK_GROUPS * k)
    values, j = members.topk(k, dim=-1, sorted=False)
    return values, groups.gather(1, j % k) + (j // k) * g


def topk_preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the pre-activations (x − b_dec)·W_enc + b_enc, no grad, no ReLU. Used at inference."""
    if _pick(x.device) == "triton":
        from .kernels import fused_encode_topk
        return fused_encode_topk(x - b_dec, W_enc, b_enc, k)
    return rows_topk(torch.addmm(b_enc, x - b_dec, W_enc), k)


def selection_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the training encoder's GEMM, which only selects the top-k latents.

    On a CPU with native bf16 matmul (AVX512_BF16 / AMX) the GEMM — over half the step — runs ~3× faster in
    bf16. It only shortlists latents; their pre-activations are recomputed in fp32 and the top k kept, and a
    bound on the rounding proves the shortlist held the exact top k (rows where it cannot are recomputed in
    fp32: `_verified_topk`). Without native bf16 (AVX2-only CPUs) bf16, fp16 and int8 GEMMs measured no faster
    than fp32 (bf16/fp16 ~50× slower), so fp32 runs there.
    `SAEKIT_ENCODER_GEMM=fp32|bf16|auto` overrides; CUDA tensors take the Triton path and never come here.
    """
    choice = os.environ.get("SAEKIT_ENCODER_GEMM", "auto").lower()
    if choice not in ("auto", "bf16", "fp32"):
        raise ValueError(f"SAEKIT_ENCODER_GEMM must be auto, bf16 or fp32, not {choice!r}")
    if x.dtype != torch.float32 or choice == "fp32":
        return x.dtype
    if choice == "bf16" or (x.device.type == "cpu" and _cpu_has_bf16()):
        return torch.bfloat16
    return x.dtype


@functools.cache
def _cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _shortlist(k: int, n: int, rounded: bool) -> int:
    """Candidates kept from a rounded (bf16) top-k: k plus a margin wide enough that the proof of completeness
    (`_verified_topk`) rarely fails. Measured on SmolLM2 layer-15 activations (d_sae 4608, k 32, a 3-epoch SAE):
    rows recomputed in fp32 were 52% with a margin of 8, 2.8% with 16, 0% with 32."""
    return min(n, k + max(16, k // 2)) if rounded else k


# A bf16 GEMM rounds its inputs and its output to bf16 (unit roundoff 2^-8) and sums exact products in fp32.
BF16_ROUNDOFF = 2.0**-8
_recomputed = [0, 0]  # [rows whose bf16 shortlist could not be proven to hold the top k, rows selected]


def recomputed_fraction() -> float:
    """Share of tokens whose shortlist was not provably complete, so their pick was made on a full fp32 row."""
    return _recomputed[0] / max(_recomputed[1], 1)


def _exact_topk(xc: torch.Tensor, W_rows: torch.Tensor, b_enc: torch.Tensor, candidates: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the exact pre-activations (xc·W_rowsᵀ + b_enc) among each token's candidate latents: N·K·d work
    (a sampled product) instead of N·n·d. W_rows [n, d] is W_enc transposed and contiguous, the layout the sampled
    product reads (given W_enc itself it makes that copy on every call)."""
    pre = _row_dots(xc, candidates, W_rows) + b_enc[candidates]
    values, pick = pre.topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, pick)


class _Rounding:
    """What the bound in `_verified_topk` needs of one bf16 GEMM's inputs, computed once per forward."""

    def __init__(self, xc: torch.Tensor, xb: torch.Tensor, W_rows: torch.Tensor, Wb_rows: torch.Tensor,
                 b: torch.Tensor, bb: torch.Tensor):
        self.x_norm = xc.norm(dim=1) * (1 + BF16_ROUNDOFF)  # ≥ ‖x̃‖
        self.dx_norm = xb.float().sub_(xc).norm(dim=1)  # ‖δx‖, exact: about 0.6·2^-8·‖x‖, half the worst case
        self.w_norm = W_rows.norm(dim=1)  # ‖W_j‖
        self.dw_norm = Wb_rows.float().sub_(W_rows).norm(dim=1)  # ‖δW_j‖
        self.db = (bb.float() - b).abs()  # |δb_j|

    def slack(self, floor: torch.Tensor, cols: torch.Tensor | None, d: int) -> torch.Tensor:
        """Per token: how far any latent's exact pre-activation can exceed its rounded one when that is ≤ floor."""
        pick = (lambda t: t) if cols is None else (lambda t: t.index_select(0, cols))
        w, dw, db = pick(self.w_norm).max(), pick(self.dw_norm).max(), pick(self.db).max()
        return (self.dx_norm * w + self.x_norm * dw + db + d * 2.0**-24 * self.x_norm * (w + dw)
                + BF16_ROUNDOFF * (1 + BF16_ROUNDOFF) * floor.abs())


def _verified_topk(rounded: torch.Tensor, xc: torch.Tensor, W_rows: torch.Tensor, b_enc: torch.Tensor, k: int,
                   rounding: _Rounding, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact fp32 top-k of xc·W_rowsᵀ + b_enc (over latents `cols`, all if None), found from `rounded` =
    bf16(x̃·W̃ + b̃), the same pre-activations from bf16 copies of the inputs (over the same columns). W_rows [n, d]
    is W_enc transposed, contiguous.

    A shortlist of k + margin latents by the rounded values is recomputed in fp32 and its top k kept. Every
    latent j left out has a rounded value ≤ the shortlist's smallest, a, and its exact value differs from its
    rounded one by at most ‖δx‖·‖W_j‖ + ‖x̃‖·‖δW_j‖ + |δb_j| (the inputs' rounding, by Cauchy-Schwarz) +
    d·2^-24·‖x̃‖·‖W̃_j‖ (fp32 summation) + 2^-8·|value| (the output's rounding). Rows where a plus that bound is
    not below the k-th exact value (or 0: latents ≤ 0 are cut by the ReLU and carry nothing) are recomputed
    whole in fp32. So the pick is the exact fp32 top-k by construction, not by the odds of rounding."""
    n = rounded.shape[1]
    m = _shortlist(k, n, True)
    W = W_rows if cols is None else W_rows.index_select(0, cols)
    b = b_enc if cols is None else b_enc.index_select(0, cols)
    approx, local = rows_topk(rounded, m)
    values, pick = _exact_topk(xc, W, b, local, k)
    if m < n:
        floor = approx.min(dim=1).values.float()
        unsure = (floor + rounding.slack(floor, cols, xc.shape[1]) > values.min(dim=1).values.clamp_min(0))
        unsure = unsure.nonzero().squeeze(1)
        _recomputed[0] += unsure.numel()
        if unsure.numel():
            v, i = rows_topk(torch.addmm(b, xc.index_select(0, unsure), W.t()), k)
            values[unsure], pick[unsure] = v, i
    _recomputed[1] += len(xc)
    return values, (pick if cols is None else cols[pick])


_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _preacts(b: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """b + x·W into a buffer kept across calls on CPU: the forward drops the [N, n] pre-activations once their
    top-k is taken, and a fresh 75 MB tensor each step (4096 × 4608 fp32) costs its page faults, 15–25 ms of a
    ~350 ms step (measured at 2 threads, AVX2 and AVX-512). The result is only valid until the next call."""
    if x.device.type != "cpu":
        return torch.addmm(b, x, W)
    numel, key = x.shape[0] * W.shape[1], (x.device, x.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch[key] = torch.empty(numel, dtype=x.dtype)
    return torch.addmm(b, x, W, out=buf[:numel].view(x.shape[0], W.shape[1]))


class _EncodeTopK(torch.autograd.Function):
    """TopK encoder whose backward touches only the selected latents.

    Forward: pre = (x − b_dec)·W_enc + b_enc; values, indices = topk(pre, k); values = relu(values).
    Optionally also the top-k_aux pre-activations among `aux_mask` latents (AuxK's dead latents),
    from the same GEMM. Backward (G = sparse grad of the kept pre-activations, [N, n] with k+k_aux
    non-zeros per row):
      grad_x     = G · W_encᵀ          as an embedding_bag over W_encᵀ rows (no N×k×d temporary)
      grad_W_enc = (x − b_dec)ᵀ · G    as a COO sparse mm (≈20× faster than index_add on CPU)
      grad_b_enc = column sums of G    grad_b_dec = −W_enc·grad_b_enc (= −Σ_t grad_x[t])
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_mask, k_aux: int):
        xc = x - b_dec
        aux_values = aux_indices = None
        want_aux = aux_mask is not None and k_aux > 0
        if selection_dtype(x) == torch.bfloat16:  # the bf16 GEMM only shortlists; the pick is exact fp32 (proven)
            W_rows = W_enc.t().contiguous()  # read by the sampled products and the rounding bound
            xb, Wb_rows, bb = xc.bfloat16(), W_rows.bfloat16(), b_enc.bfloat16()
            pre = _preacts(bb, xb, Wb_rows.t())
            rounding = _Rounding(xc, xb, W_rows, Wb_rows, b_enc, bb)
            values, indices = _verified_topk(pre, xc, W_rows, b_enc, k, rounding)
            if want_aux:
                eligible = aux_mask.nonzero().squeeze(1)
                aux_values, aux_indices = _verified_topk(pre.index_select(1, eligible), xc, W_rows, b_enc, k_aux,
                                                         rounding, eligible)
            del pre
        else:
            pre = _preacts(b_enc, xc, W_enc)
            values, indices = rows_topk(pre, k)
            if want_aux:
                eligible = aux_mask.nonzero().squeeze(1)
                if 2 * eligible.numel() <= aux_mask.numel():  # few (dead) latents: top-k over their columns only
                    aux_values, local = rows_topk(pre.index_select(1, eligible), k_aux)
                    aux_indices = eligible[local]
                else:
                    masked = pre.masked_fill_(~aux_mask, float("-inf"))  # pre no longer needed: reuse its memory
                    aux_values, aux_indices = rows_topk(masked, k_aux)
            del pre
        values = values.relu()
        if aux_values is not None:
            aux_values = aux_values.relu()
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
        return (*sparse_encoder_backward(g, i, xc, W_enc, need_grad_x=ctx.needs_input_grad[0]), None, None, None)


def sparse_encoder_backward(grad: torch.Tensor, indices: torch.Tensor, xc: torch.Tensor, W_enc: torch.Tensor,
                            need_grad_x: bool = True) -> tuple[torch.Tensor | None, ...]:
    """(grad_x, grad_W_enc, grad_b_enc, grad_b_dec) from the k-sparse latent gradient. Training never needs
    grad_x (activations are data), so need_grad_x=False skips it and returns None in its place."""
    n = W_enc.shape[1]
    grad = grad.to(xc.dtype)
    if _pick(xc.device) == "triton":
        from .kernels import encoder_backward
        return encoder_backward(grad, indices, xc, W_enc, need_grad_x)
    lat, tok, coef = _flat(indices, grad)
    keep = coef != 0
    offsets = None
    if int(keep.sum()) < 0.75 * keep.numel():
        # ReLU-clipped latents carry no gradient (most of AuxK's in a trained SAE): drop them.
        lat, tok, coef = lat[keep], tok[keep], coef[keep]
        offsets = torch.zeros(len(xc), dtype=torch.long, device=xc.device)
        offsets[1:] = keep.view(indices.shape).sum(1).cumsum(0)[:-1]
    grad_x = None
    if need_grad_x:
        W_t = W_enc.t().contiguous()
        if offsets is None:
            grad_x = F.embedding_bag(indices, W_t, per_sample_weights=grad, mode="sum")
        else:
            grad_x = F.embedding_bag(lat, W_t, offsets, per_sample_weights=coef, mode="sum")
    grad_W_enc = _transposed(_latent_rows(lat, tok, coef, xc, n))
    grad_b_enc = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, lat, coef)
    grad_b_dec = -(W_enc @ grad_b_enc)  # = −Σ_t grad_x[t], without building grad_x
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec


def encode_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0):
    """Differentiable TopK encode: (values [N,k], indices [N,k], aux_values, aux_indices).

    aux_* are None unless `aux_mask` ([n] bool, True = eligible) and k_aux > 0 are given.
    """
    if aux_mask is not None:
        k_aux = min(k_aux, int(aux_mask.sum()))
        aux_mask = aux_mask if k_aux > 0 else None
    if _pick(x.device) == "triton":
        from .kernels import encode_topk as triton_encode_topk
        return triton_encode_topk(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)
    return _EncodeTopK.apply(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)
