"""Explain and score many latents, resumably: each result is written to STORE/explanations.sqlite (beside the
user's labels.sqlite; WAL, one short connection per write) the moment it arrives, so a killed run loses at most
the features in flight, and `resume` skips every (feature, explainer, scorer) already there.

Phase 1, per feature (`concurrency` in flight): windows from the store, each explainer, each scorer on its own
explanation. Phase 2 (`shuffled`): each feature scored again with another feature's explanation (a derangement of
the features explained), the check `report` turns into the shuffle-AUC."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import ExplainConfig
from ..errors import SaekitError
from ..features.store import FeatureStore
from .client import LLMClient
from .examples import FeatureExamples, WindowSource, feature_examples
from .explainer import Explanation, explain_baseline, explain_llm
from .prompts import classify_prompt, explain_prompt, likelihood_context
from .scorers import LLM_SCORERS, derangement, samples, score, score_record, shuffle_auc

RESULTS = "explanations.sqlite"
# config fields that change what is asked: a resumed run must match them, or its scores would mix two setups
SCORED_FIELDS = ("n_explain", "n_activating", "n_random", "n_hard", "batch_size", "seed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER, explainer TEXT, text TEXT, raw TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
    seconds REAL, llm TEXT, created_at REAL, PRIMARY KEY (feature, explainer));
CREATE TABLE IF NOT EXISTS scores (
    feature INTEGER, explainer TEXT, scorer TEXT, variant TEXT, source_feature INTEGER, explanation TEXT,
    n INTEGER, tp INTEGER, fp INTEGER, tn INTEGER, fn INTEGER, unparsed INTEGER, accuracy REAL,
    balanced_accuracy REAL, f1 REAL, auroc REAL, calls INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, seconds REAL,
    answers TEXT, negatives_exact INTEGER, contamination REAL, llm TEXT, created_at REAL,
    PRIMARY KEY (feature, explainer, scorer, variant));
CREATE TABLE IF NOT EXISTS skipped (feature INTEGER PRIMARY KEY, reason TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def parse_features(text: str, d_sae: int) -> list[int]:
    """'all' or '0-499,1000' → sorted ids; out-of-range ids are an error naming the range."""
    if text.strip() == "all":
        return list(range(d_sae))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise SaekitError(f"--features {text!r}: {part!r} is not an id or a range like 0-499.") from None
        if not 0 <= a <= b < d_sae:
            raise SaekitError(f"--features {text!r}: {part!r} is outside the store's latents 0-{d_sae - 1}.")
        out.update(range(a, b + 1))
    return sorted(out)


class Results:
    """The results file of one store (read by the browser; written by `run`)."""

    def __init__(self, store_dir: str | Path, create: bool = True):
        self.path = Path(store_dir) / RESULTS
        self._lock = threading.Lock()
        if create:
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.row_factory = sqlite3.Row
        return db

    def _write(self, sql: str, row: tuple) -> None:
        with self._lock, closing(self._connect()) as db, db:
            db.execute(sql, row)

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def done_explanations(self) -> dict[tuple[int, str], str | None]:
        return {(r["feature"], r["explainer"]): r["text"] for r in self.query("SELECT feature, explainer, text FROM explanations")}

    def done_scores(self) -> set[tuple[int, str, str, str]]:
        return {tuple(r) for r in self.query("SELECT feature, explainer, scorer, variant FROM scores")}

    def save_explanation(self, e: Explanation, llm: str) -> None:
        self._write("INSERT OR REPLACE INTO explanations VALUES (?,?,?,?,?,?,?,?,?)",
                    (e.feature, e.explainer, e.text, e.raw, e.prompt_tokens, e.completion_tokens, e.seconds, llm,
                     time.time()))

    def save_score(self, feature: int, explainer: str, variant: str, source: int, explanation: str, rec: dict,
                   seconds: float, ex: FeatureExamples, llm: str) -> None:
        self._write("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (feature, explainer, rec["scorer"], variant, source, explanation, rec["n"], rec["tp"], rec["fp"],
                     rec["tn"], rec["fn"], rec["unparsed"], rec["accuracy"], rec["balanced_accuracy"], rec["f1"],
                     rec["auroc"], rec["calls"], rec["prompt_tokens"], rec["completion_tokens"], seconds, rec["answers"],
                     int(ex.negatives_exact), ex.contamination, llm, time.time()))

    def skip(self, feature: int, reason: str) -> None:
        self._write("INSERT OR REPLACE INTO skipped VALUES (?, ?)", (feature, reason))

    def clear(self, features: list[int]) -> None:
        with self._lock, closing(self._connect()) as db, db:
            for table in ("explanations", "scores", "skipped"):
                db.executemany(f"DELETE FROM {table} WHERE feature = ?", [(f,) for f in features])

    def table(self):
        """One row per explained feature: each explainer's text and each scorer's balanced accuracy on its own
        explanation (columns llm, baseline, llm_detection, baseline_fuzzing, …) — what the browser shows."""
        import pandas as pd

        if not self.exists:
            return pd.DataFrame()
        ex = pd.DataFrame([dict(r) for r in self.query("SELECT feature, explainer, text FROM explanations")])
        sc = pd.DataFrame([dict(r) for r in self.query(
            "SELECT feature, explainer, scorer, balanced_accuracy FROM scores WHERE variant = 'own'")])
        if ex.empty:
            return pd.DataFrame()
        out = ex.pivot(index="feature", columns="explainer", values="text")
        if not sc.empty:
            sc["key"] = sc["explainer"] + "_" + sc["scorer"]
            out = out.join(sc.pivot(index="feature", columns="key", values="balanced_accuracy"))
        out.columns.name = None
        return out

    def feature(self, feature: int) -> dict[str, Any]:
        """A feature's explanations and own-explanation scores, for its page."""
        return {"explanations": {r["explainer"]: dict(r) for r in self.query(
                    "SELECT * FROM explanations WHERE feature = ?", (feature,))},
                "scores": [dict(r) for r in self.query(
                    "SELECT explainer, scorer, variant, source_feature, n, tp, fp, tn, fn, unparsed, accuracy, "
                    "balanced_accuracy, f1, auroc, negatives_exact, contamination FROM scores WHERE feature = ? "
                    "ORDER BY explainer, scorer, variant", (feature,))]}


