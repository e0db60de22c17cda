"""Assembles a run: model, contexts, harvest or cache, train, evaluate, store — the same code on one process
or many (a run of several processes passes its `Comm`; a one-process Comm does nothing).

Commands (cli.py) build the typed configs and call these functions; nothing here reads a flag.
"""

from __future__ import annotations

import dataclasses
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
    cache, local = _harvest_into(cfg, Path(out), model, Comm.single(resolve_device(cfg.device)))
    for hook, acts in local.items():
        n = int((acts.norm(dim=1) > cache.massive_threshold(hook)).sum())
        print(f"{hook}: {n} massive tokens of {len(acts)}")
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


def _harvest_into(cfg: HarvestConfig, directory: Path, model, comm: Comm) -> tuple[ActivationCache, dict[str, torch.Tensor]]:
    """Harvest this process's share (rank r takes contexts r, r+W, …), write the cache with the stream-wide
    massive thresholds; returns it and this process's activations."""
    from .harvest import Harvester
    from .lm import model_id

    start = time.perf_counter()
    train_ctx, _ = contexts(model, cfg)
    mine = train_ctx.tokens[comm.rank:: comm.world]
    want = split(cfg.tokens, comm.world)[comm.rank]
    try:
        h = Harvester(model, cfg.hooks).harvest(mine, want, cfg.batch_contexts, progress=comm.is_main)
    except DataError as e:
        if comm.world == 1:
            raise
        raise DataError(f"rank {comm.rank} of {comm.world} (contexts {comm.rank}, {comm.rank + comm.world}, …): {e}") from e
    h.context_ids = h.context_ids * comm.world + comm.rank  # back to indices into all training contexts
    massive = {hook: massive_record(comm.global_median(h.norms(hook), "gathering activation norms"),
                                    cfg.massive_multiple) for hook in cfg.hooks}
    manifest = {**cfg.manifest(model_id(model)), "harvest_config": dataclasses.asdict(cfg)}
    cache = ActivationCache.write(directory, h, manifest, massive, comm)
    if comm.world > 1:
        comm.say(f"harvest: {cache.tokens:,} tokens on {comm.world} processes in {time.perf_counter() - start:.0f} s "
                 "(data loading included)")
    return cache, h.acts


def _activations(spec: TrainRun, comm: Comm, out: Path) -> tuple[ActivationCache, dict[str, torch.Tensor], Any]:
    """The run's cache and this process's rows of it: --activations, a cache of the same harvest in OUT
    (a --resume or a re-run: no model pass), or a fresh harvest into OUT/activations. Also the model, if loaded."""
    h = spec.harvest
    if spec.run.activations:
        cache = ActivationCache(spec.run.activations)
        hooks = cache.check_hooks(h.hooks or None)
        return cache, _rows_of(cache, hooks, comm), None
    cache_dir = out / "activations"
    model = load_model(h.model, h.device)
    if comm.agree(_reused(cache_dir, h), "checking the activation cache"):
        comm.say(f"saekit: reusing the activations cached in {cache_dir}")
        cache = ActivationCache(cache_dir)
        return cache, _rows_of(cache, h.hooks, comm), model
    cache, local = _harvest_into(h, cache_dir, model, comm)
    if comm.world == 1:
        print(f"harvest: {cache.tokens:,} tokens at {cache.manifest['harvest']['tokens_per_s']:,.0f} tokens/s")
    return cache, local, model


