"""Assembles a run: model, contexts, harvest or cache, train, evaluate, store — the same code on one process
or many (a run of several processes passes its `Comm`; a one-process Comm does nothing).

Commands (cli.py) build the typed configs and call these functions; nothing here reads a flag.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Any

import torch

from .cache import MANIFEST, ActivationCache
from .config import DataConfig, EvalConfig, HarvestConfig, SaeConfig, TrainConfig, TrainRun
from .dist import Comm, DistributedTrainer, launch, split, wants_distributed
from .errors import DataError, OptionError, OutputError, SaekitError
from .files import claim_output, read_json, removed_on_failure, write_json
from .harvest import MASSIVE_MULTIPLE, massive_record
from .sae import SparseAutoencoder
from .train import CHECKPOINT, StreamBatches, Trainer, resolve_device

STREAM_HEAD_TOKENS = 16384  # a streamed run estimates the median norm on its first tokens


# ----------------------------------------------------------------------------- model and text

def load_model(name: str, device: str = "auto"):
    from .lm import load_model

    print(f"saekit: loading model {name!r}", flush=True)
    return load_model(name, device=resolve_device(device))


def contexts(model, data: DataConfig):
    """(train, held-out) Contexts of `data` in the model's tokenization."""
    from .data import load_contexts

    return load_contexts(model.tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                         data.text_column)


# ----------------------------------------------------------------------------- harvest

def harvest(cfg: HarvestConfig, out: str | Path, overwrite: bool = False) -> ActivationCache:
    """`saekit harvest`: every hook of `cfg` in one pass over the training split, into a cache at `out`
    (which may hold a cache of this same harvest; anything else there needs `overwrite`)."""
    claim_cache(Path(out), cfg, overwrite)
    model = load_model(cfg.model, cfg.device)
    cache = _harvest_into(cfg, Path(out), model, Comm.single(resolve_device(cfg.device)))
    for hook in cache.hooks:
        print(f"{hook}: {cache.manifest['massive_tokens'][hook]} massive tokens of {cache.tokens}")
    meta = cache.manifest["harvest"]
    print(f"harvested {cache.tokens:,} tokens at {meta['tokens_per_s']:,.0f} tokens/s → {out}")
    return cache


