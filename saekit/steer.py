"""Steering by SAE feature edits at the SAE's hook, during a forward pass or a generation.

Edits (several compose; each on prompt positions, generated positions or all):
  add(f, s)      x ← x + s·W_dec[f]        (s in units of f's typical activation when a scale is given)
  clamp(f, v)    z_f ← v   ┐
  scale(f, a)    z_f ← a·z_f├ x ← x + decode(z′) − decode(z),  z = encode(x) of the *clean* activation
  ablate(f)      z_f ← 0   ┘
so the SAE's reconstruction error x − decode(z) is kept and nothing but the edited latents moves
(an edit applied at the latents' hook is cancelled when the error is recomputed afterwards). Position 0
(BOS; its norm is ~100× the rest and the SAE never saw it) is left alone unless `edit_bos=True`.

Generated tokens are steered too, with and without a KV cache: a KV-cache step shows the hook a sequence
of length 1, which SAELens's tutorial hook skips. `generate` samples baseline and steered rows in one batch
from the same seed, with the same Gumbel noise per step, so the two differ only through the edits.
"""

from __future__ import annotations

import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Positions, SteerMode
from .errors import HookError, SaekitError
from .sae import SparseAutoencoder

Mode = SteerMode
MODES: tuple[str, ...] = typing.get_args(SteerMode)
POSITIONS: tuple[str, ...] = typing.get_args(Positions)
Value = float | torch.Tensor  # a tensor [B] gives each batch row its own value; NaN leaves that row alone
Scale = torch.Tensor | Callable[[int], float] | Any


@dataclass(frozen=True)
class Edit:
    """One edit. `value` is the add strength, the clamp value, or the scale factor (ablate: 0).
    `direction` replaces W_dec[feature] for a plain vector add (e.g. a difference-of-means baseline;
    its strength is raw, never rescaled)."""

    feature: int
    mode: Mode
    value: Value = 0.0
    positions: Positions = "all"
    direction: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise SaekitError(f"unknown steering mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.positions not in POSITIONS:
            raise SaekitError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}.")
        if self.direction is not None and self.mode != "add":
            raise SaekitError("a steering direction can only be added (mode 'add').")

    def describe(self, unit: float | None = None) -> str:
        """e.g. "add feature 12 4"; with `unit` (the typical activation an add strength is scaled by)
        "add feature 12 4 × 9.87"."""
        v = self.value
        v = f"{v:g}" if isinstance(v, (int, float)) else f"tensor{tuple(v.shape)}"
        if unit is not None and self.mode == "add" and self.direction is None:
            v = f"{v} × {unit:.3g}"
        what = "vector" if self.direction is not None else f"feature {self.feature}"
        arg = "" if self.mode == "ablate" else f" {v}"
        where = "" if self.positions == "all" else f" ({self.positions} tokens)"
        return f"{self.mode} {what}{arg}{where}"


def add(feature: int, strength: Value, positions: Positions = "all") -> Edit:
    return Edit(feature, "add", strength, positions)


def clamp(feature: int, value: Value, positions: Positions = "all") -> Edit:
    return Edit(feature, "clamp", value, positions)


def scale(feature: int, factor: Value, positions: Positions = "all") -> Edit:
    return Edit(feature, "scale", factor, positions)


def ablate(feature: int, positions: Positions = "all") -> Edit:
    return Edit(feature, "ablate", 0.0, positions)


def add_vector(direction: torch.Tensor, strength: Value, positions: Positions = "all") -> Edit:
    """x ← x + strength·direction (raw units)."""
    return Edit(-1, "add", strength, positions, direction=direction.detach().float().reshape(-1))


def make_edit(mode: str, feature: int, value: float = 0.0, positions: Positions = "all") -> Edit:
    """An edit from CLI/app fields (`value` is ignored for ablate)."""
    return Edit(int(feature), mode, 0.0 if mode == "ablate" else float(value), positions)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- typical activations

