"""`saekit eval SAE --suite …`: core metrics, sparse probing, absorption and TPP for one or many dictionaries of
one model, each input made once (the held-out contexts, one pass over the probing documents, one over the
first-letter prompts) and shared by every SAE of that hook; eval.json + report.html beside each SAE."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, EvalConfig, SuiteConfig
from ..errors import SaekitError, ShapeError
from ..evaluate import evaluate, report, with_interval
from ..files import atomic_write, write_json


class SuiteInputs:
    """The model and the suite's inputs per hook, built on first use."""

    def __init__(self, model, data: DataConfig, suite: SuiteConfig, progress: bool = True):
        self.model, self.data, self.suite, self.progress = model, data, suite, progress
        self.cache: dict[tuple[str, str], Any] = {}
        self.timings: dict[str, float] = {}

    def _once(self, key: tuple[str, str], make):
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = make()
            self.timings[f"{key[0]} inputs ({key[1]})"] = time.perf_counter() - start
        return self.cache[key]

    def heldout(self, d: DataConfig) -> torch.Tensor:
        """The held-out contexts of the SAE's own data (its recorded split), made once per distinct data config."""
        from ..data import load_contexts

        def make():
            _, held = load_contexts(self.model.tokenizer, d.dataset, d.context_size, d.heldout_fraction, d.seed,
                                    d.text_column)
            if held is None:
                raise SaekitError("the dataset split leaves no held-out documents; set --heldout-fraction > 0.")
            return held.tokens
        return self._once(("held-out contexts", f"{d.dataset}, context {d.context_size}, seed {d.seed}"), make)

    def documents(self, hook: str):
        from .documents import balanced_subset, document_activations, labelled_documents, split_examples

        def make():
            s = self.suite
            data = labelled_documents(s.probe_dataset, s.label_column, self.data.text_column)
            chosen = balanced_subset(data.labels, s.probe_documents, s.seed)
            data.texts, data.labels = [data.texts[i] for i in chosen], data.labels[chosen]
            docs = document_activations(self.model, hook, data, s.probe_context, progress=self.progress)
            return docs, *split_examples(docs.labels, s.probe_test_fraction, s.seed)
        return self._once(("probing documents", hook), make)

    def words(self, hook: str):
        from .absorption import word_task

        s = self.suite
        return self._once(("first-letter words", hook), lambda: word_task(
            self.model, hook, s.absorption_words, s.absorption_examples, s.probe_test_fraction, s.seed, self.progress))


def check_model(sae, model, path: Path) -> None:
    """Refuse an SAE made on another model than the one whose activations the suite reads."""
    from ..lm import model_id

    recorded, have = sae.info.get("model"), model_id(model)
    if recorded and have and recorded != have:
        raise SaekitError(f"{path} was trained on {recorded!r} but the suite's activations come from {have!r}; "
                          "evaluate it with its own model (--model) or pick SAEs of this model.")


def core_of_all(saes: list, paths: list[Path], datas: list[DataConfig], inputs: SuiteInputs, cfg: EvalConfig
                ) -> dict[int, dict[str, Any]]:
    """Core metrics of every SAE, those of one hook, kind, width and held-out data evaluated together (they share
    the model passes; see evaluate_many), keyed by position in `saes`."""
    from ..evaluate import evaluate_many

    groups: dict[tuple, list[int]] = {}
    for i, (sae, d) in enumerate(zip(saes, datas)):
        check_model(sae, inputs.model, paths[i])
        key = (sae.hook, sae.hook_out if sae.is_transcoder else None, sae.cfg.d_in, sae.cfg.out_dim,
               d.dataset, d.context_size, d.heldout_fraction, d.seed, d.text_column)
        groups.setdefault(key, []).append(i)
    device = next(inputs.model.parameters()).device
    out = {}
    for members in groups.values():
        start = time.perf_counter()
        group = [saes[i].to(device) for i in members]
        results = evaluate_many(inputs.model, group, inputs.heldout(datas[members[0]]), cfg, progress=inputs.progress)
        for i, m in zip(members, results):
            saes[i].to("cpu")
            out[i] = m | {"core_seconds_shared": time.perf_counter() - start, "core_evaluated_together": len(members)}
    return out


