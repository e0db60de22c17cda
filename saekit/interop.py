"""Format interop with SAELens, EleutherAI's sparsify and circuit-tracer: import their dictionaries, export ours.

**SAELens** directory: cfg.json + sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec; JumpReLU adds threshold [d_sae]). A saekit SAE directory *is* one (sae.py `save`), so exporting
is a save. Importing folds SAELens's variants into saekit's one form, exactly (same outputs):
  - `rescale_acts_by_decoder_norm` (SAELens TopK training): W_enc·‖W_dec‖, b_enc·‖W_dec‖, W_dec/‖W_dec‖;
  - `apply_b_dec_to_input: false`: b_enc + b_dec·W_enc (saekit always subtracts b_dec before encoding);
  - JumpReLU with one threshold for every latent (how SAELens saves BatchTopK) → saekit BatchTopK; k comes
    from cfg.json (`k`, or `metadata.training_architecture_details.k`) or the caller. Per-latent
    thresholds (e.g. Gemma Scope) have no saekit equivalent and are refused.
Transcoders (SAELens 6): `jumprelu_transcoder` / `jumprelu_skip_transcoder` (cfg `d_out`,
`apply_b_dec_to_input: false`, `metadata.hook_name` → `hook_name_out`; W_dec [d_sae, d_out], b_dec [d_out],
threshold [d_sae], W_skip [d_out, d_in], ŷ = JumpReLU(x·W_enc + b_enc)·W_dec + b_dec + x·W_skipᵀ) are saekit's
BatchTopK/Matryoshka transcoders at inference. SAELens has no TopK transcoder (saekit saves its own
`topk(_skip)_transcoder`, which SAELens cannot load: exporting one is refused) and its ReLU `transcoder` /
`skip_transcoder` keep every positive latent, which no saekit transcoder does (refused on import).

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

**circuit-tracer** (0.5) transcoder set: `config.yaml` (model_kind: transcoder_set, model_name,
feature_input_hook, feature_output_hook, scan) + `layer_L.safetensors` for every layer L = 0 … n−1 — the layout
of its Hub repositories and of its local cache, which `load_transcoders_from_cache` / `load_transcoder_from_hub`
(and so `ReplacementModel.from_pretrained`) read. Per layer: W_enc [d_sae, d_model] (= saekit's W_encᵀ; it encodes
with F.linear), W_dec [d_sae, d_model], b_enc, b_dec, `activation_function.threshold` [d_sae] (JumpReLU; without
it a ReLU transcoder) and optional W_skip [d_model, d_model] (ŷ += x·W_skipᵀ). Input and output share d_model.
Its loaders build JumpReLU or ReLU only (its TopK module is never loaded from a file), so saekit exports
BatchTopK/Matryoshka transcoders (JumpReLU with the inference threshold, ReLU applied first, so exact while
the threshold is ≥ 0 and at most 4k latents of a token pass it) and refuses TopK ones. Its hook names are
relative to a layer's block and are kept verbatim: blocks.L.mlp.hook_in → `mlp.hook_in`, blocks.L.hook_mlp_out →
`hook_mlp_out`. That is exact on its nnsight backend (Llama/Qwen3/Gemma mappings: the output of the pre-MLP
norm); its TransformerLens backend loads HookedTransformer with fold_ln=False, where `ln2.hook_normalized` is
x/rms *before* the norm's weight, not the MLP input, so it is not used for `mlp.hook_in`. saekit's own fields
(each layer's config and info) ride in config.yaml's `saekit` block, which circuit-tracer ignores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import SaeConfig
from .errors import FileFormatError, OptionError, OutputError, SaekitError, ShapeError
from .files import atomic_write, claim_output, read_json, read_tensors, replacing, write_json, write_tensors
from .sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder

SPARSIFY_WEIGHTS = "sae.safetensors"
CT_CONFIG = "config.yaml"
FORMATS = ("saekit", "saelens", "sparsify", "circuit-tracer")

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out)$")
# Base-model-relative module names: Llama/Mistral/Qwen/NeoX `layers.L`, GPT-2 `h.L`; a leading
# `model.` / `transformer.` / `gpt_neox.` (names relative to the causal-LM wrapper) is accepted too.
_HF_POINT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_EMBED = re.compile(r"^(?:model\.)?embed_tokens$")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CT_LAYER = re.compile(r"^layer_(\d+)\.safetensors$")


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
    """'saekit', 'saelens', 'sparsify' (a hookpoint folder, or a folder of hookpoint folders), 'circuit-tracer'
    (config.yaml + layer_L.safetensors) or 'set' (a folder holding saekit/SAELens directories, e.g. a run over
    several layers)."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist.")
    if (path / SPARSIFY_WEIGHTS).is_file() or _sparsify_folders(path):
        return "sparsify"
    if (path / CT_CONFIG).is_file() and any(_CT_LAYER.match(p.name) for p in path.iterdir()):
        return "circuit-tracer"
    if (path / WEIGHTS_FILE).is_file() and (path / CFG_FILE).is_file():
        return "saekit" if "saekit" in read_json(path / CFG_FILE) else "saelens"
    if sae_dirs(path):
        return "set"
    raise FileFormatError(f"{path} is neither a saekit/SAELens SAE directory ({CFG_FILE} + {WEIGHTS_FILE}), a folder "
                          f"of them, a sparsify one (<hookpoint>/{CFG_FILE} + <hookpoint>/{SPARSIFY_WEIGHTS}) nor a "
                          f"circuit-tracer transcoder set ({CT_CONFIG} + layer_L.safetensors).")


