"""Format interop with SAELens and EleutherAI's sparsify: import their SAEs, export ours.

**SAELens** directory: cfg.json + sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec; JumpReLU adds threshold [d_sae]). A saekit SAE directory *is* one (sae.py `save`), so exporting
is a save. Importing folds SAELens's variants into saekit's one form, exactly (same outputs):
  - `rescale_acts_by_decoder_norm` (SAELens TopK training): W_enc·‖W_dec‖, b_enc·‖W_dec‖, W_dec/‖W_dec‖;
  - `apply_b_dec_to_input: false`: b_enc + b_dec·W_enc (saekit always subtracts b_dec before encoding);
  - JumpReLU with one threshold for every latent (how SAELens saves BatchTopK) → saekit BatchTopK; k comes
    from cfg.json (`k`, or `metadata.training_architecture_details.k`) or the caller. Per-latent
    thresholds (e.g. Gemma Scope) have no saekit equivalent and are refused.

**sparsify** (eai-sparsify ≥ 1.3) layout: one folder per hookpoint, `<hookpoint>/cfg.json` (activation,
expansion_factor, normalize_decoder, num_latents, k, multi_topk, skip_connection, transcode, d_in) +
`<hookpoint>/sae.safetensors` (encoder.weight [d_sae, d_in] = W_encᵀ, encoder.bias, W_dec [d_sae, d_in],
b_dec). sparsify applies ReLU before its top-k and saekit after; the kept values are the same.
We convert explicitly: SAELens's own sparsify loader gets this layout wrong (REFERENCE.md).

**Hookpoints.** sparsify hooks the *output* of a Hugging Face module, named relative to the base model:
`layers.L` is decoder layer L, whose output is the residual stream after block L — transformer-lens's
blocks.L.hook_resid_post, the same tensor as blocks.(L+1).hook_resid_pre. So saekit's default
blocks.15.hook_resid_pre is sparsify's `layers.14`, and sparsify's `layers.15` is blocks.16.hook_resid_pre:

    blocks.L.hook_resid_pre   ↔ layers.(L−1)      (L ≥ 1)
    blocks.0.hook_resid_pre   ↔ embed_tokens      (Llama-family only: the embedding output is the residual
                                                    stream there; not on GPT-2 (+ positions) or Gemma (scaled))
    blocks.L.hook_resid_post  ↔ layers.L          (imports prefer resid_pre of L+1 unless L is the last layer)
    blocks.L.hook_mlp_out     ↔ layers.L.mlp
    blocks.L.hook_attn_out    ↔ layers.L.self_attn

Both directions accept an explicit hook / hookpoint for anything else.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import SaeConfig
from .errors import FileFormatError, OptionError, OutputError, SaekitError, ShapeError
from .files import claim_output, read_json, read_tensors, replacing, write_json, write_tensors
from .sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder

SPARSIFY_WEIGHTS = "sae.safetensors"
FORMATS = ("saekit", "saelens", "sparsify")

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out)$")
# Base-model-relative module names: Llama/Mistral/Qwen/NeoX `layers.L`, GPT-2 `h.L`; a leading
# `model.` / `transformer.` / `gpt_neox.` (names relative to the causal-LM wrapper) is accepted too.
_HF_POINT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_EMBED = re.compile(r"^(?:model\.)?embed_tokens$")


# ----------------------------------------------------------------------------- hook names

def hookpoint_for(hook: str) -> str:
    """sparsify hookpoint (module name) whose output is the transformer-lens hook's activation."""
    m = _TL_HOOK.match(hook or "")
    if not m:
        raise SaekitError(f"no sparsify hookpoint is known for hook {hook!r} (saekit maps blocks.L.hook_resid_pre, "
                          "hook_resid_post, hook_mlp_out and hook_attn_out); pass --hookpoint MODULE_NAME.")
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "hook_resid_pre":
        return "embed_tokens" if layer == 0 else f"layers.{layer - 1}"
    if kind == "hook_resid_post":
        return f"layers.{layer}"
    return f"layers.{layer}.mlp" if kind == "hook_mlp_out" else f"layers.{layer}.self_attn"


