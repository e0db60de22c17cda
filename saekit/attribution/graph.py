"""An attribution graph: nodes, the adjacency of direct effects, influence, pruning, scores, and its JSON.

Node order (circuit-tracer's): the selected feature nodes (layer, position, latent), then one error node per
layer and position (layer-major), one token-embedding node per position, then the logit nodes. adjacency[t, s]
is the direct effect of source s on target t (rows of feature and logit nodes are filled; error and token nodes
have no inputs). Influence, pruning and the replacement / completeness scores follow Ameisen et al. 2025 and
circuit-tracer's definitions, so the numbers compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import FileFormatError
from ..files import atomic_write

GRAPH_KIND = "saekit-attribution-graph"


def normalize_rows(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row summing to 1 (a target's inputs as shares)."""
    A = A.abs()
    return A / A.sum(1, keepdim=True).clamp_min(1e-10)


def influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """weights · (A + A² + …): the total influence of every node on the weighted nodes, over all paths
    (A is nilpotent: the graph runs forward through the layers)."""
    current = weights @ A
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def partial_influence(feature_rows: torch.Tensor, done: torch.Tensor, logit_rows: torch.Tensor,
                      probs: torch.Tensor, n_features: int) -> torch.Tensor:
    """Influence on the logits of every feature node, through the rows computed so far (`feature_rows` of the
    visited features `done`, and the logit rows): ranks the features still to visit."""
    A_f, A_l = normalize_rows(feature_rows), normalize_rows(logit_rows)
    current = probs @ A_l
    total = current.clone()
    for _ in range(10_000):
        current = current[done] @ A_f if len(done) else torch.zeros_like(current)
        if not current.any():
            break
        total += current
    return total[:n_features]


class Pruned(NamedTuple):
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative: torch.Tensor  # each node's cumulative share of influence, in influence order


