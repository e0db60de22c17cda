"""The `saekit` command: parsers and dispatch only. Flags come from the config dataclasses (each field's
docstring is its help; each flag belongs to one config); `--config FILE` (YAML or JSON) sets the same keys,
and flags given on the command line override it. Each command builds its typed configs once and hands them
to the library (runner, features, steer, interop, apps)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Literal

from .config import (
    Count,
    DistConfig,
    EvalConfig,
    ExplainConfig,
    FlowConfig,
    HarvestConfig,
    NeuronpediaConfig,
    RunConfig,
    SaeConfig,
    SteerConfig,
    SuiteConfig,
    TrainConfig,
    TrainRun,
    convert,
)
from .errors import OptionError, SaekitError

DEMO_OUT = "runs/demo"
CIRCUITS_OUT = "runs/demo-circuits"
# `saekit demo-circuits`: BatchTopK transcoders (exported to SAELens and circuit-tracer as JumpReLU) on every
# layer; sized to finish in under 30 min on 2 cores without native bf16 (README: Transcoders). 48 steps per layer:
# a 50-step warm-up would leave the lr short of its peak the whole run (measured on layer 6: FVU 0.63 → 0.51).
CIRCUITS_DEFAULTS = {"transcoder": True, "layers": "all", "architecture": "batchtopk", "tokens": 90_000,
                     "epochs": 2.0, "warmup_steps": 5, "storage_dtype": "float16", "eval_tokens": 1024}
Values = dict[str, Any]


# ----------------------------------------------------------------------------- dataclass ⇄ argparse

@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), inherited ones included, keyed by field name."""
    import docstring_parser

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for p in docstring_parser.parse_from_object(klass).params:
            if p.description:
                docs[p.arg_name] = " ".join(p.description.split())
    return docs


def _item_type(hint: Any) -> Any:
    """The type a flag stands for: X for `X | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _item_type(args[0])
    return hint


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", exclude: tuple[str, ...] = (),
                    defaults: Values | None = None) -> None:
    """One flag per field of `cls` (`--prefix-name`), its help the field's docstring. Every flag defaults to
    None, so the command can tell a flag given from one left out (a config file fills those)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default_factory() if callable(f.default_factory) else f.default)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        flag, dest = "--" + (prefix + f.name).replace("_", "-"), prefix + f.name
        help_text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        hint = _item_type(hints[f.name])
        if hint is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # text as given: the config converts and checks it (one mechanism for flags, files and Python)
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            group.add_argument(flag, dest=dest, choices=choices, default=None, help=help_text)


def config_from(cls: type, values: Values, prefix: str = "", **fixed: Any):
    """An instance of `cls` from the values given for its fields (`fixed` ones set by the command); a value
    the config refuses is reported under its flag."""
    given = {f.name: values[prefix + f.name] for f in dataclasses.fields(cls)
             if values.get(prefix + f.name) is not None and f.name not in fixed}
    with flag_names(prefix):
        return cls(**given, **fixed)


@contextmanager
def flag_names(prefix: str = "") -> Iterator[None]:
    """An OptionError from a config becomes a message naming the flag (and the config-file key)."""
    try:
        yield
    except OptionError as e:
        key = prefix + e.option
        shown = ",".join(map(str, e.value)) if isinstance(e.value, list) else e.value
        name = key if "." in key else "--" + key.split("[")[0].replace("_", "-")  # an item names its list's flag
        raise SaekitError(f"{name} {shown!r}: {e.problem} (config-file key {key.split('[')[0]}).") from None


