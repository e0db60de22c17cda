"""Sparse SAE kernels against the dense textbook computation, in one process.

Three operations, each for torch dense (matmul + topk + scatter to dense codes + dense matmul decode,
plain autograd), torch sparse (saekit.ops with SAEKIT_KERNELS=torch) and Triton (CUDA only):
  decode   forward + backward of x̂ = z·W_dec from k-sparse codes z
  encode   encoder GEMM + TopK, no grad
  step     a whole training step: encode_train (+ AuxK among the dead latents), decode, loss = FVU +
           auxk_coef·AuxK FVU (as saekit.train.Trainer), backward; no optimizer
Reported per row: median time, tokens/s, the FLOPs and bytes that computation must do (formulas below),
the achieved fraction of the roofline ceiling (max(FLOPs / peak FLOP/s, bytes / peak bandwidth) over the
measured time; peaks are measured in this process: a large matmul in the working dtype — bf16 on CUDA,
where encode and step run under bf16 autocast as the Trainer does — and a large copy), and the speed ratio
against the dense row of the same operation (wall time, and process CPU time). Step rows also give Δgrad:
the largest relative difference of a parameter gradient from the dense step's (same results?).

    python benchmarks/kernels.py                      # CPU shape on CPU, GPU shape on CUDA
    python benchmarks/kernels.py --json runs/bench/kernels.json
    TRITON_INTERPRET=1 python benchmarks/kernels.py --shape tiny --methods torch,triton   # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit import ops  # noqa: E402
from saekit.config import SaeConfig  # noqa: E402
from saekit.files import write_json  # noqa: E402
from saekit.sae import SparseAutoencoder  # noqa: E402

SHAPES = {"gpu": dict(d=768, n=32768, k=32, tokens=16384), "cpu": dict(d=576, n=4608, k=32, tokens=4096),
          "tiny": dict(d=48, n=256, k=8, tokens=32)}  # tiny: a smoke test (TRITON_INTERPRET=1 --methods …,triton)
AUXK_COEF = 1 / 32


@contextmanager
def kernels(choice: str):
    old = os.environ.get("SAEKIT_KERNELS")
    os.environ["SAEKIT_KERNELS"] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAEKIT_KERNELS")
        else:
            os.environ["SAEKIT_KERNELS"] = old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
           warmup: int = 2) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each function, interleaved (A B C A B C …) so that
    a change in the machine's load hits every method alike. On a shared CPU the process CPU time (all
    threads) is the steadier measure of work; wall time is what a user waits."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t, time.process_time() - c))
    return {name: tuple(statistics.median(x) for x in zip(*ts)) for name, ts in times.items()}


def ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured peak FLOP/s (square matmul) and bandwidth (copy: read + write) on this device."""
    m = 4096 if device.type == "cuda" else 1536
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    t = timeit({"mm": lambda: a @ b}, device, 5)["mm"][0]
    src = torch.empty(2**26 if device.type == "cuda" else 2**24, device=device)
    dst = torch.empty_like(src)
    tc = timeit({"copy": lambda: dst.copy_(src)}, device, 5)["copy"][0]
    return {"flops": 2 * m**3 / t, "bytes_per_s": 2 * src.numel() * src.element_size() / tc}


# ----------------------------------------------------------------------------- the computations

