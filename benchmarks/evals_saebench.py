"""Sparse probing and feature absorption: saekit's suite beside SAEBench's own code (sae-bench 0.6.0) on the same
SAE, the same activations and the same train/test splits.

    make peers-bench                                        # .venv-bench: sae-bench 0.6.0 and its own pins
    .venv/bin/python benchmarks/evals_saebench.py --json runs/bench/evals_saebench.json
    .venv/bin/python benchmarks/evals_saebench.py --sae runs/sweep9/topk-k16 --work runs/evals-saebench-k16

SAEBench's evals load their model with transformer-lens' HookedTransformer (it has no SmolLM2-135M entry) and
their data from the Hub, so the model passes are saekit's, made once in .venv and handed over in a file:
1. here (.venv): the BBC documents' activations and the first-letter prompts' activations at the SAE's hook,
   made exactly as `saekit eval --suite probing,absorption` makes them (same documents, splits, words, k list);
   saekit's own scores on them; the SAE exported with `saekit convert --to saelens`.
2. `.venv-bench/bin/python benchmarks/evals_saebench.py saebench --work DIR`: SAEBench's functions on those
   tensors, loaded into sae-lens' SAE class. Sparse probing: `get_sae_meaned_activations`,
   `create_meaned_model_activations` and `train_probe_on_activations` (its top-k selection, its negatives and its
   probes), called as its `run_eval_single_dataset` calls them, for several seeds. Absorption: its letter probe
   (`train_linear_probe_for_task`), k-sparse probes and feature splits (`train_k_sparse_probes`,
   `build_metrics_df`, `add_feature_splits_to_metrics_df`), its true positives
   (`get_stats_and_likely_false_negative_tokens`), `FeatureAbsorptionCalculator` and its aggregation, with a
   stand-in model whose `run_with_cache` returns saekit's activation of the prompt's word. Two shims, both said
   in the output: SAEBench indexes all 26 letters, so its `LETTERS` is narrowed to the letters our task keeps;
   the calculator's prompt text is SAEBench's, the activation is the one the model saw in our prompt.
3. here: both side by side, SAEBench's absorption with the same bootstrap over held-out words as ours.

Files in --work (default runs/evals-saebench): inputs.safetensors + inputs.json (the tensors), saekit.json,
saebench.json, sae/ (the export), saebench/ (its parquet files). Delete the folder to remake the inputs."""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------------------------- step 1 (.venv)


