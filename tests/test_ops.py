"""saekit.ops: which path runs, and the torch path against dense autograd (float64, fresh random inputs)."""

from __future__ import annotations

import pytest
import torch

from saekit import ops


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv("SAEKIT_KERNELS", raising=False)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1 + b.abs().max().item()))


def dense_step(x, W, b, bd, Wd, k, eligible, k_aux):
    """Textbook dense autograd: full pre-activations, topk, dense codes, dense decode; AuxK among `eligible`."""
    pre = (x - bd) @ W + b
    v, i = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    loss = (z @ Wd + bd - x).pow(2).sum()
    if eligible is not None:
        av, ai = pre.masked_fill(~eligible, float("-inf")).topk(k_aux, dim=1)
        za = torch.zeros_like(pre).scatter(1, ai, av.relu())
        loss = loss + 0.5 * (za @ Wd - x).pow(2).sum()
    return loss


def sparse_step(x, W, b, bd, Wd, k, eligible, k_aux):
    v, i, av, ai = ops.encode_topk(x, W, b, bd, k, eligible, k_aux)
    loss = (ops.sparse_decode(v, i, Wd, bd) - x).pow(2).sum()
    if av is not None:
        loss = loss + 0.5 * (ops.sparse_decode(av, ai, Wd) - x).pow(2).sum()
    return loss


def test_cpu_tensors_run_on_torch(gen, auto):
    ops.sparse_decode(randn(gen, 3, 2), torch.randint(0, 5, (3, 2), generator=gen), randn(gen, 5, 4))
    assert ops.backend() == "torch"