def _rows_of(cache: ActivationCache, hooks: list[str], comm: Comm) -> dict[str, torch.Tensor]:
    """This process's contiguous share of the cache (all of it on one process)."""
    lo = sum(split(cache.tokens, comm.world)[: comm.rank])
    return cache.slice(lo, lo + split(cache.tokens, comm.world)[comm.rank], hooks)


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
    cache, local, model = _activations(spec, comm, out)
    hooks = list(local)
    data_info = DataConfig.from_manifest(cache.manifest).manifest(cache.manifest.get("model", "unknown"))
    sizes = comm.all_gather_sizes(len(local[hooks[0]]), "exchanging shard sizes")
    thresholds = {hook: _massive_threshold(cache, hook, local[hook], comm) for hook in hooks}
    modules = spec.dist.distribute_modules and comm.world > 1
    if modules and len(hooks) < comm.world:
        raise SaekitError(f"--distribute-modules gives each process its own hooks, but there are {len(hooks)} hook(s) "
                          f"for {comm.world} processes; add hooks, use fewer processes, or drop the flag (data parallel).")
    if modules:
        # Every exchange first (so no rank trains while another waits in a collective): the owner of hook j
        # (rank j mod W) receives every rank's rows of it, in stream order, and then trains it alone.
        for j, hook in enumerate(hooks):
            owner = j % comm.world
            rows = comm.gather_rows(local.pop(hook).to(comm.device), sizes, owner, f"sending {hook} activations to rank {owner}")
            if rows is not None:
                local[hook] = rows.cpu()
    mode = {"mode": "modules" if modules else "data", "world_size": comm.world, "backend": comm.backend}
    paths: list[Path] = []
    for hook in hooks:
        if hook not in local:
            continue
        acts = local.pop(hook)
        massive = acts.norm(dim=1) > thresholds[hook]
        n_massive = int(massive.sum()) if modules else sum(comm.all_gather_sizes(int(massive.sum()), "counting massive tokens"))
        if tcfg.exclude_massive:
            acts = acts[~massive]
        cfg = dataclasses.replace(tcfg, saes=[dataclasses.replace(c, d_in=acts.shape[1]) for c in tcfg.saes])
        info = {**data_info, "hook": hook, "activations": str(cache.dir), "harvest_tokens": sum(sizes),
                "massive_tokens_excluded": n_massive if cfg.exclude_massive else 0, **_massive_info(cache, hook, thresholds)}
        msg = (f"{hook}: {n_massive} massive tokens of {sum(sizes)} "
               f"({'left out of' if cfg.exclude_massive else 'kept in'} training)")
        hook_out = out if len(hooks) == 1 else out / hook
        start = time.perf_counter()
        if comm.world == 1 or modules:
            print(f"[rank {comm.rank}] {msg}; training it here" if modules else msg, flush=True)
            trainer = Trainer(cfg, acts, hook_out, info={**info, "distributed": mode} if modules else info,
                              resume=run.resume)
            saved = trainer.fit(progress=comm.is_main)
            print(f"{f'[rank {comm.rank}] ' if modules else ''}trained {len(saved)} SAE(s) on {hook} in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        else:
            comm.say(msg)
            trainer = DistributedTrainer(cfg, acts, hook_out, comm, info=info, resume=run.resume)
            saved = trainer.fit(progress=comm.is_main)
            comm.say(f"trained {len(saved)} SAE(s) on {hook} in {time.perf_counter() - start:.0f} s on {comm.world} "
                     f"processes; {trainer.comm_bytes_per_step / 2**20:.2f} MiB all-reduced per step and rank")
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


def _massive_threshold(cache: ActivationCache, hook: str, acts: torch.Tensor, comm: Comm) -> float:
    """The threshold recorded at harvest; a cache that records none gets it over all its tokens, as a harvest would."""
    recorded = cache.massive_threshold(hook)
    if recorded is not None:
        return recorded
    comm.say(f"saekit: {cache.dir} records no massive threshold for {hook}; computing it over its "
             f"{cache.tokens:,} tokens ({MASSIVE_MULTIPLE:g}× the median norm)")
    return MASSIVE_MULTIPLE * comm.global_median(acts.norm(dim=1), "gathering activation norms")


def _massive_info(cache: ActivationCache, hook: str, thresholds: dict[str, float]) -> dict[str, Any]:
    rec = cache.manifest.get("massive", {}).get(hook, {})
    return {"massive_threshold": thresholds[hook], "massive_multiple": rec.get("multiple", MASSIVE_MULTIPLE)}


def _train_streamed(spec: TrainRun, tcfg: TrainConfig, out: Path) -> list[Path]:
    """Train while harvesting, through a bounded shuffle buffer; nothing is cached (one epoch)."""
    from .harvest import Harvester
    from .lm import model_id

    h = spec.harvest
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


def sae_grid(k: list[int], d_sae: list[int], architecture: str = "topk") -> list[SaeConfig]:
    """One SAE per (d_sae, k) pair, trained together on one stream (d_in is set from the activations)."""
    return [SaeConfig(d_sae=d, k=kk, architecture=architecture) for d in d_sae for kk in k]  # type: ignore[arg-type]