def dense_encode(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int):
    """The textbook dense encoder: full pre-activations, topk, dense codes."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    z_aux = None
    if dead is not None:
        va, ia = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(1, ia, va.relu())
    return z, z_aux


def autocast(device: torch.device):
    """As saekit.train.Trainer: bf16 autocast for the SAE forward on CUDA."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def step_loss(x: torch.Tensor, x_hat: torch.Tensor, aux_hat: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """saekit.train.Trainer's loss: FVU + AUXK_COEF · FVU of the dead latents' fit to the residual."""
    err = x - x_hat.float()
    loss = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if aux_hat is not None:
        e = err.detach()
        loss = loss + AUXK_COEF * (e - aux_hat().float()).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss


def make_step(method: str, sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int):
    def dense():
        with autocast(x.device):
            z, z_aux = dense_encode(sae, x, dead, k_aux)
            x_hat = z @ sae.W_dec + sae.b_dec
        loss = step_loss(x, x_hat, None if z_aux is None else (lambda: z_aux @ sae.W_dec))
        loss.backward()

    def sparse():
        with kernels(method):
            with autocast(x.device):
                v, i, av, ai = sae.encode_train(x, dead, k_aux)
                x_hat = sae.decode(v, i)
            loss = step_loss(x, x_hat, None if av is None else (lambda: ops.sparse_decode(av, ai, sae.W_dec)))
            loss.backward()

    def run():
        for p in sae.parameters():
            p.grad = None
        (dense if method == "dense" else sparse)()

    return run


def step_difference(fns: dict[str, Callable[[], None]], sae: SparseAutoencoder) -> dict[str, float]:
    """Same results? Each method's parameter gradients after one step, as the largest relative difference
    (‖Δ‖ / ‖g‖ per parameter) from the dense step's."""
    grads = {}
    for method, fn in fns.items():
        fn()
        grads[method] = [p.grad.detach().float().clone() for p in sae.parameters() if p.grad is not None]
    return {m: max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, grads["dense"]))
            for m, g in grads.items()}


def make_decode(method: str, sae: SparseAutoencoder, v: torch.Tensor, i: torch.Tensor, g: torch.Tensor):
    v = v.detach().requires_grad_()

    def run():
        sae.W_dec.grad = v.grad = None
        if method == "dense":
            out = torch.zeros(v.shape[0], sae.cfg.d_sae, device=v.device, dtype=v.dtype).scatter(1, i, v) @ sae.W_dec
        else:
            with kernels(method):
                out = ops.sparse_decode(v, i, sae.W_dec)
        out.backward(g)

    return run


def make_encode(method: str, sae: SparseAutoencoder, x: torch.Tensor):
    @torch.no_grad()
    @autocast(x.device)
    def run():
        if method == "dense":
            ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).topk(sae.cfg.k, dim=-1)
        else:
            with kernels(method):
                ops.topk_preacts(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.cfg.k)

    return run