def test_env_forces_torch(gen, monkeypatch):
    monkeypatch.setenv("SAEKIT_KERNELS", "torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(gen, 4, 6).to(device)
    ops.topk_preacts(x, randn(gen, 6, 9).to(device), randn(gen, 9).to(device), randn(gen, 6).to(device), 2)
    assert ops.backend() == "torch"


def test_env_is_checked(gen, monkeypatch):
    monkeypatch.setenv("SAEKIT_KERNELS", "fast")
    with pytest.raises(ValueError, match="SAEKIT_KERNELS"):
        ops.sparse_decode(randn(gen, 3, 2), torch.randint(0, 5, (3, 2), generator=gen), randn(gen, 5, 4))
    monkeypatch.setenv("SAEKIT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.sparse_decode(randn(gen, 3, 2), torch.randint(0, 5, (3, 2), generator=gen), randn(gen, 5, 4))


# (N, d, n, k, fraction of latents eligible for AuxK): one token, k = 1, few eligible (their columns
# only) and many eligible (masked in place), AuxK off
CASES = [(9, 7, 40, 3, 0.2), (1, 5, 30, 1, 0.3), (8, 6, 50, 4, 0.8), (6, 6, 24, 5, None)]


@pytest.mark.parametrize("N,d,n,k,fraction", CASES)
def test_torch_path_matches_dense_autograd(gen, auto, N, d, n, k, fraction):
    eligible, k_aux = None, 0
    if fraction is not None:
        eligible = torch.rand(n, generator=gen) < fraction
        eligible[:4] = True
        k_aux = 3
    params = [randn(gen, *s).requires_grad_() for s in ((N, d), (d, n), (n,), (d,), (n, d))]
    loss = sparse_step(*params, k, eligible, k_aux)
    grads = torch.autograd.grad(loss, params)
    assert ops.backend() == "torch"
    ref = dense_step(*params, k, eligible, k_aux)
    ref_grads = torch.autograd.grad(ref, params)
    close(loss, ref)
    for got, want in zip(grads, ref_grads):
        close(got, want)


def test_k_aux_clamped_to_eligible(gen, auto):
    eligible = torch.zeros(20, dtype=torch.bool)
    eligible[[3, 7]] = True
    v, i, av, ai = ops.encode_topk(randn(gen, 4, 5), randn(gen, 5, 20), randn(gen, 20), randn(gen, 5), 2, eligible, 10)
    assert av.shape == (4, 2) and set(ai.flatten().tolist()) <= {3, 7}
    v, i, av, ai = ops.encode_topk(randn(gen, 4, 5), randn(gen, 5, 20), randn(gen, 20), randn(gen, 5), 2,
                                   torch.zeros(20, dtype=torch.bool), 10)
    assert av is None and ai is None


def test_sparse_decode_duplicates_and_unused(gen, auto):
    """Repeated latents in a row add up; latents no token uses get zero gradient."""
    N, k, n, d = 5, 4, 12, 7
    i = torch.randint(0, n - 3, (N, k), generator=gen)
    i[:, 1] = i[:, 0]
    v, W, bd = randn(gen, N, k).requires_grad_(), randn(gen, n, d).requires_grad_(), randn(gen, d)
    out = ops.sparse_decode(v, i, W, bd)
    g = randn(gen, N, d)
    gv, gW = torch.autograd.grad(out, (v, W), g)
    dense = torch.zeros(N, n, dtype=torch.float64).index_put((torch.arange(N)[:, None].expand(N, k), i), v,
                                                             accumulate=True)
    ref = dense @ W + bd
    rv, rW = torch.autograd.grad(ref, (v, W), g)
    close(out, ref)
    close(gv, rv)
    close(gW, rW)
    assert (gW[n - 3:] == 0).all()


@pytest.mark.parametrize("zeros", [0.0, 0.6])  # many zero gradients (ReLU-clipped): the compacted path
@pytest.mark.parametrize("n", [30, 1100])  # W_enc's gradient transposed in one strip of rows, or three
def test_sparse_encoder_backward(gen, auto, zeros, n):
    N, d, K = 6, 5, 4
    xc, W, grad = randn(gen, N, d), randn(gen, d, n), randn(gen, N, K)
    grad[torch.rand(N, K, generator=gen) < zeros] = 0
    if zeros:
        grad[2] = 0  # a token with no gradient at all: an empty bag
    i = torch.randint(0, n - 2, (N, K), generator=gen)
    i[:, 2] = i[:, 3]
    gx, gW, gb, gbd = ops.sparse_encoder_backward(grad, i, xc, W)
    G = torch.zeros(N, n, dtype=torch.float64).index_put((torch.arange(N)[:, None].expand(N, K), i), grad,
                                                         accumulate=True)
    close(gx, G @ W.t())
    close(gW, xc.t() @ G)
    close(gb, G.sum(0))
    close(gbd, -(G @ W.t()).sum(0))
    assert (gW[:, n - 2:] == 0).all()
    none, *rest = ops.sparse_encoder_backward(grad, i, xc, W, need_grad_x=False)  # training: x is data
    assert none is None
    for got, want in zip(rest, (gW, gb, gbd)):
        close(got, want)


def test_bf16_selection_keeps_fp32_values(gen, auto, monkeypatch):
    """The bf16 GEMM only shortlists latents: the pick is the fp32 top-k, the kept values and all gradients
    are the fp32 ones."""
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "bf16")
    N, d, n, k, k_aux = 64, 48, 300, 8, 6
    x, W, b, bd, Wd = (randn(gen, *s).float().requires_grad_() for s in ((N, d), (d, n), (n,), (d,), (n, d)))
    eligible = torch.rand(n, generator=gen) < 0.3
    v, i, av, ai = ops.encode_topk(x, W, b, bd, k, eligible, k_aux)
    assert ops.selection_dtype(x) == torch.bfloat16
    pre = (x - bd) @ W + b
    close(v, pre.gather(1, i).relu(), tol=1e-5)
    close(av, pre.gather(1, ai).relu(), tol=1e-5)
    assert torch.equal(i.sort(1).values, pre.topk(k, dim=1).indices.sort(1).values)
    assert torch.equal(ai.sort(1).values, pre.masked_fill(~eligible, float("-inf")).topk(k_aux, dim=1).indices.sort(1).values)
    params = (x, W, b, bd, Wd)
    loss = (ops.sparse_decode(v, i, Wd, bd) - x).pow(2).sum() + (ops.sparse_decode(av, ai, Wd) - x).pow(2).sum()
    z = torch.zeros_like(pre).scatter(1, i, pre.gather(1, i).relu())
    za = torch.zeros_like(pre).scatter(1, ai, pre.gather(1, ai).relu())
    ref = (z @ Wd + bd - x).pow(2).sum() + (za @ Wd - x).pow(2).sum()
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        close(got, want, tol=1e-4)


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("n", [512, 1024])  # the shortlist by torch's top-k, by rows_topk's groups
def test_bf16_shortlist_is_the_exact_top_k_on_ties_and_near_ties(gen, auto, monkeypatch, aux, n):
    """Latents whose pre-activations bf16 cannot tell apart (near-ties far below its 2^-8 but far above fp32's
    rounding) and exact ties crowd the k-th place: rows whose shortlist cannot be proven complete are
    recomputed in fp32, so every pick is the exact top k (its values are the top-k values; ties may pick
    either of equal latents)."""
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "bf16")
    N, d, k = 128, 64, 8
    x = randn(gen, N, d).float()
    W = randn(gen, d, n).float() * 0.05
    W[:, :40] = randn(gen, d, 1).float() + 1e-4 * randn(gen, d, 40).float()  # 40 near-parallel latents
    W[:, 40:56] = W[:, 56:57]  # 17 identical latents: exact ties
    W[:, 60:90] = randn(gen, d, 1).float() * 0.5 + 2e-3 * randn(gen, d, 30).float()
    b, bd = torch.zeros(n), torch.zeros(d)
    eligible = torch.ones(n, dtype=torch.bool) if aux else None
    recomputed_before = ops._recomputed[0]
    v, i, av, ai = ops.encode_topk(x, W, b, bd, k, eligible, k)
    pre = x.double() @ W.double()
    for got_v, got_i in [(v, i)] + ([(av, ai)] if aux else []):
        torch.testing.assert_close(got_v.double().sort(1).values, pre.topk(k, dim=1).values.relu().sort(1).values,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre.gather(1, got_i).relu(), got_v.double(), rtol=1e-5, atol=1e-5)
        assert all(len(set(row.tolist())) == k for row in got_i)
    assert ops._recomputed[0] > recomputed_before  # the near-ties defeated the shortlist on some rows


