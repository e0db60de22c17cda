"""Seconds for the data-free flow of a whole SAE set: every residual layer of a 13-layer set (resid_pre at layers
L0..L0+12, attn_out and mlp_out at L0..L0+11) matched against its three predecessor SAEs, decoder and encoder
variants, classified — `saekit.flow.compute_flow`, the call `saekit flow` makes. Target (issue 17): ≤ 30 s on 2
cores with 4608 latents per SAE.

The SAEs are random (unit decoder rows, tied encoders) and built in memory: the time of matching depends on the
shapes only. Loading 37 SAEs from disk is timed apart (`--disk DIR` writes them there and runs the same flow
reading them, as the command does). The baseline, in the same process, matches each pair with the whole
[d_sae, d_sae] cosine matrix at once (no chunking): the ratio shows what chunking costs or saves, and the peak RSS
what it bounds.

    python benchmarks/flow.py --json /tmp/flow.json
    python benchmarks/flow.py --layers 13 --d-sae 4608 --d-in 576 --threads 2 --disk /tmp/flowset
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import torch

from saekit.config import FlowConfig, SaeConfig
from saekit.flow import KIND_OF, Member, SaeSet, compute_flow, read_set, top_matches, unit_directions
from saekit.lm import hook_layer
from saekit.sae import SparseAutoencoder


def random_sae(d_in: int, d_sae: int, seed: int, hook: str) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, k=32))
    gen = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.t())
    sae.info = {"hook": hook, "model": "benchmark/random"}
    return sae


def hooks_of(first: int, layers: int) -> list[str]:
    out = []
    for layer in range(first, first + layers):
        out.append(f"blocks.{layer}.hook_resid_pre")
        if layer < first + layers - 1:
            out += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return out


def dense_baseline(s: SaeSet, saes: dict[str, SparseAutoencoder], k: int) -> float:
    """Each pair's whole cosine matrix at once, both variants (what chunking replaces)."""
    start = time.perf_counter()
    for layer in s.layers("resid")[1:]:
        for kind in ("resid", "attn", "mlp"):
            src = s.at(kind, layer - 1)
            for v in ("decoder", "encoder"):
                t = unit_directions(saes[s.at("resid", layer).path], v)
                torch.topk(t @ unit_directions(saes[src.path], v).t(), k, dim=1)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=13, help="residual layers in the set (default 13)")
    ap.add_argument("--first-layer", type=int, default=8)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--d-in", type=int, default=576, help="model width (SmolLM2-135M: 576)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=FlowConfig.chunk)
    ap.add_argument("--disk", help="also write the set here and time the flow as `saekit flow` runs it (loads included)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    hooks = hooks_of(args.first_layer, args.layers)
    t0 = time.perf_counter()
    saes = {h: random_sae(args.d_in, args.d_sae, i, h) for i, h in enumerate(hooks)}
    build = time.perf_counter() - t0
    # the set as read_set builds it from files, here from memory (a member's path keys `saes`)
    members = [Member(hook=h, layer=hook_layer(h), kind=KIND_OF[h.split(".")[-1]], d_in=args.d_in, d_sae=args.d_sae,
                      model="benchmark/random", path=h) for h in hooks]
    s = SaeSet(Path("(memory)"), members)
    cfg = FlowConfig(chunk=args.chunk, check_tokens=0)
    decoder_only = FlowConfig(chunk=args.chunk, check_tokens=0, compare=False)

    # warm-up on one pair (first-call allocation, thread pool start)
    top_matches(unit_directions(saes[hooks[0]], "decoder"), unit_directions(saes[hooks[1]], "decoder"), 5, args.chunk)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    _, one = compute_flow(s, decoder_only, load=lambda p: saes[p], progress=False)
    flow_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, summary = compute_flow(s, cfg, load=lambda p: saes[p], progress=False)
    both_s = time.perf_counter() - t0
    rss_flow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    base_s = dense_baseline(s, saes, cfg.top_k)
    rss_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [("chunked, decoder (--no-compare)", flow_s), ("chunked, decoder + encoder", both_s),
            ("dense matrix per pair, both", base_s)]
    disk = None
    if args.disk:
        root = Path(args.disk)
        for h, sae in saes.items():
            sae.save(root / h)
        from saekit.runner import dictionaries_in

        t0 = time.perf_counter()
        compute_flow(read_set(dictionaries_in(root), root), cfg, progress=False)
        disk = time.perf_counter() - t0
        rows.append(("chunked, SAEs read from disk", disk))
    load_after = os.getloadavg()[0]

    print(f"{args.layers}-layer set: {len(hooks)} SAEs × {args.d_sae} latents, d_in {args.d_in}; "
          f"{one['pairs_matched']} pair matchings per variant; {args.threads} threads; "
          f"load average {load:.1f} → {load_after:.1f}; {platform.processor() or platform.machine()}")
    print(f"{'variant':34} {'seconds':>8} {'dense both / this':>18}")
    for name, sec in rows:
        print(f"{name:34} {sec:8.2f} {base_s / sec:18.2f}")
    print(f"target ≤ 30 s (decoder flow): {'met' if flow_s <= 30 else 'NOT met'} ({flow_s:.2f} s; with the encoder "
          f"comparison {both_s:.2f} s); peak RSS {rss_flow:.2f} GiB after "
          f"the chunked flow, {rss_all:.2f} GiB after the dense baseline; building the SAEs took {build:.1f} s")
    if args.json:
        from saekit.files import write_json

        write_json(args.json, {
            "layers": args.layers, "d_sae": args.d_sae, "d_in": args.d_in, "threads": args.threads,
            "chunk": args.chunk, "saes": len(hooks), "pairs_per_variant": one["pairs_matched"],
            "flow_seconds_decoder": flow_s, "flow_seconds_both_variants": both_s, "dense_baseline_seconds_both": base_s,
            "disk_flow_seconds_both": disk, "ratio_dense_over_chunked_both": base_s / both_s, "peak_rss_gib_after_flow": rss_flow,
            "peak_rss_gib_after_dense": rss_all, "target_met": flow_s <= 30,
            "load_average_before_after": [load, load_after], "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
