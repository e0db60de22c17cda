"""What the Graph page loads besides the page itself: the graph folders under --graphs, and the model and
transcoder set behind a graph, loaded once per server: each
feature's top tokens (its decoder row through the unembedding), and interventions on feature nodes in the real
model — the new top logits (saekit.attribution.edit_features) and a continuation generated beside the baseline
(saekit.steer's sampling loop, baseline and edited rows in one batch from the same seed).

An edit of feature node (layer L, position p, latent f) by Δ adds Δ·W_dec[f] to blocks.L.hook_mlp_out at position p
(set to v: Δ = v − a; scale by s: Δ = (s − 1)·a, a its activation in the graph), as edit_features and the graph's
validation do. Positions are prompt positions: generated tokens are not edited, but they attend to the edited
prompt (its keys and values in the KV cache are the edited ones)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import steer as S
from saekit.attribution.graph import Graph
from saekit.errors import SaekitError
from saekit.lm import mlp_pair
from saekit.sae import SparseAutoencoder
from saekit.tokens import Vocab, display_token

GRAPH_FILE = "graph.json"
PATCHING_FILE = "nodes.json"  # saekit attribute --saes: a ranked node list, no graph
RESULT_FILES = (GRAPH_FILE, PATCHING_FILE)


def graph_dirs(root: str | Path) -> list[Path]:
    """The result folders of `--graphs ROOT` (an attribution graph's graph.json, or attribution patching's
    nodes.json): ROOT itself when it holds one, else its sub-folders that do."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SaekitError(f"--graphs {root} does not exist (or is no folder): pass a folder written by `saekit attribute "
                          "--out DIR`, or a folder of such folders (e.g. runs/graphs).")
    if any((root / f).is_file() for f in RESULT_FILES):
        return [root]
    found = sorted({p.parent for f in RESULT_FILES for p in root.glob(f"*/{f}")})
    if not found:
        raise SaekitError(f"--graphs {root} holds no attribution graph (no graph.json or nodes.json in it or in its "
                          f"sub-folders): write one with `saekit attribute --transcoders SET --prompt TEXT --out "
                          f"{root}/NAME` (or --saes SAES --prompts FILE).")
    return found


@dataclass(frozen=True)
class NodeEdit:
    """Feature node (layer, position, latent) of activation `activation`: set to `value`, or scaled by it."""

    layer: int
    position: int
    latent: int
    activation: float
    mode: str  # "set" | "scale"
    value: float

    @property
    def delta(self) -> float:
        return self.value - self.activation if self.mode == "set" else (self.value - 1.0) * self.activation

    def describe(self) -> str:
        what = f"L{self.layer}#{self.latent}@{self.position}"
        how = f"set {self.activation:.3g} → {self.value:g}" if self.mode == "set" else f"× {self.value:g}"
        return f"{what} {how} (Δ {self.delta:+.3g}·W_dec)"


def transcoders_in(path: Path) -> dict[int, SparseAutoencoder]:
    """The transcoder of each layer in a set (the folder `saekit attribute --transcoders` was given): the
    dictionaries up to two levels below it, by the layer of their input hook."""
    from saekit.lm import hook_layer
    from saekit.sae import CFG_FILE, WEIGHTS_FILE, load_sae

    if not path.is_dir():
        raise SaekitError(f"the graph's transcoder set {path} is gone; the top tokens and interventions need it (the "
                          "graph itself is shown without them). Rebuild the graph from the set's new place with "
                          "`saekit attribute`.")
    dirs = [path] if (path / CFG_FILE).is_file() else sorted(
        {p.parent for pat in (f"*/{WEIGHTS_FILE}", f"*/*/{WEIGHTS_FILE}") for p in path.glob(pat)
         if (p.parent / CFG_FILE).is_file()})
    out: dict[int, SparseAutoencoder] = {}
    for d in dirs:
        t = load_sae(d)
        if t.is_transcoder and (layer := hook_layer(t.hook or "")) is not None:
            t.info.setdefault("directory", str(d))
            out[layer] = t
    if not out:
        raise SaekitError(f"{path} holds no transcoder (a folder with cfg.json and sae_weights.safetensors).")
    return out


class NodeSteering(S.Steering):
    """Constant adds at prompt positions of several MLP outputs, in the batch rows `rows` only: the Steering that
    saekit.steer's sampling loop drives (it sets `offset` each step), for edits that belong to no one dictionary.
    `deltas[L]` [n, d] is what is added to blocks.L.hook_mlp_out at the n prompt positions."""

    def __init__(self, deltas: dict[int, torch.Tensor], any_transcoder: SparseAutoencoder, rows: torch.Tensor):
        # Steering.__init__ takes one dictionary's edits; these are per layer and position, so only the fields the
        # sampling loop and steer() read are set.
        self.sae, self.edits, self.deltas = any_transcoder, [], deltas
        self.hook, self.read = mlp_pair(min(deltas))[1], None
        self.scale, self.prompt_len, self.rows, self.edit_bos = None, None, rows, True
        self.offset, self._next, self._input, self.calls, self._add_unit = None, 0, None, 0, {}

    def hooks(self):
        return [(mlp_pair(L)[1], self._adder(L)) for L in sorted(self.deltas)]

    def _adder(self, L: int):
        delta = self.deltas[L]

        def add(act: torch.Tensor, hook=None) -> torch.Tensor:
            self.calls += 1
            x = act[None] if act.dim() == 2 else act
            start, T, n = self.offset or 0, x.shape[1], delta.shape[0]
            if start >= n:
                return act  # a generated token: only prompt positions are edited
            stop = min(start + T, n)
            change = torch.zeros(x.shape[0], T, x.shape[2], dtype=torch.float32, device=x.device)
            change[:, : stop - start] = delta[start:stop].to(x.device)
            change *= self.rows.to(x.device)[:, None, None]
            y = (x.float() + change).to(x.dtype)
            return y[0] if act.dim() == 2 else y
        return add


