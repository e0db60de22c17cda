"""The feature map: what UMAP costs in `saekit analyze`, and whether the map keeps the decoder's geometry.

1. Time, each step in a fresh process sharing one new NUMBA_CACHE_DIR (numba compiles once per process, then
   from its disk cache), wall and CPU seconds:
   setup   the first `import umap` after an install: pynndescent compiles its metrics (`make setup` runs it)
   first   the first map: import + umap-learn's graph and layout kernels compile (saekit caches them) + the fit
   later   every later map
   against PCA of the same rows in the same child (the fallback; the baseline of the ratio).
2. Structure: of each latent's 10 nearest map neighbours, the share among its 10 nearest decoder-cosine
   neighbours (`map_neighbour_recall`), for UMAP, PCA and a random layout (≈ 10/n).

    python benchmarks/feature_map.py [--sae runs/demo/k32-d4608] [--json runs/bench/feature_map.json]

Without --sae (and no runs/demo/k32-d4608) a planted dictionary of the demo's shape stands in: 4,608 unit rows in
576 dimensions around 256 random centres (cosine ≈ 0.7 to their centre), so there is structure to find.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit.features.weights import MAP_RECALL_K, decoder_neighbours, feature_map, map_neighbour_recall  # noqa: E402

DEMO_SAE = ROOT / "runs/demo/k32-d4608"


def planted_dictionary(n: int = 4608, d: int = 576, clusters: int = 256, spread: float = 1.0, seed: int = 0
                       ) -> torch.Tensor:
    """Unit rows scattered around `clusters` random unit centres (noise of norm ≈ `spread` per row)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    rows = centres[torch.arange(n) % clusters] + spread * torch.randn(n, d, generator=g) / d**0.5
    return torch.nn.functional.normalize(rows, dim=1)


def load_rows(sae: str | None) -> tuple[torch.Tensor, str]:
    path = Path(sae) if sae else DEMO_SAE if (DEMO_SAE / "cfg.json").is_file() else None
    if path is None:
        return planted_dictionary(), "planted: 4,608 × 576 around 256 centres"
    from saekit.sae import load_sae

    W = load_sae(path).W_dec.detach().float()
    return W, f"{path} ({W.shape[0]:,} × {W.shape[1]})"


def child(sae: str | None, import_only: bool) -> None:
    """One timing: import umap, then (unless import_only) the map as `analyze` runs it (neighbours given) and PCA;
    prints JSON of wall and CPU seconds (CPU time is what an idle machine's wall would be: numba compiles on one
    thread, and the layout runs on one for its fixed seed)."""
    W, _ = load_rows(sae)
    near = decoder_neighbours(W, 14)
    clocks = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    t0 = clocks()
    import umap  # noqa: F401  (its import is part of what analyze pays)

    t1 = clocks()
    r = {"import_s": t1[0] - t0[0], "import_cpu_s": t1[1] - t0[1]}
    if not import_only:
        xy, r["method"], r["note"] = feature_map(W, "auto", 0, near)
        t2 = clocks()
        pca, _, _ = feature_map(W, "pca", 0, near)
        t3 = clocks()
        torch.save({"umap": xy, "pca": pca}, os.environ["FEATURE_MAP_OUT"])
        r |= {"umap_s": t2[0] - t1[0], "umap_cpu_s": t2[1] - t1[1], "pca_s": t3[0] - t2[0], "pca_cpu_s": t3[1] - t2[1]}
    print(json.dumps(r))


def run_child(sae: str | None, cache: str, out: str, import_only: bool = False) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "FEATURE_MAP_OUT": out}
    cmd = [sys.executable, __file__, "--child", *(["--import-only"] if import_only else []), *(["--sae", sae] if sae else [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"the timing child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", help="an SAE directory (default: runs/demo/k32-d4608, else a planted dictionary)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.sae, args.import_only)
    W, what = load_rows(args.sae)
    print(f"rows: {what}; {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = f"{tmp}/xy.pt", f"{tmp}/numba"
        setup = run_child(args.sae, cache, out, import_only=True)  # what `make setup` pays: pynndescent's compiles
        first = run_child(args.sae, cache, out)  # the first map: umap's own kernels compile (then cached)
        later = run_child(args.sae, cache, out)
        xy = torch.load(out)
    if first["method"] != "umap":
        sys.exit(f"no UMAP ran: {first['note']}")
    print("| fresh process, one numba cache | import umap: wall (CPU) | map: wall (CPU) | map ÷ PCA's, CPU |")
    print("|---|---|---|---|")
    print(f"| first import after an install (`make setup` runs it) | {setup['import_s']:.1f} s ({setup['import_cpu_s']:.1f} s) | – | – |")
    for name, r in (("first UMAP map (umap's kernels compile)", first), ("every later UMAP map", later)):
        print(f"| {name} | {r['import_s']:.1f} s ({r['import_cpu_s']:.1f} s) | {r['umap_s']:.1f} s "
              f"({r['umap_cpu_s']:.1f} s) | {r['umap_cpu_s'] / r['pca_cpu_s']:.0f}× |")
    print(f"| PCA (the fallback) | – | {later['pca_s']:.2f} s ({later['pca_cpu_s']:.2f} s) | 1× |")

    near = decoder_neighbours(W, MAP_RECALL_K)["neighbour_id"]
    rand = torch.rand(W.shape[0], 2, generator=torch.Generator().manual_seed(0))
    recall = {name: map_neighbour_recall(v, near) for name, v in (("UMAP", xy["umap"]), ("PCA", xy["pca"]), ("random", rand))}
    print(f"\n| layout | share of the {MAP_RECALL_K} nearest map neighbours that are decoder neighbours | ÷ PCA's |")
    print("|---|---|---|")
    for name, r in recall.items():
        print(f"| {name} | {r:.3f} | {r / recall['PCA']:.1f}× |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": what, "setup": setup, "first": first, "later": later, "recall": recall,
                                               "machine": platform.processor() or platform.machine(),
                                               "cores": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
