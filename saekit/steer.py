"""Steering by SAE feature edits at the SAE's hook, during a forward pass or a generation.

Edits (several compose; each on prompt positions, generated positions or all):
  add(f, s)      x ← x + s·W_dec[f]        (s in units of f's typical activation when a scale is given)
  clamp(f, v)    z_f ← v   ┐
  scale(f, a)    z_f ← a·z_f├ x ← x + decode(z′) − decode(z),  z = encode(x) of the *clean* activation
  ablate(f)      z_f ← 0   ┘
so the SAE's reconstruction error x − decode(z) is kept and nothing but the edited latents moves
(an edit applied at the latents' hook is cancelled when the error is recomputed afterwards). Position 0
(BOS; its norm is ~100× the rest and the SAE never saw it) is left alone unless `edit_bos=True`.

A transcoder reads one hook and writes another, so an edit of its latents changes the MLP's output: z is encoded
from the clean MLP input (its input hook, `sae.hook`), and y ← y + decode(z′) − decode(z) = y + Δz·W_dec at its
output hook (`sae.hook_out`; adds and vectors land there too). The MLP's own output is kept — the transcoder's
prediction error with it — so an edit that changes nothing is the identity, as for an SAE.

Generated tokens are steered too, with and without a KV cache: a KV-cache step shows the hook a sequence
of length 1, which SAELens's tutorial hook skips. `generate` samples baseline and steered rows in one batch
from the same seed, with the same Gumbel noise per step, so the two differ only through the edits.

Speed (issue 13): the generation loop runs through the HF model inside the bridge without the bridge's
wrapper modules (`PlainHF`: same weights, HF's own KV cache, the edit as a torch hook on the decoder layer),
wherever that computes what the bridge computes, and `generate` runs it on one CPU thread. 30 tokens of
baseline + steered for the default model take ~2.3 s on a 2-core machine shared with other jobs, where the
bridge loop on torch's two threads took 20–80 s (a thread descheduled by the OS stalls every small op at
its barrier). The tokens and log-probs are the bridge loop's; benchmarks/steer_speed.py measures both.

Streaming (issue 14): `stream` is `generate` token by token — the loop is a generator (`sampling`), so each
step's baseline and steered tokens reach the caller (the browser's steering panel) as soon as they are sampled;
`generate` drains the same stream, so the two cannot disagree. The Generation says which path ran and how long.
"""

from __future__ import annotations

