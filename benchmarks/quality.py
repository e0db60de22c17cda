"""SAE quality of the demo configuration at a fixed token budget, against a baseline recipe in one process.

The demo configuration (`saekit demo`: default model and corpus, blocks.15.hook_resid_pre, d_sae 4608, k 32,
TrainConfig defaults, massive tokens left out of training) is harvested once (or read from a cache), then
trained twice on the same activations in the same batch order:
  saekit    the defaults
  baseline  one change (--baseline): 'rule' = Adam at the published lr rule 2e-4·sqrt(2^14/d_sae) (saekit
            uses 8× it), 'signum' = schedule-free SignSGD (sparsify's default), 'massive' = massive tokens
            kept in training, 'init' = W_enc = W_decᵀ at init (Gao et al.; saekit starts at W_decᵀ/2),
            'none' = no baseline
Both are evaluated on the same held-out tokens (evaluate.py: FVU with and without massive tokens, L0,
dead, CE recovered vs zero- and mean-ablation, KL). The table shows both, their ratio and the demo's
quality targets; wall times per phase are reported beside them.

    python benchmarks/quality.py --json runs/bench/quality.json                  # the full demo budget
    python benchmarks/quality.py --activations runs/demo/activations --tokens 100000 --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit.config import EvalConfig, HarvestConfig, SaeConfig, TrainConfig, parse_override  # noqa: E402

TARGETS = {"fvu_excl_massive": ("<=", 0.25), "ce_recovered_mean": (">=", 0.93), "ce_recovered_zero": (">=", 0.95),
           "dead_fraction": ("<=", 0.01)}
ROWS = ["fvu_excl_massive", "fvu", "nmse", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_sae",
        "ce_zero_ablation", "ce_mean_ablation", "ce_recovered_zero", "ce_recovered_mean", "kl", "tokens",
        "train_seconds", "train_tokens_per_s", "eval_seconds"]
BASELINES = {
    "rule": ("Adam at the lr rule (1×)", lambda c: dataclasses.replace(c, lr_scale=1.0)),
    "signum": ("schedule-free SignSGD", lambda c: dataclasses.replace(c, optimizer="signum")),
    "massive": ("massive tokens kept", lambda c: dataclasses.replace(c, exclude_massive=False)),
    "init": ("W_enc = W_decᵀ at init (Gao)", lambda c: dataclasses.replace(c, enc_init_scale=1.0)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=HarvestConfig.tokens,
                    help=f"harvested training tokens (default {HarvestConfig.tokens:,}, the demo's)")
    ap.add_argument("--epochs", type=float, default=TrainConfig.epochs, help=f"default {TrainConfig.epochs}")
    ap.add_argument("--eval-tokens", type=int, default=EvalConfig.tokens, help=f"default {EvalConfig.tokens:,}")
    ap.add_argument("--d-sae", type=int, default=SaeConfig.d_sae)
    ap.add_argument("--k", type=int, default=SaeConfig.k)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--hook", default="blocks.15.hook_resid_pre")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default="default")
    ap.add_argument("--activations", help="read the first --tokens rows of this cache instead of harvesting "
                                          "(its model, dataset and split are used for the held-out text)")
    ap.add_argument("--baseline", choices=[*BASELINES, "none"], default="rule")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a TrainConfig field of the saekit run (repeatable), e.g. enc_init_scale=0.5")
    ap.add_argument("--out", default="runs/bench/quality", help="SAE directories go here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from saekit.cache import ActivationCache
    from saekit.data import load_contexts
    from saekit.evaluate import evaluate
    from saekit.files import write_json
    from saekit.harvest import Harvester, massive_mask
    from saekit.lm import load_model, model_id
    from saekit.sae import load_sae
    from saekit.train import Trainer, resolve_device

    start = time.perf_counter()
    device = resolve_device(args.device)
    data = HarvestConfig(model=args.model, dataset=args.dataset, hooks=[args.hook], tokens=args.tokens)
    harvest_info: dict = {}
    if args.activations:
        cache = ActivationCache(args.activations).read(hooks=[args.hook])
        if len(cache) < args.tokens:
            raise SystemExit(f"{args.activations} holds {len(cache):,} tokens, fewer than --tokens {args.tokens:,}")
        m = cache.meta
        data = dataclasses.replace(data, model=m.get("model_arg", args.model), dataset=m.get("dataset", args.dataset),
                                   context_size=m.get("context_size", 128), seed=m.get("seed", 0),
                                   heldout_fraction=m.get("heldout_fraction", 0.05))
        acts = cache.acts[args.hook][: args.tokens]
        harvest_info = {"source": str(args.activations), "seconds": 0.0}
        del cache
    model = load_model(data.model, device=device)
    train_ctx, held = load_contexts(model.tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed)
    if not args.activations:
        h = Harvester(model, [args.hook]).harvest(train_ctx.tokens, args.tokens, data.batch_contexts)
        acts = h.acts[args.hook]
        harvest_info = {"source": "harvested", "seconds": h.meta["seconds"], "tokens_per_s": h.meta["tokens_per_s"]}
        del h
    massive = massive_mask(acts.norm(dim=1), data.massive_multiple)
    info = {"hook": args.hook, "model": model_id(model), "model_arg": data.model, "dataset": data.dataset,
            "context_size": data.context_size, "heldout_fraction": data.heldout_fraction, "seed": data.seed,
            "harvest_tokens": args.tokens}
    base = TrainConfig(saes=[SaeConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=args.k)], epochs=args.epochs,
                       batch_size=args.batch_size, device=str(device))
    if args.set:
        base = dataclasses.replace(base, **dict(parse_override(s) for s in args.set))
    runs = {"saekit": ("defaults" + "".join(f", {s}" for s in args.set), base)}
    if args.baseline != "none":
        label, change = BASELINES[args.baseline]
        runs["baseline"] = (label, change(base))
    ecfg = EvalConfig(tokens=args.eval_tokens)

    results: dict[str, dict] = {}
    for name, (label, tcfg) in runs.items():
        train_acts = acts[~massive] if tcfg.exclude_massive else acts
        print(f"\n== {name}: {label} — {len(train_acts):,} training activations × {tcfg.epochs} epochs", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(tcfg, train_acts, Path(args.out) / name, info={**info, "benchmark": f"quality/{name}"})
        path = trainer.fit()[0]
        train_s = time.perf_counter() - t0
        sae = load_sae(path).to(device)
        t0 = time.perf_counter()
        metrics = evaluate(model, sae, held.tokens, ecfg)
        metrics |= {"train_seconds": train_s, "train_tokens_per_s": trainer.step * tcfg.batch_size / train_s,
                    "eval_seconds": time.perf_counter() - t0, "sae": str(path), "weights_sha256": sae.weights_hash(),
                    "train_config": dataclasses.asdict(tcfg), "label": label}
        write_json(path / "eval.json", metrics)
        results[name] = metrics

    total = time.perf_counter() - start
    result = {"benchmark": "quality", "model": model_id(model), "hook": args.hook, "d_sae": args.d_sae, "k": args.k,
              "tokens": args.tokens, "epochs": args.epochs, "massive_tokens": int(massive.sum()),
              "eval_tokens": args.eval_tokens, "baseline": args.baseline, "harvest": harvest_info,
              "wall_seconds": total, "device": str(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "runs": results,
              "targets": {k: list(v) for k, v in TARGETS.items()}}
    print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def meets(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    ok = value <= bound if op == "<=" else value >= bound
    return f"{op} {bound:g} {'ok' if ok else 'MISSED'}"


def print_table(r: dict) -> None:
    runs = r["runs"]
    names = list(runs)
    h = r["harvest"]
    src = f"harvested at {h['tokens_per_s']:,.0f} tok/s in {h['seconds']:.0f} s" if "tokens_per_s" in h else f"read from {h['source']}"
    print(f"\nquality — {r['model']} {r['hook']}, d_sae {r['d_sae']}, k {r['k']}, {r['tokens']:,} tokens ({src}; "
          f"{r['massive_tokens']} massive) × {r['epochs']} epochs; eval on {r['eval_tokens']:,} held-out tokens; "
          f"{r['device']}, {r['threads']} threads")
    if len(names) == 2:
        print(f"  baseline: {runs['baseline']['label']}; ratio = saekit / baseline")
    print(f"  {'metric':<20}" + "".join(f"{n:>12}" for n in names) + (f"{'ratio':>9}" if len(names) == 2 else "")
          + "   target")
    for key in ROWS:
        vals = [runs[n].get(key) for n in names]
        if any(v is None for v in vals):
            continue
        fmt = (lambda v: f"{v:>12,.0f}") if key.endswith(("seconds", "per_s")) or key == "tokens" else (lambda v: f"{v:>12.4f}")
        line = f"  {key:<20}" + "".join(fmt(v) for v in vals)
        if len(vals) == 2:
            line += f"{vals[0] / vals[1]:>9.3f}" if vals[1] else f"{'':>9}"
        line += f"   {meets(key, vals[0])}"
        print(line.rstrip())
    print(f"  wall time {r['wall_seconds']:.0f} s (harvest {h['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
