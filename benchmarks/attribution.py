"""Attribution graphs on the default model: time, memory, growth with prompt length, and validation in the model.

Three parts, each printed and written to --json:
  time      one graph per prompt length (8, 16, 32, 64 tokens, BOS included; prompts cut from BBC News text) at
            the default budget (AttributionConfig()): wall time of the graph, its backward batches (time per
            batch), active and visited feature nodes, and the process's peak RSS (the model and the transcoder
            set loaded). Target: a 16-token prompt ≤ 60 s, ≤ 6 GB.
  validate  ≥ 10 prompts of 16 tokens: Spearman ρ between the graph's predicted and the real model's measured
            change of the top logit, when each of the top-20 feature nodes is ablated or doubled
            (saekit.attribution.validate); mean ρ over prompts with a bootstrap 95% interval, and the same for the
            direct edges alone (a finding, not a target). Also the graphs' replacement / completeness scores.
  patching  attribution patching over residual SAEs (--saes, default the demo SAE) on a prompt set with a
            logit-difference metric (benchmarks/attribution_prompts.jsonl: ten "The capital of X is" prompts):
            time, forward-backward batches, IG's completeness, and the Spearman ρ of IG and AtP against ablating
            each of the top-20 feature nodes alone in the real model.

    python benchmarks/attribution.py --transcoders runs/demo-circuits --json runs/bench/attribution.json
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

from saekit.attribution import attribute, validate
from saekit.config import AttributionConfig
from saekit.files import write_json


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    isa = "avx512_bf16" if "avx512_bf16" in out else "avx512f" if "avx512f" in out else "avx2" if "avx2" in out else "?"
    return f"{name} ({isa}), {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompts_of(tokenizer, n_tokens: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly n_tokens ids (BOS + n_tokens − 1 text tokens) from the default corpus."""
    from saekit.data import load_contexts
    from saekit.tokens import bos_id

    train, _ = load_contexts(tokenizer, "default", 128, 0.05, 0)
    rows = train.tokens
    rng = random.Random(seed)
    out = []
    for i in rng.sample(range(len(rows)), count):
        body = [t for t in rows[i].tolist()[1:] if t != bos_id(tokenizer)][: n_tokens - 1]
        out.append([bos_id(tokenizer), *body])
    return out