def prepare(sae_dir: Path, work: Path, progress: bool) -> dict:
    """The suite's inputs for the SAE's hook, saved for SAEBench, and saekit's scores on them."""
    from safetensors.torch import save_file

    from saekit.config import DataConfig, SuiteConfig
    from saekit.evals.absorption import MIN_WORDS, absorption, vocabulary_words, word_task
    from saekit.evals.documents import (
        balanced_subset,
        document_activations,
        labelled_documents,
        split_examples,
    )
    from saekit.evals.probing import sparse_probing
    from saekit.files import atomic_write, write_json
    from saekit.interop import convert
    from saekit.lm import load_model
    from saekit.sae import load_sae

    work.mkdir(parents=True, exist_ok=True)
    s = SuiteConfig()
    sae = load_sae(sae_dir)
    data = DataConfig.from_manifest(sae.info)
    convert(sae_dir, work / "sae", to="saelens", overwrite=True)
    inputs, meta_path = work / "inputs.safetensors", work / "inputs.json"
    if not inputs.exists():
        model = load_model(data.model)
        start = time.perf_counter()
        labelled = labelled_documents(s.probe_dataset, s.label_column, data.text_column)
        chosen = balanced_subset(labelled.labels, s.probe_documents, s.seed)
        labelled.texts, labelled.labels = [labelled.texts[i] for i in chosen], labelled.labels[chosen]
        docs = document_activations(model, sae.hook, labelled, s.probe_context, progress=progress)
        train, test = split_examples(docs.labels, s.probe_test_fraction, s.seed)
        docs_s = time.perf_counter() - start
        task = word_task(model, sae.hook, s.absorption_words, s.absorption_examples, s.probe_test_fraction, s.seed,
                         progress)
        # word_task keeps (token, word) pairs it does not return: the same draw and filter name them
        words = vocabulary_words(model.tokenizer, s.absorption_words, s.seed)
        counts = {c: sum(w[0] == c for _, w in words) for c in string.ascii_lowercase}
        kept = [w for _, w in words if counts[w[0]] >= MIN_WORDS]
        assert [string.ascii_lowercase.index(w[0]) for w in kept] == task.letters.tolist()
        tensors = {"doc_acts": docs.acts.contiguous(), "doc_mask": docs.mask, "doc_labels": docs.labels,
                   "doc_train": train, "doc_test": test, "word_acts": task.acts.contiguous(),
                   "word_letters": task.letters, "word_train": task.train, "word_test": task.test}
        write_json(meta_path, {"classes": docs.names, "words": kept, "hook": sae.hook, "model": docs.model,
                                         "examples": task.examples, "probe_k": s.probe_k, "seed": s.seed,
                                "documents_seconds": docs_s, "words_seconds": task.seconds})
        atomic_write(inputs, lambda q: save_file(tensors, str(q)))  # last: its presence means the inputs are whole
    from safetensors.torch import load_file

    from saekit.evals.absorption import WordActivations
    from saekit.evals.documents import DocumentActivations

    t, meta = load_file(str(inputs)), json.loads(meta_path.read_text())
    docs = DocumentActivations(t["doc_acts"], t["doc_mask"], t["doc_labels"], meta["classes"], meta["hook"],
                               meta["model"], meta["documents_seconds"])
    task = WordActivations(t["word_acts"], t["word_letters"], t["word_train"], t["word_test"], len(meta["words"]),
                           meta["examples"], meta["words_seconds"])
    start = time.perf_counter()
    ours = {"probing": sparse_probing(docs, sae, t["doc_train"], t["doc_test"], meta["probe_k"], meta["seed"]),
            "absorption": absorption(task, sae, meta["seed"])}
    ours["seconds"] = time.perf_counter() - start
    ours["inputs_seconds"] = {"documents": meta["documents_seconds"], "words": meta["words_seconds"]}
    write_json(work / "saekit.json", ours)
    return ours


# ----------------------------------------------------------------------------------------- step 2 (.venv-bench)


def load_bench_inputs(work: Path):
    import torch
    from safetensors.torch import load_file

    t = load_file(str(work / "inputs.safetensors"))
    meta = json.loads((work / "inputs.json").read_text())
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(work / "sae"), device="cpu")
    sae.eval()
    torch.set_grad_enabled(False)
    return t, meta, sae