def test_bf16_shortlist_recomputes_few_rows_on_ordinary_inputs(gen, auto, monkeypatch):
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "bf16")
    N, d, n, k = 512, 64, 1024, 16
    x, W, b, bd = (randn(gen, *s).float() for s in ((N, d), (d, n), (n,), (d,)))
    ops._recomputed[:] = [0, 0]
    v, i, _, _ = ops.encode_topk(x, W, b, bd, k)
    pre = (x.double() - bd.double()) @ W.double() + b.double()
    torch.testing.assert_close(v.double().sort(1).values, pre.topk(k, dim=1).values.relu().sort(1).values,
                               rtol=1e-5, atol=1e-5)
    assert ops.recomputed_fraction() < 0.5


def test_selection_dtype(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "fp32")
    assert ops.selection_dtype(x) == torch.float32
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "bf16")
    assert ops.selection_dtype(x.double()) == torch.float64  # only fp32 training is ever rounded down
    monkeypatch.setenv("SAEKIT_ENCODER_GEMM", "half")
    with pytest.raises(ValueError, match="SAEKIT_ENCODER_GEMM"):
        ops.selection_dtype(x)


def assert_is_top_k(x, k, values, cols):
    """values are x's per-row top-k values (as torch's top-k gives them, NaN first), at distinct columns cols."""
    want = x.topk(k, dim=1).values
    torch.testing.assert_close(values.sort(1, descending=True).values, want.sort(1, descending=True).values,
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.gather(1, cols), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row.tolist())) == k for row in cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_topk_is_the_exact_top_k_with_ties(gen, dtype):
    """The grouped top-k keeps torch's top-k values on rows full of exact ties (small integers), near-ties (one
    ulp apart), -inf (masked latents) and NaN; narrow rows take torch's own path."""
    N, n, k = 64, 1024, 16
    assert n % ops.TOPK_GROUPS == 0 and n >= 32 * k  # the grouped path
    ties = torch.randint(0, 6, (N, n), generator=gen).to(dtype)
    near = 1 + torch.finfo(dtype).eps * (torch.rand(N, n, generator=gen) < 0.5).to(dtype)  # 1 and the next value
    masked = randn(gen, N, n).to(dtype).masked_fill(torch.rand(N, n, generator=gen) < 0.99, float("-inf"))
    nans = randn(gen, N, n).to(dtype)
    nans[::2, 5::200] = float("nan")
    for x in (ties, near, masked, nans, randn(gen, N, n).to(dtype)):
        assert_is_top_k(x, k, *ops.rows_topk(x, k))
    narrow = randn(gen, N, 24 * k).to(dtype)
    assert_is_top_k(narrow, k, *ops.rows_topk(narrow, k))


def test_topk_preacts(gen, auto):
    x, W, b, bd = randn(gen, 7, 5), randn(gen, 5, 40), randn(gen, 40), randn(gen, 5)
    v, i = ops.topk_preacts(x, W, b, bd, 6)
    ref = ((x - bd) @ W + b).topk(6, dim=1)
    close(v.sort(1).values, ref.values.sort(1).values)
    assert torch.equal(i.sort(1).values, ref.indices.sort(1).values)
