"""The training step against an earlier revision's sparse ops, interleaved in one process (ratios, not absolute
speeds: the machine may be shared). The earlier `saekit/ops.py` is read from git and swapped in for the
'before' steps; everything else (trainer, Adam, data) is today's.

    python benchmarks/step_speed.py --baseline-rev ce788f3 [--activations DIR] [--dead-fraction 0]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/step_speed.py …

The second line imitates an AVX2-only CPU on an AVX-512 one (torch's kernels, oneDNN and MKL all limited to
AVX2; bf16 then has no native GEMM, so the fp32 selection runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_setup import add_step_args, step_trainer, timed_step

ROOT = Path(__file__).resolve().parent.parent


def load_ops(rev: str):
    """saekit/ops.py as of `rev`, imported as a module of the saekit package (so its relative imports work)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:saekit/ops.py"], capture_output=True, text=True,
                          check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="saekit-ops-")) / "ops_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("saekit.ops_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def ops_of(module):
    """Today's ops with `module`'s encoder and decoder autograd functions (the whole step's sparse work)."""
    from saekit import ops

    saved = ops._EncodeTopK, ops._SparseDecode
    ops._EncodeTopK, ops._SparseDecode = module._EncodeTopK, module._SparseDecode
    try:
        yield
    finally:
        ops._EncodeTopK, ops._SparseDecode = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", default="ce788f3", help="git revision whose saekit/ops.py is the baseline")
    add_step_args(p, dead_fraction=0.0)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (interleaved)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from saekit import ops

    trainer = step_trainer(args)
    baseline = load_ops(args.baseline_rev)
    n_dead = int(args.dead_fraction * args.d_sae)

    variants = {f"before ({args.baseline_rev})": lambda: ops_of(baseline), "after": contextlib.nullcontext}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for i in range(2 + args.steps):
        for name, context in variants.items():
            with context():
                t = timed_step(trainer, args, i)
            if i >= 2:  # the first steps warm up allocators and oneDNN's kernel cache
                times[name].append(t)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU {model}; avx512 {'avx512f' in cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"path {ops.training_path('cpu')}; {n_dead} dead latents; {args.steps} steps each, interleaved")
    base = statistics.median(w for w, _ in times[next(iter(variants))])
    base_cpu = statistics.median(c for _, c in times[next(iter(variants))])
    print(f"{'variant':22s} {'ms/step':>8s} {'tok/s':>8s} {'CPU ms':>8s} {'× before':>9s} {'× (CPU)':>8s}")
    for name, ts in times.items():
        w, c = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
        print(f"{name:22s} {w * 1e3:8.0f} {args.batch_size / w:8,.0f} {c * 1e3:8.0f} {base / w:9.2f} {base_cpu / c:8.2f}")
    print(f"bf16 shortlist rows recomputed in fp32: {ops.recomputed_fraction():.2%}")


if __name__ == "__main__":
    main()