def quiet(fn, *args, **kwargs):
    """SAEBench prints a line per probe; keep them out of the report (stderr still shows warnings)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def bench_probing(t, meta, sae, seeds: int) -> dict:
    """SAEBench's sparse probing (`run_eval_single_dataset`'s calls, in its order) on our documents and split."""
    import random

    import sae_bench.evals.sparse_probing.probe_training as probe_training
    import sae_bench.sae_bench_utils.activation_collection as activation_collection
    import torch
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    cfg = SparseProbingEvalConfig()
    acts, labels, names = t["doc_acts"].float(), t["doc_labels"], meta["classes"]

    def by_class(rows):  # its layout: class name → [n, L, d], zero where masked (BOS, padding)
        return {name: acts[rows[labels[rows] == c]] for c, name in enumerate(names)}

    train_BLD, test_BLD = by_class(t["doc_train"]), by_class(t["doc_test"])
    with torch.no_grad():
        train_BD = activation_collection.create_meaned_model_activations(train_BLD)
        test_BD = activation_collection.create_meaned_model_activations(test_BLD)
        sae_train_BF = activation_collection.get_sae_meaned_activations(train_BLD, sae, cfg.sae_batch_size)
        sae_test_BF = activation_collection.get_sae_meaned_activations(test_BLD, sae, cfg.sae_batch_size)

    def mean(d):
        return sum(d.values()) / len(d)

    runs = []
    for s in range(seeds):
        random.seed(cfg.random_seed + s)  # run_eval_single_sae seeds both once; seed + s for the spread
        torch.manual_seed(cfg.random_seed + s)
        gpu = {"select_top_k": None, "use_sklearn": False, "batch_size": 250, "epochs": 100, "lr": 1e-2}
        r = {"llm_all": mean(quiet(probe_training.train_probe_on_activations, train_BD, test_BD, **gpu)[1])}
        for k in meta["probe_k"]:
            r[f"llm_k{k}"] = mean(quiet(probe_training.train_probe_on_activations, train_BD, test_BD,
                                        select_top_k=k)[1])
        r["sae_all"] = mean(quiet(probe_training.train_probe_on_activations, sae_train_BF, sae_test_BF, **gpu)[1])
        for k in meta["probe_k"]:
            r[f"sae_k{k}"] = mean(quiet(probe_training.train_probe_on_activations, sae_train_BF, sae_test_BF,
                                        select_top_k=k)[1])
        runs.append(r)
        print(f"  SAEBench sparse probing, seed {cfg.random_seed + s}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()),
              flush=True)
    return {"seeds": [cfg.random_seed + s for s in range(seeds)], "runs": runs,
            "config": {"sklearn_probe": "LogisticRegression(C=1, max_iter=1000) on unscaled inputs",
                       "all_dims_probe": "its 'GPU' probe: AdamW lr 1e-2, batch 250, ≤ 100 epochs, the best epoch "
                                         "by test accuracy (early stopping on the test set)",
                       "sae_batch_size": cfg.sae_batch_size}}


class CachedModel:
    """Stands in for a HookedTransformer where FeatureAbsorptionCalculator runs the model: `run_with_cache`
    returns, at `word_token_pos`, saekit's activation of the prompt's word (read from SAEBench's prompt text,
    whose last line is its template around the word); `to_tokens` gives every prompt one length, as the model's
    tokenizer does for single-token words."""

    def __init__(self, acts_by_token: dict, hook: str, template: str, pos: int, model_name: str):
        from types import SimpleNamespace

        self.acts, self.hook, self.pos = acts_by_token, hook, pos
        self.suffix = template.split("{word}")[1]
        self.tokenizer = "activations recorded by saekit"  # asserted non-None, never used
        self.cfg = SimpleNamespace(model_name=model_name)
        self.seen: list[str] = []

    def run_with_cache(self, prompts, names_filter=None):
        import torch

        d = next(iter(self.acts.values())).shape[-1]
        out = torch.zeros(len(prompts), -self.pos, d)
        for i, p in enumerate(prompts):
            token = p.rsplit("\n", 1)[-1].removesuffix(self.suffix)
            out[i, self.pos] = self.acts[token]
            self.seen.append(token)
        return None, {self.hook: out}

    def to_tokens(self, text):
        import torch

        return torch.zeros(1, -self.pos, dtype=torch.long)


def bench_absorption(t, meta, sae, work: Path) -> dict:
    """SAEBench's absorption pipeline (its main.run_eval's steps after the model passes) on our first-letter task."""
    import random

    import pandas as pd
    import sae_bench.evals.absorption.feature_absorption as fa
    import sae_bench.evals.absorption.k_sparse_probing as ksp
    import sae_bench.evals.absorption.main as absorption_main
    import torch
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.probing import train_linear_probe_for_task
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    cfg = AbsorptionEvalConfig()
    acts, letters = t["word_acts"].float(), t["word_letters"]
    train, test = t["word_train"], t["word_test"]
    present = sorted(set(letters.tolist()))
    kept_letters = "".join(string.ascii_lowercase[c] for c in present)
    # SAEBench's loops index all 26 letters (a letter without words divides by zero in its probe's pos_weight and
    # has no AUC); our task keeps the letters with enough single-token words, so its LETTERS becomes those
    ksp.LETTERS = fa.LETTERS = kept_letters
    y = torch.tensor([present.index(c) for c in letters.tolist()])
    tokens = [" " + w for w in meta["words"]]  # its vocabulary holds token strings, leading space included
    layer = int(meta["hook"].split(".")[1]) - (1 if meta["hook"].endswith("hook_resid_pre") else 0)
    hook = f"blocks.{layer}.hook_resid_post"  # the calculator reads resid_post; resid_pre of L+1 is that tensor
    sae_name = "saekit-demo"
    random.seed(cfg.random_seed)
    torch.manual_seed(cfg.random_seed)
    start = time.perf_counter()

    def frame(rows):
        return pd.DataFrame({"answer_class": y[rows].numpy(), "token": [tokens[i] for i in rows.tolist()]})

    with torch.enable_grad():  # its probe trainers need autograd (train_probe_on_activations turns it on itself)
        probe, _ = quiet(train_linear_probe_for_task, frame(train), frame(test), device=torch.device("cpu"),
                         train_activations=acts[train].numpy(), test_activations=acts[test].numpy(),
                         num_classes=len(present), batch_size=64, num_epochs=50, lr=1e-2)  # train_and_save_probes' values
        k_probes = quiet(ksp.train_k_sparse_probes, sae, [(tokens[i], int(y[i])) for i in train.tolist()], acts[train],
                         ks=list(range(1, cfg.max_k_value + 1)), l1_decay=cfg.k_sparse_probe_l1_decay,
                         batch_size=cfg.k_sparse_probe_batch_size, num_epochs=cfg.k_sparse_probe_num_epochs,
                         precalc_sae_acts=cfg.precalc_k_sparse_probe_sae_acts)
    probe = probe.float().cpu()
    eval_labels = [(tokens[i], int(y[i])) for i in test.tolist()]
    raw_df = quiet(ksp.eval_probe_and_sae_k_sparse_raw_scores, sae, probe, k_probes, eval_labels, acts[test],
                   eval_batch_size=cfg.eval_k_sparse_probe_batch_size)
    metadata = ksp.sae_k_sparse_metadata(sae, probe, k_probes, sae_name=sae_name, layer=layer)
    metrics_df = ksp.build_metrics_df(raw_df, metadata, max_k_value=cfg.max_k_value)
    ksp.add_feature_splits_to_metrics_df(metrics_df, max_k_value=cfg.max_k_value, f1_jump_threshold=cfg.f1_jump_threshold)
    out_dir = work / "saebench"
    out_dir.mkdir(exist_ok=True)
    raw_df.to_parquet(out_dir / ksp.get_sparse_probing_raw_results_filename(sae_name, layer), index=False)
    from safetensors.torch import save_file

    save_file({"weights": probe.weights.detach().contiguous()}, str(out_dir / "letter_probe.safetensors"))
    likely = fa.get_stats_and_likely_false_negative_tokens(metrics_df, sae_name, layer, out_dir)

    model = CachedModel({tokens[i]: acts[i] for i in test.tolist()}, hook, cfg.prompt_template, cfg.prompt_token_pos,
                        meta["model"])
    calculator = FeatureAbsorptionCalculator(  # run_feature_absortion_experiment's arguments
        model=model, icl_word_list=tokens, max_icl_examples=10, base_template=cfg.prompt_template,
        answer_formatter=first_letter_formatter(), word_token_pos=cfg.prompt_token_pos,
        full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        batch_size=cfg.llm_batch_size)
    df = quiet(fa.calculate_projection_and_cos_sims, calculator, sae, probe, layer=layer, likely_negs=likely)
    agg = absorption_main._aggregate_results_df(df)
    f1 = dict(zip(metrics_df["letter"], metrics_df["f1_probe"]))
    passing = [c for c in agg["letter"] if f1[c] > cfg.min_GT_probe_f1]
    row_of = {tokens[i]: r for r, i in enumerate(test.tolist())}
    per_letter = {}
    for _, row in metrics_df.iterrows():
        c = row["letter"]
        a = agg[agg["letter"] == c]
        per_letter[c] = {"f1_probe": float(row["f1_probe"]), "split_feats": [int(v) for v in row["split_feats"]],
                         "true_positives": int(likely[c].probe_true_positives),
                         "mean_absorption_fraction": float(a["mean_absorption_fraction"].iloc[0]) if len(a) else None,
                         "full_absorption_rate": float(a["full_absorption_rate"].iloc[0]) if len(a) else None}
    return {"letters": kept_letters, "per_letter": per_letter, "letters_passing_f1": passing,
            "min_GT_probe_f1": cfg.min_GT_probe_f1, "min_feats_for_eval": cfg.min_feats_for_eval,
            "would_refuse": sum(v > cfg.min_GT_probe_f1 for v in f1.values()) < cfg.min_feats_for_eval,
            "mean_absorption_fraction": float(agg[agg["letter"].isin(passing)]["mean_absorption_fraction"].mean()),
            "full_absorption_rate": float(agg[agg["letter"].isin(passing)]["full_absorption_rate"].mean()),
            "mean_absorption_fraction_all_letters": float(agg["mean_absorption_fraction"].mean()),
            "full_absorption_rate_all_letters": float(agg["full_absorption_rate"].mean()),
            "mean_num_split_features": float(agg[agg["letter"].isin(passing)]["num_split_feats"].mean()),
            "probe_accuracy": float((probe(acts[test]).argmax(-1) == y[test]).float().mean()),
            "words": [{"row": row_of[w], "letter": c, "fraction": float(fr), "full": bool(fu)}
                      for w, c, fr, fu in zip(df["token"], df["letter"], df["absorption_fraction"], df["is_full_absorption"])],
            "prompts_read_through_shim": len(model.seen), "seconds": time.perf_counter() - start,
            "shims": ["LETTERS narrowed to the letters our task keeps (" + kept_letters + ")",
                      f"the calculator's prompts are SAEBench's text ({cfg.prompt_template!r}, 10 examples, position "
                      f"{cfg.prompt_token_pos}); the activation is saekit's at the word token of its own prompt"]}


def saebench_step(work: Path, seeds: int) -> None:
    # jaxtyping >= 0.3 shares dimension names between a @jaxtyped function and the @beartype ones it calls, so
    # train_probe_on_activations' "train_dataset_size" (one class's examples) clashes with train_sklearn_probe's
    # (positives + negatives, twice that) and every call raises; the flag turns off those shape checks only
    os.environ["JAXTYPING_DISABLE"] = "1"
    import warnings
    from importlib.metadata import version

    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # its F1 of letters a k-probe never predicts

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t, meta, sae = load_bench_inputs(work)
    out = {"versions": {p: version(p) for p in ("sae-bench", "sae-lens", "torch", "scikit-learn", "numpy")}}
    start = time.perf_counter()
    out["probing"] = bench_probing(t, meta, sae, seeds)
    out["probing"]["seconds"] = time.perf_counter() - start
    out["absorption"] = bench_absorption(t, meta, sae, work)
    (work / "saebench.json").write_text(json.dumps(out, indent=1))


# ----------------------------------------------------------------------------------------------- step 3 (.venv)


def bench_absorption_interval(bench: dict, n_test: int, seed: int) -> dict:
    """SAEBench's absorption scores with saekit's bootstrap over held-out words (its letters and filter fixed)."""
    import torch

    from saekit.evaluate import bootstrap

    letters = bench["letters_passing_f1"]
    per = {k: torch.zeros(n_test, len(letters), dtype=torch.float64) for k in ("frac", "full", "tp")}
    for w in bench["words"]:
        if w["letter"] in letters:
            j = letters.index(w["letter"])
            per["frac"][w["row"], j] += w["fraction"]
            per["full"][w["row"], j] += float(w["full"])
            per["tp"][w["row"], j] += 1.0

    def statistic(s):
        return {"mean_absorption_fraction": (s["frac"] / s["tp"]).nanmean(-1),
                "absorption_rate": (s["full"] / s["tp"]).nanmean(-1)}

    return {k: list(v) for k, v in bootstrap(per, statistic, seed=seed).items()}


def formula_check(work: Path, sae_dir: Path, bench: dict) -> dict:
    """saekit's word_absorption on SAEBench's own probe directions, main latents and true positives: the per-word
    absorption fraction and full-absorption flag should equal its FeatureAbsorptionCalculator's."""
    import torch
    from safetensors.torch import load_file

    from saekit.evals.absorption import word_absorption
    from saekit.sae import load_sae

    t = load_file(str(work / "inputs.safetensors"))
    W = load_file(str(work / "saebench" / "letter_probe.safetensors"))["weights"].float()
    sae = load_sae(sae_dir)
    W_dec = sae.W_dec.detach().float()
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    ba = bench["absorption"]
    worst, same_full = 0.0, 0
    for w in ba["words"]:
        i = int(t["word_test"][w["row"]])
        d = W[ba["letters"].index(w["letter"])]
        d = d / d.norm()
        with torch.no_grad():
            f = sae.dense_codes(t["word_acts"][i: i + 1].float())[0].float()
        fr, fu = word_absorption(float(t["word_acts"][i].float() @ d), f, W_dec @ d,
                                 ba["per_letter"][w["letter"]]["split_feats"])
        worst, same_full = max(worst, abs(fr - w["fraction"])), same_full + (fu == w["full"])
    return {"words": len(ba["words"]), "max_fraction_difference": worst, "same_full_absorption_flag": same_full}