def feature_scale(source: Scale | None) -> Callable[[int], float] | None:
    """A per-feature "typical activation" lookup from a tensor/array [d_sae], a callable, or a feature
    store (its mean activation when active, else its max)."""
    if source is None or callable(source) and not hasattr(source, "stats"):
        return source
    if hasattr(source, "stats"):  # saekit.features.FeatureStore (duck-typed: no import cycle)
        stats = source.stats
        key = next((k for k in ("mean", "act_mean", "act_max", "max") if k in stats), None)
        if key is None:
            raise SaekitError("the feature store has no mean or max activation to scale strengths by.")
        source = stats[key]
    table = torch.as_tensor(source, dtype=torch.float32).reshape(-1)

    def lookup(f: int) -> float:
        if not 0 <= f < len(table):
            raise SaekitError(f"feature {f} is out of range for the scale table ({len(table)} features).")
        s = float(table[f])
        if not s > 0:  # a feature that never fired has no typical activation
            raise SaekitError(f"feature {f} never fired in the feature store, so a strength in units of its "
                              "typical activation is undefined; pass a raw strength (no store) instead.")
        return s
    return lookup


# ----------------------------------------------------------------------------- the hook

class Steering:
    """The edits applied at one hook. Use `steer(...)` to attach it; `generate` drives it itself.

    Position bookkeeping: `offset` is the absolute position of the first token in the next forward
    (None: inferred — a call of length > 1 starts at 0, a length-1 call continues where the last one ended,
    which is what a KV-cache generation loop does). `prompt_len` splits prompt from generated positions
    (None: the first forward seen is the prompt). `rows` ([B] bool) limits the edits to some batch rows.
    """

    def __init__(self, sae: SparseAutoencoder, edits: Sequence[Edit], hook: str | None = None,
                 scale: Scale | None = None, prompt_len: int | None = None, rows: torch.Tensor | None = None,
                 edit_bos: bool = False):
        self.sae, self.edits = sae, list(edits)
        self.hook = hook or sae.hook
        if self.hook is None:
            raise HookError("the SAE records no hook; pass hook='blocks.L.hook_resid_pre'.")
        self.scale = feature_scale(scale)
        self.prompt_len, self.rows, self.edit_bos = prompt_len, rows, edit_bos
        self.offset: int | None = None
        self._next = 0
        self.calls = 0
        for e in self.edits:
            if e.direction is None and not 0 <= e.feature < sae.cfg.d_sae:
                raise SaekitError(f"feature {e.feature} is out of range: the SAE has {sae.cfg.d_sae} latents.")
            if e.direction is not None and e.direction.numel() != sae.cfg.d_in:
                raise SaekitError(f"steering vector has {e.direction.numel()} values; the hook's width is "
                                  f"{sae.cfg.d_in}.")
        # add strengths in raw units (the scale lookup raises early for a never-firing feature)
        self._add_unit = {i: (self.scale(e.feature) if self.scale and e.direction is None else 1.0)
                          for i, e in enumerate(self.edits) if e.mode == "add"}

    def _start(self, T: int) -> int:
        if self.offset is not None:
            start = self.offset
        else:
            start = self._next if (T == 1 and self._next > 0) else 0
        self._next = start + T
        if self.prompt_len is None:
            self.prompt_len = start + T
        return start

    def _mask(self, e: Edit, B: int, start: int, T: int, device) -> torch.Tensor:
        """[B, T] bool: where this edit applies."""
        pos = torch.arange(start, start + T, device=device)
        m = torch.ones(T, dtype=torch.bool, device=device)
        P = self.prompt_len if self.prompt_len is not None else start + T
        if e.positions == "prompt":
            m &= pos < P
        elif e.positions == "generated":
            m &= pos >= P
        if not self.edit_bos:
            m &= pos > 0
        m = m.expand(B, T)
        if self.rows is not None:
            m = m & self.rows.to(device)[:, None]
        return m

    @staticmethod
    def _values(v: Value, B: int, device) -> torch.Tensor:
        """[B, 1] float32 values per row."""
        t = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() not in (1, B):
            raise SaekitError(f"an edit value has {t.numel()} entries but the batch has {B} rows.")
        return t.expand(B)[:, None]

    @torch.no_grad()
    def delta(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(change [B, T, d] fp32, touched [B, T] bool) for activations x [B, T, d] at positions start…"""
        B, T, d = x.shape
        dev = x.device
        W_dec = self.sae.W_dec
        out = torch.zeros(B, T, d, dtype=torch.float32, device=dev)
        touched = torch.zeros(B, T, dtype=torch.bool, device=dev)
        z: dict[int, torch.Tensor] = {}  # feature -> clean z_f [B, T]
        z_new: dict[int, torch.Tensor] = {}
        codes = None
        for i, e in enumerate(self.edits):
            m = self._mask(e, B, start, T, dev)
            if not m.any():
                continue
            v = self._values(e.value, B, dev)
            skip = torch.isnan(v)  # NaN: leave this row alone (sweeps put the unsteered row in the same batch)
            if skip.any():
                m, v = m & ~skip, v.nan_to_num(0.0)
            if e.mode == "add":
                amount = torch.where(m, v * self._add_unit[i], 0.0)  # [B, T]
                m = m & (amount != 0)
                direction = e.direction.to(dev) if e.direction is not None else W_dec[e.feature].float()
                out += amount[..., None] * direction
                touched |= m
                continue
            if codes is None:  # encode the clean activation once; every latent edit reads it
                codes = self.sae.encode(x.reshape(-1, d).to(W_dec.dtype))
            f = e.feature
            if f not in z:
                values, indices = codes
                z[f] = (values * (indices == f)).sum(-1).view(B, T).float()
                z_new[f] = z[f].clone()
            target = {"clamp": v.expand(B, T), "scale": v * z_new[f], "ablate": torch.zeros_like(z_new[f])}[e.mode]
            z_new[f] = torch.where(m, target, z_new[f])
        for f in z:
            diff = z_new[f] - z[f]
            out += diff[..., None] * W_dec[f].float()
            touched |= diff != 0  # a latent that is zero and stays zero changes nothing, bit for bit
        return out, touched

    def __call__(self, act: torch.Tensor, hook=None) -> torch.Tensor:
        self.calls += 1
        squeeze = act.dim() == 2
        x = act[None] if squeeze else act
        start = self._start(x.shape[1])
        change, touched = self.delta(x, start)
        if not touched.any():
            return act
        y = torch.where(touched[..., None], (x.float() + change).to(x.dtype), x)
        return y[0] if squeeze else y


@contextmanager
def steer(model, sae: SparseAutoencoder, edits: Sequence[Edit] | Edit, hook: str | None = None,
          scale: Scale | None = None, prompt_len: int | None = None, rows: torch.Tensor | None = None,
          edit_bos: bool = False) -> Iterator[Steering]:
    """`with steer(model, sae, edits): model(tokens)` runs steered; on exit the hook is removed and the
    model is exactly as before (no weights are touched). `edits` may also be a ready `Steering`."""
    from .lm import check_hooks

    steering = edits if isinstance(edits, Steering) else Steering(
        sae, [edits] if isinstance(edits, Edit) else edits, hook, scale, prompt_len, rows, edit_bos)
    check_hooks(model, [steering.hook])
    width = model.cfg.d_model if steering.hook.endswith(("resid_pre", "resid_post", "resid_mid")) else None
    if width is not None and width != sae.cfg.d_in:
        raise SaekitError(f"the SAE has d_in {sae.cfg.d_in} but {steering.hook} has width {width}: "
                          "this SAE was trained on another model.")
    with model.hooks(fwd_hooks=[(steering.hook, steering)]):
        yield steering


# ----------------------------------------------------------------------------- generation

def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's tokens (as contexts are packed for training)."""
    from .tokens import bos_id

    return [bos_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for t in ("<|endoftext|>", "<|im_end|>"):
        if t in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(t))
    return {i for i in ids if i is not None}


class KVCache:
    """Incremental decoding through a TransformerBridge with an HF DynamicCache.

    transformer-lens 4.3's attention bridge reads the cache from the kwarg `past_key_values` (or
    `layer_past`), but transformers ≥ 5.2x passes it down as `cache`, so the bridge's own
    `past_key_values=` path leaves the cache empty and every step attends to itself alone (logits off
    by ~17). We hand the same cache object under both names and check after every call that it grew by
    exactly the tokens fed, so a future rename fails loudly instead of generating garbage."""

    def __init__(self, model):
        import inspect

        from transformers import DynamicCache

        self.model = model
        hf = model.original_model
        cfg = hf.config
        self.cache = DynamicCache(config=cfg)
        inner = getattr(hf, "model", hf)
        params = inspect.signature(inner.forward).parameters
        self.kwargs = {"cache": self.cache, "layer_past": self.cache} if "cache" in params else \
            {"past_key_values": self.cache}
        self.length = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens, use_cache=True, **self.kwargs)
        self.length += tokens.shape[1]
        got = self.cache.get_seq_length()
        if got != self.length:
            raise SaekitError(f"the KV cache holds {got} positions after {self.length} tokens: this transformers/"
                              "transformer-lens pair does not fill it. Generate with use_cache=False "
                              "(CLI: --no-kv-cache).")
        return logits