def sae_dirs(path: str | Path) -> list[Path]:
    """saekit/SAELens directories one or two levels below `path` (a run: <hook>/<name>/ or <name>/)."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [d for pattern in ("*", "*/*") for d in path.glob(pattern)
             if not any(part.startswith(".") for part in d.relative_to(path).parts)
             and (d / CFG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()]
    return sorted(found)


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
    """A saekit SAE directory is a SAELens directory (`sae_lens.SAE.load_from_disk` loads it as is), except for
    TopK transcoders, which SAELens lacks: those are refused."""
    if sae.is_transcoder and not sae.batch_level:
        raise FileFormatError(f"SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU), so this {sae.kind} "
                              f"({sae.hook} → {sae.hook_out}) cannot be written for SAELens; train it with "
                              "--architecture batchtopk or matryoshka (saved as SAELens's jumprelu transcoder, with its "
                              "threshold), or keep saekit's own directory (--to saekit).")
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
    if arch in ("transcoder", "skip_transcoder"):
        raise FileFormatError(f"{path} holds a SAELens ReLU {arch} (every positive latent stays active); saekit's "
                              "transcoders keep k latents per token (TopK) or those above one threshold (BatchTopK, "
                              "saved as jumprelu_transcoder), so it has no saekit equivalent.")
    transcoder = arch.endswith("_transcoder")
    skip = arch.endswith("skip_transcoder")
    arch = arch.split("_")[0] if transcoder else arch  # jumprelu_skip_transcoder → jumprelu
    if arch not in ("topk", "jumprelu", "batchtopk"):
        raise FileFormatError(f"{path} holds a SAELens {cfg.get('architecture', arch)!r} dictionary; saekit imports "
                              "TopK and BatchTopK (JumpReLU with one threshold) SAEs and transcoders only.")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise FileFormatError(f"{path}: normalize_activations={norm!r} rescales each input at run time; saekit "
                              "imports SAEs whose normalisation is folded into the weights ('none').")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise FileFormatError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (per-head hook_z SAEs) "
                              "is not supported.")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg["d_out"]) if transcoder else d_in
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path / CFG_FILE} lacks d_in, d_sae or (a transcoder's) d_out ({e}).") from e
    details = meta.get("training_architecture_details") or {}
    k = k or cfg.get("k") or details.get("k")
    if k is None:
        raise FileFormatError(f"{path / CFG_FILE} records no k (SAELens JumpReLU configs may not); pass --k, the k "
                              "the SAE was trained with.")
    w = read_tensors(path / WEIGHTS_FILE, required=("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if skip else ()))
    _check_shapes(path / WEIGHTS_FILE, w, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out),
                                           "b_dec": (d_out,), **({"W_skip": (d_out, d_in)} if skip else {})})
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
    if cfg.get("apply_b_dec_to_input", True) is False and not transcoder:  # a transcoder never shifts its input
        b_enc = b_enc + b_dec @ W_enc  # x·W + b = (x − b_dec)·W + (b + b_dec·W)
    sae = SparseAutoencoder(_sae_config(path / CFG_FILE, d_in=d_in, d_sae=d_sae, k=int(k),
                                        architecture="topk" if arch == "topk" else "batchtopk", transcoder=transcoder,
                                        skip=skip, d_out=d_out if transcoder else None))
    _assign(sae, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
            **({"W_skip": w["W_skip"]} if skip else {}))
    hook = hook or meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    sae.info = {"hook": hook, "model": meta.get("model_name") or cfg.get("model_name"),
                "imported_from": {"format": "saelens", "path": str(path), "architecture": cfg.get("architecture", arch),
                                  "sae_lens_version": meta.get("sae_lens_version") or cfg.get("sae_lens_version")}}
    if transcoder:
        sae.info["hook_out"] = meta.get("hook_name_out") or cfg.get("hook_name_out")
    for ours, theirs in (("context_size", "context_size"), ("dataset_hf", "dataset_path")):
        if meta.get(theirs) is not None:
            sae.info[ours] = meta[theirs]
    return sae


# ----------------------------------------------------------------------------- transcoder sets, circuit-tracer

TranscoderSource = str | Path | Sequence[str | Path | SparseAutoencoder]


def load_transcoders(src: TranscoderSource, name: str | None = None, k: int | None = None) -> list[SparseAutoencoder]:
    """The transcoders of a set, ordered by layer: a circuit-tracer folder, a saekit run directory (one transcoder
    folder per layer, <hook>/<name>/), a single transcoder directory, or a list of directories / transcoders.
    `name` picks one folder name where a run trained several dictionaries per layer."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        fmt = detect_format(path)
        if fmt == "circuit-tracer":
            return import_circuit_tracer(path, k=k)
        if fmt == "sparsify":
            raise FileFormatError(f"{path} is a sparsify save; saekit reads transcoder sets from saekit runs, SAELens "
                                  "directories and circuit-tracer folders.")
        dirs = [path] if fmt in ("saekit", "saelens") else sae_dirs(path)
        if name is not None:
            dirs = [d for d in dirs if d.name == name]
            if not dirs:
                raise SaekitError(f"{path} holds no dictionary folder named {name!r} (found: "
                                  f"{', '.join(sorted({d.name for d in sae_dirs(path)})) or 'none'}).")
        src = dirs
    saes = [s if isinstance(s, SparseAutoencoder) else import_saelens(s, k=k) for s in src]
    where = [str(s) if not isinstance(s, SparseAutoencoder) else f"transcoder {i}" for i, s in enumerate(src)]
    by_hook: dict[str, list[str]] = {}
    for sae, w in zip(saes, where, strict=True):
        if not sae.is_transcoder:
            raise SaekitError(f"{w} is an SAE (it reads and rebuilds {sae.hook}), not a transcoder; a transcoder set "
                              "needs dictionaries that read an MLP's input and predict its output (saekit train "
                              "--transcoder).")
        by_hook.setdefault(str(sae.hook), []).append(w)
    for hook, ws in by_hook.items():
        if len(ws) > 1:
            raise SaekitError(f"{len(ws)} transcoders read {hook} ({', '.join(ws)}); a set has one per layer: pick one "
                              f"by folder name (--name, e.g. {Path(ws[0]).name!r}) or list the directories.")
    return sorted(saes, key=lambda s: _block_hook(s.hook, "a transcoder")[0])