def table(ours: dict, bench: dict) -> tuple[str, dict]:
    import statistics

    p, bp = ours["probing"], bench["probing"]["runs"]
    ci = p["intervals"]
    out = {"probing": {}, "absorption": {}}

    def spread(key):
        v = [r[key] for r in bp]
        return statistics.mean(v), (min(v), max(v))

    lines = [f"{'sparse probing (mean over classes)':<38}{'saekit [95% CI]':<26}SAEBench mean [min, max] over "
             f"{len(bp)} seeds (first = its seed 42)"]
    pairs = [(f"SAE latents, k={k}", f"sae_k{k}", f"sae_k{k}") for k in p["k"]]
    pairs += [(f"raw activations, top k={k}", f"raw_k{k}", f"llm_k{k}") for k in p["k"]]
    pairs += [("raw activations, all dims", "raw_all", "llm_all"), ("SAE latents, all", None, "sae_all")]
    for label, mine, theirs in pairs:
        m, (lo, hi) = spread(theirs)
        ours_s = f"{p[mine]:.3f} [{ci[mine][0]:.3f}, {ci[mine][1]:.3f}]" if mine else "—"
        outside = mine is not None and not (ci[mine][0] <= m <= ci[mine][1])
        lines.append(f"{label:<38}{ours_s:<26}{m:.3f} [{lo:.3f}, {hi:.3f}] (seed 42: {bp[0][theirs]:.3f})"
                     + ("  ← outside our interval" if outside else ""))
        out["probing"][label] = {"saekit": p[mine] if mine else None, "saekit_interval": ci[mine] if mine else None,
                                 "saebench_mean": m, "saebench_range": [lo, hi], "saebench_seed42": bp[0][theirs],
                                 "outside_interval": outside}
    a, ba = ours["absorption"], bench["absorption"]
    aci = a["intervals"]
    lines.append("")
    lines.append(f"{'absorption':<38}{'saekit [95% CI]':<26}SAEBench [95% CI, same bootstrap]")
    for label, mine, theirs in (("mean absorption fraction", "mean_absorption_fraction", "mean_absorption_fraction"),
                                ("full-absorption rate", "absorption_rate", "full_absorption_rate")):
        bci = ba["interval"]["mean_absorption_fraction" if mine == "mean_absorption_fraction" else "absorption_rate"]
        lines.append(f"{label:<38}{a[mine]:.3f} [{aci[mine][0]:.3f}, {aci[mine][1]:.3f}]".ljust(64)
                     + f"{ba[theirs]:.3f} [{bci[0]:.3f}, {bci[1]:.3f}]")
        out["absorption"][label] = {"saekit": a[mine], "saekit_interval": aci[mine], "saebench": ba[theirs],
                                    "saebench_interval": bci}
    lines.append(f"{'  over all letters (no F1 filter)':<38}{'':<26}fraction {ba['mean_absorption_fraction_all_letters']:.3f}, "
                 f"full {ba['full_absorption_rate_all_letters']:.3f}")
    ours_tp = sum(v["true_positives"] for v in a["letters"].values())
    bench_tp = sum(v["true_positives"] for v in ba["per_letter"].values())
    lines.append(f"{'letter probe accuracy (held out)':<38}{a['probe_accuracy']:<26.3f}{ba['probe_accuracy']:.3f}")
    lines.append(f"{'true positives (held-out words)':<38}{ours_tp:<26}{bench_tp}")
    lines.append(f"{'letters scored':<38}{a['letters_scored']:<26}"
                 f"{len(ba['letters_passing_f1'])} with probe F1 > {ba['min_GT_probe_f1']} (of {len(ba['letters'])}; "
                 f"its main() {'would refuse: <' if ba['would_refuse'] else 'needs ≥'} {ba['min_feats_for_eval']})")
    lines.append(f"{'main latents per letter':<38}{a['mean_split_latents']:<26.2f}"
                 f"{statistics.mean(len(v['split_feats']) for v in ba['per_letter'].values()):.2f}")
    lines.append("")
    lines.append("per letter (true positives; mean absorption fraction; main latents):")
    for c in ba["letters"]:
        o, b = a["letters"].get(c, {}), ba["per_letter"][c]

        def f(v):
            return "—" if v is None else f"{v:.2f}"

        lines.append(f"  {c}: saekit {o.get('true_positives', 0):>3} {f(o.get('mean_absorption_fraction')):>5} "
                     f"{o.get('main_latents')}   SAEBench {b['true_positives']:>3} {f(b['mean_absorption_fraction']):>5} "
                     f"{b['split_feats']} (probe F1 {b['f1_probe']:.2f})")
    out["absorption"]["details"] = {"saekit_true_positives": ours_tp, "saebench_true_positives": bench_tp,
                                    "saekit_probe_accuracy": a["probe_accuracy"],
                                    "saebench_probe_accuracy": ba["probe_accuracy"],
                                    "saebench_letters_passing_f1": ba["letters_passing_f1"],
                                    "saebench_would_refuse": ba["would_refuse"], "shims": ba["shims"]}
    return "\n".join(lines), out


