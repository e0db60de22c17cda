"""Matryoshka BatchTopK against BatchTopK at the same L0: held-out FVU, CE recovered, KL and dead fraction.

Both dictionaries train together on one cached activation stream (same tokens, same order, same k, d_sae, lr and
schedule; saekit's Trainer steps every dictionary of a run on each batch), once per seed; each is then evaluated by
`saekit eval`'s code on the same held-out tokens. Matryoshka's prefixes are d_sae/16, /8, /4, /2, 1 unless
--prefixes says otherwise. Also reported: the FVU of Matryoshka's smallest prefix alone, which BatchTopK has no
equivalent of (its first latents are not trained to work alone).

    python benchmarks/matryoshka.py --activations runs/demo/activations --json runs/bench/matryoshka.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from saekit.config import EvalConfig, HarvestConfig, RunConfig, SaeConfig, TrainConfig, TrainRun
from saekit.files import read_json, write_json
from saekit.runner import train
from saekit.sae import load_sae

KEYS = ("fvu", "fvu_excl_massive", "l0", "dead_fraction", "ce_recovered_zero", "kl")


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        return f"{name}; avx512_bf16: {'yes' if 'avx512_bf16' in out else 'no'}"
    except OSError:
        return platform.processor()


def prefix_fvu(sae_dir: Path, cache_dir: str, hook: str, tokens: int) -> list[float]:
    """FVU of each nested prefix alone on the cache's last `tokens` activations (raw units, massive tokens kept)."""
    from saekit.cache import ActivationCache
    from saekit.evaluate import fvu

    sae = load_sae(sae_dir)
    cache = ActivationCache(cache_dir)
    x = cache.slice(cache.tokens - tokens, cache.tokens, [hook])[hook]
    values, indices = sae.encode(x)
    nested = SaeConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, k=sae.cfg.k, architecture="matryoshka").nested
    out = []
    for hi in nested:
        out.append(fvu(x, sae.decode(values * (indices < hi), indices)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", required=True, help="a cache written by `saekit harvest` / a run's activations/")
    p.add_argument("--hook", default=None, help="hook in the cache (default: its first)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--prefixes", default="", help="Matryoshka prefix sizes (default d_sae/16, /8, /4, /2, 1)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--out", default="runs/bench/matryoshka")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from saekit.cache import ActivationCache

    cache = ActivationCache(args.activations)
    hook = args.hook or cache.hooks[0]
    prefixes = [int(v) for v in args.prefixes.split(",") if v]
    results: dict[str, list[dict]] = {"batchtopk": [], "matryoshka": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        saes = [SaeConfig(d_in=cache.d_in(hook), d_sae=args.d_sae, k=args.k, architecture="batchtopk"),
                SaeConfig(d_in=cache.d_in(hook), d_sae=args.d_sae, k=args.k, architecture="matryoshka",
                          prefixes=prefixes)]
        out = Path(args.out) / f"seed{seed}"
        spec = TrainRun(harvest=HarvestConfig(hooks=[hook], seed=seed, device="cpu"),
                        train=TrainConfig(saes=saes, epochs=args.epochs),
                        eval=EvalConfig(tokens=args.eval_tokens),
                        run=RunConfig(out=str(out), activations=args.activations, overwrite=True))
        for path in train(spec):
            ev = read_json(path / "eval.json")
            arch = load_sae(path).cfg.architecture
            row = {k: ev[k] for k in KEYS} | {"seed": seed, "path": str(path)}
            row["prefix_fvu"] = prefix_fvu(path, args.activations, hook, 16384)
            results[arch].append(row)
    lines = [f"hook {hook}, d_sae {args.d_sae}, k {args.k}, {args.epochs:g} epochs over {cache.tokens:,} tokens, "
             f"{len(results['batchtopk'])} seed(s); held-out {args.eval_tokens:,} tokens; CPU: {cpu()}; "
             f"torch {torch.__version__}", "",
             "| | " + " | ".join(KEYS) + " | smallest prefix alone (FVU, in-sample) |", "|---" * (len(KEYS) + 2) + "|"]
    summary = {}
    for arch, rows in results.items():
        mean = {k: statistics.fmean(r[k] for r in rows) for k in KEYS}
        spread = {k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / 2 for k in KEYS}
        first = statistics.fmean(r["prefix_fvu"][0] for r in rows)
        summary[arch] = {"mean": mean, "half_range": spread, "smallest_prefix_fvu": first, "runs": rows}
        lines.append(f"| {arch} | " + " | ".join(f"{mean[k]:.4f} ± {spread[k]:.4f}" for k in KEYS) + f" | {first:.3f} |")
    print("\n".join(lines))
    if args.json:
        write_json(Path(args.json), {"table": lines, "summary": summary, "cpu": cpu(), "args": vars(args)})


if __name__ == "__main__":
    main()