def claim_cache(directory: Path, cfg: HarvestConfig, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, before the model pass, a place where the cache cannot go or would destroy something."""
    claim_output(directory, "an activation cache", ActivationCache.holds_one, overwrite,
                 lambda p: _changed(read_json(p / MANIFEST).get("harvest_config", {}), dataclasses.asdict(cfg)), flag)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """'key old → new, …' over the keys whose values differ; None when none do."""
    diff = [f"{k} {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(diff) or None


def harvest_hooks(cfg: HarvestConfig, model) -> list[str]:
    """The hooks a harvest records: `--layers` (each layer's MLP input and output with --mlp-pairs, else its
    resid_pre) or `--hooks`."""
    from .lm import check_hooks, mlp_pair, parse_layers

    if not cfg.layers:
        if cfg.mlp_pairs:
            raise OptionError("layers", "", "--mlp-pairs (or --transcoder) records MLP input/output pairs by layer: "
                              "pass --layers all or --layers 6,12")
        return cfg.hooks
    layers = parse_layers(cfg.layers, model.cfg.n_layers)
    hooks = [h for layer in layers for h in (mlp_pair(layer) if cfg.mlp_pairs else (f"blocks.{layer}.hook_resid_pre",))]
    check_hooks(model, hooks)
    return hooks


# One shard's rows in memory while harvesting: a harvest of many hooks writes shards of fewer tokens.
SHARD_BYTES = 256 * 2**20


def _harvest_into(cfg: HarvestConfig, directory: Path, model, comm: Comm) -> ActivationCache:
    """Harvest this process's share (rank r takes contexts r, r+W, …) straight into a cache, a shard at a time,
    with the stream-wide massive thresholds; a transcoder harvest first checks that each hook pair reproduces
    its MLP exactly."""
    from .cache import SHARD_TOKENS, STORAGE_DTYPES, CacheWriter
    from .harvest import Harvester
    from .lm import model_id

    start = time.perf_counter()
    hooks = harvest_hooks(cfg, model)
    train_ctx, _ = contexts(model, cfg)
    mine = train_ctx.tokens[comm.rank:: comm.world]
    want = split(cfg.tokens, comm.world)[comm.rank]
    pair_check = _check_pairs(model, hooks, mine[:2]) if cfg.mlp_pairs else {}
    dtype = STORAGE_DTYPES[cfg.storage_dtype]
    row_bytes = model.cfg.d_model * len(hooks) * dtype.itemsize
    shard = max(1024, min(SHARD_TOKENS, SHARD_BYTES // row_bytes))
    manifest = {**cfg.manifest(model_id(model)), "harvest_config": dataclasses.asdict(cfg)}
    if pair_check:
        manifest["mlp_pair_error"] = pair_check
    harvester = Harvester(model, hooks)
    with CacheWriter(directory, manifest, comm, shard, dtype) as writer:
        try:
            meta = harvester.harvest_into(writer, mine, want, cfg.batch_contexts, progress=comm.is_main)
        except DataError as e:
            if comm.world == 1:
                raise
            raise DataError(f"rank {comm.rank} of {comm.world} (contexts {comm.rank}, {comm.rank + comm.world}, …): {e}") from e
        massive = {}
        for hook in hooks:
            norms = writer.hook_norms(hook)
            massive[hook] = massive_record(comm.global_median(norms, "gathering activation norms"), cfg.massive_multiple)
        writer.manifest["massive_tokens"] = {
            hook: sum(comm.all_gather_sizes(int((writer.hook_norms(hook) > massive[hook]["threshold"]).sum()),
                                            "counting massive tokens")) for hook in hooks}
        cache = writer.close(meta, massive)
    if comm.world > 1:
        comm.say(f"harvest: {cache.tokens:,} tokens on {comm.world} processes in {time.perf_counter() - start:.0f} s "
                 "(data loading included)")
    return cache


def _check_pairs(model, hooks: list[str], tokens: torch.Tensor) -> dict[str, float]:
    """Every MLP pair among `hooks` must reproduce its MLP (what a transcoder replaces): the relative error of
    each, or a HookError for a pair that does not."""
    from .errors import HookError
    from .lm import hook_layer, mlp_pair, pair_error

    layers = sorted({hook_layer(h) for h in hooks if h in {x for lay in range(model.cfg.n_layers) for x in mlp_pair(lay)}})
    errors = pair_error(model, layers, tokens.to(next(model.parameters()).device))
    bad = {layer: e for layer, e in errors.items() if not e < 1e-4}
    if bad:
        raise HookError(f"on this model the hooks {', '.join(mlp_pair(layer)[0] for layer in bad)} do not reproduce "
                        f"their MLP's output (relative error {max(bad.values()):.2g}); its MLPs are not hooked where "
                        "saekit expects, so transcoders cannot be trained on it.")
    return {f"blocks.{layer}.mlp": e for layer, e in errors.items()}


def _activations(spec: TrainRun, comm: Comm, out: Path) -> tuple[ActivationCache, list[str], Any]:
    """The run's cache and the hooks to train on: --activations, a cache of the same harvest in OUT (a --resume
    or a re-run: no model pass), or a fresh harvest into OUT/activations. Also the model, if loaded."""
    h = spec.harvest
    if spec.run.activations:
        cache = ActivationCache(spec.run.activations)
        return cache, cache.check_hooks(h.hooks or None), None
    cache_dir = out / "activations"
    model = load_model(h.model, h.device)
    if comm.agree(_reused(cache_dir, h), "checking the activation cache"):
        comm.say(f"saekit: reusing the activations cached in {cache_dir}")
        cache = ActivationCache(cache_dir)
        return cache, cache.hooks, model
    cache = _harvest_into(h, cache_dir, model, comm)
    if comm.world == 1:
        print(f"harvest: {cache.tokens:,} tokens at {cache.manifest['harvest']['tokens_per_s']:,.0f} tokens/s")
    return cache, cache.hooks, model


def _rows_of(cache: ActivationCache, hooks: list[str], comm: Comm | None) -> torch.Tensor:
    """Rows of `hooks` side by side ([x | y] for a transcoder's pair): this process's contiguous share of the
    cache, or all of it (`comm` None)."""
    world, rank = (comm.world, comm.rank) if comm is not None else (1, 0)
    lo = sum(split(cache.tokens, world)[:rank])
    parts = cache.slice(lo, lo + split(cache.tokens, world)[rank], hooks)
    return torch.cat([parts[h] for h in hooks], dim=1) if len(hooks) > 1 else parts[hooks[0]]


def training_units(cache: ActivationCache, hooks: list[str], transcoder: bool) -> dict[str, list[str]]:
    """What each trainer reads, by name: one hook per SAE trainer; a transcoder's MLP input and output, named
    blocks.L.mlp. A transcoder run on a cache without both hooks of a layer says which pairs it holds."""
    from .lm import MLP_IN, MLP_OUT, hook_layer

    if not transcoder:
        return {h: [h] for h in hooks}
    units: dict[str, list[str]] = {}
    for h in hooks:
        layer = hook_layer(h)
        if h.endswith("." + MLP_IN) and f"blocks.{layer}.{MLP_OUT}" in cache.hooks:
            units[f"blocks.{layer}.mlp"] = [h, f"blocks.{layer}.{MLP_OUT}"]
    if not units:
        raise OptionError("hooks", hooks, f"a transcoder trains on an MLP's input and output (blocks.L.{MLP_IN} and "
                          f"blocks.L.{MLP_OUT}), and the cache {cache.dir} holds no such pair (it holds "
                          f"{', '.join(cache.hooks[:6])}…). Harvest with --transcoder --layers all (or 6,12).")
    return units


# ----------------------------------------------------------------------------- train

def train_run(spec: TrainRun) -> list[Path]:
    """`saekit train`: on this process, or on several (--distributed, or under torchrun)."""
    if wants_distributed(spec.dist):
        launch(train, (spec,), spec.dist, spec.harvest.device)
        return []
    return train(spec)


def train(spec: TrainRun, comm: Comm | None = None) -> list[Path]:
    """Harvest (or read a cache), train every SAE of `spec.train` on each hook, evaluate each on held-out text.
    Returns the SAE directories (every process gets all of them)."""
    h, run = spec.harvest, spec.run
    tcfg = dataclasses.replace(spec.train, seed=h.seed, device=h.device)
    comm = comm or Comm.single(resolve_device(h.device))
    out = Path(run.out)
    # Every rank checks before any rank writes (the agreement is the barrier); all stop if one objects.
    refusal = None
    try:
        claim_run(spec)
    except SaekitError as e:
        refusal = e
    if not comm.agree(refusal is None, "checking the output folder"):
        raise refusal or OutputError(f"another process refused --out {out}; see its message.")
    with removed_on_failure(out):
        return _train(spec, tcfg, comm, out)


def claim_run(spec: TrainRun) -> None:
    """Before any work: `--out` may be new, or hold a run to `--resume` (or to start again with `--overwrite`);
    a run's checkpoint is never replaced silently, and nothing of another kind is touched."""
    run, out = spec.run, Path(spec.run.out)
    if run.resume and run.overwrite:
        raise OptionError("resume", True, "--resume continues the run in --out and --overwrite starts it again; "
                                          "pass one of them")
    checkpoints = sorted(out.glob(CHECKPOINT)) + sorted(out.glob(f"*/{CHECKPOINT}")) if out.is_dir() else []
    if run.resume and not checkpoints:
        raise OutputError(f"--resume: {out} holds no {CHECKPOINT}; start without --resume.")
    if checkpoints and not (run.resume or run.overwrite):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(checkpoints[0].stat().st_mtime))
        raise OutputError(f"--out {out} holds a training run (checkpoint {checkpoints[0]}, written {when}); pass "
                          "--resume to continue it, --overwrite to start it again, or choose another --out.")
    claim_output(out, "a training run", _holds_run, run.overwrite)
    if not run.activations and not run.stream:
        claim_cache(out / "activations", spec.harvest, run.overwrite, "--out (its activations/ cache)")


