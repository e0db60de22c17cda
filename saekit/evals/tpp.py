"""Targeted probe perturbation (SAEBench's TPP): ablating the latents most tied to class i should lower the
accuracy of class i's probe and leave the other classes' probes alone.

Probes: balanced one-vs-rest logistic regressions on the mean-pooled raw activations. Ablation: the chosen
latents' decoder contributions are taken out of each token's activation, x − Σ_j f_j(x) W_dec[j]; pooling is a
mean, so on the pooled activations this is x̄ − Σ_j f̄_j W_dec[j]. With drop[i, j] = acc_j(clean) − acc_j(latents
of class i ablated):  TPP = mean_i drop[i, i] − mean_{i≠j} drop[i, j]  (higher is better)."""

from __future__ import annotations

from typing import Any

import torch

from ..evaluate import DRAWS, LEVEL, bootstrap
from .probing import ProbeSets, top_by_mean_difference


def tpp_statistic(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TPP and its two terms from sums: right_clean [..., C], count [..., C], right_ablated [..., C(i), C(j)]."""
    clean = s["right_clean"] / s["count"]
    ablated = s["right_ablated"] / s["count"][..., None, :]
    drop = clean[..., None, :] - ablated
    eye = torch.eye(drop.shape[-1], dtype=torch.bool)
    targeted = drop[..., eye].mean(-1)
    untargeted = drop[..., ~eye].mean(-1)
    return {"tpp": targeted - untargeted, "targeted_drop": targeted, "untargeted_drop": untargeted}


def targeted_probe_perturbation(docs, sae, train: torch.Tensor, test: torch.Tensor, n_latents: int = 20,
                                seed: int = 0, latents: torch.Tensor | None = None) -> dict[str, Any]:
    """eval.json's "tpp" part (`docs`: DocumentActivations; `latents`: their pooled SAE latents if at hand)."""
    labels = docs.labels
    raw = docs.mean_pooled()
    lat = docs.pooled_latents(sae)[0] if latents is None else latents
    sets = ProbeSets(labels[train], labels[test], seed)
    fitted = sets.fit(raw[train])
    clean = sets.score(fitted, raw[test])
    W_dec = sae.W_dec.detach().float().cpu()
    chosen, ablated = {}, []
    for c in sets.classes:
        idx = top_by_mean_difference(lat[train], labels[train] == c, n_latents)
        chosen[docs.names[c]] = idx.tolist()
        x = raw[test] - lat[test][:, idx] @ W_dec[idx]
        ablated.append(sets.score(fitted, x)["right"])
    per_unit = {"right_clean": clean["right"], "count": clean["count"], "right_ablated": torch.stack(ablated, 1)}
    ci = bootstrap(per_unit, tpp_statistic, seed=seed)
    point = tpp_statistic({k: v.sum(0) for k, v in per_unit.items()})
    drop = (clean["right"].sum(0) / clean["count"].sum(0))[None, :] - per_unit["right_ablated"].sum(0) / clean["count"].sum(0)[None, :]
    return {**{k: v.item() for k, v in point.items()}, "intervals": {k: list(v) for k, v in ci.items()},
            "latents_per_class": n_latents, "ablated_latents": chosen, "classes": docs.names,
            "accuracy_drop": drop.tolist(), "test_documents": len(test),
            "interval_method": f"{LEVEL:.0%} percentile bootstrap over {len(test)} test documents ({DRAWS} resamples)"}