def cost(op: str, method: str, N: int, d: int, n: int, k: int, k_aux: int, aux: bool, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) the method's algorithm must do. Dense pays for every latent, sparse for the kept
    ones (2·d·n + 10·(k + k_aux)·d per token for a step). Bytes are compulsory traffic: parameters read
    once, their gradients written once, activations read/written once, and for dense the [N, n]
    pre-activation/code matrices it materialises (written and read back, per code set)."""
    dense = method == "dense"
    ka = k_aux if aux else 0
    if op == "decode":
        flops = 6 * N * (n if dense else k) * d
        nbytes = 2 * n * d + 2 * N * d + (3 * N * n if dense else 3 * N * k)
    elif op == "encode":
        flops = 2 * N * d * n
        nbytes = n * d + N * d + (2 * N * n if dense else 2 * N * k)
    else:  # step: encoder fwd; dense adds 2 encoder-backward GEMMs and 3 decoder GEMMs per code set
        sets = 2 if aux else 1
        flops = 2 * N * d * n + (4 * N * d * n + 6 * N * d * n * sets if dense else 10 * N * (k + ka) * d)
        nbytes = 4 * n * d + 4 * N * d + (6 * N * n * sets if dense else 6 * N * (k + ka))
    return float(flops), float(nbytes * elt)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: gpu on CUDA, cpu on CPU")
    ap.add_argument("--tokens", type=int, help="override the shape's tokens per batch")
    ap.add_argument("--dead-fraction", type=float, default=0.1,
                    help="latents marked dead for AuxK in the step (k_aux = d/2, clamped to the dead count)")
    ap.add_argument("--methods", default="dense,torch" + (",triton" if torch.cuda.is_available() else ""),
                    help="comma-separated: dense, torch, triton (triton on CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the table and environment here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape or ("gpu" if device.type == "cuda" else "cpu")])
    if args.tokens:
        shape["tokens"] = args.tokens
    N, d, n, k = shape["tokens"], shape["d"], shape["n"], shape["k"]
    torch.manual_seed(0)
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=d, d_sae=n, k=k), device=device)
    x = torch.randn(N, d, device=device)
    gen = torch.Generator().manual_seed(1)
    dead = (torch.rand(n, generator=gen) < args.dead_fraction).to(device)
    k_aux = min(d // 2, int(dead.sum()))
    with torch.no_grad():
        v, i = ops.topk_preacts(x, sae.W_enc, sae.b_enc, sae.b_dec, k)
        v = v.relu()
    g = torch.randn(N, d, device=device)

    methods = ["dense"] + [m for m in args.methods.split(",") if m != "dense"]
    ceil = ceilings(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for op in ("decode", "encode", "step", "step_noaux"):
        fns = {}
        for method in methods:
            if op == "decode":
                fns[method] = make_decode(method, sae, v, i, g)
            elif op == "encode":
                fns[method] = make_encode(method, sae, x)
            else:
                fns[method] = make_step(method, sae, x, dead if op == "step" else None, k_aux)
        times = timeit(fns, device, args.repeats)
        diff = step_difference(fns, sae) if op.startswith("step") else {}
        for method, (t, c) in times.items():
            flops, nbytes = cost(op.split("_")[0], method, N, d, n, k, k_aux, op == "step", 4)
            roof = max(flops / ceil["flops"], nbytes / ceil["bytes_per_s"])
            rows.append(dict(op=op, method=method, ms=t * 1e3, cpu_ms=c * 1e3, tokens_per_s=N / t,
                             gflop=flops / 1e9, gbyte=nbytes / 1e9, ceiling_fraction=roof / t,
                             speedup_vs_dense=times["dense"][0] / t, cpu_speedup_vs_dense=times["dense"][1] / c,
                             grad_rel_diff=diff.get(method)))
            print(f"  {op:10s} {method:6s} {t * 1e3:9.1f} ms", file=sys.stderr, flush=True)

    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               threads=torch.get_num_threads(), torch=torch.__version__, shape=shape, k_aux=k_aux,
               dead_fraction=float(dead.float().mean()), peak_gflops=ceil["flops"] / 1e9,
               peak_gbytes_per_s=ceil["bytes_per_s"] / 1e9)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"\n{env['device']} ({env['threads']} threads), torch {env['torch']}; d {d}, n {n}, k {k}, {N} tokens; "
          f"AuxK: {env['dead_fraction']:.1%} dead, k_aux {k_aux}; measured peaks {env['peak_gflops']:.0f} GFLOP/s, "
          f"{env['peak_gbytes_per_s']:.0f} GB/s")
    print(f"{'op':11s} {'method':7s} {'ms':>9s} {'tokens/s':>11s} {'GFLOP':>8s} {'GB':>7s} {'of ceiling':>10s} "
          f"{'vs dense':>9s} {'CPU ms':>9s} {'vs dense':>9s} {'Δgrad':>8s}")
    for r in rows:
        print(f"{r['op']:11s} {r['method']:7s} {r['ms']:9.1f} {r['tokens_per_s']:11,.0f} {r['gflop']:8.2f} "
              f"{r['gbyte']:7.3f} {r['ceiling_fraction']:10.1%} {r['speedup_vs_dense']:8.2f}x "
              f"{r['cpu_ms']:9.1f} {r['cpu_speedup_vs_dense']:8.2f}x "
              + (f"{r['grad_rel_diff']:8.1e}" if r["grad_rel_diff"] is not None else ""))
    if args.json:
        write_json(args.json, dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