def _check_resume(res: Results, features: list[int], cfg: ExplainConfig, resume: bool, overwrite: bool,
                  store: FeatureStore) -> None:
    setup = json.dumps({k: getattr(cfg, k) for k in SCORED_FIELDS})
    have = {r[0] for r in res.query("SELECT DISTINCT feature FROM explanations")} & set(features)
    if overwrite:
        res.clear(features)
    elif have and not resume:
        raise SaekitError(f"{res.path} already holds results for {len(have)} of these features: add --resume to "
                          "continue (done ones are skipped) or --overwrite to start them again.")
    elif have and res.meta("setup") not in (None, setup):
        raise SaekitError(f"{res.path} was made with other window settings ({res.meta('setup')}; now {setup}): "
                          "resume with the same ones, or --overwrite.")
    sha = str(store.manifest.get("sae_weights_sha256"))
    if have and not overwrite and res.meta("sae_weights_sha256") not in (None, sha):
        raise SaekitError(f"{res.path} holds results for another SAE (weights {res.meta('sae_weights_sha256')}, the "
                          f"store now {sha}); --overwrite to start again.")
    res.set_meta("setup", setup)
    res.set_meta("sae_weights_sha256", sha)


@lru_cache(maxsize=4)
def _source(store: FeatureStore) -> WindowSource:
    return WindowSource(store)


def _examples(store: FeatureStore, f: int, cfg: ExplainConfig) -> FeatureExamples:
    return feature_examples(store, f, cfg.n_explain, cfg.n_activating, cfg.n_random, cfg.n_hard, cfg.seed,
                            _source(store))