class GraphModel:
    """The model and transcoder set a graph was built on (graph.meta["transcoders"]). Calls that run the model take
    `lock` (hooks go on the shared model for the call's duration)."""

    def __init__(self, transcoders: str | Path, graph_model: str | None = None):
        from saekit.config import DataConfig
        from saekit.lm import load_model, model_id, unembedding

        self.path = Path(transcoders)
        self.transcoders = transcoders_in(self.path)
        first = self.transcoders[min(self.transcoders)]
        self.model = load_model(DataConfig.from_manifest(first.info).model)
        if graph_model is not None and model_id(self.model) != graph_model:
            raise SaekitError(f"the graph was built on {graph_model!r}, but its transcoder set {self.path} now names "
                              f"{model_id(self.model)!r}: rebuild the graph with `saekit attribute`.")
        W_U, w = unembedding(self.model)
        self.W_U = W_U.float() * (w.float()[:, None] if w is not None else 1.0)  # (v ⊙ w_norm) · W_U = v · (w ⊙ W_U)
        self.tokenizer = self.model.tokenizer
        self.vocab = Vocab.from_tokenizer(self.tokenizer)  # partial characters shown as \xNN, not �
        self.lock = threading.Lock()
        self._tops: dict[tuple[int, int], list[str]] = {}

    def transcoder(self, layer: int) -> SparseAutoencoder:
        if layer not in self.transcoders:
            raise SaekitError(f"the transcoder set {self.path} has no transcoder for layer {layer}.")
        return self.transcoders[layer]

    @torch.no_grad()
    def top_tokens(self, nodes: list[tuple[int, int]], n: int = 5) -> dict[tuple[int, int], list[str]]:
        """{(layer, latent): the n tokens its decoder row promotes most} (W_dec[f] ⊙ final-norm weight) · W_U;
        computed once per feature."""
        todo = [k for k in dict.fromkeys(nodes) if k not in self._tops]
        for chunk in range(0, len(todo), 256):
            part = todo[chunk: chunk + 256]
            rows = torch.stack([self.transcoder(L).W_dec[f].detach().float() for L, f in part])
            top = (rows @ self.W_U).topk(n, dim=1).indices
            for k, ids in zip(part, top.tolist()):
                self._tops[k] = [self.token(i) for i in ids]
        return {k: self._tops[k] for k in nodes}

    def token(self, i: int) -> str:
        """Token i on its own, as the feature pages show tokens (␣ for a space, \\xNN for part of a character)."""
        return display_token(self.vocab.token_str(i))

    def _edits(self, edits: list[NodeEdit]) -> list[tuple[int, int, int, float]]:
        for e in edits:
            self.transcoder(e.layer)
        return [(e.layer, e.position, e.latent, e.delta) for e in edits]

    def logits(self, graph: Graph, edits: list[NodeEdit]) -> tuple[torch.Tensor, torch.Tensor]:
        """(baseline, edited) last-position logits of the real model on the graph's prompt."""
        from saekit.attribution import edit_features

        rows = self._edits(edits)
        tcs = {L: self.transcoder(L) for L, *_ in rows}
        with self.lock:
            out = edit_features(self.model, tcs, graph.tokens, [rows])
        return out[-1], out[0]

    def stream(self, graph: Graph, edits: list[NodeEdit], seed: int = 0, max_new_tokens: int = 30,
               temperature: float = 1.0) -> S.GenerationStream:
        """Baseline and edited continuations of the graph's prompt, token by token (saekit.steer's loop: the
        plain HF model with its KV cache where that is exact, one CPU thread). Hold `lock` while consuming it."""
        rows = self._edits(edits)
        n = len(graph.tokens)
        deltas: dict[int, torch.Tensor] = {}
        for L, p, f, d in rows:
            t = self.transcoder(L)
            deltas.setdefault(L, torch.zeros(n, t.W_dec.shape[1]))[p] += d * t.W_dec[f].detach().float()
        steering = NodeSteering(deltas, self.transcoder(rows[0][0]), torch.tensor([False, True]))
        steps = S.sampling(self.model, list(graph.tokens), 2, max_new_tokens, seed, temperature, steering,
                           threads=1)
        prompt = self.tokenizer.decode(graph.tokens[1:])
        return S.GenerationStream(S._tokens(self.tokenizer, steps, prompt, [e.describe() for e in edits], seed,
                                            temperature, max_new_tokens))
