"""The local replacement model of one prompt: every MLP replaced by its transcoder, error nodes added back,
attention patterns and norm denominators frozen from the clean forward; its forward (for checks and
interventions) and an explicit batched backward giving direct effects (see saekit.attribution)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SaekitError
from ..lm import mlp_pair, model_id
from ..sae import SparseAutoencoder

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
        return torch.cat([torch.stack([torch.full_like(lay.positions, L), lay.positions, lay.latents], 1)
                          for L, lay in enumerate(self.layers)])

    @property
    def feature_values(self) -> torch.Tensor:
        return torch.cat([lay.values for lay in self.layers])

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
