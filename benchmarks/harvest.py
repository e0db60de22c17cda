"""Harvest throughput against the bare model forward, in one process.

Both paths run the same contexts in the same batches with the same `stop_at_layer` (just past the hook):
  bare     model(tokens, stop_at_layer=L)            — the forward alone, nothing kept
  harvest  Harvester(model, hooks).harvest(...)      — hooks, position-0/special-token masks, copies, exact budget
Runs alternate (bare, harvest, bare, harvest, …) so drifting machine load hits both alike; the table shows
the median of each, tokens/s counted over the kept tokens (position 0 and separators excluded), and the
ratio harvest/bare. Target: overhead (1 − ratio) ≤ 10%.

    python benchmarks/harvest.py --tokens 8192 --repeats 3 --json runs/bench/harvest.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def forward_flops(cfg, layers: int, context: int) -> float:
    """FLOPs per token of `layers` transformer blocks (matmuls and causal attention at the mean length), the
    work a forward to stop_at_layer must do: the floor to compare the measured speed with."""
    d, heads = cfg.d_model, cfg.n_heads
    d_head = cfg.d_head
    kv = getattr(cfg, "n_key_value_heads", None) or heads
    d_mlp = cfg.d_mlp
    gated = 3 if getattr(cfg, "gated_mlp", True) else 2
    proj = d * heads * d_head * 2 + d * kv * d_head * 2 + gated * d * d_mlp
    attention = 2 * heads * d_head * (context + 1) / 2
    return 2 * layers * (proj + attention)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default="default")
    ap.add_argument("--hooks", default="blocks.15.hook_resid_pre", help="comma-separated hook names")
    ap.add_argument("--tokens", type=int, default=8192, help="kept tokens per run (default 8192)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-contexts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved (default 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from saekit.data import load_contexts
    from saekit.harvest import Harvester, keep_mask
    from saekit.lm import load_model, model_id
    from saekit.train import resolve_device

    device = resolve_device(args.device)
    hooks = [h for h in args.hooks.split(",") if h]
    model = load_model(args.model, device=device)
    train, _ = load_contexts(model.tokenizer, args.dataset, args.context_size, 0.05, 0)
    harvester = Harvester(model, hooks)
    # The contexts one harvest of --tokens uses: both paths run exactly these, in the same batches.
    special = harvester.special
    kept = keep_mask(train.tokens, special).sum(1).cumsum(0)
    n_ctx = int((kept < args.tokens).sum()) + 1
    if n_ctx > len(train.tokens):
        raise SystemExit(f"the dataset holds only {int(kept[-1])} usable tokens; lower --tokens")
    contexts = train.tokens[:n_ctx]
    all_tokens = contexts.numel()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare() -> float:
        sync()
        t0 = time.perf_counter()
        for lo in range(0, n_ctx, args.batch_contexts):
            model(contexts[lo: lo + args.batch_contexts].to(device), stop_at_layer=harvester.stop)
        sync()
        return time.perf_counter() - t0

    def harvest() -> float:
        sync()
        t0 = time.perf_counter()
        h = harvester.harvest(contexts, args.tokens, args.batch_contexts, progress=False)
        sync()
        assert len(h) == args.tokens
        return time.perf_counter() - t0

    # warm-up: first calls allocate and (on CUDA) pick kernels
    with torch.no_grad():
        model(contexts[: args.batch_contexts].to(device), stop_at_layer=harvester.stop)
    harvester.harvest(contexts[: args.batch_contexts], 16, args.batch_contexts, progress=False)

    times: dict[str, list[float]] = {"bare": [], "harvest": []}
    for r in range(args.repeats):
        for name, fn in (("bare", bare), ("harvest", harvest)) if r % 2 == 0 else (("harvest", harvest), ("bare", bare)):
            times[name].append(fn())
            print(f"  repeat {r + 1}/{args.repeats} {name:<8} {times[name][-1]:7.2f} s", flush=True)

    rows = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        rows[name] = {"seconds": s, "seconds_all": ts, "kept_tokens_per_s": args.tokens / s,
                      "all_tokens_per_s": all_tokens / s}
    ratio = rows["harvest"]["kept_tokens_per_s"] / rows["bare"]["kept_tokens_per_s"]
    result = {
        "benchmark": "harvest", "model": model_id(model), "hooks": hooks, "stop_at_layer": harvester.stop,
        "kept_tokens": args.tokens, "contexts": n_ctx, "context_tokens": all_tokens,
        "batch_contexts": args.batch_contexts, "repeats": args.repeats, "device": str(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows, "ratio_harvest_to_bare": ratio, "overhead": 1 - ratio, "target_overhead": 0.10,
    }

    print(f"\nharvest vs bare forward — {model_id(model)}, hooks {','.join(hooks)}, stop_at_layer {harvester.stop}, "
          f"{n_ctx} contexts × {args.context_size} ({args.tokens:,} kept tokens), {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  {'path':<14}{'seconds':>10}{'kept tok/s':>13}{'all tok/s':>12}{'ratio':>8}")
    for name, label in (("bare", "bare forward"), ("harvest", "harvest")):
        row = rows[name]
        print(f"  {label:<14}{row['seconds']:>10.2f}{row['kept_tokens_per_s']:>13,.0f}{row['all_tokens_per_s']:>12,.0f}"
              f"{row['kept_tokens_per_s'] / rows['bare']['kept_tokens_per_s']:>8.3f}")
    verdict = "ok" if 1 - ratio <= 0.10 else "ABOVE TARGET"
    print(f"  overhead {1 - ratio:+.1%} (target ≤ 10%: {verdict})")
    flops = forward_flops(model.cfg, harvester.stop, args.context_size)
    result["gflop_per_token"] = flops / 1e9
    result["bare_gflop_per_s"] = flops * rows["bare"]["all_tokens_per_s"] / 1e9
    print(f"  the forward does {flops / 1e6:.0f} MFLOP per token ({harvester.stop} blocks): the bare forward runs at "
          f"{result['bare_gflop_per_s']:.0f} GFLOP/s")
    if args.json:
        from saekit.files import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