def dry_run(store: FeatureStore, cfg: ExplainConfig, features: list[int]) -> dict[str, Any]:
    """LLM calls and prompt tokens a run would make (tokens estimated at 4 characters each; the scorer prompts
    with the baseline's explanation standing in for the LLM's). Builds every prompt, so it also times that."""
    calls = chars = skipped = 0
    variants = 2 if cfg.shuffled else 1
    t0 = time.perf_counter()
    for f in features:
        try:
            ex = _examples(store, f, cfg)
        except SaekitError:
            skipped += 1
            continue
        stand_in = explain_baseline(ex).text or "fires on text"
        if "llm" in cfg.explainers:
            calls += 1
            chars += sum(len(m["content"]) for m in explain_prompt(ex.explain))
        for kind in (k for k in cfg.scorers if k in LLM_SCORERS):
            if kind == "likelihood":  # one sequence per excerpt with the explanation, one neutral (reused)
                texts = [t for t, _ in samples("detection", ex, random.Random(0))]
                calls += len(texts) * (len(cfg.explainers) * variants + 1)
                chars += sum(len(cfg.likelihood_prefix + likelihood_context(stand_in) + t) for t in texts) * (
                    len(cfg.explainers) * variants + 1)
                continue
            items = samples(kind, ex, random.Random(0))
            for i in range(0, len(items), cfg.batch_size):
                msg = classify_prompt(kind, stand_in, [t for t, _ in items[i: i + cfg.batch_size]])
                calls += len(cfg.explainers) * variants
                chars += len(cfg.explainers) * variants * sum(len(m["content"]) for m in msg)
    seconds = time.perf_counter() - t0
    done = len(features) - skipped
    return {"features": done, "skipped": skipped, "calls": calls, "prompt_tokens_est": chars // 4,
            "prompt_tokens_per_feature_est": chars / 4 / max(done, 1),
            "build_ms_per_feature": 1000 * seconds / max(len(features), 1)}


class _Tally:
    def __init__(self):
        self.calls = self.prompt = self.completion = 0
        self.lock = threading.Lock()

    def add(self, calls: int, prompt: int, completion: int) -> None:
        with self.lock:
            self.calls += calls
            self.prompt += prompt
            self.completion += completion


def needs_llm(store: FeatureStore, cfg: ExplainConfig, features: list[int], keep_done: bool = True) -> bool:
    """Whether a run asks an LLM anything: an LLM scorer, or an LLM explanation not yet in the results (with
    keep_done; --overwrite starts them again) — so the lexical scorer reruns on stored explanations without one."""
    if any(k in LLM_SCORERS for k in cfg.scorers):
        return True
    if "llm" not in cfg.explainers:
        return False
    res = Results(store.path, create=False)
    if not keep_done or not res.exists:
        return True
    done, skipped = res.done_explanations(), {r[0] for r in res.query("SELECT feature FROM skipped")}
    return any((f, "llm") not in done for f in features if f not in skipped)