def _holds_run(path: Path) -> bool:
    marks = (CHECKPOINT, "metrics.jsonl", "activations")
    return any((path / m).exists() or any(path.glob(f"*/{m}")) for m in marks)


def _reused(cache_dir: Path, h: HarvestConfig) -> bool:
    """Whether `cache_dir` holds a cache of exactly this harvest (a re-run or a --resume reads it, no model pass)."""
    return (cache_dir / MANIFEST).is_file() and read_json(cache_dir / MANIFEST).get("harvest_config") == dataclasses.asdict(h)


def _train(spec: TrainRun, tcfg: TrainConfig, comm: Comm, out: Path) -> list[Path]:
    h, run = spec.harvest, spec.run
    if run.stream:
        if comm.world > 1:
            raise SaekitError("--stream is not supported with --distributed yet: harvest into a cache (the default) "
                              "or train on one process.")
        return _train_streamed(spec, tcfg, out)
    cache, hooks, model = _activations(spec, comm, out)
    transcoder = any(c.transcoder for c in tcfg.saes)
    units = training_units(cache, hooks, transcoder)
    data_info = DataConfig.from_manifest(cache.manifest).manifest(cache.manifest.get("model", "unknown"))
    modules = spec.dist.distribute_modules and comm.world > 1
    if modules and len(units) < comm.world:
        raise SaekitError(f"--distribute-modules gives each process its own hooks, but there are {len(units)} hook(s) "
                          f"for {comm.world} processes; add hooks, use fewer processes, or drop the flag (data parallel).")
    mode = {"mode": "modules" if modules else "data", "world_size": comm.world, "backend": comm.backend}
    paths: list[Path] = []
    for j, (unit, unit_hooks) in enumerate(units.items()):
        if modules and j % comm.world != comm.rank:
            continue  # module mode: rank r trains units r, r+W, …, each on all of its rows (read from the shared cache)
        # One unit's rows at a time: a run over every layer never holds two layers' activations.
        acts = _rows_of(cache, unit_hooks, None if modules else comm)
        thresholds = {hk: _massive_threshold(cache, hk, acts[:, sum(cache.d_in(x) for x in unit_hooks[:i]):],
                                             None if modules else comm) for i, hk in enumerate(unit_hooks)}
        massive = torch.zeros(len(acts), dtype=torch.bool)
        lo = 0
        for hk in unit_hooks:
            width = cache.d_in(hk)
            massive |= acts[:, lo: lo + width].norm(dim=1) > thresholds[hk]
            lo += width
        n_massive = int(massive.sum()) if modules else sum(comm.all_gather_sizes(int(massive.sum()), "counting massive tokens"))
        if tcfg.exclude_massive:
            acts = acts[~massive]
        d_in = cache.d_in(unit_hooks[0])
        # seed + j: each hook's dictionaries start from their own random weights (a shared start would make the
        # SAEs of different layers look matched feature by feature, index for index)
        cfg = dataclasses.replace(tcfg, seed=tcfg.seed + j,
                                  saes=[dataclasses.replace(c, d_in=d_in, d_out=cache.d_in(unit_hooks[-1])
                                                            if c.transcoder else None) for c in tcfg.saes])
        info = {**data_info, "hook": unit_hooks[0], "activations": str(cache.dir), "harvest_tokens": cache.tokens,
                "massive_tokens_excluded": n_massive if cfg.exclude_massive else 0,
                **_massive_info(cache, unit_hooks[-1], thresholds)}
        if transcoder:  # the input's threshold too: readers without the cache judge massive tokens at both hooks
            info |= {"hook_out": unit_hooks[1], "kind": "transcoder", "massive_threshold_in": thresholds[unit_hooks[0]]}
        msg = (f"{unit}: {n_massive} massive tokens of {cache.tokens} "
               f"({'left out of' if cfg.exclude_massive else 'kept in'} training)")
        unit_out = out if len(units) == 1 else out / unit
        start = time.perf_counter()
        if comm.world == 1 or modules:
            print(f"[rank {comm.rank}] {msg}; training it here" if modules else msg, flush=True)
            trainer = Trainer(cfg, acts, unit_out, info={**info, "distributed": mode} if modules else info,
                              resume=run.resume)
            saved = trainer.fit(progress=comm.is_main or modules)
            print(f"{f'[rank {comm.rank}] ' if modules else ''}trained {_count(saved)} on {unit} in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        else:
            comm.say(msg)
            trainer = DistributedTrainer(cfg, acts, unit_out, comm, info=info, resume=run.resume)
            saved = trainer.fit(progress=comm.is_main)
            comm.say(f"trained {_count(saved)} on {unit} in {time.perf_counter() - start:.0f} s on "
                     f"{comm.world} processes; {trainer.comm_bytes_per_step / 2**20:.2f} MiB all-reduced per step and rank")
        del acts, trainer
        gc.collect()  # the Trainer's schedules hold its bound methods (a cycle): free this unit's rows now
        paths += saved
    # Module mode: each rank knows only its own SAEs; data parallel: all ranks hold the same list.
    everyone = comm.all_gather_object([str(p) for p in paths], "collecting SAE paths")
    paths = list(dict.fromkeys(Path(p) for ps in everyone for p in ps))
    if run.eval:
        # No collectives: rank r evaluates SAEs r, r+W, … and nobody waits on anybody.
        for path in paths[comm.rank:: comm.world]:
            model = model or load_model(data_info["model_arg"], h.device)
            evaluate_sae(path, spec.eval, model=model, device=h.device)
    return paths


def _count(paths: list[Path]) -> str:
    return f"{len(paths)} dictionar{'y' if len(paths) == 1 else 'ies'}"


def _massive_threshold(cache: ActivationCache, hook: str, rows: torch.Tensor, comm: Comm | None) -> float:
    """The threshold recorded at harvest; a cache that records none gets it over all its tokens, as a harvest would
    (`rows`: this process's rows, holding `hook`'s columns first; `comm` None: they are all the rows)."""
    recorded = cache.massive_threshold(hook)
    if recorded is not None:
        return recorded
    if comm is None:
        return MASSIVE_MULTIPLE * rows[:, : cache.d_in(hook)].norm(dim=1).median().item()
    comm.say(f"saekit: {cache.dir} records no massive threshold for {hook}; computing it over its "
             f"{cache.tokens:,} tokens ({MASSIVE_MULTIPLE:g}× the median norm)")
    return MASSIVE_MULTIPLE * comm.global_median(rows[:, : cache.d_in(hook)].norm(dim=1), "gathering activation norms")


def _massive_info(cache: ActivationCache, hook: str, thresholds: dict[str, float]) -> dict[str, Any]:
    rec = cache.manifest.get("massive", {}).get(hook, {})
    return {"massive_threshold": thresholds[hook], "massive_multiple": rec.get("multiple", MASSIVE_MULTIPLE)}


def _train_streamed(spec: TrainRun, tcfg: TrainConfig, out: Path) -> list[Path]:
    """Train while harvesting, through a bounded shuffle buffer; nothing is cached (one epoch)."""
    from .harvest import Harvester
    from .lm import model_id

    h = spec.harvest
    if any(c.transcoder for c in tcfg.saes):
        raise SaekitError("--stream trains SAEs only: a transcoder run harvests its MLP pairs into a cache (drop --stream).")
    if len(h.hooks) != 1:
        raise SaekitError("--stream trains on one hook at a time; cache a multi-hook harvest with `saekit harvest`.")
    hook = h.hooks[0]
    model = load_model(h.model, h.device)
    train_ctx, _ = contexts(model, h)
    harvester = Harvester(model, [hook])
    head = torch.cat(list(harvester.rows(train_ctx.tokens, hook, STREAM_HEAD_TOKENS, h.batch_contexts)))
    threshold = h.massive_multiple * head.norm(dim=1).median().item()
    max_norm = threshold if tcfg.exclude_massive else None
    tcfg = dataclasses.replace(tcfg, epochs=1.0, saes=[dataclasses.replace(c, d_in=model.cfg.d_model) for c in tcfg.saes])
    stream = StreamBatches(lambda: harvester.rows(train_ctx.tokens, hook, h.tokens, h.batch_contexts, max_norm),
                           h.tokens, tcfg.batch_size, seed=tcfg.seed)
    info = {**h.manifest(model_id(model)), "hook": hook, "harvest_tokens": h.tokens, "streamed": True,
            "massive_threshold": threshold, "massive_multiple": h.massive_multiple,
            "massive_threshold_from": f"the stream's first {STREAM_HEAD_TOKENS} tokens"}
    paths = Trainer(tcfg, stream, out, info=info, resume=spec.run.resume).fit()
    if spec.run.eval:
        for path in paths:
            evaluate_sae(path, spec.eval, model=model, device=h.device)
    return paths


# ----------------------------------------------------------------------------- evaluate

def evaluate_sae(sae_dir: str | Path, cfg: EvalConfig, model=None, model_arg: str | None = None,
                 dataset: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Evaluate the SAE in `sae_dir` on the held-out split of its data (or `dataset`); writes eval.json."""
    from .evaluate import evaluate, report
    from .sae import load_sae

    sae = load_sae(sae_dir)
    if not os.access(sae_dir, os.W_OK):
        raise OutputError(f"cannot write eval.json in {sae_dir} (permission denied); make it writable or evaluate a copy.")
    data = DataConfig.from_manifest(sae.info, model=model_arg, dataset=dataset)
    model = model or load_model(data.model, device)
    _, held = contexts(model, data)
    if held is None:
        raise SaekitError("the dataset split leaves no held-out documents; set --heldout-fraction > 0.")
    metrics = evaluate(model, sae.to(next(model.parameters()).device), held.tokens, cfg)
    metrics["sae"] = str(sae_dir)
    metrics["weights_sha256"] = sae.weights_hash()
    write_json(Path(sae_dir) / "eval.json", metrics)
    print(f"\n{sae_dir} — held-out evaluation\n{report(metrics)}")
    return metrics


def dictionaries_in(path: str | Path) -> list[Path]:
    """The dictionary directories (cfg.json + weights) at `path`: itself, or those up to two levels below (a run
    of several hooks, or a transcoder set: RUN/blocks.L.mlp/NAME)."""
    from .sae import CFG_FILE, WEIGHTS_FILE

    path = Path(path)
    if (path / CFG_FILE).is_file() or not path.is_dir():
        return [path]  # loading says what is wrong with it
    found = sorted({p.parent for pattern in (f"*/{WEIGHTS_FILE}", f"*/*/{WEIGHTS_FILE}") for p in path.glob(pattern)
                    if (p.parent / CFG_FILE).is_file()})
    if not found:
        raise SaekitError(f"{path} holds no SAE or transcoder (a folder with cfg.json and sae_weights.safetensors, "
                          "or a run folder holding such folders).")
    return found


def transcoder_set(path: str | Path, why: str) -> dict[int, SparseAutoencoder]:
    """The transcoders of a set (a `saekit train --transcoder` run, or a folder of them) by layer: one per MLP.
    `why` starts the message when the folder holds SAEs."""
    from .lm import hook_layer
    from .sae import load_sae

    path = Path(path)
    dirs = dictionaries_in(path)
    saes = [load_sae(p) for p in dirs]
    if sae_dirs := [str(p) for p, s in zip(dirs, saes) if not s.is_transcoder]:
        raise SaekitError(f"{why}, and {', '.join(sae_dirs[:3])} hold SAEs; point it at a transcoder run (saekit "
                          "train --transcoder --layers all).")
    by_layer: dict[int, list[Path]] = {}
    for p, s in zip(dirs, saes):
        by_layer.setdefault(hook_layer(s.hook), []).append(p)
    if twice := {layer: ps for layer, ps in by_layer.items() if len(ps) > 1}:
        layer, ps = next(iter(twice.items()))
        raise SaekitError(f"{path} holds {len(ps)} transcoders for layer {layer} ({', '.join(map(str, ps))}); the "
                          "replacement model takes one per MLP: copy one per layer into a folder and use that.")
    return {hook_layer(s.hook): s for s in saes}


def check_every_layer(by_layer: dict[int, Any], n_layers: int, path: Path, why: str, instead: str) -> None:
    """Refuse a transcoder set that misses a layer of the model, naming it."""
    if missing := sorted(set(range(n_layers)) - set(by_layer)):
        raise SaekitError(f"{why}, and {path} has no transcoder for layer(s) {', '.join(map(str, missing))}; train "
                          f"them (saekit train --transcoder --layers {','.join(map(str, missing))}) {instead}.")


def evaluate_replacement_set(path: str | Path, cfg: EvalConfig, model_arg: str | None = None,
                             dataset: str | None = None, device: str = "auto") -> dict[str, Any]:
    """`saekit eval RUN --replace-all`: every MLP replaced by the run's transcoder for its layer at once, on the
    held-out split; writes RUN/replacement_eval.json."""
    from .evaluate import evaluate_replacement, report

    path = Path(path)
    by_layer = transcoder_set(path, "--replace-all replaces MLPs with transcoders")
    if not os.access(path, os.W_OK):
        raise OutputError(f"cannot write replacement_eval.json in {path} (permission denied).")
    saes = [by_layer[L] for L in sorted(by_layer)]
    data = DataConfig.from_manifest(saes[0].info, model=model_arg, dataset=dataset)
    model = load_model(data.model, device)
    check_every_layer(by_layer, model.cfg.n_layers, path, "--replace-all replaces every MLP",
                      "or evaluate layers one at a time without --replace-all")
    _, held = contexts(model, data)
    if held is None:
        raise SaekitError("the dataset split leaves no held-out documents; set --heldout-fraction > 0.")
    metrics = evaluate_replacement(model, saes, held.tokens, cfg)
    metrics["set"] = str(path)
    write_json(path / "replacement_eval.json", metrics)
    print(f"\n{path} — every MLP replaced by its transcoder at once\n{report(metrics)}")
    return metrics


# ----------------------------------------------------------------------------- the demo

def demo(spec: TrainRun) -> list[Path]:
    """The embedded default end to end: harvest → train → evaluate → feature store (from the cache)."""
    from .features import FeatureConfig, analyze

    start = time.perf_counter()
    out = Path(spec.run.out)
    paths = train(spec)  # claims the run's folder first; the store goes inside it
    for p in paths:
        print(f"\nSAE saved in {p} (hook {read_json(p / 'cfg.json')['metadata']['hook_name']}); eval.json beside it.")
    for p in paths:  # the feature store, from the cached activations: no second model pass
        store = out / ("store" if len(paths) == 1 else f"store-{p.name}")
        analyze(p, store, FeatureConfig(), activations=read_json(p / "cfg.json")["saekit"].get("activations"),
                overwrite=True)
        print(f"browse its features:  saekit browse {store}   (or: make browse)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return paths


def demo_circuits(spec: TrainRun) -> dict[str, Any]:
    """`saekit demo-circuits`: transcoders on every layer of the model from one harvest, each evaluated with its MLP
    replaced, then all MLPs replaced at once; RUN/report.md (+ report.json) tabulates them."""
    start = time.perf_counter()
    out = Path(spec.run.out)
    paths = train(spec)
    replacement = evaluate_replacement_set(out, spec.eval, device=spec.harvest.device)
    rows = []
    for p in paths:
        ev = read_json(p / "eval.json")
        rows.append({"dictionary": str(p.relative_to(out)), "hook": ev.get("hook_in"), **{
            k: ev[k] for k in ("fvu", "fvu_excl_massive", "l0", "dead_fraction", "ce_recovered_zero", "kl", "tokens")}})
    report = {"layers": rows, "replacement": replacement, "seconds": time.perf_counter() - start,
              "cache": read_json(out / "activations" / MANIFEST)["harvest"]}
    write_json(out / "report.json", report)
    lines = ["# Transcoders on every layer", "",
             f"{len(rows)} transcoders, one harvest of {report['cache']['tokens']:,} tokens "
             f"({report['cache']['tokens_per_s']:,.0f} tokens/s); evaluated on {rows[0]['tokens']:,} held-out tokens each "
             "(silent: latents that fire on none of them, which on so few tokens is not the training's dead fraction).",
             "", "| dictionary | FVU (MLP out) | FVU excl. massive | L0 | silent | CE recovered (MLP zero-ablated) | KL |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dictionary']} | {r['fvu']:.3f} | {r['fvu_excl_massive']:.3f} | {r['l0']:.1f} | "
              f"{r['dead_fraction']:.1%} | {r['ce_recovered_zero']:.3f} | {r['kl']:.3f} |" for r in rows]
    rep = replacement
    lines += ["", f"**Every MLP replaced at once** ({rep['tokens']:,} held-out tokens, error terms dropped): CE "
              f"{rep['ce_sae']:.3f} vs clean {rep['ce_clean']:.3f}, all MLPs zero-ablated {rep['ce_zero_ablation']:.3f}, "
              f"mean-ablated {rep['ce_mean_ablation']:.3f}; CE recovered {rep['ce_recovered_zero']:.3f} (vs zero), "
              f"{rep['ce_recovered_mean']:.3f} (vs mean); KL {rep['kl']:.3f}.",
              "", f"Run in {report['seconds'] / 60:.1f} min."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def sae_grid(k: list[int], d_sae: list[int], architecture: str = "topk", transcoder: bool = False,
             skip: bool = False, prefixes: list[int] | None = None) -> list[SaeConfig]:
    """One dictionary per (d_sae, k) pair, trained together on one stream (d_in, d_out are set from the activations)."""
    return [SaeConfig(d_sae=d, k=kk, architecture=architecture, transcoder=transcoder, skip=skip,  # type: ignore[arg-type]
                      prefixes=prefixes or []) for d in d_sae for kk in k]