@dataclass
class Sampled:
    """Tokens [B, N] sampled from one prompt, their log-probs under the sampling model [B, N], the number of
    tokens kept per row (up to and including a stop token), and the probability mass each step put on
    `track` tokens [B, N] (when asked)."""

    prompt: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    tracked: torch.Tensor | None = None


@torch.no_grad()
def sample(model, prompt: list[int], rows: int, max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
           steering: Steering | None = None, use_cache: bool = True, track: torch.Tensor | None = None,
           stop_early: bool = True) -> Sampled:
    """Sample `rows` continuations of one prompt in one batch. Every row sees the same Gumbel noise per step
    (one seeded stream), so rows differ only through the steering (per-row values / `steering.rows`).
    temperature 0 is greedy. With `use_cache` each step feeds one token and the HF KV cache; without it
    each step reruns the whole sequence."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
    P = ids.shape[1]
    gen = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids(model.tokenizer)), device=device)
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device)
    tracked = torch.zeros(rows, max_new_tokens, device=device) if track is not None else None
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    kv = KVCache(model) if use_cache else None
    n = max_new_tokens
    with steer(model, steering.sae, steering) if steering is not None else nullcontext():
        if steering is not None:
            steering.prompt_len = P
        try:
            for step in range(max_new_tokens):
                if steering is not None:  # absolute position of the first token fed this step
                    steering.offset = P + step - 1 if (kv is not None and step > 0) else 0
                if kv is not None:
                    logits = kv.forward(ids if step == 0 else out[:, step - 1: step])
                else:
                    logits = model(torch.cat([ids, out[:, :step]], 1))
                logp = torch.log_softmax(logits[:, -1].float(), -1)
                u = torch.rand(logp.shape[-1], generator=gen).clamp_(1e-20, 1 - 1e-7).to(device)
                tok = (logp / temperature - torch.log(-torch.log(u))).argmax(-1) if temperature > 0 else logp.argmax(-1)
                out[:, step] = tok
                logprobs[:, step] = logp.gather(1, tok[:, None])[:, 0]
                if tracked is not None:
                    tracked[:, step] = logp[:, track.to(device)].exp().sum(-1)
                newly = torch.isin(tok, stops) & ~done
                lengths[newly] = step + 1
                done |= newly
                if stop_early and done.all():
                    n = step + 1
                    break
        finally:
            if steering is not None:
                steering.offset = None  # back to inferred positions for any later use of this Steering
    return Sampled(prompt, out[:, :n].cpu(), logprobs[:, :n].cpu(), lengths.cpu(),
                   tracked[:, :n].cpu() if tracked is not None else None)


@dataclass
class Generation:
    """Baseline and steered continuations of one prompt from the same seed."""

    prompt: str
    edits: list[str]
    seed: int
    temperature: float
    baseline: str
    steered: str
    baseline_tokens: list[int]
    steered_tokens: list[int]
    baseline_pieces: list[str]
    steered_pieces: list[str]
    baseline_logprobs: list[float]  # log-prob of each generated token under the model that sampled it
    steered_logprobs: list[float]

    def side_by_side(self, width: int = 100) -> str:
        col = max(20, (width - 3) // 2)
        left = _wrap(self.prompt + self.baseline, col)
        right = _wrap(self.prompt + self.steered, col)
        head = f"{'baseline':<{col}} | steered: {'; '.join(self.edits)}"
        rows = [f"{a:<{col}} | {b}" for a, b in zip(left + [""] * (len(right) - len(left)),
                                                     right + [""] * (len(left) - len(right)))]
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        foot = (f"{'mean log-prob ' + format(mean(self.baseline_logprobs), '.3f'):<{col}} | "
                f"mean log-prob {mean(self.steered_logprobs):.3f}")
        return "\n".join([head, "-" * len(head), *rows, "-" * len(head), foot])


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width) or [""]
    return lines


def generate(model, sae: SparseAutoencoder, prompt: str, edits: Sequence[Edit] | Edit, seed: int = 0,
             max_new_tokens: int = 40, temperature: float = 1.0, scale: Scale | None = None,
             use_cache: bool = True, hook: str | None = None) -> Generation:
    """Baseline and steered continuations of `prompt`, sampled in one batch from the same seed."""
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    ids = prompt_tokens(model.tokenizer, prompt)
    steering = Steering(sae, edits, hook, scale, rows=torch.tensor([False, True]))
    s = sample(model, ids, 2, max_new_tokens, seed, temperature, steering, use_cache)
    tok = model.tokenizer
    parts = []
    for r in range(2):
        n = int(s.lengths[r])
        t = s.tokens[r, :n].tolist()
        parts.append((tok.decode(t, skip_special_tokens=True), t, [tok.decode([i]) for i in t],
                      s.logprobs[r, :n].tolist()))
    (bt, btok, bp, bl), (st, stok, sp, sl) = parts
    described = [e.describe(steering.scale(e.feature) if steering.scale and e.mode == "add" and e.direction is None
                            else None) for e in edits]
    return Generation(prompt, described, seed, temperature, bt, st, btok, stok, bp, sp, bl, sl)


# ----------------------------------------------------------------------------- loading for the CLI and the app

def find_store(sae_dir: str | Path, sae: SparseAutoencoder) -> Path | None:
    """The feature store `saekit analyze` writes by default (SAE_DIR/../store), if it was built from
    these very weights."""
    from .files import read_json

    cand = Path(sae_dir).resolve().parent / "store"
    try:
        man = read_json(cand / "manifest.json")
    except SaekitError:
        return None
    same_dir = Path(man.get("sae_dir", "")).resolve() == Path(sae_dir).resolve()
    return cand if same_dir and man.get("sae_weights_sha256") == sae.weights_hash() else None


def load_for_steering(sae_dir: str, model_name: str | None = None, store: str | None = None):
    """(model, sae, feature store or None) for the CLI. store: a path, "none" (raw strengths), or None to
    use SAE_DIR/../store when it was built from this SAE."""
    from .lm import load_model
    from .sae import load_sae

    sae = load_sae(sae_dir)
    path = None if store == "none" else (Path(store) if store else find_store(sae_dir, sae))
    model = load_model(model_name or sae.info.get("model_arg") or "default")
    sae = sae.to(next(model.parameters()).device)
    if path is None:
        return model, sae, None
    from .features import open_store

    return model, sae, open_store(path)