def _block_hook(hook: str | None, what: str) -> tuple[int, str]:
    """(layer L, the hook's name inside block L) of blocks.L.<name>."""
    m = _BLOCK_HOOK.match(hook or "")
    if not m:
        raise SaekitError(f"{what} records hook {hook!r}, not a hook inside a block (blocks.L.<name>); a transcoder set "
                          "is indexed by layer. Record the hook (saekit convert --hook blocks.L.mlp.hook_in).")
    return int(m.group(1)), m.group(2)


def _check_layers(layers: list[int], n_layers: int | None, hook_of: Any, where: str) -> None:
    want = range(n_layers if n_layers is not None else max(layers) + 1)
    missing = [layer for layer in want if layer not in layers]
    if missing:
        raise SaekitError(f"{where} has no transcoder for layer {', '.join(map(str, missing))} ({', '.join(map(hook_of, missing))}); "
                          f"a circuit-tracer set replaces every MLP, layers 0 … {len(want) - 1}: train the missing "
                          f"layer(s) (saekit train --transcoder --layers {','.join(map(str, missing))}) and add them.")
    extra = [layer for layer in layers if layer not in want]
    if extra:
        raise SaekitError(f"{where} has transcoders for layer(s) {', '.join(map(str, extra))} beyond the model's "
                          f"{n_layers} layers.")


