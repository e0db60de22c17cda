"""Dictionaries: an input hook's activation x → sparse latents z → a prediction of the output hook's.

    SAE (in = out):   z = TopK(W_encᵀ(x − b_dec) + b_enc)   x̂ = W_decᵀ z + b_dec
    transcoder:       z = TopK(W_encᵀ x + b_enc)             ŷ = W_decᵀ z + b_dec (+ W_skip x: skip-transcoder)

TopK (Gao et al. 2024) keeps k latents per token; BatchTopK (Bussmann et al. 2024) k·batch over a batch and a
threshold at inference; Matryoshka is BatchTopK whose nested prefixes each reconstruct the target (the
prefixes are a training loss: inference is BatchTopK's). ReLU on the kept values; W_dec rows unit-norm.

Shapes follow the ecosystem: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
W_skip [d_out, d_in] (SAELens's and sparsify's). A saved directory (cfg.json + sae_weights.safetensors) loads
in SAELens where SAELens has the architecture; saekit's own fields live under cfg["saekit"]. This module knows
nothing of models or text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import ops
from .config import SaeConfig
from .errors import FileFormatError, OptionError, ShapeError
from .files import read_json, read_tensors, replacing, tensors_hash, write_json, write_tensors

WEIGHTS_FILE = "sae_weights.safetensors"
KNOWN_ARCHITECTURES = ("topk", "jumprelu", "topk_transcoder", "topk_skip_transcoder", "jumprelu_transcoder",
                       "jumprelu_skip_transcoder")
CFG_FILE = "cfg.json"
FORMAT_VERSION = 1


class Across(Protocol):
    """How a data-parallel run joins the processes' parts of one batch (saekit.dist provides it)."""

    batch_tokens: int
    """Tokens in the global batch."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t`, concatenated."""
        ...

    def min(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over the processes."""
        ...


def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances (robust b_dec init)."""
    points = points.double()
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(eps)
        y_next = (w[:, None] * points).sum(0) / w.sum()
        if (y_next - y).norm() < eps * (1 + y.norm()):
            y = y_next
            break
        y = y_next
    return y.float()


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SaeConfig, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.out_dim, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_dim, **kw))
        self.W_skip = nn.Parameter(torch.zeros(cfg.out_dim, cfg.d_in, **kw)) if cfg.skip else None
        # A transcoder's b_dec lives in the output space: its encoder shifts its input by nothing.
        self.register_buffer("_no_shift", torch.zeros(cfg.d_in, **kw), persistent=False)
        # BatchTopK's inference threshold: running mean of the smallest kept activation.
        self.register_buffer("threshold", torch.zeros((), **kw))
        self.info: dict[str, Any] = {}  # hook, model, manifest … carried into cfg.json

    # ------------------------------------------------------------------ init
    @classmethod
    def initialized(cls, cfg: SaeConfig, sample: torch.Tensor | None = None, seed: int = 0,
                    device: torch.device | str | None = None, enc_scale: float = 1.0,
                    target: torch.Tensor | None = None, init: str = "tied") -> SparseAutoencoder:
        """b_enc = 0 and random unit-norm decoder rows with, by `init`:
          tied          W_enc = enc_scale·W_decᵀ (an SAE's init; needs d_in = d_out)
          independent   W_enc = enc_scale × random unit columns of its own
          zero_decoder  sparsify's transcoder init: W_dec = 0, so each row starts along its first gradient (the
                        direction its latent's activations correlate with the target's error); W_enc ~ U(±1/√d_in)
                        and b_enc = −mean(sample)·W_enc, centring the sample's pre-activations
        b_dec: the geometric median of `sample` (an SAE) or the mean of `target` (a transcoder: its target's offset)."""
        if init not in ("tied", "independent", "zero_decoder"):
            raise ValueError(f"init must be tied, independent or zero_decoder, not {init!r}")
        if init == "tied" and cfg.out_dim != cfg.d_in:
            raise ShapeError(f"a tied init needs d_in = d_out (here {cfg.d_in} and {cfg.out_dim}); use another init.")
        if sample is not None and sample.shape[-1] != cfg.d_in:
            raise ShapeError(f"sample has width {sample.shape[-1]} but the SAE's d_in is {cfg.d_in}.")
        sae = cls(cfg, device=device)
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(cfg.d_sae, cfg.out_dim, generator=gen)
        W /= W.norm(dim=1, keepdim=True)
        if init == "tied":
            E = W.t() * enc_scale
        elif init == "independent":
            E = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
            E = (E / E.norm(dim=1, keepdim=True)).t() * enc_scale
        else:
            E = (torch.rand(cfg.d_in, cfg.d_sae, generator=gen) * 2 - 1) / math.sqrt(cfg.d_in)
            W.zero_()
        with torch.no_grad():
            sae.W_dec.copy_(W)
            sae.W_enc.copy_(E)
            if init == "zero_decoder" and sample is not None:
                sae.b_enc.copy_(-sample[:16384].float().mean(0).to(E.device) @ E)
            if cfg.transcoder and target is not None:
                if target.shape[-1] != cfg.out_dim:
                    raise ShapeError(f"the target has width {target.shape[-1]} but d_out is {cfg.out_dim}.")
                sae.b_dec.copy_(target[:16384].float().mean(0))
            elif sample is not None and not cfg.transcoder:
                sae.b_dec.copy_(geometric_median(sample[:16384].cpu()))
        return sae

    # ------------------------------------------------------------------ forward
    @property
    def is_transcoder(self) -> bool:
        return self.cfg.transcoder

    @property
    def batch_level(self) -> bool:
        """Whether latents are picked over the batch in training and by a threshold at inference."""
        return self.cfg.architecture in ("batchtopk", "matryoshka")

    @property
    def input_shift(self) -> torch.Tensor:
        """What the encoder subtracts from x: b_dec for an SAE, nothing for a transcoder."""
        return self._no_shift if self.cfg.transcoder else self.b_dec

    @property
    def k_candidates(self) -> int:
        """Per-token candidates kept by BatchTopK (a token may use more than k latents)."""
        return min(self.cfg.d_sae, 4 * self.cfg.k) if self.batch_level else self.cfg.k

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes (values [N, K], indices [N, K]); K = k for TopK. BatchTopK applies its threshold
        (JumpReLU-style), so some values are 0 and L0 varies per token."""
        values, indices = ops.topk_preacts(x, self.W_enc, self.b_enc, self.input_shift, self.k_candidates)
        values = values.relu()
        if self.batch_level:
            values = values * (values > self.threshold)
        return values, indices

    def encode_train(self, x: torch.Tensor, aux_mask: torch.Tensor | None = None, k_aux: int = 0,
                     across: Across | None = None):
        """Differentiable encode for training: (values, indices, aux_values, aux_indices).

        BatchTopK keeps the k·batch largest values of the batch; in a data-parallel run `across` joins every
        process's candidates so the cutoff and the threshold are those of the global batch."""
        values, indices, aux_v, aux_i = ops.encode_topk(x, self.W_enc, self.b_enc, self.input_shift,
                                                         self.k_candidates, aux_mask, k_aux)
        if self.batch_level:
            keep = self.cfg.k * (across.batch_tokens if across is not None else x.shape[0])
            flat = values.detach().flatten().float()
            cand = flat.topk(min(keep, flat.numel()), sorted=False).values
            if across is not None:  # every global winner is among its own process's local winners
                padded = torch.full((keep,), -math.inf, device=x.device)
                padded[: len(cand)] = cand
                cand = across.gather(padded)
            cutoff = cand.topk(min(keep, cand.numel()), sorted=False).values.min()
            values = values * (values >= cutoff)
            if self.training:
                kept = values.detach()[values.detach() > 0]
                low = (kept.min() if kept.numel() else torch.tensor(math.inf, device=x.device)).float().reshape(1)
                low = across.min(low)[0] if across is not None else low[0]
                if torch.isfinite(low):  # the first batch sets it; an EMA from 0 would take ~300 steps to arrive
                    self.threshold.lerp_(low.to(self.threshold.dtype), 0.01 if self.threshold > 0 else 1.0)
        return values, indices, aux_v, aux_i

    def decode(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction from sparse codes; a skip-transcoder also needs the input x for its dense path."""
        out = ops.sparse_decode(values, indices, self.W_dec, self.b_dec)
        return out if self.W_skip is None else out + self.skip_path(x)

    def skip_path(self, x: torch.Tensor | None) -> torch.Tensor:
        if x is None:
            raise ValueError("a skip-transcoder's decode needs the input x (decode(values, indices, x)).")
        return x.to(self.W_skip.dtype) @ self.W_skip.t()

    def prefix_decodes(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None
                       ) -> list[torch.Tensor]:
        """The prediction of each nested prefix (Matryoshka; one entry, the whole dictionary, otherwise),
        built up prefix by prefix: each adds the latents of its band to the one before."""
        out: list[torch.Tensor] = []
        lo = 0
        for hi in self.cfg.nested:
            band = values * ((indices >= lo) & (indices < hi)) if len(self.cfg.nested) > 1 else values
            part = ops.sparse_decode(band, indices, self.W_dec)
            out.append(part + (self.b_dec if self.W_skip is None else self.b_dec + self.skip_path(x))
                       if not out else out[-1] + part)
            lo = hi
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction ŷ (x̂ for an SAE) of x (no grad through the TopK selection; use encode_train to train)."""
        return self.decode(*self.encode(x), x)

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations as a dense [N, d_sae] matrix (for small inputs, e.g. the app)."""
        values, indices = self.encode(x)
        return torch.zeros(x.shape[0], self.cfg.d_sae, dtype=values.dtype, device=x.device).scatter_(1, indices, values)

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (rows stay unit-norm to first order)."""
        if self.W_dec.grad is not None:
            g, W = self.W_dec.grad, self.W_dec
            dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).squeeze(2)  # row dots, no [n, d] temporary
            g.addcmul_(dots, W, value=-1)

    def folded(self, scale: float, out_scale: float | None = None) -> SparseAutoencoder:
        """A copy that works on raw activations when this one was trained on x·scale predicting y·out_scale
        (out_scale = scale for an SAE).

        Latents come out in the target's raw units (z/out_scale): W_enc × scale/out_scale, b_enc, b_dec and the
        threshold ÷ out_scale, W_skip × scale/out_scale; the unit-norm W_dec is unchanged and every latent's
        pre-activation is scaled alike, so the TopK selection is identical.
        """
        t = scale if out_scale is None else out_scale
        out = SparseAutoencoder(self.cfg, device=self.W_enc.device)
        with torch.no_grad():
            out.W_enc.copy_(self.W_enc * (scale / t))
            out.W_dec.copy_(self.W_dec)
            out.b_enc.copy_(self.b_enc / t)
            out.b_dec.copy_(self.b_dec / t)
            out.threshold.copy_(self.threshold / t)
            if self.W_skip is not None:
                out.W_skip.copy_(self.W_skip * (scale / t))
        out.info = {**self.info, "input_scale_folded": scale} | ({"target_scale_folded": t} if out_scale else {})
        return out

    # ------------------------------------------------------------------ save / load
    def weights(self) -> dict[str, torch.Tensor]:
        w = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            w["W_skip"] = self.W_skip
        if self.batch_level:
            w["threshold"] = self.threshold.expand(self.cfg.d_sae)  # SAELens JumpReLU: per-latent
        return {k: v.detach().float().cpu() for k, v in w.items()}

    @property
    def saelens_architecture(self) -> str:
        """The architecture name cfg.json carries: SAELens's where SAELens has the same function (BatchTopK and
        Matryoshka at inference are JumpReLU with one threshold), saekit's own names for TopK transcoders."""
        act = "jumprelu" if self.batch_level else "topk"
        if not self.cfg.transcoder:
            return act
        return f"{act}_skip_transcoder" if self.cfg.skip else f"{act}_transcoder"

    def weights_hash(self) -> str:
        return tensors_hash(self.weights())

    def save(self, directory: str | Path, manifest: dict[str, Any] | None = None) -> Path:
        """Write cfg.json + sae_weights.safetensors, readable by SAELens and saekit, as a new folder swapped in
        whole: files beside the old weights (an eval.json) described those weights and go with them."""
        directory = Path(directory)
        weights = self.weights()
        info = {**self.info, **(manifest or {})}
        hook = info.get("hook")
        cfg = {
            # SAELens fields (sae_lens.SAE.load_from_disk); BatchTopK is JumpReLU with a threshold.
            "architecture": self.saelens_architecture,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            **({"d_out": self.cfg.out_dim} if self.cfg.transcoder else {}),
            "k": self.cfg.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": not self.cfg.transcoder,
            "normalize_activations": "none",
            # sae_lens_version marks the v6 cfg layout: without it SAELens re-reads the file as a pre-6
            # config and drops this metadata (hook_name would load as None).
            "metadata": {"hook_name": hook, "model_name": info.get("model"), "sae_lens_version": "6.0.0",
                         "sae_lens_training_version": None, "prepend_bos": True,
                         "context_size": info.get("context_size"), "dataset_path": info.get("dataset"),
                         **({"hook_name_out": info.get("hook_out")} if self.cfg.transcoder else {})},
            "saekit": {
                "format_version": FORMAT_VERSION,
                "sae": asdict(self.cfg),
                "weights_sha256": tensors_hash(weights),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **info,
            },
        }
        with replacing(directory) as staged:
            write_tensors(staged / WEIGHTS_FILE, weights)
            write_json(staged / CFG_FILE, cfg)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileFormatError(f"{directory} is not an SAE directory (expected {CFG_FILE} and {WEIGHTS_FILE}).")
        cfg = read_json(directory / CFG_FILE)
        arch = cfg.get("architecture", "topk")
        if arch not in KNOWN_ARCHITECTURES:
            raise FileFormatError(f"{directory} holds a {arch!r} dictionary; saekit loads TopK/BatchTopK/Matryoshka "
                                  f"SAEs and transcoders ({', '.join(KNOWN_ARCHITECTURES)}). Convert a SAELens one "
                                  "with `saekit convert`.")
        try:
            own = cfg.get("saekit", {})
            transcoder = "transcoder" in arch
            sae_cfg = SaeConfig(**own["sae"]) if "sae" in own else SaeConfig(
                d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), k=int(cfg["k"]),
                architecture="batchtopk" if arch.startswith("jumprelu") else "topk", transcoder=transcoder,
                skip="skip" in arch, d_out=int(cfg["d_out"]) if transcoder else None)
        except (KeyError, TypeError, ValueError, OptionError) as e:
            raise FileFormatError(f"{directory / CFG_FILE} lacks or mangles a field ({e}); "
                                  "a saekit/SAELens TopK cfg.json needs d_in, d_sae and k (and d_out for a "
                                  "transcoder).") from e
        w = read_tensors(directory / WEIGHTS_FILE, required=("W_enc", "b_enc", "W_dec", "b_dec")
                         + (("W_skip",) if sae_cfg.skip else ()))
        expect = {"W_enc": (sae_cfg.d_in, sae_cfg.d_sae), "b_enc": (sae_cfg.d_sae,),
                  "W_dec": (sae_cfg.d_sae, sae_cfg.out_dim), "b_dec": (sae_cfg.out_dim,)}
        if sae_cfg.skip:
            expect["W_skip"] = (sae_cfg.out_dim, sae_cfg.d_in)
        for name, shape in expect.items():
            if tuple(w[name].shape) != shape:
                raise ShapeError(f"{directory / WEIGHTS_FILE}: {name} has shape {tuple(w[name].shape)} but cfg.json "
                                 f"says {shape} (d_in {sae_cfg.d_in}, d_sae {sae_cfg.d_sae}, d_out "
                                 f"{sae_cfg.out_dim}).")
        sae = cls(sae_cfg, device=device)
        with torch.no_grad():
            for name in expect:
                getattr(sae, name).copy_(w[name])
            if "threshold" in w:
                sae.threshold.copy_(w["threshold"].double().mean())  # exact for equal values (a float32 mean is not)
        sae.info = {k: v for k, v in cfg.get("saekit", {}).items()
                    if k not in ("format_version", "sae", "weights_sha256", "saved_at")}
        for name, t in w.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FileFormatError(f"{directory / WEIGHTS_FILE}: {name} holds NaN or inf.")
        return sae

    @property
    def hook(self) -> str | None:
        """The hook read (an SAE's only hook; a transcoder's MLP input)."""
        return self.info.get("hook")

    @property
    def hook_out(self) -> str | None:
        """The hook predicted: the MLP output for a transcoder, the hook read for an SAE."""
        return self.info.get("hook_out") if self.cfg.transcoder else self.hook

    @property
    def kind(self) -> str:
        return ("skip-transcoder" if self.cfg.skip else "transcoder") if self.cfg.transcoder else "sae"

    def extra_repr(self) -> str:
        c = self.cfg
        out = f", d_out={c.out_dim}, hook_out={self.hook_out!r}" if c.transcoder else ""
        return f"{self.kind} {c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, hook={self.hook!r}{out}"


def load_sae(directory: str | Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """Load a saekit (or SAELens TopK) SAE directory."""
    return SparseAutoencoder.load(directory, device=device)


def lr_rule(d_sae: int) -> float:
    """dictionary_learning's Adam lr rule: 2e-4 · sqrt(2^14 / d_sae)."""
    return 2e-4 * math.sqrt(2**14 / d_sae)
