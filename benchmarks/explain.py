"""Auto-interpretation: prompt building from the store, and an LLM backend's throughput and checks.

1. Prompt build: the windows (top, quantile bands, random and neighbour negatives) and every prompt of a feature,
   from the store alone, in ms per feature over --build-features latents (the target: < 5 ms).
2. With --llm (an OpenAI-compatible URL or local:MODEL): `saekit explain` on --features of a copy of the store
   (the store itself is left alone), then LLM calls/s, prompt and completion tokens per feature, and the report:
   each explainer × scorer's score on own and shuffled explanations, the shuffle-AUC with its interval, and the
   token-profile baseline beside the LLM.

    python benchmarks/explain.py --store runs/demo/store [--llm http://127.0.0.1:8080/v1 --features 0-29
        --scorers detection --batch-size 1] [--json runs/bench/explain.json]

Figures recorded in benchmarks/RESULTS.md ("Issue 19") say whether the machine was loaded at the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit.config import ExplainConfig  # noqa: E402
from saekit.explain import format_report, make_client, parse_features, run  # noqa: E402
from saekit.explain.examples import WindowSource, feature_examples  # noqa: E402
from saekit.explain.prompts import classify_prompt, explain_prompt  # noqa: E402
from saekit.explain.scorers import samples  # noqa: E402
from saekit.features import FeatureStore  # noqa: E402
from saekit.files import write_json  # noqa: E402


def build_ms(store: FeatureStore, n: int, seed: int = 0) -> dict:
    src = WindowSource(store)  # loads the contexts and per-latent columns once (timed separately)
    t0 = time.perf_counter()
    feature_examples(store, 0, source=src)
    load = time.perf_counter() - t0
    ids = random.Random(seed).sample(range(store.d_sae), min(n, store.d_sae))
    t0, done = time.perf_counter(), 0
    for f in ids:
        try:
            ex = feature_examples(store, f, source=src)
        except Exception:  # never fired: nothing to build
            continue
        explain_prompt(ex.explain)
        for kind in ("detection", "fuzzing"):
            items = samples(kind, ex, random.Random(f))
            for i in range(0, len(items), 5):
                classify_prompt(kind, "an explanation", [t for t, _ in items[i: i + 5]])
        done += 1
    return {"features": done, "ms_per_feature": 1000 * (time.perf_counter() - t0) / max(done, 1),
            "first_load_s": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--build-features", type=int, default=500)
    ap.add_argument("--llm", help="run a batch through this backend (URL or local:MODEL)")
    ap.add_argument("--model")
    ap.add_argument("--features", default="0-29")
    ap.add_argument("--scorers", default="detection")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    store = FeatureStore(a.store)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_before": os.getloadavg()[0]}, "store": str(a.store)}
    out["build"] = build_ms(store, a.build_features)
    print(f"prompt build: {out['build']['ms_per_feature']:.2f} ms/feature over {out['build']['features']} features "
          f"(columns loaded once in {out['build']['first_load_s']:.2f} s)")
    if a.llm:
        cfg = ExplainConfig(llm=a.llm, model=a.model, features=a.features, scorers=a.scorers.split(","),
                            batch_size=a.batch_size, concurrency=a.concurrency, n_activating=4, n_random=2, n_hard=2)
        client = make_client(cfg.llm, cfg.model)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "store"
            shutil.copytree(a.store, copy, ignore=shutil.ignore_patterns("explanations.sqlite*", "labels.sqlite*"))
            rep = run(FeatureStore(copy), client, cfg)
        n = len(parse_features(a.features, store.d_sae)) - len(rep["skipped"])
        rep["run"]["prompt_tokens_per_feature"] = rep["run"]["prompt_tokens"] / max(n, 1)
        out["batch"] = rep
        print(format_report(rep))
        print(f"prompt tokens per feature: {rep['run']['prompt_tokens_per_feature']:.0f}")
    out["machine"]["load_after"] = os.getloadavg()[0]
    if a.json:
        write_json(Path(a.json), json.loads(json.dumps(out, default=str)))


if __name__ == "__main__":
    main()