def export_circuit_tracer(src: TranscoderSource, out: str | Path, n_layers: int | None = None, name: str | None = None,
                          scan: str | None = None) -> Path:
    """Write a transcoder set as circuit-tracer's `config.yaml + layer_L.safetensors` (see the module doc): every
    layer 0 … n_layers−1 (or up to the last one present) must have one BatchTopK/Matryoshka transcoder with
    d_out = d_in. Load it there with `load_transcoders_from_cache(OUT.name, cache_dir=OUT.parent)`, or
    `ReplacementModel.from_pretrained(model, OUT.name)` with CIRCUIT_TRACER_CACHE_DIR=OUT.parent."""
    import yaml

    saes = load_transcoders(src, name=name)
    if not saes:
        raise SaekitError(f"{src} holds no transcoders.")
    placed = [_block_hook(s.hook, f"the transcoder for {s.hook}") + _block_hook(s.hook_out, f"the transcoder for {s.hook}")
              for s in saes]
    layers = [p[0] for p in placed]
    _check_layers(layers, n_layers, lambda layer: f"blocks.{layer}.{placed[0][1]}", f"the set {src}"
                  if isinstance(src, (str, Path)) else "the set")
    for sae, (layer, hook_in, layer_out, hook_out) in zip(saes, placed, strict=True):
        if (hook_in, hook_out) != placed[0][1::2] or layer_out != layer:
            raise SaekitError(f"circuit-tracer reads every layer at one hook pair, but layer {layer} maps {sae.hook} → "
                              f"{sae.hook_out} and layer {placed[0][0]} blocks.L.{placed[0][1]} → blocks.L.{placed[0][3]}.")
        if not sae.batch_level:
            raise FileFormatError(f"the transcoder for {sae.hook} is TopK: circuit-tracer 0.5 loads transcoders as JumpReLU "
                                  "(a threshold in the file) or ReLU only (its TopK module is never built from a file), so "
                                  "it cannot be exported exactly. Train with --architecture batchtopk or matryoshka: it is "
                                  "exported as JumpReLU with its inference threshold.")
        if sae.cfg.out_dim != sae.cfg.d_in:
            raise ShapeError(f"the transcoder for {sae.hook} maps width {sae.cfg.d_in} to {sae.cfg.out_dim}; circuit-tracer's "
                             "transcoders read and write the residual width d_model (d_in = d_out).")
        if sae.cfg.d_sae != saes[0].cfg.d_sae:
            raise ShapeError(f"circuit-tracer needs one d_sae for every layer: {saes[0].hook} has {saes[0].cfg.d_sae}, "
                             f"{sae.hook} has {sae.cfg.d_sae}.")
    model = next((s.info.get("model") for s in saes if s.info.get("model")), None)
    out = Path(out)
    own = {layer: {"sae": asdict(s.cfg), "info": json.loads(json.dumps(s.info, default=str)),
                   "weights_sha256": s.weights_hash()} for layer, s in zip(layers, saes, strict=True)}
    config = {"model_kind": "transcoder_set", "model_name": model, "feature_input_hook": placed[0][1],
              "feature_output_hook": placed[0][3], "scan": scan or f"saekit/{out.name}",
              "saekit": {"format_version": 1, "layers": own}}
    with replacing(out) as staged:
        for layer, sae in zip(layers, saes, strict=True):
            w = sae.weights()
            tensors = {"W_enc": w["W_enc"].t(), "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
                       "activation_function.threshold": w["threshold"]}
            if "W_skip" in w:
                tensors["W_skip"] = w["W_skip"]
            write_tensors(staged / f"layer_{layer}.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                          metadata={"format": "pt"})
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write(staged / CT_CONFIG, lambda p: p.write_text(text))
    return out


def import_circuit_tracer(path: str | Path, k: int | None = None) -> list[SparseAutoencoder]:
    """A circuit-tracer transcoder set (config.yaml + layer_L.safetensors, or config.yaml's `transcoders:` list
    of local files) as saekit transcoders, one per layer, with identical outputs. JumpReLU transcoders with one
    threshold become BatchTopK ones (k from saekit's block in config.yaml, or `k`); ReLU and per-latent-threshold
    transcoders, and cross-layer transcoders, have no saekit equivalent and are refused."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load((path / CT_CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FileFormatError(f"{path / CT_CONFIG} cannot be read as YAML ({e}).") from e
    if not isinstance(config, dict) or config.get("model_kind", "transcoder_set") != "transcoder_set":
        kind = config.get("model_kind") if isinstance(config, dict) else type(config).__name__
        raise FileFormatError(f"{path / CT_CONFIG} describes a {kind!r}, not a per-layer transcoder set "
                              "(model_kind: transcoder_set); saekit has no cross-layer transcoders.")
    try:
        hook_in, hook_out = str(config["feature_input_hook"]), str(config["feature_output_hook"])
    except KeyError as e:
        raise FileFormatError(f"{path / CT_CONFIG} lacks {e} (circuit-tracer needs feature_input_hook and "
                              "feature_output_hook).") from e
    if config.get("transcoders"):
        remote = [f for f in config["transcoders"] if str(f).startswith("hf://")]
        if remote:
            raise FileFormatError(f"{path / CT_CONFIG} lists Hub files ({remote[0]} …); download the set first (circuit-"
                                  "tracer's save_transcoders_to_cache writes config.yaml + layer_L.safetensors) and "
                                  "import that folder.")
        files = {i: path / f for i, f in enumerate(config["transcoders"])}
    else:
        files = {int(m.group(1)): p for p in path.iterdir() if (m := _CT_LAYER.match(p.name))}
    _check_layers(sorted(files), None, lambda layer: f"layer_{layer}.safetensors", str(path))
    own = (config.get("saekit") or {}).get("layers") or {}
    saes = []
    for layer, file in sorted(files.items()):
        mine = own.get(layer) or own.get(str(layer)) or {}
        w = read_tensors(file, required=("W_enc", "W_dec", "b_enc", "b_dec"))
        d_sae, d_model = w["W_enc"].shape if w["W_enc"].ndim == 2 else (0, 0)
        _check_shapes(file, w, {"W_enc": (d_sae, d_model), "W_dec": (d_sae, d_model), "b_enc": (d_sae,),
                                "b_dec": (d_model,), **({"W_skip": (d_model, d_model)} if "W_skip" in w else {})})
        t = w.get("activation_function.threshold")
        if t is None:
            raise FileFormatError(f"{file} is a ReLU transcoder (no activation_function.threshold: every positive "
                                  "latent stays active); saekit's transcoders keep k latents per token or those above "
                                  "one threshold, so it has no saekit equivalent.")
        t = t.double().flatten()
        if t.numel() not in (1, d_sae) or (t.max() - t.min()).abs() > 1e-6 * max(1.0, t.abs().max().item()):
            raise FileFormatError(f"{file} is a JumpReLU transcoder with per-latent thresholds (from {t.min():.4g} to "
                                  f"{t.max():.4g}); saekit's BatchTopK uses one threshold for every latent.")
        if mine.get("sae"):
            cfg = _sae_config(path / CT_CONFIG, **mine["sae"])
        else:
            if k is None:
                raise FileFormatError(f"{path / CT_CONFIG} records no k (circuit-tracer's JumpReLU transcoders have "
                                      "none); pass --k, the k the transcoders were trained with.")
            cfg = _sae_config(path / CT_CONFIG, d_in=d_model, d_sae=d_sae, k=int(k), architecture="batchtopk",
                              transcoder=True, skip="W_skip" in w, d_out=d_model)
        if cfg.skip != ("W_skip" in w) or (cfg.d_in, cfg.d_sae, cfg.out_dim) != (d_model, d_sae, d_model):
            raise ShapeError(f"{file} does not match config.yaml's saekit block for layer {layer} ({cfg}).")
        sae = SparseAutoencoder(cfg)
        _assign(sae, W_enc=w["W_enc"].t(), b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"], threshold=t[0].item(),
                **({"W_skip": w["W_skip"]} if "W_skip" in w else {}))
        sae.info = dict(mine.get("info") or {"hook": f"blocks.{layer}.{hook_in}", "hook_out": f"blocks.{layer}.{hook_out}",
                                             "model": config.get("model_name")})
        sae.info["imported_from"] = {"format": "circuit-tracer", "path": str(file), "scan": config.get("scan")}
        saes.append(sae)
    return saes


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
    """Load a saekit, SAELens or sparsify SAE directory as a saekit SAE; from a circuit-tracer set or a folder of
    dictionaries, the one that reads `hook` (or the only one)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sparsify":
        return import_sparsify(path, hookpoint=hookpoint, hook=hook, n_layers=n_layers)
    if fmt in ("saekit", "saelens"):
        return import_saelens(path, hook=hook, k=k)
    if fmt in ("circuit-tracer", "set"):
        saes = import_circuit_tracer(path, k=k) if fmt == "circuit-tracer" else [import_saelens(d, k=k) for d in sae_dirs(path)]
        picked = [s for s in saes if hook is None or s.hook == hook]
        if len(picked) == 1:
            return picked[0]
        raise SaekitError(f"{path} holds {len(saes)} dictionaries ({', '.join(str(s.hook) for s in saes)}); "
                          + (f"none reads {hook}." if hook else "pick one with --hook, or convert the whole set."))
    raise SaekitError(f"unknown format {fmt!r}: use one of auto, {', '.join(FORMATS)}.")


def convert(src: str | Path, out: str | Path, to: str = "saekit", fmt: str = "auto", hookpoint: str | None = None,
            hook: str | None = None, k: int | None = None, n_layers: int | None = None,
            approximate_batchtopk: bool = False, overwrite: bool = False, name: str | None = None) -> Path:
    """Convert an SAE between formats; returns the written directory (a hookpoint folder for sparsify).
    A transcoder set (a run over several layers, or a circuit-tracer folder) converts as a whole: to
    circuit-tracer, or to saekit/SAELens as one directory per layer, OUT/<hook>/ (`name` picks the dictionary
    where a run trained several per layer). An existing output is replaced only by the same weights, or with
    `overwrite`."""
    if to not in FORMATS:
        raise SaekitError(f"unknown target format {to!r}: use one of {', '.join(FORMATS)}.")
    fmt = detect_format(src) if fmt == "auto" else fmt
    out = Path(out)
    if fmt == "set" and to != "circuit-tracer" and len(sae_dirs(src)) == 1:
        fmt = "saekit"  # a run with one dictionary: convert that one
        src = sae_dirs(src)[0]
    if to == "circuit-tracer" or fmt in ("circuit-tracer", "set"):
        if to == "sparsify":
            raise SaekitError("saekit exports SAEs to sparsify, not transcoder sets; convert to saekit, saelens or "
                              "circuit-tracer.")
        saes = import_circuit_tracer(src, k=k) if fmt == "circuit-tracer" else load_transcoders(src, name=name, k=k)
        if Path(src).resolve() == out.resolve():
            raise OutputError(f"out_dir {out} is the source itself; write the converted set to another folder.")

        def differs(path: Path) -> str | None:
            try:
                old = load_transcoders(path)
            except SaekitError:
                return "unreadable transcoders"
            return None if [o.weights_hash() for o in old] == [s.weights_hash() for s in saes] else "other weights"

        if to == "circuit-tracer":
            claim_output(out, "a circuit-tracer transcoder set", lambda p: (p / CT_CONFIG).is_file(), overwrite,
                         differs, flag="out_dir")
            return export_circuit_tracer(saes, out, n_layers=n_layers)
        claim_output(out, "a transcoder set", lambda p: bool(sae_dirs(p)), overwrite, differs, flag="out_dir")
        with replacing(out) as staged:
            for sae in saes:
                if to == "saekit":
                    sae.save(staged / str(sae.hook))
                else:
                    export_saelens(sae, staged / str(sae.hook))
        return out
    sae = load_any(src, fmt, hookpoint=hookpoint, hook=hook, k=k, n_layers=n_layers)
    if to == "sparsify":
        point = hookpoint if hookpoint and fmt != "sparsify" else None
        if point or sae.hook:
            _claim_sae_dir(out / (point or hookpoint_for(sae.hook)), sae, SPARSIFY_WEIGHTS, overwrite, "out_dir", src)
        return export_sparsify(sae, out, hookpoint=point, approximate_batchtopk=approximate_batchtopk)
    _claim_sae_dir(out, sae, WEIGHTS_FILE, overwrite, "out_dir", src)
    return sae.save(out) if to == "saekit" else export_saelens(sae, out)


def describe_converted(path: str | Path) -> str:
    """What `convert` wrote, in a few lines (for the CLI)."""
    path = Path(path)
    fmt = detect_format(path)
    saes = (import_circuit_tracer(path) if fmt == "circuit-tracer" else load_transcoders(path) if fmt == "set"
            else [load_any(path, fmt)])
    lines = []
    for sae in saes:
        c = sae.cfg
        arrow = f" → {sae.hook_out}" if sae.is_transcoder else ""
        lines.append(f"  {sae.kind} {c.architecture} d_in={c.d_in} d_sae={c.d_sae} k={c.k} hook={sae.hook}{arrow}"
                     + (f" threshold={float(sae.threshold):.4g}" if sae.batch_level else ""))
    if len(lines) > 4:
        lines = lines[:2] + [f"  … {len(lines) - 3} more …", lines[-1]]
    if fmt in ("circuit-tracer", "set"):
        lines.insert(0, f"  {'circuit-tracer set' if fmt == 'circuit-tracer' else 'set'} of {len(saes)} transcoders, "
                        f"one per layer ({saes[0].hook} … {saes[-1].hook})")
    if fmt in ("saekit", "saelens") and not saes[0].info.get("model_arg"):
        lines.append("  (no model recorded: `saekit eval` uses --model, default the embedded SmolLM2)")
    return "\n".join(lines)


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