def run(store: FeatureStore, client: LLMClient | None, cfg: ExplainConfig, resume: bool = False,
        overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Explain and score cfg.features of the store; returns the report (see `report`) and the run's throughput."""
    features = parse_features(cfg.features, store.d_sae)
    res = Results(store.path)
    _check_resume(res, features, cfg, resume, overwrite, store)
    if client is None and needs_llm(store, cfg, features):
        raise SaekitError("this run needs an LLM (--llm): an LLM scorer, or LLM explanations not yet made.")
    llm = client.name if client is not None else ""
    if client is not None:
        res.set_meta("llm", llm)
    done_ex, done_sc = res.done_explanations(), res.done_scores()
    skipped = {r[0] for r in res.query("SELECT feature FROM skipped")}
    tally = _Tally()
    workers = cfg.concurrency if client is None or client.parallel else 1
    t0 = time.perf_counter()

    def one(f: int) -> None:
        try:
            ex = _examples(store, f, cfg)
        except SaekitError as e:
            res.skip(f, str(e))
            return
        for name in cfg.explainers:
            if (f, name) in done_ex:
                text = done_ex[(f, name)]
            else:
                e = explain_llm(client, ex) if name == "llm" else explain_baseline(ex)
                res.save_explanation(e, llm if name == "llm" else "token profile")
                tally.add(int(name == "llm"), e.prompt_tokens, e.completion_tokens)
                text = e.text
            if text is None:
                continue  # unparseable: recorded with its raw answer, nothing to score
            for kind in cfg.scorers:
                if (f, name, kind, "own") not in done_sc:
                    _score_and_save(res, client, kind, text, ex, f, name, "own", f, cfg, llm, tally)

    todo = [f for f in features if f not in skipped]
    _in_pool(one, todo, workers, tally, progress, "explain", "feature")

    if cfg.shuffled and cfg.scorers:
        _shuffled_phase(store, res, client, cfg, features, llm, tally, workers, progress)
    seconds = time.perf_counter() - t0
    out = report(store.path, features)
    out["run"] = {"seconds": seconds, "calls": tally.calls, "calls_per_s": tally.calls / seconds if seconds else 0.0,
                  "prompt_tokens": tally.prompt, "completion_tokens": tally.completion, "llm": llm,
                  "workers": workers}
    return out


def _in_pool(fn, items: list, workers: int, tally, progress: bool, desc: str, unit: str) -> None:
    """fn over items on `workers` threads (the LLM calls wait on the network), with a progress bar that shows the
    calls and tokens so far."""
    with tqdm(total=len(items), unit=unit, disable=not progress, desc=desc) as bar, ThreadPoolExecutor(workers) as pool:
        for fut in as_completed([pool.submit(fn, x) for x in items]):
            fut.result()
            bar.set_postfix(calls=tally.calls, tok_in=tally.prompt, tok_out=tally.completion, refresh=False)
            bar.update()


def _score_and_save(res: Results, client: LLMClient, kind: str, text: str, ex: FeatureExamples, f: int, name: str,
                    variant: str, source: int, cfg: ExplainConfig, llm: str, tally: _Tally) -> None:
    t = time.perf_counter()
    s = score(kind, client, text, ex, cfg.batch_size, cfg.seed, cfg.likelihood_prefix)
    rec = score_record(s) | {"scorer": kind}
    res.save_score(f, name, variant, source, text, rec, time.perf_counter() - t, ex,
                   llm if kind in LLM_SCORERS else "none (lexical)")
    tally.add(s.calls, s.prompt_tokens, s.completion_tokens)


def _shuffled_phase(store: FeatureStore, res: Results, client: LLMClient, cfg: ExplainConfig, features: list[int],
                    llm: str, tally: _Tally, workers: int, progress: bool) -> None:
    done_ex, done_sc = res.done_explanations(), res.done_scores()
    jobs = []
    for name in cfg.explainers:
        have = [f for f in features if done_ex.get((f, name))]
        if len(have) < 2:
            continue
        perm = derangement(len(have), cfg.seed)
        for i, f in enumerate(have):
            src = have[perm[i]]
            for kind in cfg.scorers:
                if (f, name, kind, "shuffled") not in done_sc:
                    jobs.append((f, name, kind, src, done_ex[(src, name)]))

    def one(job) -> None:
        f, name, kind, src, text = job
        _score_and_save(res, client, kind, text, _examples(store, f, cfg), f, name, "shuffled", src, cfg, llm, tally)

    _in_pool(one, jobs, workers, tally, progress, "shuffled", "score")


def report(store_dir: str | Path, features: list[int] | None = None) -> dict[str, Any]:
    """Per explainer × scorer: features scored, the mean score on own and on shuffled explanations, the
    shuffle-AUC with its 95% bootstrap interval, unparsed votes; plus unparseable explanations and skips. The score
    is the log-prob AUROC where every row has one (one excerpt per call, a backend with logprobs), else the
    balanced accuracy of the votes."""
    res = Results(store_dir)
    keep = set(features) if features is not None else None
    rows = [dict(r) for r in res.query("SELECT feature, explainer, scorer, variant, balanced_accuracy, auroc, "
                                       "unparsed, n, calls, prompt_tokens, negatives_exact FROM scores")]
    rows = [r for r in rows if keep is None or r["feature"] in keep]
    table = []
    for name in sorted({r["explainer"] for r in rows}):
        for kind in sorted({r["scorer"] for r in rows}):
            sel = [r for r in rows if (r["explainer"], r["scorer"]) == (name, kind)]
            own = {r["feature"]: r for r in sel if r["variant"] == "own"}
            shuf = {r["feature"]: r for r in sel if r["variant"] == "shuffled"}
            if not own:
                continue
            metric = "auroc" if all(r["auroc"] is not None for r in sel) else "balanced_accuracy"
            both = [f for f in own if f in shuf and own[f][metric] is not None and shuf[f][metric] is not None]
            vals = [r[metric] for r in own.values() if r[metric] is not None]
            bal = [r["balanced_accuracy"] for r in own.values() if r["balanced_accuracy"] is not None]
            entry = {"explainer": name, "scorer": kind, "features": len(own), "metric": metric,
                     "mean_own": sum(vals) / len(vals) if vals else None,
                     "mean_balanced_accuracy": sum(bal) / len(bal) if bal else None,
                     "unparsed_votes": sum(r["unparsed"] for r in own.values()),
                     "votes": sum(r["unparsed"] + r["n"] for r in own.values()),
                     "exact_negatives": sum(r["negatives_exact"] for r in own.values())}
            if both:
                entry["mean_shuffled"] = sum(shuf[f][metric] for f in both) / len(both)
                entry["shuffle_auc"] = shuffle_auc([own[f][metric] for f in both], [shuf[f][metric] for f in both])
            table.append(entry)
    exps = [dict(r) for r in res.query("SELECT feature, explainer, text, prompt_tokens FROM explanations")]
    exps = [e for e in exps if keep is None or e["feature"] in keep]
    skipped = [dict(r) for r in res.query("SELECT * FROM skipped") if keep is None or r["feature"] in keep]
    return {"table": table, "explanations": len(exps),
            "unparseable_explanations": sum(e["text"] is None for e in exps), "skipped": skipped}


def format_report(rep: dict[str, Any]) -> str:
    def f(x, spec=".3f"):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = ["| explainer | scorer | features | score | own | shuffled | shuffle-AUC [95% CI] | bal. acc. own | "
             "unparsed votes |", "|---|---|---|---|---|---|---|---|---|"]
    for e in rep["table"]:
        a = e.get("shuffle_auc")
        auc = f"{f(a['auc'])} [{f(a['lo'])}, {f(a['hi'])}]" if a else "—"
        lines.append(f"| {e['explainer']} | {e['scorer']} | {e['features']} | {e['metric']} | {f(e['mean_own'])} | "
                     f"{f(e.get('mean_shuffled'))} | {auc} | {f(e['mean_balanced_accuracy'])} | "
                     f"{e['unparsed_votes']}/{e['votes']} |")
    lines.append(f"\n{rep['explanations']} explanations ({rep['unparseable_explanations']} unparseable, kept with "
                 f"their raw answers); {len(rep['skipped'])} features skipped"
                 + (f" (e.g. {rep['skipped'][0]['feature']}: {rep['skipped'][0]['reason']})" if rep["skipped"] else ""))
    if "run" in rep:
        r = rep["run"]
        lines.append(f"{r['calls']} LLM calls in {r['seconds']:.1f} s ({r['calls_per_s']:.2f} calls/s, {r['workers']} "
                     f"in flight), {r['prompt_tokens']:,} prompt and {r['completion_tokens']:,} completion tokens; "
                     f"LLM: {r['llm']}")
    return "\n".join(lines)


