"""Feature store: build time against the bare model forward, and feature-page load time.

1. Build (one pass) vs bare forward, same process, same contexts, interleaved repeats (medians):
   baseline  the model forward alone (`stop_at_layer` just past the hook, as the harvester runs it) over
             the contexts that hold --tokens kept tokens
   store     `saekit analyze` over the same tokens: forward + SAE encode + all bookkeeping (the pass), and
             the pass + the weight-only statistics (logits, neighbours, map) + writing the store (total)
   The pass is also timed against the forward measured inside it (robust when the machine's load drifts between
   runs). The weight-only part does not grow with tokens, so the table also gives the total at the demo's budget
   (300k tokens) from the measured per-token costs: pass_per_token·N + fixed, against forward_per_token·N.
2. Page load: a synthetic 32,768-latent store (65k tokens of Zipf-distributed codes, k 32, real builder);
   time to open it, and `FeatureStore.feature(i)` (everything a feature page shows) for random latents.

    python benchmarks/features.py [--sae runs/demo/k32-d4608] [--tokens 16384] [--json runs/bench/features.json]

Without --sae (and no runs/demo/k32-d4608) a random-weight SAE of the demo's shape (4608 latents, k 32,
blocks.15.hook_resid_pre) stands in: the timing depends on its shape, not its training.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit.features import FeatureBuilder, FeatureConfig, FeatureStore, analyze, write_store  # noqa: E402
from saekit.files import write_json  # noqa: E402
from saekit.tokens import Vocab  # noqa: E402

DEMO_SAE = ROOT / "runs/demo/k32-d4608"
DEMO_TOKENS = 300_000


def random_sae(out: Path) -> Path:
    from saekit.config import SaeConfig
    from saekit.sae import SparseAutoencoder

    sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=4608, k=32), seed=0)
    sae.info = {"hook": "blocks.15.hook_resid_pre", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_arg": "default",
                "dataset": "default", "context_size": 128, "heldout_fraction": 0.05, "seed": 0}
    return sae.save(out)


@torch.no_grad()
def bare_forward(model, hook: str, contexts: torch.Tensor, tokens: int, batch_contexts: int) -> float:
    """Seconds of model forward over the first contexts holding `tokens` kept tokens (the store's tokens)."""
    from saekit.harvest import Harvester, keep_mask

    h = Harvester(model, [hook])
    seen, seconds = 0, 0.0
    for lo in range(0, len(contexts), batch_contexts):
        chunk = contexts[lo: lo + batch_contexts]
        t0 = time.perf_counter()
        h.forward(chunk)
        seconds += time.perf_counter() - t0
        seen += int(keep_mask(chunk, h.special).sum())
        if seen >= tokens:
            break
    return seconds


def bench_build(sae_dir: Path, tokens: int, repeats: int, tmp: Path) -> dict:
    from saekit.data import load_contexts
    from saekit.lm import load_model
    from saekit.sae import load_sae

    sae = load_sae(sae_dir)
    model = load_model(sae.info.get("model_arg", "default"))
    train, _ = load_contexts(model.tokenizer, sae.info.get("dataset", "default"), int(sae.info.get("context_size", 128)),
                             sae.info.get("heldout_fraction", 0.05), sae.info.get("seed", 0))
    cfg = FeatureConfig(tokens=tokens, device="cpu")
    bare_forward(model, sae.hook, train.tokens, 2048, cfg.batch_contexts)  # warm-up: allocations, kernels
    runs = []
    for r in range(repeats):
        fwd = bare_forward(model, sae.hook, train.tokens, tokens, cfg.batch_contexts)
        analyze(sae_dir, tmp / f"store{r}", cfg, model=model, progress=False)
        t = json.loads((tmp / f"store{r}" / "manifest.json").read_text())["timings"]
        runs.append({"forward": fwd, "pass": t["pass_seconds"], "pass_forward": t["forward_seconds"],
                     "fixed": t["total_seconds"] - t["pass_seconds"], "total": t["total_seconds"]})
        print(f"  repeat {r}: forward {fwd:.1f} s, store pass {t['pass_seconds']:.1f} s "
              f"(its forward {t['forward_seconds']:.1f} s), total {t['total_seconds']:.1f} s", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    per_tok_fwd, per_tok_pass = med["forward"] / tokens, med["pass"] / tokens
    return {
        "sae": str(sae_dir), "tokens": tokens, "repeats": repeats, "runs": runs, **{f"{k}_s": v for k, v in med.items()},
        "pass_ratio": med["pass"] / med["forward"], "total_ratio": med["total"] / med["forward"],
        # the same ratio against the forward timed inside the pass itself: immune to load drifting between runs
        "pass_ratio_own_forward": statistics.median(r["pass"] / r["pass_forward"] for r in runs),
        "demo_tokens": DEMO_TOKENS,
        "demo_total_ratio": (per_tok_pass * DEMO_TOKENS + med["fixed"]) / (per_tok_fwd * DEMO_TOKENS),
        "forward_tokens_per_s": tokens / med["forward"], "store_tokens_per_s": tokens / med["pass"],
    }


def synthetic_store(out: Path, d_sae: int = 32768, tokens: int = 65536, k: int = 32, vocab: int = 49152,
                    d: int = 64) -> float:
    """A store of d_sae latents built by the real FeatureBuilder from Zipf-distributed codes; returns seconds."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    cfg = FeatureConfig(device="cpu")
    b = FeatureBuilder(d_sae, vocab, cfg)
    T, B = 128, cfg.batch_contexts
    weights = 1.0 / torch.arange(1, d_sae + 1).double() ** 0.7
    weights = weights[torch.randperm(d_sae, generator=g)]
    cdf = weights.cumsum(0) / weights.sum()  # Zipf draws (with replacement: a rare repeat in a token is harmless)
    n_ctx = math.ceil(tokens / (T - 1))
    for lo in range(0, n_ctx, B):
        cs = torch.arange(lo, min(lo + B, n_ctx))
        ctx = cs.repeat_interleave(T - 1)
        pos = torch.arange(1, T).repeat(len(cs))
        idx = torch.searchsorted(cdf, torch.rand(len(ctx), k, generator=g, dtype=torch.float64)).clamp(max=d_sae - 1)
        val = torch.rand(len(ctx), k, generator=g) * 10
        b.add(val, idx, torch.randint(0, vocab, (len(ctx),), generator=g), pos, ctx)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=g), dim=1)
    stats, feats, info = b.finish(W_dec, torch.randn(d, vocab, generator=g), torch.ones(d))
    contexts = torch.randint(0, vocab, (n_ctx, T), generator=g)
    vocab_obj = Vocab(np.frombuffer(b"".join(f"tok{i}".encode() for i in range(vocab)), dtype=np.uint8),
                      np.cumsum([0] + [len(f"tok{i}") for i in range(vocab)]), np.zeros(vocab, dtype=bool))
    man = {"kind": "saekit-feature-store", "format_version": 1, "d_sae": d_sae, "tokens": b.tokens,
           "config": cfg.__dict__, "map_method": info["map_method"], "synthetic": True}
    write_store(out, man, stats, feats, contexts, vocab_obj)
    return time.perf_counter() - t0


def bench_page(tmp: Path, d_sae: int, pages: int) -> dict:
    store_dir = tmp / "synthetic"
    build_s = synthetic_store(store_dir, d_sae=d_sae)
    t0 = time.perf_counter()
    store = FeatureStore(store_dir)
    _ = store.stats, store.vocab
    open_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    alive = np.nonzero(store.stats["count"])[0]
    ids = rng.choice(alive, size=min(pages, len(alive)), replace=False)
    first_ms = []
    for i in ids[:20]:  # a fresh store object per page: no handle or cache reuse
        s = FeatureStore(store_dir)
        _ = s.stats, s.vocab
        t0 = time.perf_counter()
        s.feature(int(i))
        first_ms.append((time.perf_counter() - t0) * 1e3)
    ms = []
    for i in ids:
        t0 = time.perf_counter()
        f = store.feature(int(i))
        ms.append((time.perf_counter() - t0) * 1e3)
    assert f.top
    size_mb = sum(p.stat().st_size for p in store_dir.iterdir()) / 1e6
    return {"d_sae": d_sae, "store_mb": size_mb, "synthetic_build_s": build_s, "open_ms": open_ms,
            "page_ms_median": statistics.median(ms), "page_ms_p95": float(np.percentile(ms, 95)),
            "page_ms_fresh_median": statistics.median(first_ms), "pages": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", help=f"SAE directory (default {DEMO_SAE.relative_to(ROOT)} if present, else a random one)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens for the build benchmark (default 16384)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=32768, help="latents of the synthetic store (default 32768)")
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--skip-build", action="store_true", help="only the page-load benchmark")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out: dict = {"machine": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="saekit-bench-features-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_build:
            sae_dir = Path(args.sae) if args.sae else (DEMO_SAE if (DEMO_SAE / "cfg.json").is_file() else None)
            if sae_dir is None:
                print("no --sae and no demo SAE: timing a random SAE of the demo's shape")
                sae_dir = random_sae(tmp / "random-sae")
            print(f"build: {args.tokens:,} tokens, SAE {sae_dir}", flush=True)
            out["build"] = bench_build(sae_dir, args.tokens, args.repeats, tmp)
        print(f"page load: synthetic store of {args.d_sae:,} latents", flush=True)
        out["page"] = bench_page(tmp, args.d_sae, args.pages)

    print("\n| measurement | value | ratio / target |\n|---|---|---|")
    if "build" in out:
        b = out["build"]
        print(f"| bare model forward, {b['tokens']:,} tokens (baseline) | {b['forward_s']:.1f} s "
              f"({b['forward_tokens_per_s']:,.0f} tok/s) | 1.00× |")
        print(f"| store pass: forward + SAE + bookkeeping | {b['pass_s']:.1f} s ({b['store_tokens_per_s']:,.0f} tok/s) "
              f"| {b['pass_ratio']:.2f}× (target ≤ 1.5×) |")
        print(f"| store pass vs the forward timed inside it | {b['pass_forward_s']:.1f} s forward | "
              f"{b['pass_ratio_own_forward']:.2f}× |")
        print(f"| store total: + logits, neighbours, map, write | {b['total_s']:.1f} s | {b['total_ratio']:.2f}× |")
        print(f"| store total at {b['demo_tokens']:,} tokens (per-token costs + fixed {b['fixed_s']:.1f} s) | "
              f"– | {b['demo_total_ratio']:.2f}× (target ≤ 1.5×) |")
    p = out["page"]
    print(f"| open a {p['d_sae']:,}-latent store ({p['store_mb']:.0f} MB) | {p['open_ms']:.0f} ms | – |")
    print(f"| feature page data, median / p95 of {p['pages']} | {p['page_ms_median']:.1f} / {p['page_ms_p95']:.1f} ms "
          f"| target < 100 ms |")
    print(f"| feature page data, fresh store object | {p['page_ms_fresh_median']:.1f} ms | target < 100 ms |")
    if args.json:
        write_json(args.json, out)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
