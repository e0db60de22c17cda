"""How far to trust a graph: features ablated and doubled in the real (unfrozen) model, the measured change of a
logit ranked against the graph's prediction."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import SaekitError
from ..lm import mlp_pair
from ..sae import SparseAutoencoder
from .graph import Graph

# ----------------------------------------------------------------------------- validation in the real model

def target_value(target: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """A logit node's value from logits [..., vocab]: the logit minus the mean logit, or a contrast's difference."""
    if target.get("contrast") is not None:
        return logits[..., target["vocab_index"]] - logits[..., target["contrast"]]
    return logits[..., target["vocab_index"]] - logits.mean(-1)


@torch.no_grad()
def edit_features(model, transcoders: dict[int, SparseAutoencoder], tokens: list[int],
                  edits: list[list[tuple[int, int, int, float]]]) -> torch.Tensor:
    """Last-position logits of the real model with each row's edits applied: (layer, position, latent, Δ) adds
    Δ × the latent's decoder row to that MLP's output there (Δ = −activation ablates it, +activation doubles it).
    Row R (one past the edits) is the clean run."""
    R, n = len(edits) + 1, len(tokens)
    deltas: dict[int, torch.Tensor] = {}
    for r, row in enumerate(edits):
        for L, p, f, d in row:
            t = transcoders[L]
            if L not in deltas:
                deltas[L] = torch.zeros(R, n, t.W_dec.shape[1])
            deltas[L][r, p] += d * t.W_dec[f].detach().float()

    def adder(L: int):
        def add(a, hook):
            return a + deltas[L].to(a.dtype)
        return add

    hooks = [(mlp_pair(L)[1], adder(L)) for L in deltas]
    logits = model.run_with_hooks(torch.tensor(tokens)[None].expand(R, n), fwd_hooks=hooks)
    return logits[:, -1].float()


def validate(model, transcoders: dict[int, SparseAutoencoder], graph: Graph, top: int = 20,
             target: int = 0) -> dict[str, Any]:
    """How far to trust the graph: for its `top` feature nodes by influence, ablate each in the real (unfrozen)
    model, and double it, and compare the measured change of logit node `target` with the graph's prediction
    (its total effect through every path, features responding linearly): Spearman ρ of each, with a 95%
    interval (Fisher z, n − 3 degrees of freedom; Bonett–Wright's 1.06 factor for Spearman)."""
    S = graph.n_features
    top = min(top, S)
    if top < 3:
        raise SaekitError(f"the graph has {S} feature nodes; validation needs at least 3.")
    tgt = graph.targets[target]
    nodes = graph.node_influence()[:S].argsort(descending=True)[:top]
    predicted = graph.total_effects(graph.logit_start + target)[nodes]
    direct = graph.adjacency[graph.logit_start + target, nodes]
    feats = graph.features[nodes].tolist()
    acts = graph.activations[nodes].tolist()
    edits = [[(L, p, f, -a)] for (L, p, f), a in zip(feats, acts)] + [[(L, p, f, a)] for (L, p, f), a in
                                                                        zip(feats, acts)]
    logits = edit_features(model, transcoders, graph.tokens, edits)
    values = target_value(tgt, logits)
    clean = values[-1]
    ablate, double = values[:top] - clean, values[top: 2 * top] - clean
    result = {"target": tgt["token"], "nodes": top,
              "ablation": _spearman(-predicted, ablate), "doubling": _spearman(predicted, double),
              "ablation_direct_only": _spearman(-direct, ablate),
              "per_node": [{"layer": L, "position": p, "latent": f, "activation": a, "predicted": float(pr),
                            "ablation": float(ab), "doubling": float(db)}
                           for (L, p, f), a, pr, ab, db in zip(feats, acts, predicted, ablate, double)]}
    return result


def _spearman(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    n = len(x)
    rho = float(spearmanr(x.numpy(), y.numpy()).statistic)
    if not math.isfinite(rho):
        return {"rho": float("nan"), "low": float("nan"), "high": float("nan"), "n": n}
    z, se = math.atanh(max(min(rho, 0.999999), -0.999999)), 1.06 / math.sqrt(max(n - 3, 1))
    return {"rho": rho, "low": math.tanh(z - 1.96 * se), "high": math.tanh(z + 1.96 * se), "n": n}