def hook_for(hookpoint: str, n_layers: int | None = None) -> str:
    """transformer-lens hook name of a sparsify hookpoint. `layers.L` (the output of layer L) is returned as
    blocks.(L+1).hook_resid_pre, or blocks.L.hook_resid_post when L is the last layer (n_layers known)."""
    if _EMBED.match(hookpoint):
        return "blocks.0.hook_resid_pre"
    m = _HF_POINT.match(hookpoint)
    if not m:
        raise SaekitError(f"no transformer-lens hook is known for sparsify hookpoint {hookpoint!r}; "
                          "pass --hook blocks.L.hook_... explicitly.")
    layer, sub = int(m.group(1)), m.group(2)
    if sub is None:
        if n_layers is not None and layer + 1 >= n_layers:
            return f"blocks.{layer}.hook_resid_post"
        return f"blocks.{layer + 1}.hook_resid_pre"
    return f"blocks.{layer}.hook_mlp_out" if sub == "mlp" else f"blocks.{layer}.hook_attn_out"


# ----------------------------------------------------------------------------- detection

def detect_format(path: str | Path) -> str:
    """'saekit', 'saelens' or 'sparsify' (a hookpoint folder, or a folder of hookpoint folders)."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist.")
    if (path / SPARSIFY_WEIGHTS).is_file() or _sparsify_folders(path):
        return "sparsify"
    if (path / WEIGHTS_FILE).is_file() and (path / CFG_FILE).is_file():
        return "saekit" if "saekit" in read_json(path / CFG_FILE) else "saelens"
    raise FileFormatError(f"{path} is neither a saekit/SAELens SAE directory ({CFG_FILE} + {WEIGHTS_FILE}) nor a "
                          f"sparsify one (<hookpoint>/{CFG_FILE} + <hookpoint>/{SPARSIFY_WEIGHTS}).")


def _sparsify_folders(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.is_dir() and (p / SPARSIFY_WEIGHTS).is_file()]
    # several seeds of one hookpoint are saved as <hookpoint>/seedN/
    found += [q for p in path.iterdir() if p.is_dir() for q in p.iterdir()
              if q.is_dir() and (q / SPARSIFY_WEIGHTS).is_file()]
    return sorted(found)


def sparsify_hookpoints(path: str | Path) -> list[str]:
    """Hookpoint folders (relative names) under a sparsify save directory."""
    path = Path(path)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return [path.name]
    return [str(p.relative_to(path)) for p in _sparsify_folders(path)]


# ----------------------------------------------------------------------------- sparsify

def export_sparsify(sae: SparseAutoencoder, out: str | Path, hookpoint: str | None = None,
                    approximate_batchtopk: bool = False) -> Path:
    """Write `out/<hookpoint>/cfg.json + sae.safetensors`, loadable by `sparsify.SparseCoder.load_from_disk`.

    A BatchTopK SAE has no exact sparsify form (sparsify has no threshold activation): it is refused
    unless `approximate_batchtopk`, which writes it as per-token TopK k and keeps the threshold in
    cfg.json's "saekit" block so that importing it back restores the BatchTopK SAE exactly.
    """
    c = sae.cfg
    if c.architecture == "batchtopk" and not approximate_batchtopk:
        raise FileFormatError("sparsify has no threshold (JumpReLU) activation, so a BatchTopK SAE cannot be "
                              "exported exactly; pass --approximate-batchtopk to write it as TopK k (sparsify will "
                              "then keep exactly k latents per token), or export to SAELens (exact).")
    if hookpoint is None:
        if sae.hook is None:
            raise SaekitError("the SAE records no hook; pass --hookpoint (e.g. layers.14 for blocks.15.hook_resid_pre).")
        hookpoint = hookpoint_for(sae.hook)
    folder = Path(out) / hookpoint
    tensors = {
        "encoder.weight": sae.W_enc.detach().t(),
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    tensors = {k: v.float().contiguous().cpu() for k, v in tensors.items()}
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.d_sae,  # wins over expansion_factor in sparsify
        "k": c.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": c.d_in,
        # sparsify drops unknown fields on load; saekit reads this back on import.
        "saekit": {**sae.info, "hook": sae.hook, "sae": asdict(c), "threshold": float(sae.threshold),
                   "hookpoint": hookpoint},
    }
    with replacing(folder) as staged:
        write_tensors(staged / SPARSIFY_WEIGHTS, tensors, metadata={"format": "pt"})
        write_json(staged / CFG_FILE, cfg)
    return folder


def import_sparsify(path: str | Path, hookpoint: str | None = None, hook: str | None = None,
                    n_layers: int | None = None) -> SparseAutoencoder:
    """A sparsify SAE as a saekit SAE with identical outputs. `path` is a hookpoint folder or a save
    directory holding hookpoint folders (then `hookpoint` picks one when there are several)."""
    path = Path(path)
    folder = _sparsify_folder(path, hookpoint)
    cfg = read_json(folder / CFG_FILE)
    if cfg.get("activation", "topk") != "topk":
        raise FileFormatError(f"{folder} uses sparsify's {cfg['activation']!r} activation; saekit imports TopK only.")
    if cfg.get("transcode"):
        raise FileFormatError(f"{folder} is a transcoder (predicts a module's output from its input); saekit "
                              "imports autoencoders only.")
    if cfg.get("skip_connection"):
        raise FileFormatError(f"{folder} has a linear skip connection (W_skip), which saekit's SAE lacks.")
    try:
        d_in = int(cfg["d_in"])
        d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
        k = int(cfg.get("k", 32))
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{folder / CFG_FILE} lacks or mangles a field ({e}); sparsify cfg.json needs d_in, "
                              "num_latents or expansion_factor, and k.") from e
    w = read_tensors(folder / SPARSIFY_WEIGHTS, required=("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    expect = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_shapes(folder / SPARSIFY_WEIGHTS, w, expect)
    own = cfg.get("saekit") or {}
    arch = (own.get("sae") or {}).get("architecture", "topk")
    sae = SparseAutoencoder(_sae_config(folder / CFG_FILE, d_in=d_in, d_sae=d_sae, k=k, architecture=arch))
    _assign(sae, W_enc=w["encoder.weight"].t(), b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
            threshold=own.get("threshold"))
    point = own.get("hookpoint") or (str(folder.relative_to(path)) if folder != path else folder.name)
    if point.startswith("seed") and folder.parent.name:  # <hookpoint>/seedN
        point = folder.parent.name
    point = point.split("/")[0]
    info = {key: v for key, v in own.items() if key not in ("sae", "threshold", "hookpoint")}
    info["hook"] = hook or own.get("hook") or hook_for(point, n_layers)
    info["imported_from"] = {"format": "sparsify", "path": str(folder), "hookpoint": point}
    sae.info = info
    return sae


def _sparsify_folder(path: Path, hookpoint: str | None) -> Path:
    if hookpoint is not None:
        folder = path if path.name == hookpoint and (path / SPARSIFY_WEIGHTS).is_file() else path / hookpoint
        if not (folder / SPARSIFY_WEIGHTS).is_file():
            raise FileFormatError(f"no sparsify hookpoint {hookpoint!r} under {path} "
                                  f"(found: {', '.join(sparsify_hookpoints(path)) or 'none'}).")
        return folder
    if (path / SPARSIFY_WEIGHTS).is_file():
        return path
    found = _sparsify_folders(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileFormatError(f"{path} holds no sparsify SAE (<hookpoint>/{SPARSIFY_WEIGHTS}).")
    raise SaekitError(f"{path} holds {len(found)} sparsify SAEs ({', '.join(sparsify_hookpoints(path))}); "
                      "pick one with --hookpoint.")


# ----------------------------------------------------------------------------- SAELens

def export_saelens(sae: SparseAutoencoder, out: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """A saekit SAE directory is a SAELens directory (`sae_lens.SAE.load_from_disk` loads it as is)."""
    return sae.save(out, manifest)


def import_saelens(path: str | Path, hook: str | None = None, k: int | None = None) -> SparseAutoencoder:
    """A SAELens TopK, BatchTopK (saved as JumpReLU with one threshold) or BatchTopK-training SAE directory
    as a saekit SAE with identical outputs. saekit's own directories load unchanged."""
    path = Path(path)
    cfg = read_json(path / CFG_FILE)
    if "saekit" in cfg:
        sae = SparseAutoencoder.load(path)
        if hook:
            sae.info["hook"] = hook
        return sae
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture")
    if arch is None:  # SAELens < 6: activation_fn + activation_fn_kwargs
        act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        arch = "topk" if act == "topk" else "standard"
        k = k or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch not in ("topk", "jumprelu", "batchtopk"):
        raise FileFormatError(f"{path} holds a SAELens {arch!r} SAE; saekit imports TopK and BatchTopK "
                              "(JumpReLU with one threshold) SAEs only.")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise FileFormatError(f"{path}: normalize_activations={norm!r} rescales each input at run time; saekit "
                              "imports SAEs whose normalisation is folded into the weights ('none').")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise FileFormatError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (per-head hook_z SAEs) "
                              "is not supported.")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path / CFG_FILE} lacks d_in or d_sae ({e}).") from e
    details = meta.get("training_architecture_details") or {}
    k = k or cfg.get("k") or details.get("k")
    if k is None:
        raise FileFormatError(f"{path / CFG_FILE} records no k (SAELens JumpReLU configs may not); pass --k, the k "
                              "the SAE was trained with.")
    w = read_tensors(path / WEIGHTS_FILE, required=("W_enc", "b_enc", "W_dec", "b_dec"))
    _check_shapes(path / WEIGHTS_FILE, w, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                           "b_dec": (d_in,)})
    W_enc, b_enc, W_dec, b_dec = (w[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    threshold = None
    if arch == "jumprelu":
        if "threshold" not in w:
            raise FileFormatError(f"{path / WEIGHTS_FILE} is a JumpReLU SAE without a threshold tensor.")
        t = w["threshold"].double().flatten()
        if t.numel() not in (1, d_sae) or (t.max() - t.min()).abs() > 1e-6 * max(1.0, t.abs().max().item()):
            raise FileFormatError(f"{path} is a JumpReLU SAE with per-latent thresholds (from {t.min():.4g} to "
                                  f"{t.max():.4g}); saekit's BatchTopK uses one threshold for every latent.")
        threshold = t.mean().item()
    elif arch == "batchtopk":  # a SAELens BatchTopK *training* checkpoint (save_model, not save_inference_model)
        if "topk_threshold" not in w:
            raise FileFormatError(f"{path / WEIGHTS_FILE}: a batchtopk checkpoint without topk_threshold.")
        threshold = w["topk_threshold"].double().item()
    if cfg.get("rescale_acts_by_decoder_norm", details.get("rescale_acts_by_decoder_norm", False)) and arch != "jumprelu":
        # SAELens selects on pre·‖W_dec‖ and decodes with W_dec/‖W_dec‖: fold the norms (its _fold_norm_topk).
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    if cfg.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + b_dec @ W_enc  # x·W + b = (x − b_dec)·W + (b + b_dec·W)
    sae = SparseAutoencoder(_sae_config(path / CFG_FILE, d_in=d_in, d_sae=d_sae, k=int(k),
                                        architecture="topk" if arch == "topk" else "batchtopk"))
    _assign(sae, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    hook = hook or meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    sae.info = {"hook": hook, "model": meta.get("model_name") or cfg.get("model_name"),
                "imported_from": {"format": "saelens", "path": str(path), "architecture": arch,
                                  "sae_lens_version": meta.get("sae_lens_version") or cfg.get("sae_lens_version")}}
    for ours, theirs in (("context_size", "context_size"), ("dataset_hf", "dataset_path")):
        if meta.get(theirs) is not None:
            sae.info[ours] = meta[theirs]
    return sae


# ----------------------------------------------------------------------------- shared

def _sae_config(file: Path, **fields: Any) -> SaeConfig:
    try:
        return SaeConfig(**fields)
    except OptionError as e:
        raise FileFormatError(f"{file}: {e}.") from e


def _check_shapes(file: Path, w: dict[str, torch.Tensor], expect: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expect.items():
        if tuple(w[name].shape) != shape:
            raise ShapeError(f"{file}: {name} has shape {tuple(w[name].shape)}, but the config says {shape}.")
    for name, t in w.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FileFormatError(f"{file}: {name} holds NaN or inf.")


def _assign(sae: SparseAutoencoder, threshold: float | None = None, **tensors: torch.Tensor) -> None:
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.to(torch.float32))
        if threshold is not None:
            sae.threshold.fill_(float(threshold))


def load_any(path: str | Path, fmt: str = "auto", hookpoint: str | None = None, hook: str | None = None,
             k: int | None = None, n_layers: int | None = None) -> SparseAutoencoder:
    """Load a saekit, SAELens or sparsify SAE directory as a saekit SAE."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sparsify":
        return import_sparsify(path, hookpoint=hookpoint, hook=hook, n_layers=n_layers)
    if fmt in ("saekit", "saelens"):
        return import_saelens(path, hook=hook, k=k)
    raise SaekitError(f"unknown format {fmt!r}: use one of auto, {', '.join(FORMATS)}.")


def convert(src: str | Path, out: str | Path, to: str = "saekit", fmt: str = "auto", hookpoint: str | None = None,
            hook: str | None = None, k: int | None = None, n_layers: int | None = None,
            approximate_batchtopk: bool = False, overwrite: bool = False) -> Path:
    """Convert an SAE between formats; returns the written directory (a hookpoint folder for sparsify).
    An existing SAE there is replaced only by the same weights, or with `overwrite`."""
    if to not in FORMATS:
        raise SaekitError(f"unknown target format {to!r}: use one of {', '.join(FORMATS)}.")
    sae = load_any(src, fmt, hookpoint=hookpoint, hook=hook, k=k, n_layers=n_layers)
    out = Path(out)
    if to == "sparsify":
        point = hookpoint if hookpoint and detect_format(src) != "sparsify" else None
        if point or sae.hook:
            _claim_sae_dir(out / (point or hookpoint_for(sae.hook)), sae, SPARSIFY_WEIGHTS, overwrite, "out_dir", src)
        return export_sparsify(sae, out, hookpoint=point, approximate_batchtopk=approximate_batchtopk)
    _claim_sae_dir(out, sae, WEIGHTS_FILE, overwrite, "out_dir", src)
    return export_saelens(sae, out)


def _claim_sae_dir(folder: Path, sae: SparseAutoencoder, weights_file: str, overwrite: bool, flag: str,
                   src: str | Path) -> None:
    if folder.resolve() == Path(src).resolve():
        raise OutputError(f"{flag} {folder} is the source itself; write the converted SAE to another folder.")
    def differs(path: Path) -> str | None:
        try:
            old = load_any(path)
        except SaekitError:
            return "unreadable weights"
        return None if old.weights_hash() == sae.weights_hash() else (
            f"other weights: d_sae {old.cfg.d_sae}, k {old.cfg.k}, hook {old.hook}")

    claim_output(folder, "an SAE", lambda p: (p / weights_file).is_file(), overwrite, differs, flag=flag)
