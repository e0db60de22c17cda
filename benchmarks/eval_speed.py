"""The held-out evaluation (`saekit eval` → evaluate.evaluate): the current code against the algorithm it replaced
(kept below as `old_evaluate`), in one process, on the same tokens, runs interleaved old/new.

    python benchmarks/eval_speed.py                        # 16,384 tokens like the demo, a quick SAE
    python benchmarks/eval_speed.py --sae runs/demo/k32-d4608 --tokens 4096 --repeats 3
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/eval_speed.py
                                                           # as on an AVX2-only CPU (MKL does the fp32 GEMMs)

Without --sae it builds a TopK SAE for the default model at blocks.15.hook_resid_pre from a small harvest
(`SparseAutoencoder.initialized`: random unit decoder rows, b_dec the geometric median): the time goes into model
passes, not into the SAE, and every metric is still computed. Prints wall-clock medians, process CPU-time medians
(this machine is shared, so wall times are noisy), their ratios, and the largest |Δ| between the two codes'
metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from typing import Any

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the old algorithm (commit 86fc637)


class _OldSplicer:
    """The old splicer: for resid_pre hooks `model(act, start_at_layer=L)`, which in transformer-lens 4.3's
    TransformerBridge still runs blocks 0..L-1 on the injected residual and discards their output."""

    def __init__(self, model, hook: str):
        from saekit.lm import check_hooks, hook_layer

        check_hooks(model, [hook])
        self.model, self.hook = model, hook
        layer = hook_layer(hook)
        self.layer = layer if layer is not None and hook.endswith("hook_resid_pre") and layer > 0 else None

    def activations(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            return self.model(tokens, stop_at_layer=self.layer)
        from saekit.harvest import Harvester

        return Harvester(self.model, [self.hook]).forward(tokens)[self.hook]

    def logits(self, tokens: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            return self.model(act, start_at_layer=self.layer)
        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, lambda a, hook: act.to(a.dtype))])


@torch.no_grad()
def old_evaluate(model, sae, contexts: torch.Tensor, cfg=None, hook: str | None = None) -> dict[str, Any]:
    """evaluate.evaluate as of commit 86fc637 (four full passes from the hook per batch, full-vocabulary
    log-softmax of each)."""
    from dataclasses import asdict

    from saekit.config import EvalConfig
    from saekit.errors import DataError
    from saekit.evaluate import ce_metrics, reconstruction_metrics
    from saekit.harvest import MASSIVE_MULTIPLE, keep_mask
    from saekit.tokens import special_ids

    cfg = cfg or EvalConfig()
    hook = hook or sae.hook
    splice = _OldSplicer(model, hook)
    special = special_ids(model.tokenizer)
    device = next(model.parameters()).device
    start = time.perf_counter()
    batches, have = [], 0
    for lo in range(0, len(contexts), cfg.batch_contexts):
        toks = contexts[lo: lo + cfg.batch_contexts].to(device)
        keep = keep_mask(toks, special)
        csum = keep.flatten().cumsum(0).view_as(keep)
        keep &= csum <= cfg.tokens - have
        rows = keep.any(1)
        if not rows.any():
            continue
        toks, keep = toks[rows], keep[rows]
        act = splice.activations(toks).float()
        batches.append((toks, keep, act))
        have += int(keep.sum())
        if have >= cfg.tokens:
            break
    if have < cfg.tokens:
        raise DataError(f"the held-out contexts give {have} tokens, fewer than the {cfg.tokens} asked")
    x = torch.cat([a[k] for _, k, a in batches])
    recorded = sae.info.get("massive_threshold") if cfg.massive_multiple is None else None
    multiple = MASSIVE_MULTIPLE if cfg.massive_multiple is None else cfg.massive_multiple
    out = reconstruction_metrics(sae, x, multiple, cfg.dense_threshold, massive_threshold=recorded)
    mean_act = x.mean(0)
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    n_pred = 0
    for toks, keep, act in batches:
        pred = keep[:, :-1]
        targets = toks[:, 1:][pred]
        variants = {
            "clean": act,
            "sae": torch.where(keep[..., None], sae(act.reshape(-1, act.shape[-1])).view_as(act), act),
            "zero": torch.where(keep[..., None], torch.zeros_like(act), act),
            "mean": torch.where(keep[..., None], mean_act.expand_as(act), act),
        }
        logp_clean = None
        for name, a in variants.items():
            logp = F.log_softmax(splice.logits(toks, a)[:, :-1][pred].float(), dim=-1)
            sums[name] += F.nll_loss(logp, targets, reduction="sum").item()
            if name == "clean":
                logp_clean = logp
            elif name == "sae":
                sums["kl"] += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        n_pred += len(targets)
    out |= ce_metrics(sums, n_pred) | {"hook": hook, "eval_config": asdict(cfg), "seconds": time.perf_counter() - start}
    return out


# ----------------------------------------------------------------------------- the benchmark

def cpu_info() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    return (f"CPU: {name}; {os.cpu_count()} cores; flags {', '.join(isa) or 'none of avx2/avx512'}; "
            f"torch {torch.__version__} uses {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{torch.get_num_threads()} threads" + (f"; {env}" if env else ""))


def quick_sae(model, train_tokens: torch.Tensor, hook: str, d_sae: int, k: int, tokens: int):
    from saekit.config import SaeConfig
    from saekit.harvest import Harvester
    from saekit.sae import SparseAutoencoder

    acts = Harvester(model, [hook]).harvest(train_tokens, tokens, progress=False).acts[hook]
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=acts.shape[1], d_sae=d_sae, k=k), sample=acts, seed=0,
                                        enc_scale=0.5)
    sae.info = {"hook": hook}
    return sae


def deviation(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    """Largest |a[k] − b[k]| over the numeric metrics both hold (not the timing)."""
    worst, where = 0.0, "-"
    for key in sorted(set(a) & set(b)):
        va, vb = a[key], b[key]
        if key == "seconds" or isinstance(va, bool) or not isinstance(va, int | float):
            continue
        d = abs(float(va) - float(vb))
        if d > worst or where == "-":
            worst, where = d, key
    return worst, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=None, help="an SAE directory (default: a quick SAE on the default model)")
    p.add_argument("--tokens", type=int, default=16_384, help="held-out tokens evaluated (the demo's 16,384)")
    p.add_argument("--repeats", type=int, default=3, help="old/new pairs, interleaved (order alternates)")
    p.add_argument("--batch-contexts", type=int, default=16, help="EvalConfig.batch_contexts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre", help="hook of the quick SAE")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the runs and metrics here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from saekit.config import EvalConfig
    from saekit.data import load_contexts
    from saekit.evaluate import evaluate
    from saekit.lm import load_model
    from saekit.sae import load_sae

    print(cpu_info(), flush=True)
    model = load_model("default")
    train, held = load_contexts(model.tokenizer, "default", 128, 0.05, 0)
    if args.sae:
        sae = load_sae(args.sae)
    else:
        t0 = time.perf_counter()
        sae = quick_sae(model, train.tokens, args.hook, args.d_sae, args.k, 8192)
        print(f"quick SAE d_sae {args.d_sae}, k {args.k} at {args.hook} in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = EvalConfig(tokens=args.tokens, batch_contexts=args.batch_contexts)
    codes = {"old": lambda: old_evaluate(model, sae, held.tokens, cfg),
             "new": lambda: evaluate(model, sae, held.tokens, cfg, progress=False)}
    runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    metrics: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for r in range(args.repeats):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            wall, cpu = time.perf_counter(), time.process_time()
            m = codes[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append((wall, cpu))
            metrics[name].append(m)
            print(f"  repeat {r + 1} {name}: {wall:7.1f} s wall, {cpu:7.1f} s CPU (load before {load:.1f})", flush=True)
    dev, where = max(deviation(o, n) for o in metrics["old"] for n in metrics["new"])
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    pairs = [o[0] / n[0] for o, n in zip(runs["old"], runs["new"])]
    pairs_cpu = [o[1] / n[1] for o, n in zip(runs["old"], runs["new"])]
    header = (f"{'tokens':>7} {'old s':>8} {'new s':>8} {'ratio':>6} {'old CPU s':>10} {'new CPU s':>10} "
              f"{'CPU ratio':>9}  max |Δ| (metric)")
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{args.tokens:>7} {med['old'][0]:>8.1f} {med['new'][0]:>8.1f} {med['old'][0] / med['new'][0]:>6.2f} "
          f"{med['old'][1]:>10.1f} {med['new'][1]:>10.1f} {med['old'][1] / med['new'][1]:>9.2f}  {dev:.2e} ({where})")
    print(f"medians of {args.repeats} interleaved repeats; per-repeat ratios wall "
          f"{' / '.join(f'{x:.2f}' for x in pairs)}, CPU {' / '.join(f'{x:.2f}' for x in pairs_cpu)}")
    new = metrics["new"][0]
    print("metrics (new): " + ", ".join(f"{k} {new[k]:.4f}" for k in (
        "fvu", "fvu_excl_massive", "nmse", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_zero_ablation",
        "ce_mean_ablation", "ce_recovered_zero", "ce_recovered_mean", "kl")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_info(), "args": vars(args), "runs": runs, "max_abs_dev": dev, "worst_metric": where,
                       "metrics": metrics}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