def read_config_file(path: Path) -> Values:
    """A YAML (or JSON, which YAML reads too) mapping of option names to values, whatever the file's suffix."""
    import yaml

    if not path.is_file():
        raise SaekitError(f"--config {path}: no such file.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SaekitError(f"--config {path}: not valid YAML or JSON ({e}).") from None
    if not isinstance(data, dict):
        raise SaekitError(f"--config {path} must hold a mapping of option names to values (like `tokens: 100000`), "
                          f"not {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def options(args: argparse.Namespace) -> Values:
    """Config-file values, overridden by the flags the user gave; `--hook H` is `--hooks H`."""
    known = sorted((set(vars(args)) | {"saes"}) - {"command", "config"})
    values: Values = {}
    if getattr(args, "config", None):
        values = read_config_file(Path(args.config))
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                initials = "".join(w[:1] for w in key.split("_"))  # learning_rate → lr
                close += [initials] if initials in known and initials not in close and "_" in key else []
                raise SaekitError(f"--config {args.config}: unknown option {key!r}"
                                  + (f"; did you mean {' or '.join(close)}?" if close else "")
                                  + f". See `saekit {args.command} --help` for the options.")
    values |= {k: v for k, v in vars(args).items() if v is not None}
    if "hook" in values:
        values["hooks"] = [values.pop("hook")]
    return values


def sae_configs(values: Values) -> list[SaeConfig]:
    """The SAEs trained together: a config file's `saes` list, else one per (d_sae, k) of --d-sae × --k.
    Their d_in is set from the activations."""
    from .runner import sae_grid

    saes = values.get("saes")
    with flag_names():
        if isinstance(saes, list) and saes and isinstance(saes[0], dict):
            return convert(saes, list[SaeConfig], "saes")
        return sae_grid(convert(values.get("k", SaeConfig.k), list[Count], "k"),
                        convert(values.get("d_sae", SaeConfig.d_sae), list[Count], "d_sae"),
                        values.get("architecture", "topk"), transcoder=bool(values.get("transcoder")),
                        skip=bool(values.get("skip")), prefixes=convert(values.get("prefixes", []), list[Count], "prefixes"))


def train_run(values: Values, out: str) -> TrainRun:
    """The typed configs of `saekit train` / `saekit demo`."""
    if values.get("activations") and "hooks" not in values:
        values = {**values, "hooks": []}  # train on every hook in the cache
    if values.get("transcoder") and not values.get("activations"):
        values = {**values, "mlp_pairs": True}  # a transcoder trains on its MLP's input and output
    return TrainRun(harvest=config_from(HarvestConfig, values),
                    train=config_from(TrainConfig, values, saes=sae_configs(values)),
                    eval=config_from(EvalConfig, values, prefix="eval_"),
                    run=config_from(RunConfig, {"out": out, **values}), dist=config_from(DistConfig, values))


# ----------------------------------------------------------------------------- commands

def cmd_harvest(values: Values) -> int:
    from .runner import harvest

    harvest(config_from(HarvestConfig, values), values.get("out") or "runs/activations", bool(values.get("overwrite")))
    return 0


def cmd_train(values: Values) -> int:
    from .runner import train_run as run

    run(train_run(values, "runs/train"))
    return 0


def cmd_demo(values: Values) -> int:
    from .runner import demo

    demo(train_run(values, DEMO_OUT))
    return 0


def cmd_demo_circuits(values: Values) -> int:
    from .runner import demo_circuits

    demo_circuits(train_run({**CIRCUITS_DEFAULTS, **values}, CIRCUITS_OUT))
    return 0


def cmd_eval(values: Values) -> int:
    from .runner import dictionaries_in, evaluate_replacement_set, evaluate_sae

    cfg = config_from(EvalConfig, values, prefix="eval_")
    where = dict(model_arg=values.get("model"), dataset=values.get("dataset"), device=values.get("device") or "auto")
    if values.get("replace_all"):
        evaluate_replacement_set(Path(values["sae_dir"]), cfg, **where)
        return 0
    if values.get("suite"):  # the evaluation suite: inputs made once for every dictionary; + report.html
        from .evals.suite import run_suite

        run_suite(dictionaries_in(values["sae_dir"]), cfg, config_from(SuiteConfig, values), **where)
        return 0
    for path in dictionaries_in(values["sae_dir"]):
        evaluate_sae(path, cfg, **where)
    return 0


def cmd_sweep(values: Values) -> int:
    from .evals.suite import run_suite
    from .evals.sweep import ARCHITECTURES, check_sweep, sweep_saes
    from .runner import train_run as run

    with flag_names():
        saes = sweep_saes(convert(values.get("architectures") or ",".join(ARCHITECTURES), list[str], "architectures"),
                          convert(values.get("k", SaeConfig.k), list[Count], "k"),
                          convert(values.get("d_sae", SaeConfig.d_sae), list[Count], "d_sae"))
    spec = train_run({**values, "saes": [dataclasses.asdict(s) for s in saes], "eval": False}, "runs/sweep")
    check_sweep(spec)  # one hook, one model: refused before any training
    paths = run(spec)
    run_suite(paths, spec.eval, config_from(SuiteConfig, {"suite": "all", **values}, seed=spec.harvest.seed),
              device=spec.harvest.device)
    print(f"\ncompare them:  saekit compare {spec.run.out}")
    return 0


def cmd_compare(values: Values) -> int:
    from .evals.compare import compare

    compare(values["dir"])
    return 0


def cmd_convert(values: Values) -> int:
    from .interop import convert, describe_converted

    src = values["src"]
    written = convert(src, values["out_dir"], to=values.get("to") or "saekit", fmt=values.get("from_format") or "auto",
                      hookpoint=values.get("hookpoint"), hook=(values.get("hooks") or [None])[0], k=values.get("k"),
                      n_layers=values.get("n_layers"), approximate_batchtopk=bool(values.get("approximate_batchtopk")),
                      overwrite=bool(values.get("overwrite")), name=values.get("name"))
    print(f"{src} → {written}\n{describe_converted(written)}")
    return 0


def cmd_analyze(values: Values) -> int:
    from .features import FeatureConfig, analyze

    sae_dir = Path(values["sae_dir"])
    out = Path(values.get("out") or sae_dir.parent / "store")
    analyze(sae_dir, out, config_from(FeatureConfig, values), activations=values.get("activations"),
            model_arg=values.get("model"), dataset=values.get("dataset"), overwrite=bool(values.get("overwrite")))
    print(f"browse it with:  saekit browse {out}")
    return 0


def cmd_export_neuronpedia(values: Values) -> int:
    from .neuronpedia import export_neuronpedia

    store = Path(values["store"])
    export_neuronpedia(store, values.get("out") or store.with_name(store.name + "-neuronpedia"),
                       config_from(NeuronpediaConfig, values), sae_dir=values.get("sae"), model_arg=values.get("model"),
                       overwrite=bool(values.get("overwrite")))
    return 0


def cmd_browse(values: Values) -> int:
    from .apps.serve import browse

    return browse(values["store"], values["port"], values.get("graphs"))


def cmd_steer(values: Values) -> int:
    from .steer import generate, load_for_steering, make_edit, where

    cfg = config_from(SteerConfig, values)
    if values.get("flow"):
        from .flow_steer import steer_along_flow

        print(steer_along_flow(values["flow"], values["sae"], values["feature"], cfg, values.get("model"),
                               values.get("flow_depth") or 3))
        return 0
    model, sae, store = load_for_steering(values["sae"], values.get("model"), values.get("store"))
    edit = make_edit(cfg.mode, values["feature"], cfg.strength or 0.0, cfg.positions)
    units = (f"typical activations (from the feature store {store.path})" if store is not None and cfg.mode == "add"
             else "raw units")
    g = generate(model, sae, cfg.prompt, edit, cfg.seed, cfg.max_new_tokens, cfg.temperature, scale=store,
                 use_cache=cfg.kv_cache)
    print(f"{edit.describe()} at {where(sae)}; strength in {units}; seed {g.seed}, temperature {g.temperature:g}\n")
    print(g.side_by_side(cfg.width))
    return 0


def cmd_steer_eval(values: Values) -> int:
    from .steer import load_for_steering
    from .steer_eval import SteerEvalConfig, claim_report, run_and_report

    cfg = config_from(SteerEvalConfig, values)
    out = Path(values.get("out") or Path(values["sae"]) / ("steer-eval-flow" if values.get("flow") else "steer-eval"))
    claim_report(out, cfg, bool(values.get("overwrite")))
    if values.get("flow"):
        from .flow_eval import run_and_report as run_flow_eval

        run_flow_eval(values["flow"], values["sae"], cfg, out, values.get("flow_depth") or 3,
                      values.get("flow_min_cos"), values.get("model"))
        return 0
    model, sae, store = load_for_steering(values["sae"], values.get("model"), values.get("store"))
    run_and_report(model, sae, cfg, Path(values["sae"]), store, out)
    return 0


def cmd_attribute(values: Values) -> int:
    from .attribution import AttributionConfig, attribute_to_dir

    tcs, saes, prompt, prompts = (values.get(k) for k in ("transcoders", "saes", "prompt", "prompts"))
    if bool(tcs) == bool(saes):
        raise OptionError("give --transcoders (an attribution graph) or --saes (attribution patching over residual "
                          "SAEs), one of them.")
    if bool(prompt) == bool(prompts):
        raise OptionError("give --prompt TEXT or --prompts FILE (a prompt set), one of them.")
    common = {"model_arg": values.get("model"), "device": values.get("device") or "cpu",
              "overwrite": bool(values.get("overwrite"))}
    if tcs:
        if prompts:
            raise OptionError("--prompts is for attribution patching (--saes); a graph traces one --prompt.")
        attribute_to_dir(tcs, prompt, values["out"], values.get("target"), config_from(AttributionConfig, values),
                         validate_top=values.get("validate") or 0, **common)
        return 0
    from .attribution.patching import MetricPrompt, patch_to_dir, read_prompts

    if prompt:
        target = values.get("target")
        if not target:
            raise OptionError("attribution patching needs a metric: --target ' Paris' (its logit minus the mean "
                              "logit) or --target ' Paris| London' (a logit difference).")
        a, _, b = target.partition("|")
        items = [MetricPrompt(prompt, a, b or None)]
    else:
        items = read_prompts(prompts)
    patch_to_dir(saes, items, values["out"], ig_steps=values.get("ig_steps", 10),
                 validate_top=values.get("validate") or 0, max_tokens=values.get("max_tokens") or 64, **common)
    return 0


def cmd_flow(values: Values) -> int:
    from .flow import run_flow
    from .runner import dictionaries_in

    root = Path(values["sae_set"])
    run_flow(root, dictionaries_in(root), values.get("out") or root / "flow", config_from(FlowConfig, values),
             model_arg=values.get("model"), dataset=values.get("dataset"), overwrite=bool(values.get("overwrite")))
    return 0


def cmd_explain(values: Values) -> int:
    import json

    from .explain import dry_run, format_report, make_client, needs_llm, parse_features, run
    from .features.store import open_store

    cfg = config_from(ExplainConfig, values)
    store = open_store(values["store"])
    if values.get("dry_run"):
        d = dry_run(store, cfg, parse_features(cfg.features, store.d_sae))
        print(json.dumps(d, indent=1))
        return 0
    client = None  # the lexical scorer on stored explanations asks no LLM: none is loaded
    if needs_llm(store, cfg, parse_features(cfg.features, store.d_sae), keep_done=not values.get("overwrite")):
        client = make_client(cfg.llm, cfg.model, cfg.api_key_env, cfg.timeout, cfg.retries, cfg.rate_limit)
    print(f"saekit explain: LLM {client.name if client else 'none needed'}; results in {store.path}/explanations.sqlite")
    rep = run(store, client, cfg, resume=bool(values.get("resume")), overwrite=bool(values.get("overwrite")))
    print(format_report(rep))
    return 0


# ----------------------------------------------------------------------------- parsers

def build_parser() -> argparse.ArgumentParser:
    from .features import FeatureConfig
    from .steer_eval import SteerEvalConfig

    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML or JSON file of options (flags override it)")

    def overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--overwrite", action="store_true", default=None, help=f"replace {what}; without it, refused")

    p = sub.add_parser("harvest", help="harvest activations into an on-disk cache")
    config_flag(p)
    p.add_argument("--out", help="cache directory (default runs/activations)")
    overwrite_flag(p, "a cache of another harvest (or another artifact) in --out")
    p.add_argument("--hook", help="one hook name (shorthand for --hooks)")
    add_config_args(p, HarvestConfig)

    for name, helptext, out in (("train", "harvest (or read --activations), train SAEs, evaluate them", "runs/train"),
                                ("demo", "the embedded default end to end, into runs/demo", DEMO_OUT),
                                ("demo-circuits", "transcoders on every layer of the default model, each evaluated, then "
                                                  "all MLPs replaced at once; into runs/demo-circuits", CIRCUITS_OUT)):
        p = sub.add_parser(name, help=helptext)
        config_flag(p)
        p.add_argument("--hook", help="one hook name (shorthand for --hooks)")
        p.add_argument("--k", help="active latents per token; a comma list trains one SAE per value (default 32)")
        p.add_argument("--d-sae", help="number of latents; a comma list trains one SAE per value (default 4608)")
        p.add_argument("--architecture", choices=["topk", "batchtopk", "matryoshka"],
                       help="activation: topk, batchtopk or matryoshka (BatchTopK with nested prefixes; default topk)")
        p.add_argument("--prefixes", help="Matryoshka prefix sizes, increasing, the last = d_sae (default d_sae/16, "
                                          "/8, /4, /2, 1)")
        p.add_argument("--transcoder", action="store_true", default=None,
                       help="train transcoders: read each of --layers' MLP input, predict its output (one harvest pass)")
        p.add_argument("--skip", action="store_true", default=None,
                       help="with --transcoder: skip-transcoders (a dense linear path W_skip·x beside the latents)")
        shown = CIRCUITS_DEFAULTS if name == "demo-circuits" else {}
        add_config_args(p, HarvestConfig, defaults=shown)
        # the run's seed and device are the harvest's flags, passed on to training
        add_config_args(p, TrainConfig, exclude=("saes", "seed", "device"), defaults=shown)
        add_config_args(p, EvalConfig, prefix="eval_", defaults={"tokens": shown.get("eval_tokens", EvalConfig.tokens)})
        add_config_args(p, RunConfig, defaults={"out": out})
        if name == "train":
            add_config_args(p, DistConfig)

    p = sub.add_parser("eval", help="evaluate an SAE or transcoder (or each in a run folder) on held-out text; "
                                    "writes eval.json")
    config_flag(p)
    p.add_argument("sae_dir", help="a dictionary directory, or a run folder holding several")
    p.add_argument("--replace-all", action="store_true", default=None,
                   help="a transcoder set: CE/KL with every MLP replaced at once (the replacement model); writes "
                        "SAE_DIR/replacement_eval.json")
    p.add_argument("--model", help="override the model recorded in the SAE")
    p.add_argument("--dataset", help="override the dataset recorded in the SAE")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    add_config_args(p, EvalConfig, prefix="eval_")
    add_config_args(p, SuiteConfig)

    p = sub.add_parser("sweep", help="train several SAEs (architectures × k × d_sae) from one activation stream of one "
                                     "hook, then run the evaluation suite on each; compare them with saekit compare")
    config_flag(p)
    p.add_argument("--hook", help="the one hook every SAE reads (shorthand for --hooks)")
    p.add_argument("--architectures", help="comma list of topk, batchtopk, matryoshka (default all three)")
    p.add_argument("--k", help="comma list of k (default 32)")
    p.add_argument("--d-sae", help="comma list of d_sae (default 4608)")
    add_config_args(p, HarvestConfig)
    add_config_args(p, TrainConfig, exclude=("saes", "seed", "device"))
    add_config_args(p, EvalConfig, prefix="eval_")
    add_config_args(p, RunConfig, exclude=("eval",), defaults={"out": "runs/sweep"})
    add_config_args(p, SuiteConfig, exclude=("seed",), defaults={"suite": "all"})

    p = sub.add_parser("compare", help="the SAEs evaluated under DIR side by side: L0 frontier plots with error bars "
                                       "and a sortable table (DIR/compare.html, DIR/compare.md)")
    p.add_argument("dir", help="a sweep's folder, or any folder holding evaluated SAEs (eval.json)")

    p = sub.add_parser("convert", help="convert an SAE or a transcoder set between saekit, SAELens, sparsify and "
                                       "circuit-tracer formats")
    p.add_argument("src", help="SAE directory: saekit/SAELens (cfg.json + sae_weights.safetensors) or sparsify "
                               "(<hookpoint>/cfg.json + sae.safetensors, or the folder holding hookpoint folders)")
    p.add_argument("out_dir", help="output directory (for sparsify: the folder that gets <hookpoint>/)")
    p.add_argument("--to", choices=["saekit", "saelens", "sparsify", "circuit-tracer"], default="saekit",
                   help="target format (saekit and saelens write the same directory; circuit-tracer: a whole transcoder "
                        "set, config.yaml + layer_L.safetensors; default saekit)")
    p.add_argument("--from", dest="from_format", choices=["auto", "saekit", "saelens", "sparsify", "circuit-tracer"],
                   default="auto",
                   help="source format (default: detected)")
    p.add_argument("--hookpoint", help="sparsify module name (picks one of several on import; names the folder on "
                                       "export; default: mapped from the hook, blocks.L.hook_resid_pre → layers.L-1)")
    p.add_argument("--hook", help="transformer-lens hook to record (default: from the source; sparsify layers.L → "
                                  "blocks.L+1.hook_resid_pre)")
    p.add_argument("--k", type=int, help="k for SAELens JumpReLU SAEs and circuit-tracer sets that record none")
    p.add_argument("--n-layers", type=int, help="model depth: sparsify's last layers.L maps to hook_resid_post; a "
                                                "circuit-tracer set must have a transcoder for each of its layers")
    p.add_argument("--name", help="a run that trained several dictionaries per layer: the folder name to convert "
                                  "(e.g. stc-btk32-d4608)")
    p.add_argument("--approximate-batchtopk", action="store_true", default=None,
                   help="export a BatchTopK SAE to sparsify as TopK k (sparsify has no threshold activation)")
    overwrite_flag(p, "an SAE with other weights in OUT_DIR")

    p = sub.add_parser("analyze", help="build the feature store (one pass over text or a cached harvest) for `browse`")
    p.add_argument("sae_dir")
    p.add_argument("--out", help="store directory (default: SAE_DIR/../store)")
    overwrite_flag(p, "a store of another SAE or config (its labels.sqlite is kept), or another artifact, in --out")
    p.add_argument("--activations", help="read a cache written by `saekit harvest`/`train` instead of running the model")
    p.add_argument("--model", help="override the model recorded in the SAE (or the cache)")
    p.add_argument("--dataset", help="override the dataset recorded in the SAE (or the cache)")
    add_config_args(p, FeatureConfig)

    p = sub.add_parser("export-neuronpedia", help="write a feature store as Neuronpedia dashboard batches (the JSON "
                                                  "SAEDashboard's Neuronpedia runner writes)")
    p.add_argument("store", help="a directory written by `saekit analyze`")
    p.add_argument("--out", help="output directory (default: STORE-neuronpedia beside the store)")
    overwrite_flag(p, "an export of another store, or another artifact, in --out")
    p.add_argument("--sae", help="the SAE the store was built from, if it moved (default: the one the store records)")
    p.add_argument("--model", help="override the model recorded in the store (for the logit histograms)")
    add_config_args(p, NeuronpediaConfig)

    p = sub.add_parser("browse", help="serve the feature browser for a store (or a set of stores) on 127.0.0.1")
    p.add_argument("store", help="a directory written by `saekit analyze`, or a set folder holding one per SAE "
                                 "(SET/HOOK/store, where `saekit analyze SET/HOOK/SAE` writes): a sidebar picks the SAE")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    p.add_argument("--graphs", help="attribution graphs for the Graph page: a folder written by `saekit attribute "
                                    "--out`, or a folder of them (e.g. runs/graphs)")

    p = sub.add_parser("steer", help="generate baseline and steered continuations side by side")
    p.add_argument("--sae", required=True, help="SAE directory")
    p.add_argument("--feature", type=int, required=True, help="latent to edit")
    p.add_argument("--store", help="feature store (`saekit analyze`) whose typical activations scale add strengths; "
                                   "default SAE_DIR/../store when built from this SAE; 'none': raw strengths")
    p.add_argument("--model", help="override the model recorded in the SAE")
    p.add_argument("--flow", help="a flow store (`saekit flow`): steer the feature and its matched residual "
                                  "predecessors together (add: strength split equally over the path)")
    p.add_argument("--flow-depth", type=int, default=3, help="predecessor steps followed with --flow (default 3)")
    add_config_args(p, SteerConfig)

    p = sub.add_parser("steer-eval", help="sweep steering strengths: hit rate, fluency, side effects vs a "
                                          "difference-of-means baseline; table + plotly HTML")
    p.add_argument("--sae", required=True, help="SAE directory")
    p.add_argument("--out", help="output directory (default SAE_DIR/steer-eval)")
    overwrite_flag(p, "a steering evaluation made with another config in --out")
    p.add_argument("--store", help="feature store whose typical activations to use (default SAE_DIR/../store when "
                                   "built from this SAE; 'none': measure them on the reference tokens)")
    p.add_argument("--model", help="override the model recorded in the SAE")
    p.add_argument("--flow", help="a flow store (`saekit flow`): sweep single-layer and along-the-flow steering of "
                                  "--features side by side, compared at equal perplexity (default out "
                                  "SAE_DIR/steer-eval-flow)")
    p.add_argument("--flow-depth", type=int, default=3, help="predecessor steps followed with --flow (default 3)")
    p.add_argument("--flow-min-cos", type=float, help="cosine a predecessor needs with --flow (default the flow's "
                                                      "threshold)")
    add_config_args(p, SteerEvalConfig)

    from .attribution import AttributionConfig

    p = sub.add_parser("attribute", help="the attribution graph of a prompt through a transcoder set, validated "
                                         "in the real model: OUT/graph.json, report.md")
    p.add_argument("--transcoders", help="a transcoder set (saekit train --transcoder --layers all; "
                                         "make demo-circuits writes runs/demo-circuits): builds a graph")
    p.add_argument("--saes", help="instead, residual SAEs (a run or folder of them): ranks their features and error "
                                  "nodes by attribution patching and integrated gradients (Marks et al. 2024)")
    p.add_argument("--prompt", help="the text (BOS is prepended)")
    p.add_argument("--prompts", help="a prompt set for attribution patching: JSON lines {prompt, target, contrast} or "
                                     "'prompt<TAB>target[<TAB>contrast]'; the metric is averaged over it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", help="a next token to explain (one token, e.g. ' Paris'), or a contrast 'A|B' "
                                    "(logit difference); default: the likeliest tokens (required for attribution patching)")
    p.add_argument("--validate", type=int, default=20, help="feature nodes to ablate (and, for a graph, double) in "
                                                            "the real model (0: skip; default 20)")
    p.add_argument("--ig-steps", type=int, default=10, help="integrated-gradient steps of attribution patching (0: AtP "
                                                               "only)")
    p.add_argument("--model", help="override the model recorded in the transcoders")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    overwrite_flag(p, "a graph in --out")
    add_config_args(p, AttributionConfig)

    p = sub.add_parser("flow", help="data-free feature flow across a set of SAEs (resid/attn/mlp over many layers), "
                                    "checked on held-out tokens: OUT/flow.json, flow.safetensors, report.md")
    p.add_argument("sae_set", help="a folder of SAEs on blocks.L.hook_resid_pre (and hook_attn_out, hook_mlp_out) of "
                                   "one model, e.g. saekit train --hooks 'blocks.{8..20}.hook_resid_pre,…'")
    p.add_argument("--out", help="flow store directory (default SAE_SET/flow)")
    p.add_argument("--model", help="override the model recorded in the SAEs (data check)")
    p.add_argument("--dataset", help="override the dataset recorded in the SAEs (data check)")
    overwrite_flag(p, "another artifact in --out")
    add_config_args(p, FlowConfig)

    p = sub.add_parser("explain", help="explain a store's latents with an LLM and score the explanations (detection, "
                                       "fuzzing) against a token-profile baseline and shuffled explanations; "
                                       "results in STORE/explanations.sqlite, shown by `saekit browse`")
    config_flag(p)
    p.add_argument("store", help="a feature store written by `saekit analyze`")
    p.add_argument("--resume", action="store_true", default=None, help="skip features (and scores) already done")
    p.add_argument("--dry-run", action="store_true", default=None, help="print the LLM calls and prompt tokens a "
                                                                         "run would make, and stop")
    overwrite_flag(p, "the results of these features")
    add_config_args(p, ExplainConfig)
    return parser


COMMANDS = {"harvest": cmd_harvest, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo,
            "demo-circuits": cmd_demo_circuits, "convert": cmd_convert,
            "analyze": cmd_analyze, "export-neuronpedia": cmd_export_neuronpedia, "browse": cmd_browse,
            "steer": cmd_steer, "steer-eval": cmd_steer_eval, "sweep": cmd_sweep, "compare": cmd_compare, "attribute": cmd_attribute, "flow": cmd_flow,
            "explain": cmd_explain}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](options(args))
    except SaekitError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saekit: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
