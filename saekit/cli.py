"""The `saekit` command. Flags come from the config dataclasses (their docstrings are the help);
`--config FILE` (YAML or JSON) sets the same keys, and flags given on the command line override it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig, EvalConfig, HarvestConfig, SaeConfig, TrainConfig, config_fields
from .errors import SaekitError

DEMO_OUT = "runs/demo"


# ----------------------------------------------------------------------------- dataclass ⇄ argparse

def _parser_type(cls: type, name: str, default: Any):
    annotation = str({f.name: f.type for f in dataclasses.fields(cls)}[name])
    if isinstance(default, bool) or annotation == "bool":
        return None
    if isinstance(default, list) or annotation.startswith("list"):
        return lambda s: [p for p in s.split(",") if p]
    for t in (int, float):
        if isinstance(default, t) or annotation.startswith(t.__name__):
            return t
    return str


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for name, default, help_text in config_fields(cls):
        dest = prefix + name
        if name in skip or any(a.dest == dest for a in parser._actions):
            continue
        flag = "--" + dest.replace("_", "-")
        kind = _parser_type(cls, name, default)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if kind is None:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (default: {shown})")
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help_text} (default: {shown})")


def build_config(cls: type, values: dict[str, Any], prefix: str = ""):
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values.get(prefix + f.name)
        if v is not None:
            kwargs[f.name] = v
    return cls(**kwargs)


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file values, overridden by flags the user gave."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = read_config_file(Path(args.config))
    values |= {k: v for k, v in vars(args).items() if v is not None}
    if "hook" in values:
        values["hooks"] = [values.pop("hook")]
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SaekitError(f"config file {path} does not exist.")
    try:
        import yaml

        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except Exception as e:
        raise SaekitError(f"could not parse config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise SaekitError(f"config file {path} must hold a mapping of option names to values.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def sae_configs(values: dict[str, Any], d_in: int) -> list[SaeConfig]:
    """Every (k, d_sae) combination asked for: --k 16,32 --d-sae 4608 trains two SAEs on one stream."""
    if "saes" in values and isinstance(values["saes"], list) and values["saes"] and isinstance(values["saes"][0], dict):
        return [SaeConfig(**{**s, "d_in": d_in}) for s in values["saes"]]
    ks = _int_list(values.get("k", SaeConfig.k))
    ds = _int_list(values.get("d_sae", SaeConfig.d_sae))
    arch = values.get("architecture", "topk")
    return [SaeConfig(d_in=d_in, d_sae=d, k=k, architecture=arch) for d in ds for k in ks]


def _int_list(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [int(x) for x in v]
    try:
        return [int(x) for x in str(v).split(",") if x]
    except ValueError as e:
        raise SaekitError(f"expected an integer or a comma-separated list of integers, not {v!r}.") from e


# ----------------------------------------------------------------------------- commands

def _load_model(values: dict[str, Any]):
    from .lm import load_model
    from .train import resolve_device

    print(f"saekit: loading model {values.get('model', 'default')!r}", flush=True)
    return load_model(values.get("model", "default"), device=resolve_device(values.get("device", "auto")))


def _contexts(model, data: DataConfig):
    from .data import load_contexts

    return load_contexts(model.tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                         data.text_column)


def _data_manifest(hcfg: HarvestConfig, model) -> dict[str, Any]:
    from . import __version__
    from .lm import model_id

    return {"model": model_id(model), "model_arg": hcfg.model, "dataset": hcfg.dataset, "text_column": hcfg.text_column,
            "context_size": hcfg.context_size, "heldout_fraction": hcfg.heldout_fraction, "seed": hcfg.seed,
            "saekit_version": __version__}


def cmd_harvest(values: dict[str, Any]) -> int:
    from .harvest import Harvester, write_cache

    hcfg = build_config(HarvestConfig, values)
    out = Path(values.get("out") or "runs/activations")
    model = _load_model(values)
    train_ctx, _ = _contexts(model, hcfg)
    harvest = Harvester(model, hcfg.hooks).harvest(train_ctx.tokens, hcfg.tokens, hcfg.batch_contexts)
    write_cache(harvest, out, {**_data_manifest(hcfg, model), "harvest_config": dataclasses.asdict(hcfg)})
    for hook in hcfg.hooks:
        print(f"{hook}: {int(harvest.massive(hook, hcfg.massive_multiple).sum())} massive tokens of {len(harvest)}")
    print(f"harvested {len(harvest):,} tokens at {harvest.meta['tokens_per_s']:,.0f} tokens/s → {out}")
    return 0


def run_training(values: dict[str, Any]) -> list[Path]:
    """Harvest (or read a cache), train every SAE, evaluate each on held-out text. Returns SAE dirs."""
    from .harvest import Harvester, read_cache, write_cache
    from .train import Trainer

    out = Path(values.get("out") or "runs/train")
    hcfg = build_config(HarvestConfig, values)
    model = None
    if values.get("stream"):
        return _train_streamed(values, hcfg, out)
    if values.get("activations"):
        harvest = read_cache(values["activations"], hooks=values.get("hooks"))
        data_info = {k: harvest.meta[k] for k in ("model", "model_arg", "dataset", "text_column", "context_size",
                                                  "heldout_fraction", "seed") if k in harvest.meta}
        hooks = list(harvest.acts)
        cache_dir = Path(values["activations"])
    else:
        cache_dir = out / "activations"
        model = _load_model(values)
        data_info = _data_manifest(hcfg, model)
        hooks = hcfg.hooks
        from .files import read_json
        from .harvest import MANIFEST

        reuse = (cache_dir / MANIFEST).is_file() and read_json(cache_dir / MANIFEST).get("harvest_config") == \
            dataclasses.asdict(hcfg)
        if reuse:  # --resume (or a re-run) with the same data: skip the model pass
            print(f"saekit: reusing the activations cached in {cache_dir}")
            harvest = read_cache(cache_dir)
        else:
            train_ctx, _ = _contexts(model, hcfg)
            harvest = Harvester(model, hooks).harvest(train_ctx.tokens, hcfg.tokens, hcfg.batch_contexts)
            print(f"harvest: {len(harvest):,} tokens at {harvest.meta['tokens_per_s']:,.0f} tokens/s")
            write_cache(harvest, cache_dir, {**data_info, "harvest_config": dataclasses.asdict(hcfg)})
    paths: list[Path] = []
    tcfg_base = build_config(TrainConfig, values)
    for hook in hooks:
        acts = harvest.acts[hook]
        massive = harvest.massive(hook, hcfg.massive_multiple)
        if tcfg_base.exclude_massive:
            acts = acts[~massive]
        print(f"{hook}: {int(massive.sum())} massive tokens of {len(massive)} "
              f"({'left out of' if tcfg_base.exclude_massive else 'kept in'} training)")
        tcfg = dataclasses.replace(tcfg_base, saes=sae_configs(values, acts.shape[1]))
        hook_out = out if len(hooks) == 1 else out / hook
        info = {**data_info, "hook": hook, "activations": str(cache_dir), "harvest_tokens": len(harvest),
                "massive_tokens_excluded": int(massive.sum()) if tcfg.exclude_massive else 0}
        trainer = Trainer(tcfg, acts, hook_out, info=info, resume=bool(values.get("resume")))
        start = time.perf_counter()
        saved = trainer.fit()
        print(f"trained {len(saved)} SAE(s) on {hook} in {time.perf_counter() - start:.0f} s")
        paths += saved
    if not values.get("no_eval"):
        for path in paths:
            model = model or _load_model({**values, "model": data_info.get("model_arg", "default")})
            run_eval(path, values, model)
    return paths


def _train_streamed(values: dict[str, Any], hcfg: HarvestConfig, out: Path) -> list[Path]:
    """Train while harvesting, through a bounded shuffle buffer; nothing is cached (one epoch)."""
    from .harvest import Harvester
    from .train import StreamBatches, Trainer

    if len(hcfg.hooks) != 1:
        raise SaekitError("--stream trains on one hook at a time; cache a multi-hook harvest with `saekit harvest`.")
    hook = hcfg.hooks[0]
    model = _load_model(values)
    train_ctx, _ = _contexts(model, hcfg)
    harvester = Harvester(model, [hook])
    tcfg = build_config(TrainConfig, {**values, "epochs": 1.0})
    max_norm = None
    if tcfg.exclude_massive:  # the median is estimated on the stream's first 16k tokens
        head = torch.cat(list(harvester.rows(train_ctx.tokens, hook, 16384, hcfg.batch_contexts)))
        max_norm = hcfg.massive_multiple * head.norm(dim=1).median().item()
    stream = StreamBatches(lambda: harvester.rows(train_ctx.tokens, hook, hcfg.tokens, hcfg.batch_contexts, max_norm),
                           hcfg.tokens, tcfg.batch_size, seed=tcfg.seed)
    tcfg = dataclasses.replace(tcfg, saes=sae_configs(values, model.cfg.d_model))
    info = {**_data_manifest(hcfg, model), "hook": hook, "harvest_tokens": hcfg.tokens, "streamed": True,
            "massive_max_norm": max_norm}
    paths = Trainer(tcfg, stream, out, info=info, resume=bool(values.get("resume"))).fit()
    if not values.get("no_eval"):
        for path in paths:
            run_eval(path, values, model)
    return paths


def run_eval(sae_dir: Path, values: dict[str, Any], model=None) -> dict[str, Any]:
    from .evaluate import evaluate, report
    from .files import write_json
    from .sae import load_sae

    sae = load_sae(sae_dir)
    info = sae.info
    ecfg = build_config(EvalConfig, values, prefix="eval_")
    data = DataConfig(model=values.get("model") or info.get("model_arg", "default"),
                      dataset=values.get("dataset") or info.get("dataset", "default"),
                      text_column=info.get("text_column", "text"), context_size=info.get("context_size", 128),
                      heldout_fraction=info.get("heldout_fraction", 0.05), seed=info.get("seed", 0))
    model = model or _load_model({**values, "model": data.model})
    _, held = _contexts(model, data)
    if held is None:
        raise SaekitError("the dataset split leaves no held-out documents; set --heldout-fraction > 0.")
    metrics = evaluate(model, sae.to(next(model.parameters()).device), held.tokens, ecfg)
    metrics["sae"] = str(sae_dir)
    metrics["weights_sha256"] = sae.weights_hash()
    write_json(Path(sae_dir) / "eval.json", metrics)
    print(f"\n{sae_dir} — held-out evaluation\n{report(metrics)}")
    return metrics


def cmd_train(values: dict[str, Any]) -> int:
    from .distributed import cmd_train as distributed_train
    from .distributed import wants_distributed

    if wants_distributed(values):  # --distributed, or launched by torchrun with several processes
        return distributed_train(values)
    run_training(values)
    return 0


def cmd_eval(values: dict[str, Any]) -> int:
    run_eval(Path(values["sae_dir"]), values)
    return 0


def cmd_convert(values: dict[str, Any]) -> int:
    from .interop import cmd_convert as convert

    return convert(values)


def cmd_analyze(values: dict[str, Any]) -> int:
    from .features import cmd_analyze as analyze

    return analyze(values)


def cmd_browse(values: dict[str, Any]) -> int:
    from .apps.serve import cmd_browse as browse

    return browse(values)


def cmd_steer(values: dict[str, Any]) -> int:
    from .steer import cmd_steer as steer

    return steer(values)


def cmd_steer_eval(values: dict[str, Any]) -> int:
    from .steer_eval import cmd_steer_eval as steer_eval

    return steer_eval(values)


def cmd_demo(values: dict[str, Any]) -> int:
    """The embedded default end to end: harvest → train → evaluate (→ feature store when available)."""
    values = {"out": DEMO_OUT, **values}
    start = time.perf_counter()
    paths = run_training(values)
    for p in paths:
        hook = json.loads((p / "cfg.json").read_text())["metadata"]["hook_name"]
        print(f"\nSAE saved in {p} (hook {hook}); eval.json beside it.")
    from .features import FeatureConfig, analyze

    for p in paths:  # the feature store, from the cached activations: no second model pass
        store = Path(values["out"]) / ("store" if len(paths) == 1 else f"store-{p.name}")
        analyze(p, store, FeatureConfig(), activations=json.loads((p / "cfg.json").read_text())["saekit"].get("activations"))
        print(f"browse its features:  saekit browse {store}   (or: make browse)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
        p.add_argument("--hook", help="one hook name (shorthand for --hooks)")

    p = sub.add_parser("harvest", help="harvest activations into an on-disk cache")
    common(p)
    p.add_argument("--out", help="cache directory (default runs/activations)")
    add_config_args(p, HarvestConfig)

    for name, helptext in (("train", "harvest (or read --activations), train SAEs, evaluate them"),
                           ("demo", "the embedded default end to end, into runs/demo")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--out", help="run directory (SAEs, checkpoint, metrics.jsonl, training.html)")
        p.add_argument("--activations", help="train on a cache written by `saekit harvest` (no model pass)")
        p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
        p.add_argument("--no-eval", action="store_true", default=None, help="skip the held-out evaluation")
        p.add_argument("--stream", action="store_true", default=None,
                       help="train while harvesting through a bounded shuffle buffer (one epoch, no cache)")
        p.add_argument("--k", help="active latents per token; a comma list trains one SAE per value")
        p.add_argument("--d-sae", help="number of latents; a comma list trains one SAE per value")
        p.add_argument("--architecture", choices=["topk", "batchtopk"], help="SAE activation (default topk)")
        add_config_args(p, HarvestConfig)
        add_config_args(p, TrainConfig, skip=("saes",))
        add_config_args(p, EvalConfig, prefix="eval_")
        if name == "train":
            from .distributed import DistConfig

            add_config_args(p, DistConfig)

    p = sub.add_parser("eval", help="evaluate an SAE directory on held-out text; writes eval.json")
    common(p)
    p.add_argument("sae_dir")
    p.add_argument("--model", help="override the model recorded in the SAE")
    p.add_argument("--dataset", help="override the dataset recorded in the SAE")
    p.add_argument("--device", help="auto, cpu or cuda")
    add_config_args(p, EvalConfig, prefix="eval_")

    p = sub.add_parser("convert", help="convert an SAE between saekit, SAELens and sparsify formats")
    p.add_argument("src", help="SAE directory: saekit/SAELens (cfg.json + sae_weights.safetensors) or sparsify "
                               "(<hookpoint>/cfg.json + sae.safetensors, or the folder holding hookpoint folders)")
    p.add_argument("out_dir", help="output directory (for sparsify: the folder that gets <hookpoint>/)")
    p.add_argument("--to", choices=["saekit", "saelens", "sparsify"], default="saekit",
                   help="target format (saekit and saelens write the same directory; default saekit)")
    p.add_argument("--from", dest="from_format", choices=["auto", "saekit", "saelens", "sparsify"], default="auto",
                   help="source format (default: detected)")
    p.add_argument("--hookpoint", help="sparsify module name (picks one of several on import; names the folder on "
                                       "export; default: mapped from the hook, blocks.L.hook_resid_pre → layers.L-1)")
    p.add_argument("--hook", help="transformer-lens hook to record (default: from the source; sparsify layers.L → "
                                  "blocks.L+1.hook_resid_pre)")
    p.add_argument("--k", type=int, help="k for SAELens JumpReLU SAEs whose cfg.json records none")
    p.add_argument("--n-layers", type=int, help="model depth: sparsify's last layers.L maps to hook_resid_post")
    p.add_argument("--approximate-batchtopk", action="store_true", default=None,
                   help="export a BatchTopK SAE to sparsify as TopK k (sparsify has no threshold activation)")
    from .features import FeatureConfig

    p = sub.add_parser("analyze", help="build the feature store (one pass over text or a cached harvest) for `browse`")
    p.add_argument("sae_dir")
    p.add_argument("--out", help="store directory (default: SAE_DIR/../store)")
    p.add_argument("--activations", help="read a cache written by `saekit harvest`/`train` instead of running the model")
    p.add_argument("--model", help="override the model recorded in the SAE (or the cache)")
    p.add_argument("--dataset", help="override the dataset recorded in the SAE (or the cache)")
    add_config_args(p, FeatureConfig)

    p = sub.add_parser("browse", help="serve the feature browser for a store on 127.0.0.1")
    p.add_argument("store", help="a directory written by `saekit analyze`")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    from .steer_eval import add_parsers as add_steer_parsers

    add_steer_parsers(sub)  # saekit steer, saekit steer-eval
    return parser


COMMANDS = {"harvest": cmd_harvest, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "convert": cmd_convert,
            "analyze": cmd_analyze, "browse": cmd_browse, "steer": cmd_steer, "steer-eval": cmd_steer_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](merged_options(args))
    except SaekitError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saekit: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