import copy
import os
import re
import textwrap
import time
import typing
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
        # hook: where the edits land; read: where a transcoder's latents are read (None: at `hook`, an SAE)
        self.hook, self.read = steering_hooks(sae, hook)
        self.scale = feature_scale(scale)
        self.prompt_len, self.rows, self.edit_bos = prompt_len, rows, edit_bos
        self.offset: int | None = None
        self._next = 0
        self._input: tuple[torch.Tensor, int] | None = None  # a transcoder's clean input in this forward, its start
        self.calls = 0
        for e in self.edits:
            if e.direction is None and not 0 <= e.feature < sae.cfg.d_sae:
                raise SaekitError(f"feature {e.feature} is out of range: the {sae.kind} has {sae.cfg.d_sae} latents.")
            if e.direction is not None and e.direction.numel() != sae.cfg.out_dim:
                raise SaekitError(f"steering vector has {e.direction.numel()} values; the width of {self.hook}, where "
                                  f"it is added, is {sae.cfg.out_dim}.")
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

    def hooks(self) -> list[tuple[str, Callable]]:
        """The (hook, function) pairs to attach, in the order a forward reaches them: an SAE's one hook; a
        transcoder's input hook (which keeps the clean input) and output hook (which edits)."""
        return [(self.hook, self)] if self.read is None else [(self.read, self.keep_input), (self.hook, self)]

    def keep_input(self, act: torch.Tensor, hook=None) -> torch.Tensor:
        """A transcoder's input hook: remember this forward's clean MLP input (unchanged) for the output hook."""
        self.calls += 1
        x = act[None] if act.dim() == 2 else act
        self._input = (x, self._start(x.shape[1]))
        return act

    @torch.no_grad()
    def delta(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(change [B, T, d_out] fp32, touched [B, T] bool) for activations x [B, T, d_in] that the latents are
        encoded from (a transcoder's input), at positions start…"""
        B, T, d = x.shape
        dev = x.device
        W_dec = self.sae.W_dec
        out = torch.zeros(B, T, W_dec.shape[1], dtype=torch.float32, device=dev)
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
        """The edit hook: act is the activation at `self.hook` (a transcoder's output; its input came first)."""
        squeeze = act.dim() == 2
        x = act[None] if squeeze else act
        if self.read is None:
            self.calls += 1
            src, start = x, self._start(x.shape[1])
        else:
            if self._input is None or self._input[0].shape[:2] != x.shape[:2]:
                raise SaekitError(f"a transcoder's edits at {self.hook} need the MLP input of the same forward from "
                                  f"{self.read}: attach both of Steering.hooks() (steer() does), not the edit alone.")
            (src, start), self._input = self._input, None
        change, touched = self.delta(src, start)
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
    steering = edits if isinstance(edits, Steering) else Steering(
        sae, [edits] if isinstance(edits, Edit) else edits, hook, scale, prompt_len, rows, edit_bos)
    _check_fits(model, steering)
    with model.hooks(fwd_hooks=steering.hooks()):
        yield steering


def steering_hooks(sae: SparseAutoencoder, hook: str | None = None) -> tuple[str, str | None]:
    """(where edits land, where a transcoder reads its latents or None). An SAE steers at `hook` (default its own);
    a transcoder at its output hook, reading its input hook, and nowhere else: its latents mean something only as
    the MLP's output, so another `hook` is refused."""
    if not sae.is_transcoder:
        if (hook or sae.hook) is None:
            raise HookError("the SAE records no hook; pass hook='blocks.L.hook_resid_pre'.")
        return hook or sae.hook, None  # type: ignore[return-value]
    if sae.hook is None or sae.hook_out is None:
        raise HookError(f"the {sae.kind} records no input or output hook (hook {sae.hook!r}, hook_out "
                        f"{sae.hook_out!r} in cfg.json's saekit fields); steering needs both.")
    if hook is not None and hook != sae.hook_out:
        raise HookError(f"a {sae.kind} is steered where it writes, the MLP output {sae.hook_out} (its latents read "
                        f"{sae.hook}); it cannot steer {hook}. Drop the hook argument, or steer with an SAE trained "
                        f"on {hook}.")
    return sae.hook_out, sae.hook


def where(sae: SparseAutoencoder, hook: str | None = None) -> str:
    """Where the edits act, in words: "blocks.15.hook_resid_pre" or, for a transcoder, "blocks.6.hook_mlp_out (the
    MLP output; latents read from blocks.6.mlp.hook_in)"."""
    at, read = steering_hooks(sae, hook)
    return at if read is None else f"{at} (the MLP output; latents read from {read})"


def _check_fits(model, steering: Steering) -> None:
    """A HookError for a hook the model lacks (or a transcoder's hooks that are no MLP's input and output); a
    SaekitError for a dictionary of another width."""
    from .lm import check_hooks, check_pair

    sae = steering.sae
    check_hooks(model, [h for h, _ in steering.hooks()])
    if steering.read is not None:
        check_pair(model, steering.read, steering.hook)
    # (hook, the dictionary's width there): residual-width hooks only; others are not known to have d_model
    widths = [(steering.hook, sae.cfg.out_dim)] + ([(steering.read, sae.cfg.d_in)] if steering.read else [])
    for hook, width in widths:
        if hook.endswith(RESIDUAL_WIDTH) and model.cfg.d_model != width:
            raise SaekitError(f"the {sae.kind} has width {width} at {hook} but the model's is {model.cfg.d_model}: "
                              f"this {sae.kind} was trained on another model.")


RESIDUAL_WIDTH = ("resid_pre", "resid_post", "resid_mid", "hook_mlp_out", "mlp.hook_in")


# ----------------------------------------------------------------------------- generation

def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's tokens (as contexts are packed for training)."""
    from .tokens import bos_id

    return [bos_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def stop_ids(tokenizer) -> set[int]:
    """EOS and the chat end tokens the vocabulary has. (A token maps to an id and back to itself exactly when the
    vocabulary holds it; `get_vocab()` would build a 49k-entry dict, ~0.15 s, on every call.)"""
    ids = {tokenizer.eos_token_id}
    for t in ("<|endoftext|>", "<|im_end|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == t:
            ids.add(i)
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


def foreign_hooks(model: torch.nn.Module) -> list[int]:
    """Ids of the forward (pre-)hooks on `model`'s modules other than the bridge's own (its blocks wire some on their
    first forward and keep the handles in `_capture_hook_handles`); hook points included."""
    modules = list(model.modules())
    own = {h.id for m in modules for h in getattr(m, "_capture_hook_handles", ())}
    return [k for m in modules for d in (m._forward_pre_hooks, m._forward_hooks) for k in d if k not in own]


class PlainHF:
    """The HF model a TransformerBridge wraps, without the bridge's wrapper modules, sharing its weights
    (no copy), for generation.

    The bridge swaps every HF submodule for a wrapper that fires its hook points, so one decode step of the
    default model makes ~1,800 Python module calls and 30 `inspect.signature` calls; this plain copy makes
    ~400. Steering hooks the HF module that the hook name denotes (`blocks.L.hook_resid_pre`: the input of
    decoder layer L, `…resid_post`: its output; `blocks.L.mlp.hook_in` / `blocks.L.hook_mlp_out`: the input and
    output of its MLP, where a transcoder reads and writes) with a plain torch hook, and decoding uses HF's own
    past_key_values. `agrees` checks once per hook that this path computes what the bridge computes (the
    hook's activation and the logits on a short prompt, to 1e-4; for the default model they agree bit for
    bit) and says no otherwise, so callers fall back to the bridge for any other hook or architecture."""

    _HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|mlp\.hook_in|hook_mlp_out)$")
    _PLACE = {"hook_resid_pre": ("", "pre"), "hook_resid_post": ("", "post"), "mlp.hook_in": ("mlp", "pre"),
              "hook_mlp_out": ("mlp", "post")}  # hook → (the decoder layer's submodule, its input or output)
    _CHECK_TEXT = "The fast path is taken only where it computes what the bridge computes."

    def __init__(self, bridge):
        from transformers import AutoModelForCausalLM

        hf = bridge.original_model
        strip = re.compile(r"\._?original_component(?=\.|$)")
        tensors: dict[str, torch.Tensor] = {}
        for name, t in [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]:
            tensors.setdefault(strip.sub("", name), t)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config))
        for name, t in [*plain.named_parameters(remove_duplicate=False), *plain.named_buffers(remove_duplicate=False)]:
            src = tensors.get(name)
            if src is None or src.shape != t.shape:
                raise LookupError(f"{name}: not in the bridge's model or of another shape")
            owner, _, attr = name.rpartition(".")
            module = plain.get_submodule(owner)
            (module._parameters if attr in module._parameters else module._buffers)[attr] = src
        self.model = plain.eval()
        self.config = plain.config
        names: dict[int, str] = {}
        for name, module in hf.named_modules(remove_duplicate=False):
            names.setdefault(id(module), strip.sub("", name))
        self._layers = [plain.get_submodule(names[id(b)]) for b in bridge.blocks]
        self._weights = self.weights_of(bridge)
        self._agrees: dict[str | None, bool] = {}

    @staticmethod
    def weights_of(bridge) -> tuple[int, ...]:
        """Where the bridge's weights live: a model moved or given new weights since needs a new PlainHF."""
        return tuple(p.data_ptr() for p in bridge.parameters())

    def location(self, hook: str) -> tuple[torch.nn.Module, str] | None:
        """(module, "pre" | "post"): the hook's activation is that module's input or output; None if unmapped."""
        m = self._HOOK.match(hook)
        if m is None or int(m.group(1)) >= len(self._layers):
            return None
        sub, where = self._PLACE[m.group(2)]
        module = getattr(self._layers[int(m.group(1))], sub, None) if sub else self._layers[int(m.group(1))]
        return (module, where) if isinstance(module, torch.nn.Module) else None

    @contextmanager
    def hooked(self, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Run `fn` on the activation at `hook` (a bridge hook name `location` maps) and use what it returns."""
        layer, where = self.location(hook)  # type: ignore[misc]

        def pre(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, name: fn(kwargs[name])}

        def post(module, args, output):
            return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)

        handle = (layer.register_forward_pre_hook(pre, with_kwargs=True) if where == "pre"
                  else layer.register_forward_hook(post))
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def agrees(self, bridge, hook: str | None) -> bool:
        """Whether the logits and the activation at `hook` (None: logits only) match the bridge's on a short
        prompt (checked once per hook)."""
        if hook not in self._agrees:
            ok = hook is None or self.location(hook) is not None
            if ok:
                device = next(bridge.parameters()).device
                toks = torch.tensor([prompt_tokens(bridge.tokenizer, self._CHECK_TEXT)], device=device)
                seen: dict[str, torch.Tensor] = {}

                def grab(key):
                    def fn(act, hook=None):
                        seen[key] = act.detach().clone()
                        return act
                    return fn

                with bridge.hooks(fwd_hooks=[(hook, grab("bridge"))] if hook else []):
                    ref = bridge(toks)
                with self.hooked(hook, grab("plain")) if hook else nullcontext():
                    got = self.model(toks, use_cache=False).logits
                close = lambda a, b: a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=1e-4))  # noqa: E731
                ok = close(ref, got) and (hook is None or close(seen["bridge"], seen["plain"]))
            self._agrees[hook] = ok
        return self._agrees[hook]

    def forward(self, use_cache: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """tokens [B, T] → logits [B, T, vocab]; with `use_cache` each call continues the last (HF's DynamicCache).
        Runs in inference mode (the same numbers, less bookkeeping per op); the logits are inference tensors."""
        import inspect

        from transformers import DynamicCache

        kwargs: dict[str, Any] = {"use_cache": use_cache}
        if use_cache:  # transformers ≥ 5.2x names it `cache` and warns on every call given `past_key_values`
            name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            kwargs[name] = DynamicCache(config=self.config)

        def forward(tokens: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.model(tokens, **kwargs).logits
        return forward


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bridge → PlainHF, or the reason there is none
Engine = Literal["auto", "hf", "bridge"]


def fast_path(model, hook: str | Sequence[str] | None, engine: Engine = "auto") -> tuple[PlainHF | None, str]:
    """(the PlainHF to run `model` with, steered at `hook` (several for a transcoder, `Steering.hooks()`; None:
    unsteered), or None for the bridge; why not the plain path, "" when it is taken). The bridge runs for engine
    "bridge"; hooks attached to the bridge (the plain model would not run them); a hook or model the plain path does
    not map or does not match. Engine "hf" raises instead of falling back (tests and benchmarks)."""
    if engine == "bridge":
        return None, "engine 'bridge' asked for"
    hooks = [hook] if hook is None or isinstance(hook, str) else list(hook)
    why = None
    if not hasattr(model, "original_model") or not hasattr(model, "blocks"):
        why = "the model is no TransformerBridge over an HF model"
    elif foreign_hooks(model):  # on hook points or straight on the bridge's modules
        why = "the bridge has hooks attached, which only the bridge would run"
    if why is None:
        plain = _PLAIN.get(model)
        if isinstance(plain, PlainHF) and plain._weights != PlainHF.weights_of(model):
            plain = None  # moved to another device or given new weights: build again
        if plain is None:
            try:
                plain = PlainHF(model)
            except Exception as e:  # another architecture or transformer-lens layout: the bridge still works
                plain = f"the HF model could not be rebuilt without the bridge ({type(e).__name__}: {e})"
            _PLAIN[model] = plain
        if isinstance(plain, str):
            why = plain
        elif bad := [h for h in hooks if not plain.agrees(model, h)]:
            why = f"the plain HF path does not compute what the bridge computes at {', '.join(map(str, bad))}"
        else:
            return plain, ""
    if engine == "hf":
        raise SaekitError(f"cannot generate through the plain HF model: {why}.")
    return None, why


def plain_hf(model, hook: str | Sequence[str] | None, engine: Engine = "auto") -> PlainHF | None:
    """The PlainHF to run `model` with, steered at `hook`(s), or None for the bridge (`fast_path` says why)."""
    return fast_path(model, hook, engine)[0]


@contextmanager
def cpu_threads(n: int | None, device) -> Iterator[None]:
    """Torch's intra-op threads set to `n` for the block (CPU only; None: left alone), then put back."""
    old = torch.get_num_threads()
    if n is None or torch.device(device).type != "cpu" or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Sampled:
    """Tokens [B, N] sampled from one prompt, their log-probs under the sampling model [B, N], the number of
    tokens kept per row (up to and including a stop token), the probability mass each step put on
    `track` tokens [B, N] (when asked), and the path the loop ran (`path_text`)."""

    prompt: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    tracked: torch.Tensor | None = None
    path: str = ""


def path_text(plain: bool, why: str, use_cache: bool, device) -> str:
    """e.g. "plain HF model, KV cache, 1 CPU thread" or "TransformerBridge (why), no KV cache, 2 CPU threads"."""
    engine = "plain HF model" if plain else f"TransformerBridge ({why})"
    cache = "KV cache" if use_cache else "no KV cache (the whole sequence every step)"
    n = torch.get_num_threads()
    where = f"{n} CPU thread{'s' if n != 1 else ''}" if torch.device(device).type == "cpu" else str(device)
    return f"{engine}, {cache}, {where}"


@torch.no_grad()
def sampling(model, prompt: list[int], rows: int, max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
             steering: Steering | Sequence[Steering] | None = None, use_cache: bool = True,
             track: torch.Tensor | None = None, stop_early: bool = True, threads: int | None = None,
             engine: Engine = "auto") -> Generator[tuple[torch.Tensor, torch.Tensor], None, Sampled]:
    """`sample`, one step at a time: yields each step's (tokens [rows], their log-probs [rows]), on the model's device,
    as soon as they are sampled, and returns the Sampled (draining it, as `sample` does, never waits on the device).
    The hook and the thread count hold from the first `next` until the generator ends or is closed (a `for` loop
    left early, `close()`), so consume it before running the model otherwise. Several steerings (one per hook, as
    flow steering uses) act together."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
    P = ids.shape[1]
    gen = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids(model.tokenizer)), device=device)
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device)
    tracked = torch.zeros(rows, max_new_tokens, device=device) if track is not None else None
    track = track.to(device) if track is not None else None
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    steerings = [] if steering is None else [steering] if isinstance(steering, Steering) else list(steering)
    for st in steerings:
        _check_fits(model, st)
    n = max_new_tokens
    with cpu_threads(threads, device), ExitStack() as stack:
        hooks = [hk for st in steerings for hk in st.hooks()]
        plain, why = fast_path(model, [h for h, _ in hooks] or None, engine)  # (built once per model)
        path = path_text(plain is not None, why, use_cache, device)
        if plain is not None:
            forward = plain.forward(use_cache)
            for h, fn in hooks:
                stack.enter_context(plain.hooked(h, fn))
        else:
            forward = KVCache(model).forward if use_cache else model
            for st in steerings:
                stack.enter_context(steer(model, st.sae, st))
        for st in steerings:
            st.prompt_len = P
        try:
            for step in range(max_new_tokens):
                for st in steerings:  # absolute position of the first token fed this step
                    st.offset = P + step - 1 if (use_cache and step > 0) else 0
                if use_cache:
                    logits = forward(ids if step == 0 else out[:, step - 1: step])
                else:
                    logits = forward(torch.cat([ids, out[:, :step]], 1))
                logp = torch.log_softmax(logits[:, -1].float(), -1)
                u = torch.rand(logp.shape[-1], generator=gen).clamp_(1e-20, 1 - 1e-7).to(device)
                tok = (logp / temperature - torch.log(-torch.log(u))).argmax(-1) if temperature > 0 else logp.argmax(-1)
                out[:, step] = tok
                logprobs[:, step] = logp.gather(1, tok[:, None])[:, 0]
                if tracked is not None:
                    tracked[:, step] = logp[:, track].exp().sum(-1)
                newly = torch.isin(tok, stops) & ~done
                lengths[newly] = step + 1
                done |= newly
                yield tok, logprobs[:, step]
                if stop_early and done.all():
                    n = step + 1
                    break
        finally:
            for st in steerings:
                st.offset = None  # back to inferred positions for any later use of this Steering
    return Sampled(prompt, out[:, :n].cpu(), logprobs[:, :n].cpu(), lengths.cpu(),
                   tracked[:, :n].cpu() if tracked is not None else None, path)


def _drain(steps: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def sample(model, prompt: list[int], rows: int, max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
           steering: Steering | None = None, use_cache: bool = True, track: torch.Tensor | None = None,
           stop_early: bool = True, threads: int | None = None, engine: Engine = "auto") -> Sampled:
    """Sample `rows` continuations of one prompt in one batch. Every row sees the same Gumbel noise per step
    (one seeded stream), so rows differ only through the steering (per-row values / `steering.rows`).
    temperature 0 is greedy. With `use_cache` each step feeds one token and the HF KV cache; without it
    each step reruns the whole sequence.

    `engine`: "auto" runs the loop through the HF model under the bridge (`PlainHF`, the same numbers without
    the bridge's Python overhead) wherever that is exact, else through the bridge; "bridge" and "hf" force one.
    `threads`: torch's CPU threads during the loop (None: as set). A decode step is a chain of small
    matrix-vector products, and a second thread that the OS has lent to another process stalls every one of
    them at its barrier, so one thread is both faster on a shared machine and independent of the core count."""
    return _drain(sampling(model, prompt, rows, max_new_tokens, seed, temperature, steering, use_cache, track,
                           stop_early, threads, engine))


@dataclass
class Generation:
    """Baseline and steered continuations of one prompt from the same seed. The pieces join to the texts (see
    `_Pieces`); `path` is the loop that ran (`path_text`), `seconds` its wall time from the first step (the
    prefill) to the last token."""

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
    path: str = ""
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens sampled per second, both rows counted (they run as one batch)."""
        return (len(self.baseline_tokens) + len(self.steered_tokens)) / self.seconds if self.seconds > 0 else 0.0

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


ROWS = ("baseline", "steered")


@dataclass(frozen=True)
class Token:
    """One new token of one row, as a `GenerationStream` yields it."""

    row: int        # 0 baseline, 1 steered (ROWS)
    step: int       # its index among the row's new tokens
    id: int
    piece: str      # the text it adds (a character split over several tokens comes whole with the last of them)
    logprob: float  # under the model that sampled it
    last: bool      # the row ends here (a stop token, or the max_new_tokens-th)


class _Pieces:
    """Text pieces of a growing token sequence: each token's piece is what it adds to the decoded text, a
    character still incomplete held back until the token that completes it, so the pieces join to the text. (A
    decode that rewrites earlier text — none of the byte-level BPE ones do — gets the new text after the part that
    is unchanged; the pieces shown before cannot be taken back.)"""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.pieces, self.text = tokenizer, [], [], ""

    def add(self, token: int, last: bool) -> str:
        self.ids.append(token)
        text = _decode(self.tokenizer, self.ids)
        if not last:
            text = text.rstrip("\ufffd")
        piece, self.text = text[len(os.path.commonprefix([text, self.text])):], text
        self.pieces.append(piece)
        return piece


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class GenerationStream:
    """Baseline and steered tokens as they are sampled (`stream`): iterating yields each step's baseline `Token`,
    then its steered one (a row that has ended yields no more); when it ends, `.generation` holds what `generate`
    returns. `close()`, or leaving a `with` block, ends the loop early and removes the steering hook."""

    def __init__(self, steps: Generator[Token, None, Generation]):
        self._steps = steps
        self.generation: Generation | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Token:
        try:
            return next(self._steps)
        except StopIteration as stop:
            self.generation = stop.value
            raise

    def close(self) -> None:
        self._steps.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> Generation:
        """Consume the rest; the Generation."""
        for _ in self:
            pass
        assert self.generation is not None
        return self.generation


def stream(model, sae: SparseAutoencoder, prompt: str, edits: Sequence[Edit] | Edit, seed: int = 0,
           max_new_tokens: int = 40, temperature: float = 1.0, scale: Scale | None = None,
           use_cache: bool = True, hook: str | None = None, threads: int | None = 1,
           engine: Engine = "auto") -> GenerationStream:
    """`generate`, token by token: the same two rows from the same seed (baseline and steered in one batch), each
    new token yielded as soon as its step is sampled. Bad edits raise here, before anything runs."""
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    steering = Steering(sae, edits, hook, scale, rows=torch.tensor([False, True]))
    described = [e.describe(steering.scale(e.feature) if steering.scale and e.mode == "add" and e.direction is None
                            else None) for e in edits]
    return stream_steerings(model, [steering], prompt, described, seed, max_new_tokens, temperature, use_cache, threads,
                            engine)


def stream_steerings(model, steerings: Sequence[Steering], prompt: str, described: list[str], seed: int = 0,
                     max_new_tokens: int = 40, temperature: float = 1.0, use_cache: bool = True,
                     threads: int | None = 1, engine: Engine = "auto") -> GenerationStream:
    """`stream` for ready steerings (each limited to the steered row, rows=[False, True]), e.g. one per layer."""
    ids = prompt_tokens(model.tokenizer, prompt)
    steps = sampling(model, ids, 2, max_new_tokens, seed, temperature, list(steerings), use_cache, threads=threads,
                     engine=engine)
    return GenerationStream(_tokens(model.tokenizer, steps, prompt, described, seed, temperature, max_new_tokens))


def _tokens(tokenizer, steps: Generator[tuple[torch.Tensor, torch.Tensor], None, Sampled], prompt: str,
            described: list[str], seed: int, temperature: float, max_new_tokens: int
            ) -> Generator[Token, None, Generation]:
    stops = stop_ids(tokenizer)
    pieces = [_Pieces(tokenizer) for _ in ROWS]
    ended = [False] * len(ROWS)
    start = time.perf_counter()
    try:
        step = 0
        while True:
            try:
                toks, lps = next(steps)
            except StopIteration as stop:
                s: Sampled = stop.value
                break
            for r in range(len(ROWS)):
                if ended[r]:
                    continue
                t = int(toks[r])
                ended[r] = t in stops or step + 1 == max_new_tokens
                yield Token(r, step, t, pieces[r].add(t, ended[r]), float(lps[r]), ended[r])
            step += 1
    finally:
        steps.close()  # a stream left early: the hook comes off and the threads go back now
    seconds = time.perf_counter() - start
    rows = []
    for r in range(len(ROWS)):
        t = s.tokens[r, :int(s.lengths[r])].tolist()
        assert t == pieces[r].ids, "the stream yielded other tokens than the loop kept"
        rows.append((_decode(tokenizer, t), t, s.logprobs[r, :len(t)].tolist()))
    (bt, btok, bl), (st, stok, sl) = rows
    return Generation(prompt, described, seed, temperature, bt, st, btok, stok, pieces[0].pieces, pieces[1].pieces,
                      bl, sl, s.path, seconds)


def generate(model, sae: SparseAutoencoder, prompt: str, edits: Sequence[Edit] | Edit, seed: int = 0,
             max_new_tokens: int = 40, temperature: float = 1.0, scale: Scale | None = None,
             use_cache: bool = True, hook: str | None = None, threads: int | None = 1,
             engine: Engine = "auto") -> Generation:
    """Baseline and steered continuations of `prompt`, sampled in one batch from the same seed.
    On CPU the loop runs on one thread unless `threads` says otherwise (see `sample`)."""
    return stream(model, sae, prompt, edits, seed, max_new_tokens, temperature, scale, use_cache, hook, threads,
                  engine).run()


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