@dataclass
class Graph:
    tokens: list[int]
    token_strings: list[str]
    features: torch.Tensor  # [S, 3] (layer, position, latent) of the selected feature nodes
    activations: torch.Tensor  # [S]
    adjacency: torch.Tensor  # [N, N]
    targets: list[dict[str, Any]]  # logit nodes: token, vocab_index, probability
    n_layers: int
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def assemble(cls, tokens: list[int], token_strings: list[str], features: torch.Tensor,
                 activations: torch.Tensor, selected: torch.Tensor, feature_rows: torch.Tensor,
                 logit_rows: torch.Tensor, targets: list, n_layers: int, meta: dict[str, Any]) -> Graph:
        """The square adjacency from the computed rows: columns of unselected features are dropped."""
        F, n = len(features), len(tokens)
        order = selected.argsort()
        sel = selected[order]
        cols = torch.cat([sel, torch.arange(F, F + (n_layers + 1) * n)])
        S, K = len(sel), len(targets)
        N = S + (n_layers + 1) * n + K
        A = torch.zeros(N, N)
        A[:S, : N - K] = feature_rows[order][:, cols]
        A[N - K:, : N - K] = logit_rows[:, cols]
        tgts = [{"token": t.token, "vocab_index": t.vocab_index, "probability": t.probability,
                 "contrast": t.contrast} for t in targets]
        return cls(tokens, token_strings, features[sel], activations[sel], A, tgts, n_layers, meta)

    # ------------------------------------------------------------------ node layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    def node(self, i: int) -> dict[str, Any]:
        """What node i is: kind, layer, position (and latent / token / target)."""
        if i < self.error_start:
            L, p, f = self.features[i].tolist()
            return {"kind": "feature", "layer": L, "position": p, "latent": f,
                    "activation": float(self.activations[i])}
        if i < self.token_start:
            L, p = divmod(i - self.error_start, self.n_pos)
            return {"kind": "error", "layer": L, "position": p}
        if i < self.logit_start:
            p = i - self.token_start
            return {"kind": "token", "layer": -1, "position": p, "token": self.token_strings[p]}
        t = self.targets[i - self.logit_start]
        return {"kind": "logit", "layer": self.n_layers, "position": self.n_pos - 1, **t}

    def find(self, layer: int, position: int, latent: int) -> int:
        hit = ((self.features[:, 0] == layer) & (self.features[:, 1] == position) & (self.features[:, 2] == latent))
        idx = hit.nonzero()
        if not len(idx):
            raise KeyError(f"no feature node L{layer} p{position} #{latent} in this graph")
        return int(idx[0])

    @property
    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes)
        w[self.logit_start:] = torch.tensor([t["probability"] for t in self.targets])
        return w

    # ------------------------------------------------------------------ influence, pruning, scores
    def node_influence(self, A: torch.Tensor | None = None) -> torch.Tensor:
        return influence(normalize_rows(self.adjacency if A is None else A), self.logit_weights)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        """Keep the nodes holding `node_threshold` of the influence on the logits, then the edges holding
        `edge_threshold` of the edge influence among them; tokens and logits always stay, and features or
        errors left without an outgoing edge (features: or an incoming one) go."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {v}")
        A, w = self.adjacency, self.logit_weights
        node_inf = self.node_influence()
        node_mask = node_inf >= _threshold(node_inf, node_threshold)
        node_mask[self.token_start:] = True
        P = A.clone()
        P[~node_mask] = 0
        P[:, ~node_mask] = 0
        Pn = normalize_rows(P)
        edge_scores = Pn * (influence(Pn, w) + w)[:, None]
        edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
        inner, S = slice(0, self.token_start), self.n_features
        while True:
            before = node_mask.clone()
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            node_mask[inner] &= edge_mask[:, inner].any(0)
            node_mask[:S] &= edge_mask[:S].any(1)
            if torch.equal(before, node_mask):
                break
        scores, order = node_inf.sort(descending=True)
        cumulative = torch.zeros_like(node_inf)
        cumulative[order] = scores.cumsum(0) / scores.sum().clamp_min(1e-30)
        return Pruned(node_mask, edge_mask, cumulative)

    def scores(self, pruned: Pruned | None = None) -> dict[str, float]:
        """replacement: the share of the tokens' end-to-end influence on the logits that flows through features
        rather than error nodes; completeness: the influence-weighted share of every node's input coming from
        features and tokens rather than errors. On the pruned graph when `pruned` is given."""
        A = self.adjacency if pruned is None else self.adjacency * pruned.edge_mask
        An, w = normalize_rows(A), self.logit_weights
        inf = influence(An, w)
        token = inf[self.token_start: self.logit_start].sum()
        error = inf[self.error_start: self.token_start].sum()
        non_error = 1 - An[:, self.error_start: self.token_start].sum(1)
        out_inf = inf + w
        return {"replacement": float(token / (token + error).clamp_min(1e-30)),
                "completeness": float((non_error * out_inf).sum() / out_inf.sum())}

    # ------------------------------------------------------------------ effects through the graph
    def total_effects(self, target: int | None = None) -> torch.Tensor:
        """Signed effect on logit node `target` (default: the first) of removing each node's value, through all
        paths of the graph with active features responding linearly (a feature's edges are per unit of its
        activation ÷ its value)."""
        t = self.logit_start if target is None else target
        S, A = self.n_features, self.adjacency
        per_unit = A.clone()
        per_unit[:, :S] = A[:, :S] / self.activations.clamp_min(1e-12)
        r = per_unit[t].clone()  # effect on the target of one unit at each source, direct
        total = r.clone()
        for _ in range(10_000):
            r = r[:S] @ per_unit[:S]
            if not r.any():
                break
            total += r
        values = torch.ones(self.n_nodes)
        values[:S] = self.activations
        return total * values

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"kind": GRAPH_KIND, "version": 1, "tokens": self.tokens, "token_strings": self.token_strings,
                "n_layers": self.n_layers, "targets": self.targets, "meta": self.meta}

    def save(self, directory: str | Path) -> Path:
        """DIR/graph.json (nodes, targets, metadata) + DIR/graph.safetensors (adjacency, features)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"adjacency": self.adjacency.contiguous(), "features": self.features.contiguous(),
                   "activations": self.activations.contiguous()}
        atomic_write(d / "graph.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write(d / "graph.json", lambda p: p.write_text(json.dumps(self.to_dict(), indent=1)))
        return d

    @classmethod
    def load(cls, directory: str | Path, model: str | None = None, transcoders: str | None = None) -> Graph:
        """A saved graph; refused when `model` / `transcoders` are given and differ from those it was built on."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "graph.json").is_file():
            raise FileFormatError(f"{d} holds no graph.json: write one with `saekit attribute --out {d}`.")
        info = json.loads((d / "graph.json").read_text())
        if info.get("kind") != GRAPH_KIND:
            raise FileFormatError(f"{d}/graph.json is not a saekit attribution graph (kind {info.get('kind')!r}).")
        meta = info.get("meta", {})
        for what, want in (("model", model), ("transcoders", transcoders)):
            if want is not None and meta.get(what) not in (None, want):
                raise FileFormatError(f"{d} was built on {what} {meta.get(what)!r}, not {want!r}: rebuild it with "
                                      "`saekit attribute`.")
        t = load_file(str(d / "graph.safetensors"))
        return cls(info["tokens"], info["token_strings"], t["features"], t["activations"], t["adjacency"],
                   info["targets"], info["n_layers"], meta)


def _threshold(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The score above which the largest scores hold `keep` of the total."""
    s = scores.sort(descending=True).values
    cum = s.cumsum(0) / s.sum().clamp_min(1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(keep))), len(s) - 1)
    return s[i]