def suite_of(sae, path: Path, inputs: SuiteInputs, data: DataConfig, cfg: EvalConfig, suite: SuiteConfig,
             core: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every requested part for one SAE; core metrics stay at the top level of eval.json, as before (`core`: the
    SAE's core metrics when they were evaluated together with others', see core_of_all)."""
    from .probing import sparse_probing
    from .tpp import targeted_probe_perturbation

    check_model(sae, inputs.model, path)
    parts = suite.parts()
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    hook = sae.hook
    device = next(inputs.model.parameters()).device
    if core is not None:
        out |= core
        seconds["core"] = core["core_seconds_shared"] / core["core_evaluated_together"]
    elif "core" in parts:
        start = time.perf_counter()
        out |= evaluate(inputs.model, sae.to(device), inputs.heldout(data), cfg, progress=inputs.progress)
        seconds["core"] = time.perf_counter() - start
    sae = sae.to("cpu")
    extra = [p for p in parts if p != "core"]
    if extra and sae.is_transcoder:
        out["suite_skipped"] = {p: "a transcoder: probing, absorption and TPP read an SAE's own hook" for p in extra}
        extra = []
    for part in extra:
        if part in ("probing", "tpp"):
            docs, train, test = inputs.documents(hook)
            if docs.acts.shape[-1] != sae.cfg.d_in:
                raise ShapeError(f"the SAE has d_in {sae.cfg.d_in} but {hook} has width {docs.acts.shape[-1]}.")
        start = time.perf_counter()
        if part == "probing":
            out["probing"] = sparse_probing(docs, sae, train, test, suite.probe_k, suite.seed)
        elif part == "tpp":
            out["tpp"] = targeted_probe_perturbation(docs, sae, train, test, suite.tpp_latents, suite.seed)
        elif part == "absorption":
            from .absorption import absorption

            out["absorption"] = absorption(inputs.words(hook), sae, suite.seed)
        seconds[part] = time.perf_counter() - start
    out["suite"] = {"parts": parts, "seconds": seconds, "inputs_seconds": dict(inputs.timings),
                    "config": {k: v for k, v in vars(suite).items()}}
    return out


def run_suite(paths: list[Path], cfg: EvalConfig, suite: SuiteConfig, model_arg: str | None = None,
              dataset: str | None = None, device: str = "auto", progress: bool = True) -> list[dict[str, Any]]:
    """The suite on each dictionary in `paths` (one model; inputs shared); writes eval.json and report.html."""
    import os

    from ..lm import load_model
    from ..sae import load_sae

    start = time.perf_counter()
    saes = [load_sae(p) for p in paths]
    for p in paths:
        if not os.access(p, os.W_OK):
            from ..errors import OutputError

            raise OutputError(f"cannot write eval.json in {p} (permission denied); make it writable or evaluate a copy.")
    datas = [DataConfig.from_manifest(s.info, model=model_arg, dataset=dataset) for s in saes]
    models = {d.model for d in datas}
    if len(models) > 1:
        raise SaekitError(f"the SAEs come from different models ({', '.join(sorted(models))}); evaluate each model's "
                          "SAEs separately.")
    data = datas[0]
    print(f"saekit: loading model {data.model!r}", flush=True)
    model = load_model(data.model, device=("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    inputs = SuiteInputs(model, data, suite, progress)
    cores = core_of_all(saes, paths, datas, inputs, cfg) if "core" in suite.parts() else {}
    results = []
    for i, (path, sae, d) in enumerate(zip(paths, saes, datas)):
        metrics = suite_of(sae, path, inputs, d, cfg, suite, cores.get(i))
        metrics |= {"sae": str(path), "weights_sha256": sae.weights_hash(), "architecture": sae.cfg.architecture,
                    "k": sae.cfg.k, "d_sae": sae.cfg.d_sae}
        write_json(Path(path) / "eval.json", metrics)
        write_report(Path(path) / "report.html", metrics)
        print(f"\n{path} — evaluation suite\n{suite_text(metrics)}")
        results.append(metrics)
    print(f"\nsuite finished in {time.perf_counter() - start:.0f} s; where the time went: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in inputs.timings.items()))
    return results


def suite_text(m: dict[str, Any]) -> str:
    """The report's text: core metrics, then one line per probing k, absorption and TPP, each with its interval."""
    lines = [report(m)] if "fvu" in m else []
    if p := m.get("probing"):
        ci = p["intervals"]
        lines.append(f"  sparse probing ({p['test_documents']} test documents, {len(p['classes'])} classes; "
                     f"raw activations, all dims: {with_interval(p['raw_all'], ci['raw_all'], 3)})")
        lines.append(f"    {'k':>3}  {'SAE (mean-pooled)':<24}{'SAE (last token)':<24}raw top-k dims")
        for k in p["k"]:
            lines.append(f"    {k:>3}  {with_interval(p[f'sae_k{k}'], ci[f'sae_k{k}'], 3):<24}"
                         f"{with_interval(p[f'sae_last_token_k{k}'], ci[f'sae_last_token_k{k}'], 3):<24}"
                         f"{with_interval(p[f'raw_k{k}'], ci[f'raw_k{k}'], 3)}")
    if a := m.get("absorption"):
        ci = a["intervals"]
        lines.append(f"  absorption ({a['test_words']} held-out words, letter probe accuracy {a['probe_accuracy']:.3f}): "
                     f"mean absorption fraction {with_interval(a['mean_absorption_fraction'], ci['mean_absorption_fraction'], 3)}, "
                     f"full-absorption rate {with_interval(a['absorption_rate'], ci['absorption_rate'], 3)}, "
                     f"{a['mean_split_latents']:.1f} main latents per letter")
    if t := m.get("tpp"):
        ci = t["intervals"]
        lines.append(f"  TPP ({t['latents_per_class']} latents per class): {with_interval(t['tpp'], ci['tpp'], 3)} "
                     f"(targeted drop {with_interval(t['targeted_drop'], ci['targeted_drop'], 3)}, others "
                     f"{with_interval(t['untargeted_drop'], ci['untargeted_drop'], 3)})")
    if s := m.get("suite_skipped"):
        lines.append(f"  skipped: {', '.join(s)} ({next(iter(s.values()))})")
    return "\n".join(lines)


def write_report(path: Path, m: dict[str, Any]) -> Path:
    """report.html: the suite's text, probing accuracy by k with error bars, absorption by letter, TPP drops."""
    import html

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    def bars(value, interval):
        return {"type": "data", "symmetric": False, "array": [hi - v for v, (_, hi) in zip(value, interval)],
                "arrayminus": [v - lo for v, (lo, _) in zip(value, interval)]}

    figs = []
    if p := m.get("probing"):
        fig = go.Figure()
        for name, label in (("sae_k", "SAE latents (mean-pooled)"), ("sae_last_token_k", "SAE latents (last token)"),
                            ("raw_k", "raw activations, top-k dims")):
            ys = [p[f"{name}{k}"] for k in p["k"]]
            fig.add_scatter(x=p["k"], y=ys, name=label, mode="lines+markers",
                            error_y=bars(ys, [p["intervals"][f"{name}{k}"] for k in p["k"]]))
        fig.add_hline(y=p["raw_all"], line_dash="dot", annotation_text=f"raw, all dims {p['raw_all']:.3f}")
        fig.update_layout(title="Sparse probing: accuracy by k (balanced one-vs-rest, mean over classes; 95% CI)",
                          xaxis={"type": "log", "title": "k"}, yaxis_title="accuracy")
        figs.append(fig)
    if a := m.get("absorption"):
        letters = [c for c, v in a["letters"].items() if v["true_positives"]]
        fig = make_subplots(specs=[[{"secondary_y": False}]])
        fig.add_bar(x=letters, y=[a["letters"][c]["mean_absorption_fraction"] for c in letters], name="mean absorption fraction")
        fig.add_bar(x=letters, y=[a["letters"][c]["absorption_rate"] for c in letters], name="full-absorption rate")
        fig.update_layout(title=f"Absorption by first letter (overall fraction {a['mean_absorption_fraction']:.3f}, "
                                f"rate {a['absorption_rate']:.3f})", barmode="group")
        figs.append(fig)
    if t := m.get("tpp"):
        fig = go.Figure(go.Heatmap(z=t["accuracy_drop"], x=t["classes"], y=t["classes"], colorscale="RdBu_r", zmid=0))
        fig.update_layout(title=f"TPP: accuracy drop of each class's probe (columns) when class i's latents are ablated "
                                f"(rows); TPP {t['tpp']:.3f}", xaxis_title="probe", yaxis_title="ablated latents of")
        figs.append(fig)
    body = [f"<h2>{html.escape(str(m.get('sae', '')))}</h2><pre>{html.escape(suite_text(m))}</pre>"]
    body += [f.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False) for i, f in enumerate(figs)]
    page = "<html><head><meta charset='utf-8'><title>saekit evaluation</title></head><body>" + "".join(body) + "</body></html>"
    return atomic_write(path, lambda q: q.write_text(page))
