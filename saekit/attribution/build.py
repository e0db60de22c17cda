"""Building a graph: its logit targets, then the rows of the logit and feature nodes, features visited in order
of their influence on the logits within the budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import AttributionConfig
from ..errors import SaekitError
from ..lm import model_id
from ..sae import SparseAutoencoder
from .graph import Graph, partial_influence
from .replacement import LocalReplacement

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


def single_token(tokenizer, text_or_id: str | int, vocab: int) -> int:
    """A target's token id: an id in the vocabulary, or a text that is exactly one token."""
    if isinstance(text_or_id, int):
        if not 0 <= text_or_id < vocab:
            raise SaekitError(f"token id {text_or_id} is outside the vocabulary (0–{vocab - 1}).")
        return text_or_id
    ids = tokenizer(text_or_id, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise SaekitError(f"the target {text_or_id!r} is {len(ids)} tokens ({pieces}), not one; pick a single "
                          "token (often with its leading space, e.g. ' Paris').")
    return ids[0]


def logit_targets(rep: LocalReplacement, tokenizer, target: str | int | Sequence[str] | tuple | None = None,
                  cfg: AttributionConfig = AttributionConfig()) -> list[LogitTarget]:
    """The logit nodes: the likeliest next tokens (None), one token (text or id), a list of tokens, or a
    contrast "A-B" / ("A", "B")."""
    probs = rep.logits.softmax(-1)
    W = rep.W_U
    mean = W.mean(1)

    def one(text_or_id: str | int) -> int:
        return single_token(tokenizer, text_or_id, W.shape[1])

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
    from ..steer import prompt_tokens

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