def cpu_kind() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all", choices=["all", "prepare", "saebench", "compare"],
                    help="all: the three steps (run with .venv's python); prepare: step 1 only; saebench: step 2 only "
                         "(.venv-bench's python); compare: steps 1 and 3 on the saebench.json already in --work")
    ap.add_argument("--sae", default="runs/demo/k32-d4608")
    ap.add_argument("--work", default="runs/evals-saebench")
    ap.add_argument("--bench-python", default=".venv-bench/bin/python", help="the interpreter with sae-bench")
    ap.add_argument("--seeds", type=int, default=5, help="SAEBench probing repeats (its negatives are random)")
    ap.add_argument("--json", help="write the comparison here")
    args = ap.parse_args()
    work = Path(args.work)
    if args.step == "saebench":
        saebench_step(work, args.seeds)
        return
    try:
        import saekit  # noqa: F401
    except ImportError:
        sys.exit("step 1 needs saekit: run this with .venv/bin/python (it calls --bench-python for SAEBench).")
    if args.step == "prepare":
        prepare(Path(args.sae), work, progress=True)
        return
    if args.step == "all" and not Path(args.bench_python).exists():
        sys.exit(f"{args.bench_python} is missing: `make peers-bench` builds .venv-bench with sae-bench 0.6.0.")
    load_before, wall = os.getloadavg(), time.perf_counter()
    ours = prepare(Path(args.sae), work, progress=not args.json)
    prepared = time.perf_counter()
    if args.step == "all":
        subprocess.run([args.bench_python, "-P", __file__, "saebench", "--work", str(work), "--seeds", str(args.seeds)],
                       check=True)
    bench_s = time.perf_counter() - prepared
    bench = json.loads((work / "saebench.json").read_text())
    bench["absorption"]["interval"] = bench_absorption_interval(bench["absorption"], ours["absorption"]["test_words"],
                                                                0)
    text, out = table(ours, bench)
    out["absorption"]["formula_check"] = check = formula_check(work, Path(args.sae), bench)
    text += (f"\nsaekit's word_absorption on SAEBench's probe, main latents and {check['words']} true positives: "
             f"largest per-word fraction difference {check['max_fraction_difference']:.2e}, same full-absorption "
             f"flag on {check['same_full_absorption_flag']}/{check['words']} words")
    print(f"\n{args.sae} ({ours['absorption']['test_words']} held-out words, {ours['probing']['test_documents']} "
          f"test documents)\n{text}")
    report = {"sae": args.sae, "cpu": cpu_kind(), "load_before": load_before, "load_after": os.getloadavg(),
              "wall_s": time.perf_counter() - wall, "saekit_step_s": prepared - wall, "saebench_step_s": bench_s,
              "saebench_probing_s": bench["probing"]["seconds"], "saebench_absorption_s": bench["absorption"]["seconds"],
              "saekit_scoring_s": ours["seconds"], "inputs_s": ours["inputs_seconds"], "versions": bench["versions"],
              "saebench_probing_config": bench["probing"]["config"]} | out
    print(f"\n{report['cpu']}; load {load_before[0]:.1f} before, {report['load_after'][0]:.1f} after; wall "
          f"{report['wall_s']:.0f} s (saekit step {report['saekit_step_s']:.0f} s, SAEBench step {bench_s:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