def bootstrap_mean(xs: list[float], reps: int = 2000, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(reps))
    return {"mean": statistics.fmean(xs), "low": means[int(0.025 * reps)], "high": means[int(0.975 * reps) - 1],
            "n": len(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transcoders", default="runs/demo-circuits")
    p.add_argument("--lengths", default="8,16,32,64")
    p.add_argument("--prompts", type=int, default=10, help="prompts of 16 tokens for the validation")
    p.add_argument("--top", type=int, default=20, help="feature nodes ablated / doubled per prompt")
    p.add_argument("--max-feature-nodes", type=int, default=AttributionConfig.max_feature_nodes)
    p.add_argument("--saes", default="runs/demo/k32-d4608", help="residual SAEs for the patching part")
    p.add_argument("--patching-prompts", default=str(Path(__file__).with_name("attribution_prompts.jsonl")))
    p.add_argument("--skip", default="", help="comma list of parts to skip: time, validate, patching")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from saekit.config import DataConfig
    from saekit.lm import load_model
    from saekit.runner import transcoder_set

    skip = set(args.skip.split(","))
    result: dict = {"cpu": cpu(), "transcoders": args.transcoders, "config": vars(args), "time": [], "validate": []}
    if {"time", "validate"} <= skip:
        tcs, model = {}, None
    else:
        tcs = transcoder_set(args.transcoders, "the benchmark needs transcoders")
        model = load_model(DataConfig.from_manifest(tcs[min(tcs)].info).model)
        print(f"CPU: {result['cpu']}; model and {len(tcs)} transcoders loaded, peak RSS {peak_rss_gb():.2f} GB")
    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes)
    if "time" not in skip:
        print(f"\n{'tokens':>6} {'seconds':>8} {'batches':>8} {'s/batch':>8} {'active':>7} {'visited':>8} "
              f"{'peak RSS GB':>12}")
        for n in map(int, args.lengths.split(",")):
            ids = prompts_of(model.tokenizer, n, 1, seed=n)[0]
            t0 = time.perf_counter()
            g = attribute(model, tcs, ids, cfg=cfg, progress=False)
            row = {"tokens": n, "seconds": time.perf_counter() - t0, "batches": g.meta["backward_batches"],
                   "seconds_per_batch": g.meta["seconds_per_batch"], "active_features": g.meta["active_features"],
                   "feature_nodes": g.n_features, "peak_rss_gb": peak_rss_gb()}
            result["time"].append(row)
            print(f"{n:>6} {row['seconds']:>8.1f} {row['batches']:>8} {row['seconds_per_batch']:>8.2f} "
                  f"{row['active_features']:>7,} {row['feature_nodes']:>8,} {row['peak_rss_gb']:>12.2f}")
            del g
    if "validate" not in skip:
        print(f"\nvalidation: {args.prompts} prompts of 16 tokens, top {args.top} feature nodes each")
        for i, ids in enumerate(prompts_of(model.tokenizer, 16, args.prompts, seed=100)):
            g = attribute(model, tcs, ids, cfg=cfg, progress=False)
            v = validate(model, tcs, g, args.top)
            pruned = g.prune()
            row = {"prompt": model.tokenizer.decode(ids[1:]), "target": v["target"],
                   "ablation": v["ablation"]["rho"], "doubling": v["doubling"]["rho"],
                   "ablation_direct_only": v["ablation_direct_only"]["rho"], **{f"{k}": x for k, x in g.scores().items()},
                   **{f"{k}_pruned": x for k, x in g.scores(pruned).items()}}
            result["validate"].append(row)
            print(f"  {i:2d} ρ ablation {row['ablation']:+.2f} doubling {row['doubling']:+.2f} direct-only "
                  f"{row['ablation_direct_only']:+.2f}; replacement {row['replacement']:.3f} completeness "
                  f"{row['completeness']:.3f} | {row['prompt'][:50]!r} → {row['target']!r}")
        summary = {k: bootstrap_mean([r[k] for r in result["validate"] if r[k] == r[k]])
                   for k in ("ablation", "doubling", "ablation_direct_only", "replacement", "completeness",
                             "replacement_pruned", "completeness_pruned")}
        result["validate_summary"] = summary
        for k, s in summary.items():
            print(f"  mean {k}: {s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}] over {s['n']} prompts")
    if "patching" not in skip:
        result["patching"] = patching(args, model)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")


def patching(args, model) -> dict:
    from saekit.attribution.patching import node_effects, read_prompts, residual_sae_set, validate_patching
    from saekit.config import DataConfig
    from saekit.lm import load_model

    saes = residual_sae_set(args.saes)
    if model is None:
        model = load_model(DataConfig.from_manifest(next(iter(saes.values())).info).model)
    prompts = read_prompts(args.patching_prompts)
    print(f"\nattribution patching: {len(prompts)} prompts, SAEs {', '.join(saes)}; CPU {cpu()}")
    t0 = time.perf_counter()
    effects = node_effects(model, saes, prompts, ig_steps=10, progress=False)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    v = validate_patching(model, saes, prompts, effects, args.top)
    row = {"prompts": len(prompts), "seconds": seconds, "seconds_per_prompt": seconds / len(prompts),
           "forward_backward_batches": effects.meta["forward_backward_batches"],
           "validation_seconds": time.perf_counter() - t0, "metric": effects.metric,
           "ig_completeness": effects.ig_sum_check, "rho_ig": v["ig"], "rho_atp": v["atp"], "nodes": v["nodes"]}
    print(f"  {seconds:.1f} s ({row['seconds_per_prompt']:.1f} s a prompt, {row['forward_backward_batches']} "
          f"forward-backward batches), validation {row['validation_seconds']:.1f} s; metric {effects.metric:+.3f}")
    for h, c in zip(effects.hooks, effects.ig_sum_check):
        print(f"  IG completeness {h}: Σ IG {c['ig_sum']:+.3f} vs all nodes off {c['measured']:+.3f}")
    print(f"  top {v['nodes']} feature nodes ablated alone: Spearman ρ IG {v['ig']['rho']:+.2f} "
          f"[{v['ig']['low']:+.2f}, {v['ig']['high']:+.2f}], AtP {v['atp']['rho']:+.2f} "
          f"[{v['atp']['low']:+.2f}, {v['atp']['high']:+.2f}]")
    return row


if __name__ == "__main__":
    main()
