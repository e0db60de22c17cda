"""Attribution graphs: a prompt's computation traced through transcoder features (Ameisen et al. 2025).

The *local replacement model* of a prompt: every MLP replaced by its layer's transcoder, the transcoder's error
(MLP output − transcoder output) added back at each layer and position as a fixed *error node*, attention
patterns and normalisation denominators frozen from the clean forward. With the error nodes in, its logits are
the model's. Inside it the residual stream is linear in the feature activations, the error nodes and the token
embeddings, so the direct effect of a source on a target is exact: the source's value × its write vector · the
target's gradient at that layer and position. The gradients come from an explicit backward through the frozen
layers (norm, attention's OV path), a batch of targets at a time: no autograd through the model, and no MLP.

Targets: a feature's pre-activation (its encoder input), or a logit minus the mean logit (the logits carrying
most of the probability, a chosen token, or a contrast "A-B"). Position 0 (BOS, the attention sink, which the
transcoders never saw in training) holds no feature or error node: its MLP output is a constant there, as
circuit-tracer zeroes it.

    graph = attribute(model, transcoders, "The capital of France is")
    graph.prune(0.8, 0.98); graph.scores(); validate(model, transcoders, graph)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .config import AttributionConfig
from .errors import SaekitError
from .graph import Graph, partial_influence
from .graph_json import write_graph_json
from .lm import mlp_pair, model_id
from .sae import SparseAutoencoder


# ----------------------------------------------------------------------------- the frozen model

@dataclass
class FrozenNorm:
    """A LayerNorm or RMSNorm with each position's denominator fixed: y = w ⊙ (x − mean x?) / s + b."""

    weight: torch.Tensor
    scale: torch.Tensor  # [n]: the clean forward's denominator at each position
    bias: torch.Tensor | None = None
    centred: bool = False

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            centred: bool) -> FrozenNorm:
        """The denominators that map the clean input x to the clean output y (a least-squares fit per position,
        exact for these norms)."""
        xc = x - x.mean(-1, keepdim=True) if centred else x
        num, out = xc * weight, y - bias if bias is not None else y
        scale = num.pow(2).sum(-1) / (num * out).sum(-1)
        return cls(weight, scale, bias, centred)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True) if self.centred else x
        return x * (self.weight / self.scale[:, None])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.bias if self.bias is not None else y

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of `linear` (centring is symmetric)."""
        g = g * (self.weight / self.scale[:, None])
        return g - g.mean(-1, keepdim=True) if self.centred else g


@dataclass
class FrozenAttention:
    """Attention with its pattern fixed: linear in its (normalised) input through the OV circuit."""

    pattern: torch.Tensor  # [H, n, n]
    W_V: torch.Tensor      # [KV, d, dh]
    W_O: torch.Tensor      # [H, dh, d]
    b_V: torch.Tensor | None = None  # [KV, dh]
    b_O: torch.Tensor | None = None  # [d]

    @property
    def group(self) -> int:
        return self.W_O.shape[0] // self.W_V.shape[0]  # query heads per key/value head (GQA)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, d] (the norm's output) → the attention output [..., n, d], biases included."""
        v = torch.einsum("...nd,kde->...kne", x, self.W_V)
        if self.b_V is not None:
            v = v + self.b_V[:, None, :]
        z = self.pattern @ v.repeat_interleave(self.group, dim=-3)
        out = torch.einsum("...hne,hed->...nd", z, self.W_O)
        return out + self.b_O if self.b_O is not None else out

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient [T, n, d] at the output → at the input (biases drop out)."""
        T, n, _ = g.shape
        gz = torch.einsum("tnd,hed->thne", g, self.W_O)
        gv = self.pattern.transpose(-1, -2) @ gz
        gv = gv.view(T, self.W_V.shape[0], self.group, n, -1).sum(2)
        return torch.einsum("tkne,kde->tnd", gv, self.W_V)


@dataclass
class FrozenLayer:
    ln1: FrozenNorm
    attn: FrozenAttention
    ln2: FrozenNorm
    transcoder: SparseAutoencoder
    mlp_out: torch.Tensor  # [n, d] the clean MLP output (position 0's stays a constant)
    error: torch.Tensor    # [n, d] MLP output − transcoder output; 0 at position 0
    positions: torch.Tensor  # [m] active features of this layer: position,
    latents: torch.Tensor    # [m] latent,
    values: torch.Tensor     # [m] activation (positions ≥ 1)
    offset: int = 0          # index of this layer's first feature node


class LocalReplacement:
    """The local replacement model of one prompt: frozen norms and patterns, transcoders, error nodes."""

    def __init__(self, model, transcoders: dict[int, SparseAutoencoder], tokens: torch.Tensor):
        self.model, self.transcoders, self.tokens = model, transcoders, tokens
        cfg = model.cfg
        self.n_layers, self.n = cfg.n_layers, len(tokens)
        missing = sorted(set(range(self.n_layers)) - set(transcoders))
        if missing:
            raise SaekitError(f"an attribution graph needs a transcoder at every MLP; layer(s) "
                              f"{', '.join(map(str, missing))} have none. Train them: saekit train --transcoder "
                              f"--layers {','.join(map(str, missing))}")
        centred = str(getattr(cfg, "normalization_type", "RMS") or "RMS").upper().startswith("LN")
        names = ["hook_embed", "ln_final.hook_in", "ln_final.hook_out"]
        for L in range(self.n_layers):
            names += [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.ln1.hook_out", f"blocks.{L}.attn.hook_pattern",
                      f"blocks.{L}.hook_resid_mid", *mlp_pair(L)]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens[None], names_filter=lambda name: name in names)
        self.logits = logits[0, -1].float()
        grab = {k: v[0].float() for k, v in cache.items()}
        self.embed = grab["blocks.0.hook_resid_pre"]
        self.layers: list[FrozenLayer] = []
        offset = 0
        for L in range(self.n_layers):
            block, t = model.blocks[L], transcoders[L].float()
            hook_in, hook_out = mlp_pair(L)
            x_in, y = grab[hook_in], grab[hook_out]
            ln1 = FrozenNorm.fit(grab[f"blocks.{L}.hook_resid_pre"], grab[f"blocks.{L}.ln1.hook_out"],
                                 *_norm_params(block.ln1, cfg), centred)
            ln2 = FrozenNorm.fit(grab[f"blocks.{L}.hook_resid_mid"], x_in, *_norm_params(block.ln2, cfg), centred)
            attn = FrozenAttention(grab[f"blocks.{L}.attn.hook_pattern"], block.attn.W_V.detach().float(),
                                   block.attn.W_O.detach().float(), _maybe(block.attn, "b_V"),
                                   _maybe(block.attn, "b_O"))
            with torch.no_grad():
                values, latents = t.encode(x_in)
                error = y - t.decode(values, latents, x_in)
            error[0] = 0
            on = values > 0
            on[0] = False
            pos = torch.arange(self.n)[:, None].expand_as(on)[on]
            layer = FrozenLayer(ln1, attn, ln2, t, y, error, pos, latents[on], values[on], offset)
            offset += len(pos)
            self.layers.append(layer)
        self.n_features = offset
        self.ln_final = FrozenNorm.fit(grab["ln_final.hook_in"], grab["ln_final.hook_out"],
                                       *_norm_params(model.ln_final, cfg), centred)
        self.W_U = model.W_U.detach().float()
        b_U = getattr(model, "b_U", None)
        self.b_U = b_U.detach().float() if isinstance(b_U, torch.Tensor) else torch.zeros(self.W_U.shape[1])
        self.check(grab)

    # --------------------------------------------------------------- nodes
    @property
    def feature_index(self) -> torch.Tensor:
        """[F, 3] (layer, position, latent) of every feature node, in node order."""
        return torch.cat([torch.stack([torch.full_like(l.positions, L), l.positions, l.latents], 1)
                          for L, l in enumerate(self.layers)])

    @property
    def feature_values(self) -> torch.Tensor:
        return torch.cat([l.values for l in self.layers])

    def encoder_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """W_enc columns [len(rows), d_in] of feature nodes `rows`."""
        idx = self.feature_index[rows]
        return torch.stack([self.layers[int(L)].transcoder.W_enc[:, int(f)] for L, _, f in idx.tolist()])

    # --------------------------------------------------------------- the forward, for checks and interventions
    def forward(self, feature_values: torch.Tensor | None = None, errors: bool = True,
                embed: torch.Tensor | None = None) -> dict[str, Any]:
        """The frozen model's logits (last position) and every feature's pre-activation, from the given feature
        values (default: the clean ones), with or without the error nodes."""
        vals = self.feature_values if feature_values is None else feature_values
        x = (self.embed if embed is None else embed).clone()
        pre = []
        for layer in self.layers:
            x = x + layer.attn(layer.ln1(x))
            x2 = layer.ln2(x)
            t = layer.transcoder
            pre.append(((x2 - t.input_shift)[layer.positions] * t.W_enc[:, layer.latents].t()).sum(-1)
                       + t.b_enc[layer.latents])
            v = vals[layer.offset: layer.offset + len(layer.positions)]
            out = torch.zeros_like(x).index_add_(0, layer.positions, v[:, None] * t.W_dec[layer.latents]) + t.b_dec
            if t.W_skip is not None:
                out = out + t.skip_path(x2)
            if errors:
                out = out + layer.error
            out[0] = layer.mlp_out[0]
            x = x + out
        logits = self.ln_final(x)[-1] @ self.W_U + self.b_U
        return {"logits": logits, "pre": torch.cat(pre)}

    @torch.no_grad()
    def check(self, grab: dict[str, torch.Tensor], tol: float = 1e-3) -> None:
        """The frozen pieces rebuild the clean forward: each layer's attention, the MLP input, the logits."""
        x = self.embed
        for L, layer in enumerate(self.layers):
            x = x + layer.attn(layer.ln1(x))
            ref = grab[f"blocks.{L}.hook_resid_mid"]
            if (x - ref).abs().max() > tol * ref.abs().max():
                raise SaekitError(f"{model_id(self.model)}: the frozen attention of layer {L} does not rebuild the "
                                  f"model's (max error {(x - ref).abs().max():.3g}); attribution supports models with "
                                  "sequential blocks, LayerNorm or RMSNorm and standard attention.")
            x = ref + layer.mlp_out
        logits = self.forward()["logits"]
        err = (logits - self.logits).abs().max()
        if err > tol * max(1.0, self.logits.abs().max().item()):
            raise SaekitError(f"the local replacement model's logits differ from {model_id(self.model)}'s by {err:.3g}")

    # --------------------------------------------------------------- the backward
    @torch.no_grad()
    def rows(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Direct effects on a batch of targets: target i reads `vectors[i]` at the MLP input of layer
        `layers[i]` (layer n_layers: the final norm's output) at `positions[i]`. Returns [T, n_nodes - n_logits]
        over (features, errors by layer and position, token embeddings)."""
        T, n = len(layers), self.n
        out = torch.zeros(T, self.n_features + (self.n_layers + 1) * n)
        g = torch.zeros(T, n, self.embed.shape[1])
        rows = torch.arange(T)
        final = layers == self.n_layers
        if final.any():
            g[rows[final]] = self.ln_final.backward(_at(vectors[final], positions[final], n))
        top = int(layers.max())
        for L in range(min(top, self.n_layers - 1), -1, -1):
            layer = self.layers[L]
            t = layer.transcoder
            if L < top:  # sources of this layer write into resid_post L
                cols = layer.offset
                for p in layer.positions.unique().tolist():
                    sel = (layer.positions == p).nonzero().squeeze(1)
                    w = t.W_dec[layer.latents[sel]] * layer.values[sel, None]
                    out[:, cols + sel] = g[:, p] @ w.t()
                out[:, self.n_features + L * n: self.n_features + (L + 1) * n] = (g * layer.error).sum(-1)
                if t.W_skip is not None:
                    gs = g @ t.W_skip
                    gs[:, 0] = 0
                    g = g + layer.ln2.backward(gs)
            here = layers == L
            if here.any():
                g_in = layer.ln2.backward(_at(vectors[here], positions[here], n))
                g[rows[here]] += g_in
            g = g + layer.ln1.backward(layer.attn.backward(g))
        out[:, -n:] = (g * self.embed).sum(-1)
        return out


def _at(vectors: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """[T, d] vectors placed at their positions of an [T, n, d] zero tensor."""
    g = torch.zeros(len(vectors), n, vectors.shape[1])
    g[torch.arange(len(vectors)), positions] = vectors
    return g


def _maybe(module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t.detach().float() if isinstance(t, torch.Tensor) else None


def _norm_params(norm, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(effective weight, bias) of a norm: Gemma-style RMSNorms scale by (1 + weight)."""
    module = getattr(norm, "original_component", norm)
    weight = next((getattr(module, a) for a in ("weight", "w") if isinstance(getattr(module, a, None), torch.Tensor)),
                  None)
    bias = next((getattr(module, a) for a in ("bias", "b") if isinstance(getattr(module, a, None), torch.Tensor)),
                None)
    if weight is None:
        raise SaekitError(f"cannot read the weight of {type(module).__name__}: attribution supports LayerNorm and "
                          "RMSNorm models.")
    weight = weight.detach().float()
    if getattr(cfg, "rmsnorm_uses_offset", False) and bias is None:
        weight = 1.0 + weight
    return weight, bias.detach().float() if bias is not None else None


# ----------------------------------------------------------------------------- logit targets

@dataclass
class LogitTarget:
    token: str
    """The token (or "A|B" for a contrast)."""
    vocab_index: int
    """Its id (a contrast: A's)."""
    probability: float
    """The model's probability of it (a contrast: of A); logit nodes are weighted by it."""
    vector: torch.Tensor = field(repr=False)
    """The unembedding direction read: W_U[:, t] − mean over the vocabulary (a contrast: W_U[:, A] − W_U[:, B])."""
    contrast: int | None = None
    """A contrast's B."""

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """What the node reads from logits [..., vocab]."""
        if self.contrast is not None:
            return logits[..., self.vocab_index] - logits[..., self.contrast]
        return logits[..., self.vocab_index] - logits.mean(-1)


def logit_targets(rep: LocalReplacement, tokenizer, target: str | int | Sequence[str] | tuple | None = None,
                  cfg: AttributionConfig = AttributionConfig()) -> list[LogitTarget]:
    """The logit nodes: the likeliest next tokens (None), one token (text or id), a list of tokens, or a
    contrast "A-B" / ("A", "B")."""
    probs = rep.logits.softmax(-1)
    W = rep.W_U
    mean = W.mean(1)

    def one(text_or_id: str | int) -> int:
        if isinstance(text_or_id, int):
            if not 0 <= text_or_id < W.shape[1]:
                raise SaekitError(f"token id {text_or_id} is outside the vocabulary (0–{W.shape[1] - 1}).")
            return text_or_id
        ids = tokenizer(text_or_id, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise SaekitError(f"the target {text_or_id!r} is {len(ids)} tokens ({pieces}), not one; pick a single "
                              "token (often with its leading space, e.g. ' Paris').")
        return ids[0]

    if target is None:
        order = probs.argsort(descending=True)[: cfg.max_logits]
        keep = int((probs[order].cumsum(0) < cfg.logit_probability).sum()) + 1
        ids = order[: min(keep, len(order))].tolist()
        return [LogitTarget(tokenizer.decode([i]), i, probs[i].item(), W[:, i] - mean) for i in ids]
    if isinstance(target, tuple) or (isinstance(target, str) and "|" in target):
        a, b = target if isinstance(target, tuple) else target.split("|", 1)
        ia, ib = one(a), one(b)
        name = f"{tokenizer.decode([ia])}|{tokenizer.decode([ib])}"
        return [LogitTarget(name, ia, probs[ia].item(), W[:, ia] - W[:, ib], contrast=ib)]
    items = [target] if isinstance(target, (str, int)) else list(target)
    return [LogitTarget(tokenizer.decode([i]), i, probs[i].item(), W[:, i] - mean) for i in map(one, items)]




# ----------------------------------------------------------------------------- attribute

def attribute(model, transcoders: dict[int, SparseAutoencoder], prompt: str | Sequence[int],
              target: str | int | Sequence[str] | tuple[str, str] | None = None,
              cfg: AttributionConfig | None = None, progress: bool = True) -> Graph:
    """The attribution graph of `prompt` (text, or token ids with BOS first) in the local replacement model.

    target: None (the likeliest next tokens, up to cfg.max_logits / cfg.logit_probability), a token ("Paris"
    or " Paris": one token), a list of tokens, or a contrast "A|B" / ("A", "B") (logit difference)."""
    from .steer import prompt_tokens

    cfg = cfg or AttributionConfig()
    tokenizer = model.tokenizer
    ids = prompt_tokens(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if len(ids) > cfg.max_tokens:
        raise SaekitError(f"the prompt is {len(ids)} tokens (BOS included) and the limit is {cfg.max_tokens}: "
                          "shorten it, or raise it (--max-tokens; memory and time grow with it).")
    start = time.perf_counter()
    tokens = torch.tensor(ids)
    rep = LocalReplacement(model, transcoders, tokens)
    targets = logit_targets(rep, tokenizer, target, cfg)
    n, L = rep.n, rep.n_layers
    F = rep.n_features
    n_sources = F + (L + 1) * n
    budget = F if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, F)
    B = cfg.batch_size
    timings: list[float] = []

    def run(layers, positions, vectors):
        t0 = time.perf_counter()
        rows = rep.rows(layers, positions, vectors)
        timings.append(time.perf_counter() - t0)
        return rows

    logit_vectors = torch.stack([t.vector for t in targets])
    logit_rows = torch.cat([run(torch.full((len(c),), L), torch.full((len(c),), n - 1), c)
                            for c in logit_vectors.split(B)])
    probs = torch.tensor([t.probability for t in targets])
    index = rep.feature_index
    feature_rows = torch.zeros(budget, n_sources)
    visited = torch.zeros(F, dtype=torch.bool)
    order: list[int] = []
    bar = tqdm(total=budget, desc="attribution", unit="node", disable=not progress)
    while len(order) < budget:
        if budget == F:
            pending = torch.arange(F)
        else:  # the unvisited features likeliest to matter, by influence through the rows computed so far
            done = torch.tensor(order, dtype=torch.long)
            infl = partial_influence(feature_rows[: len(order)], done, logit_rows, probs, F)
            rank = infl.argsort(descending=True)
            pending = rank[~visited[rank]][: min(cfg.update_interval * B, budget - len(order))]
        for chunk in pending.split(B):
            rows = run(index[chunk, 0], index[chunk, 1], rep.encoder_vectors(chunk))
            feature_rows[len(order): len(order) + len(chunk)] = rows
            order += chunk.tolist()
            visited[chunk] = True
            bar.update(len(chunk))
            tp = len(order) / max(sum(timings), 1e-9)
            bar.set_postfix_str(f"{tp:,.0f} nodes/s")
    bar.close()
    meta = {"model": model_id(model), "seconds": time.perf_counter() - start, "backward_batches": len(timings),
            "seconds_per_batch": sum(timings) / max(len(timings), 1), "batch_size": B,
            "active_features": F, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return Graph.assemble(tokens=ids, token_strings=[tokenizer.decode([i]) for i in ids], features=index,
                          activations=rep.feature_values, selected=torch.tensor(order, dtype=torch.long),
                          feature_rows=feature_rows, logit_rows=logit_rows, targets=targets, n_layers=L, meta=meta)



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


# ----------------------------------------------------------------------------- `saekit attribute`

def strongest_path(graph: Graph, target: int = 0) -> list[int]:
    """From a logit node back to a token: at each step the input with the largest |direct effect|."""
    node, path = graph.logit_start + target, [graph.logit_start + target]
    while node < graph.error_start or node >= graph.logit_start:
        row = graph.adjacency[node].clone()
        row[graph.error_start: graph.token_start] = 0  # errors explain nothing: follow features and tokens
        if not row.abs().any():
            break
        node = int(row.abs().argmax())
        path.append(node)
    return path[::-1]


def describe_node(graph: Graph, i: int) -> str:
    n = graph.node(i)
    if n["kind"] == "feature":
        return f"L{n['layer']}#{n['latent']}@{n['position']} ({graph.token_strings[n['position']]!r}, a={n['activation']:.2f})"
    if n["kind"] == "token":
        return f"token {n['token']!r}@{n['position']}"
    if n["kind"] == "logit":
        return f"logit {n['token']!r} (p={n['probability']:.2f})"
    return f"error L{n['layer']}@{n['position']}"


def attribution_report(graph: Graph, validation: dict[str, Any] | None, node_threshold: float = 0.8,
                       edge_threshold: float = 0.98) -> tuple[dict[str, Any], str]:
    """(report.json's content, report.md's text) of a graph: targets, size, scores, top nodes, the strongest
    path and the validation."""
    pruned = graph.prune(node_threshold, edge_threshold)
    full, kept = graph.scores(), graph.scores(pruned)
    inf = graph.node_influence()
    S = graph.n_features
    top = inf[:S].argsort(descending=True)[:10].tolist()
    path = strongest_path(graph)
    m = graph.meta
    rep = {"prompt_tokens": graph.token_strings, "targets": graph.targets, "feature_nodes": S,
           "active_features": m.get("active_features"), "nodes": graph.n_nodes,
           "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": int(pruned.edge_mask.sum()),
           "scores": full, "scores_pruned": kept, "thresholds": [node_threshold, edge_threshold],
           "top_features": [{**graph.node(i), "influence": float(inf[i]),
                             "direct_effect_on_target": float(graph.adjacency[graph.logit_start, i])} for i in top],
           "strongest_path": [describe_node(graph, i) for i in path], "validation": validation,
           "seconds": m.get("seconds"), "seconds_per_batch": m.get("seconds_per_batch"),
           "backward_batches": m.get("backward_batches")}
    lines = [f"# Attribution graph: {''.join(graph.token_strings)!r}", "",
             "Targets: " + ", ".join(f"{t['token']!r} (p={t['probability']:.3f})" for t in graph.targets),
             f"{S:,} feature nodes of {m.get('active_features', S):,} active; {graph.n_nodes:,} nodes; built in "
             f"{m.get('seconds', 0):.1f} s ({m.get('backward_batches')} backward batches, "
             f"{m.get('seconds_per_batch', 0):.2f} s each).", "",
             f"| graph | nodes | replacement score | completeness score |", "|---|---|---|---|",
             f"| unpruned | {graph.n_nodes:,} | {full['replacement']:.3f} | {full['completeness']:.3f} |",
             f"| pruned ({node_threshold}, {edge_threshold}) | {int(pruned.node_mask.sum()):,} | "
             f"{kept['replacement']:.3f} | {kept['completeness']:.3f} |", "",
             "Strongest path: " + " → ".join(describe_node(graph, i) for i in path), "",
             "| feature | influence | direct effect on the first target |", "|---|---|---|"]
    lines += [f"| {describe_node(graph, i)} | {inf[i]:.4f} | {graph.adjacency[graph.logit_start, i]:+.3f} |"
              for i in top]
    if validation:
        a, d = validation["ablation"], validation["doubling"]
        lines += ["", f"**Validation in the real model** (top {validation['nodes']} feature nodes by influence, target "
                  f"{validation['target']!r}): Spearman ρ between the graph's predicted and the measured change of "
                  f"the target — ablation {a['rho']:+.2f} [{a['low']:+.2f}, {a['high']:+.2f}], doubling "
                  f"{d['rho']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] (95% intervals); direct edges alone, "
                  f"ablation {validation['ablation_direct_only']['rho']:+.2f}."]
    return rep, "\n".join(lines) + "\n"


def attribute_to_dir(transcoders_dir: str | Path, prompt: str, out: str | Path, target: str | None = None,
                     cfg: AttributionConfig | None = None, validate_top: int = 20, model_arg: str | None = None,
                     device: str = "cpu", overwrite: bool = False) -> Graph:
    """`saekit attribute`: the graph of `prompt` on a transcoder set → OUT/graph.json + graph.safetensors,
    OUT/report.md + report.json (scores, top nodes, the strongest path, validation in the real model)."""
    from .config import DataConfig
    from .files import claim_output, read_json, write_json
    from .lm import load_model
    from .runner import check_every_layer, transcoder_set

    def differs(p: Path) -> str | None:
        meta = read_json(p / "graph.json").get("meta", {})
        same = meta.get("prompt") == prompt and meta.get("transcoders") == str(Path(transcoders_dir).resolve())
        return None if same else f"of {meta.get('prompt')!r} on {meta.get('transcoders')}"

    out = claim_output(out, "an attribution graph", lambda p: (p / "graph.json").is_file(), overwrite, differs)
    tcs = transcoder_set(transcoders_dir, "an attribution graph is built on transcoders")
    first = tcs[min(tcs)]
    data = DataConfig.from_manifest(first.info, model=model_arg)
    model = load_model(data.model, device)
    check_every_layer(tcs, model.cfg.n_layers, Path(transcoders_dir), "an attribution graph needs a transcoder at "
                      "every MLP", "or point --transcoders at a complete set")
    graph = attribute(model, tcs, prompt, target or None, cfg)
    graph.meta.update({"transcoders": str(Path(transcoders_dir).resolve()), "prompt": prompt})
    validation = validate(model, tcs, graph, validate_top) if validate_top else None
    rep, md = attribution_report(graph, validation)
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out)
    write_graph_json(graph, out / "graph-frontend.json")  # opens in circuit-tracer's / Neuronpedia's graph frontend
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(md)
    print(md)
    return graph

