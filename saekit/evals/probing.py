"""Sparse probing (SAEBench's k-sparse probes): for each class a balanced one-vs-rest logistic regression on the
k latents whose class means differ most, k = 1, 2, 5, …; the same probes on the raw activations' top-k
dimensions and on all of them. Accuracy is the mean over classes, with a bootstrap interval over test documents.

Inputs are mean-pooled over each document's tokens, as SAEBench pools (`get_sae_meaned_activations`); the
last token's latents are probed too, for comparison."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SaekitError
from ..evaluate import DRAWS, LEVEL, bootstrap


def top_by_mean_difference(x: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k columns of x [n, F] whose means differ most between positive and other rows."""
    diff = (x[positive].mean(0) - x[~positive].mean(0)).abs()
    return diff.topk(min(k, x.shape[1])).indices


def balanced(labels: torch.Tensor, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, is_positive) of a one-vs-rest set for class c: all its examples and as many of the others."""
    gen = torch.Generator().manual_seed(seed * 1000 + c)
    pos = (labels == c).nonzero()[:, 0]
    neg = (labels != c).nonzero()[:, 0]
    neg = neg[torch.randperm(len(neg), generator=gen)[: len(pos)]]
    rows = torch.cat([pos, neg])
    return rows, torch.cat([torch.ones(len(pos), dtype=torch.bool), torch.zeros(len(neg), dtype=torch.bool)])


def logistic_probe(x: torch.Tensor, y: torch.Tensor):
    """A logistic regression on standardised features (sklearn, lbfgs): fitted pipeline."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise SaekitError("probing needs scikit-learn: pip install 'saekit[evals]' (or pip install scikit-learn)") from e
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return probe.fit(x.double().numpy(), y.numpy())


class ProbeSets:
    """The balanced one-vs-rest train and test sets of every class, drawn once and shared by every probe."""

    def __init__(self, train_labels: torch.Tensor, test_labels: torch.Tensor, seed: int = 0):
        self.classes = sorted(int(c) for c in train_labels.unique())
        self.n_test = len(test_labels)
        self.train = {c: balanced(train_labels, c, seed) for c in self.classes}
        self.test = {c: balanced(test_labels, c, seed + 7) for c in self.classes}

    def fit(self, train_x: torch.Tensor, columns=None) -> list[tuple[Any, Any]]:
        """Each class's (probe, columns); `columns(c, x, positive)` picks the features it uses (None: all)."""
        fitted = []
        for c in self.classes:
            rows, pos = self.train[c]
            cols = columns(c, train_x[rows], pos) if columns else slice(None)
            fitted.append((logistic_probe(train_x[rows][:, cols], pos), cols))
        return fitted

    def score(self, fitted: list[tuple[Any, Any]], test_x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per test example (the bootstrap's unit) and class: probe right (1) or wrong (0), and whether the
        example is in that class's test set."""
        right = torch.zeros(self.n_test, len(self.classes), dtype=torch.float64)
        count = torch.zeros_like(right)
        for j, (c, (probe, cols)) in enumerate(zip(self.classes, fitted)):
            t_rows, t_pos = self.test[c]
            pred = torch.from_numpy(np.asarray(probe.predict(test_x[t_rows][:, cols].double().numpy()))).bool()
            right[:, j].index_add_(0, t_rows, (pred == t_pos).double())
            count[:, j].index_add_(0, t_rows, torch.ones(len(t_rows), dtype=torch.float64))
        return {"right": right, "count": count}

    def correct(self, train_x: torch.Tensor, test_x: torch.Tensor, columns=None) -> dict[str, torch.Tensor]:
        return self.score(self.fit(train_x, columns), test_x)


def mean_accuracy(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over classes of the accuracy (sums with any leading resample axes)."""
    return (s["right"] / s["count"]).mean(-1)


def with_intervals(per_unit: dict[str, dict[str, torch.Tensor]], seed: int = 0) -> dict[str, Any]:
    """{name: value, "intervals": {name: [lo, hi]}} from per-unit sums of several accuracies at once."""
    flat = {f"{name}/{k}": v for name, parts in per_unit.items() for k, v in parts.items()}

    def statistic(s):
        return {name: mean_accuracy({k: s[f"{name}/{k}"] for k in ("right", "count")}) for name in per_unit}

    ci = bootstrap(flat, statistic, seed=seed)
    out: dict[str, Any] = {name: mean_accuracy({k: v.sum(0) for k, v in parts.items()}).item()
                           for name, parts in per_unit.items()}
    return out | {"intervals": {k: list(v) for k, v in ci.items()}}


def sparse_probing(docs, sae, train: torch.Tensor, test: torch.Tensor, ks: list[int], seed: int = 0) -> dict[str, Any]:
    """eval.json's "probing" part: accuracies of k-sparse probes on the SAE's mean-pooled (and last-token)
    latents and on the raw activations' top-k dimensions, per k, and of a probe on all raw dimensions.
    `docs`: DocumentActivations; `train`/`test`: document indices (whole documents held out)."""
    labels = docs.labels
    raw = docs.mean_pooled()
    lat, lat_last = docs.pooled_latents(sae)
    sets = ProbeSets(labels[train], labels[test], seed)

    def top(k):
        return lambda c, x, pos: top_by_mean_difference(x, pos, k)

    per_unit: dict[str, dict[str, torch.Tensor]] = {}
    for k in ks:
        per_unit[f"sae_k{k}"] = sets.correct(lat[train], lat[test], top(k))
        per_unit[f"sae_last_token_k{k}"] = sets.correct(lat_last[train], lat_last[test], top(k))
    # the raw-activation probes do not depend on the SAE: made once per documents, split and k list
    memo = docs.raw_probes
    key = (tuple(train.tolist()), tuple(test.tolist()), tuple(ks), seed)
    if key not in memo:
        memo[key] = {f"raw_k{k}": sets.correct(raw[train], raw[test], top(k)) for k in ks}
        memo[key]["raw_all"] = sets.correct(raw[train], raw[test])
    per_unit |= memo[key]
    out = with_intervals(per_unit, seed)
    return out | {"k": list(ks), "classes": docs.names, "train_documents": len(train), "test_documents": len(test),
                  "pooling": "mean over each document's tokens (as SAEBench); sae_last_token_*: the last token's latents",
                  "task": "balanced one-vs-rest per class, accuracy averaged over classes (chance 0.5)",
                  "interval_method": f"{LEVEL:.0%} percentile bootstrap over {len(test)} test documents ({DRAWS} resamples)"}
