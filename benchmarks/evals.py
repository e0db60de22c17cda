"""The evaluation suite's time (`saekit eval SAE --suite all`): where it goes, and what a second SAE costs once the
inputs (held-out contexts, probing documents' activations, first-letter prompts' activations) are made.

    python benchmarks/evals.py                                  # the demo SAE, --suite all, into runs/evals-bench
    python benchmarks/evals.py --sae runs/demo/k32-d4608 --suite probing,absorption --json
    python benchmarks/evals.py --second                         # + a random SAE of the same shape: the marginal cost

The SAE is copied into --out first (its eval.json and report.html are written there, the original is left alone).
Prints the wall time of each part and of each shared input, the total, process CPU time, peak RSS and the load
average before and after (this machine is shared: say so when you record the numbers)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path


def cpu_kind() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="runs/demo/k32-d4608")
    ap.add_argument("--suite", default="all")
    ap.add_argument("--out", default="runs/evals-bench")
    ap.add_argument("--second", action="store_true", help="also a random SAE of the same shape (inputs reused)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from saekit.config import EvalConfig, SuiteConfig
    from saekit.evals.suite import run_suite
    from saekit.sae import SparseAutoencoder, load_sae

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = out / Path(args.sae).name
    shutil.rmtree(first, ignore_errors=True)
    shutil.copytree(args.sae, first, ignore=shutil.ignore_patterns("eval.json", "report.html"))
    paths = [first]
    if args.second:
        sae = load_sae(first)
        rand = SparseAutoencoder.initialized(sae.cfg, seed=1)
        rand.info = dict(sae.info)
        paths.append(rand.save(out / "random-same-shape"))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    results = run_suite(paths, EvalConfig(), SuiteConfig(suite=args.suite), progress=not args.json)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = {
        "sae": args.sae, "suite": args.suite, "cpu": cpu_kind(), "threads": torch.get_num_threads(),
        "wall_s": wall, "cpu_s": cpu, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_before": load_before, "load_after": os.getloadavg(),
        "inputs_s": results[-1]["suite"]["inputs_seconds"],
        "per_sae": [{"sae": str(p), "parts_s": r["suite"]["seconds"]} for p, r in zip(paths, results)],
        "figures": {k: results[0].get(k) for k in ("fvu", "l0", "ce_recovered_zero", "kl")}
        | {"probing_sae_k1": results[0].get("probing", {}).get("sae_k1"),
           "absorption_fraction": results[0].get("absorption", {}).get("mean_absorption_fraction"),
           "tpp": results[0].get("tpp", {}).get("tpp")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{report['cpu']}, {report['threads']} threads; load {load_before[0]:.1f} before, "
          f"{report['load_after'][0]:.1f} after")
    print(f"{'what':<48}{'wall s':>10}")
    for k, v in report["inputs_s"].items():
        print(f"{'input: ' + k:<48}{v:>10.1f}")
    for row in report["per_sae"]:
        for part, s in row["parts_s"].items():
            print(f"{Path(row['sae']).name + ': ' + part:<48}{s:>10.1f}")
    print(f"{'total (incl. model load)':<48}{wall:>10.1f}   CPU {cpu:.0f} s, peak RSS {report['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
