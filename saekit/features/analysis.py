"""`analyze`: build a feature store in one pass, from the model + SAE over the SAE's dataset (`saekit analyze
SAE_DIR`), or from a cached harvest (`--activations DIR`: no model forward at all). Both batch contexts
identically, so they build the same store.

A transcoder's store is built the same way from its encoder on the MLP input (its input hook): the examples,
quantiles and histograms are of those activations; logit effects, neighbours and the map come from W_dec, the
directions it writes into the residual through the MLP output. The pass also reads the MLP output (its output hook),
so that massive tokens are left out at either hook, as training left them out."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import DataError, FileFormatError, ShapeError
from ..files import claim_output, read_json, replacing
from ..tokens import Vocab, bos_id, separator_id
from .builder import FeatureBuilder
from .config import BINS_PER_DECADE, HIST_HI, HIST_LO, FeatureConfig
from .store import FORMAT_VERSION, LABELS, MANIFEST, STORE_KIND, write_store
from .weights import MAP_RECALL_K

if TYPE_CHECKING:
    from ..config import DataConfig


def _load_sae_with_hook(sae_dir: str | Path):
    """The SAE of `sae_dir`; it must record the hook it reads, which the pass harvests (and a transcoder the hook
    it writes)."""
    from ..sae import load_sae

    sae = load_sae(sae_dir)
    if not sae.hook:
        raise FileFormatError(f"{sae_dir}/cfg.json records no hook; the feature store needs to know where the SAE reads.")
    if sae.is_transcoder and not sae.hook_out:
        raise FileFormatError(f"{sae_dir}/cfg.json is a {sae.kind} without its output hook (saekit.hook_out, e.g. "
                              f"blocks.L.hook_mlp_out for {sae.hook}); add it, or retrain with `saekit train "
                              "--transcoder`.")
    return sae


def _quality(sae_dir: Path, sae) -> dict | None:
    """The held-out numbers of `saekit eval` (eval.json beside the weights, if it is of these weights): FVU of
    what the dictionary predicts — the MLP output for a transcoder — L0 and CE recovered."""
    from ..errors import SaekitError

    try:
        ev = read_json(sae_dir / "eval.json")
    except SaekitError:
        return None
    if ev.get("weights_sha256") != sae.weights_hash():
        return None
    keys = ("fvu", "l0", "ce_recovered_zero", "kl", "tokens")
    return {k: ev[k] for k in keys if k in ev} | {"of": sae.hook_out, "from": str((sae_dir / "eval.json").resolve())}


def claim_store(out: Path, sae_hash: str, cfg: FeatureConfig, overwrite: bool = False) -> None:
    """Refuse, before any work, an `out` that holds something other than a store of this SAE and config."""

    def differs(path: Path) -> str | None:
        man = read_json(path / MANIFEST)
        if man.get("sae_weights_sha256") != sae_hash:
            return f"from other SAE weights ({man.get('sae_dir', '?')})"
        old = man.get("config", {})
        changed = [f"{k} {old[k]!r} → {v!r}" for k, v in dataclasses.asdict(cfg).items() if k in old and old[k] != v]
        return ", ".join(changed) or None

    claim_output(out, "a feature store", lambda p: (p / MANIFEST).is_file() and
                 read_json(p / MANIFEST).get("kind") == STORE_KIND, overwrite, differs)


def analyze(sae_dir: str | Path, out: str | Path, cfg: FeatureConfig | None = None, activations: str | Path | None = None,
            model=None, model_arg: str | None = None, dataset: str | None = None, progress: bool = True,
            overwrite: bool = False) -> Path:
    """Build the feature store for the SAE in `sae_dir` into `out` (one pass; see module doc).

    `activations`: a cache written by `saekit harvest`/`train` (no model forward). Otherwise `model` (or
    `model_arg`, default the SAE's recorded model) runs over the SAE's dataset (or `dataset`).
    `out` may already hold a store of this SAE and config (it is rebuilt, its labels kept); anything else there
    is refused unless `overwrite`. The store is written beside `out` and swapped in when complete.
    """
    from ..config import DataConfig
    from ..harvest import MASSIVE_MULTIPLE
    from ..lm import load_model, unembedding
    from ..train import resolve_device
    from ..version import __version__

    cfg = cfg or FeatureConfig()
    device = resolve_device(cfg.device)
    sae_dir, out = Path(sae_dir), Path(out)
    sae = _load_sae_with_hook(sae_dir).to(device)
    claim_store(out, sae.weights_hash(), cfg, overwrite)
    info = sae.info
    hook = sae.hook
    # Massive tokens are judged at every hook the dictionary touches (a transcoder: its input and its output).
    judged = [hook] + ([sae.hook_out] if sae.is_transcoder and sae.hook_out != hook else [])
    data = DataConfig.from_manifest(info, model=model_arg, dataset=dataset)
    cache = None
    # Per judged hook, the massive threshold recorded at harvest (the cache's, else the SAE's, which is of the hook
    # it predicts: its output), unless a multiple is asked for; with neither, the first batch's median sets it.
    thresholds: dict[str, float | None] = dict.fromkeys(judged)
    threshold_from = dict.fromkeys(judged, "")
    if cfg.massive_multiple is None and info.get("massive_threshold") is not None:
        thresholds[judged[-1]], threshold_from[judged[-1]] = info["massive_threshold"], "the SAE (recorded at harvest)"
    if cfg.massive_multiple is None and len(judged) > 1 and info.get("massive_threshold_in") is not None:
        thresholds[hook], threshold_from[hook] = info["massive_threshold_in"], "the transcoder (recorded at harvest)"
    if activations is not None:
        from ..cache import ActivationCache

        acts_cache = ActivationCache(activations)
        if missing := [h for h in judged if h not in acts_cache.hooks]:
            raise DataError(f"the cache in {activations} holds {acts_cache.hooks}, not {missing}"
                            + (f": a {sae.kind}'s store reads its input {hook} and its output {sae.hook_out} (massive "
                               "tokens are left out at either, as in training); use the cache it was trained on "
                               "(`saekit train --transcoder` writes both) or drop --activations."
                               if sae.is_transcoder else "; use a cache harvested at the SAE's hook."))
        cache = acts_cache.read(judged)
        for h in judged:
            if cfg.massive_multiple is None and acts_cache.massive_threshold(h) is not None:
                thresholds[h], threshold_from[h] = acts_cache.massive_threshold(h), "the activation cache (recorded at harvest)"
        if cache.acts[hook].shape[1] != sae.cfg.d_in:
            raise ShapeError(f"the cache in {activations} has width {cache.acts[hook].shape[1]} at {hook}, "
                             f"but the SAE's d_in is {sae.cfg.d_in}.")
        if cache.meta.get("model") and info.get("model") and cache.meta["model"] != info["model"]:
            raise DataError(f"the cache in {activations} holds activations of {cache.meta['model']}, but the SAE was "
                            f"trained on {info['model']}; use a cache of the SAE's model (or drop --activations).")
        data = DataConfig.from_manifest({**info, **cache.meta}, model=model_arg, dataset=dataset)
    if model is None:
        print(f"saekit: loading model {data.model!r}", flush=True)
        model = load_model(data.model, device=device if cache is None else "cpu")
    tokenizer = model.tokenizer
    vocab = Vocab.from_tokenizer(tokenizer)
    W_U, norm_weight = unembedding(model)
    vocab_size = max(W_U.shape[1], len(vocab))
    builder = FeatureBuilder(sae.cfg.d_sae, vocab_size, cfg, device)
    budget = cfg.tokens
    seen = massive = 0
    forward_s = 0.0
    t_data = time.perf_counter()
    contexts = _contexts_for(tokenizer, data) if cache is None else None
    data_s = time.perf_counter() - t_data
    start = time.perf_counter()
    bar = tqdm(total=budget, desc="analyze", unit="tok", disable=not progress, dynamic_ncols=True)

    def consume(acts: dict[str, torch.Tensor], ids, pos, ctx) -> bool:
        nonlocal seen, massive
        take = min(len(ids), budget - seen)
        ids, pos, ctx = ids[:take], pos[:take], ctx[:take]
        seen += take
        keep = torch.ones(take, dtype=torch.bool, device=ids.device)
        for h in judged:
            norms = acts[h][:take].norm(dim=1)
            if thresholds[h] is None:
                multiple = MASSIVE_MULTIPLE if cfg.massive_multiple is None else cfg.massive_multiple
                median = float(norms.median()) if len(norms) else 0.0
                thresholds[h] = multiple * median if multiple > 0 and median > 0 else math.inf
                threshold_from[h] = f"{multiple:g}× the first batch's median norm" if multiple > 0 else "none (all kept)"
            keep &= (norms <= thresholds[h]).to(keep.device)
        massive += int((~keep).sum())
        values, indices = sae.encode(acts[hook][:take][keep].to(device))
        builder.add(values, indices, ids[keep], pos[keep], ctx[keep])
        bar.update(take)
        return seen >= budget

    if cache is None:
        from ..harvest import Harvester

        harvester = Harvester(model, judged, device=device)
        gen = harvester.batches(contexts, cfg.batch_contexts)
        while True:
            t0 = time.perf_counter()
            batch = next(gen, None)
            forward_s += time.perf_counter() - t0
            if batch is None:
                break
            acts, ids, pos, ctx = batch
            if consume(acts, ids, pos, ctx):
                break
        source = {"source": "model"}
    else:
        group = cache.context_ids // cfg.batch_contexts
        cuts = torch.nonzero(group[1:] != group[:-1]).squeeze(1) + 1
        bounds = [0, *cuts.tolist(), len(group)]
        for lo, hi in zip(bounds, bounds[1:]):
            if consume({h: cache.acts[h][lo:hi] for h in judged}, cache.token_ids[lo:hi], cache.positions[lo:hi],
                       cache.context_ids[lo:hi]):
                break
        source = {"source": "activations", "activations": str(Path(activations).resolve())}
        try:  # tokenizing only: the windows show the very contexts the cache was harvested from
            packed = _contexts_for(tokenizer, data)
        except DataError:
            packed = None
        contexts = _contexts_from_cache(cache, packed, tokenizer, data.context_size)
    bar.close()
    if seen < budget:
        print(f"saekit: the {'cache' if cache is not None else 'dataset'} gave {seen:,} tokens, fewer than the "
              f"{budget:,} asked; analysing those.")
    if builder.tokens == 0:
        raise DataError("no tokens to analyse; check the dataset or the activation cache.")
    pass_s = time.perf_counter() - start
    stats, feats, finfo = builder.finish(sae.W_dec.detach(), W_U.to(device), None if norm_weight is None else norm_weight.to(device))
    n_ctx = int(max(int(feats["top_ctx"].max()), int(feats["sample_ctx"].max()), 0)) + 1
    used_contexts = contexts[: max(n_ctx, 1)].to(torch.int32)
    from ..lm import model_id

    manifest = {
        **data.manifest(info.get("model") or model_id(model)),
        "kind": STORE_KIND, "format_version": FORMAT_VERSION, "saekit_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sae_dir": str(sae_dir.resolve()), "sae_weights_sha256": sae.weights_hash(),
        "sae": dataclasses.asdict(sae.cfg), "hook": hook, "model": info.get("model") or model_id(model),
        # what kind of dictionary the latents are (sae | transcoder | skip-transcoder) and the hook it writes
        "dictionary": sae.kind, "hook_out": sae.hook_out, "quality": _quality(sae_dir, sae),
        "split": "train", **source,
        "tokens": builder.tokens, "tokens_seen": seen, "massive_excluded": massive,
        "massive_threshold": finite(thresholds[hook]), "massive_threshold_from": threshold_from[hook],
        "massive_thresholds": {h: {"threshold": finite(thresholds[h]), "from": threshold_from[h]} for h in judged},
        "d_sae": sae.cfg.d_sae, "vocab_size": vocab_size,
        "config": dataclasses.asdict(cfg), "map_method": finfo.pop("map_method"),
        "map_note": finfo.pop("map_note"), "map_neighbour_recall": finfo.pop("map_neighbour_recall"),
        "hist": {"log10_lo": HIST_LO, "log10_hi": HIST_HI, "bins_per_decade": BINS_PER_DECADE},
        "final_norm_applied": norm_weight is not None,
        "timings": {"data_seconds": data_s, "pass_seconds": pass_s, "forward_seconds": forward_s if cache is None else 0.0,
                    "tokens_per_s": seen / max(pass_s, 1e-9), **finfo,
                    "total_seconds": time.perf_counter() - start},
    }
    with replacing(out, keep=(LABELS,)) as staged:
        write_store(staged, manifest, stats, feats, used_contexts, vocab, started=start)
    print(f"feature store of the {sae.kind} at {hook}" + (f" → {sae.hook_out}" if sae.is_transcoder else "") +
          f": {builder.tokens:,} tokens ({massive} massive left out), {sae.cfg.d_sae} latents, "
          f"{seen / max(pass_s, 1e-9):,.0f} tokens/s → {out}\n"
          f"map: {manifest['map_note']}; {finfo['map_seconds']:.1f} s; its {MAP_RECALL_K} nearest points hold "
          f"{manifest['map_neighbour_recall']:.0%} of each latent's {MAP_RECALL_K} nearest decoder neighbours")
    return out


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _contexts_for(tokenizer, data: DataConfig) -> torch.Tensor:
    from ..data import load_contexts

    train, _ = load_contexts(tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                             data.text_column)
    return train.tokens


def _contexts_from_cache(cache, contexts: torch.Tensor | None, tokenizer, T: int) -> torch.Tensor:
    """The token contexts the cache came from: the re-packed dataset when it agrees with the cached token
    ids, else rebuilt from them (dropped positions become BOS at 0 and the separator elsewhere)."""
    n_ctx = int(cache.context_ids.max()) + 1 if len(cache) else 0
    ctx, pos, ids = cache.context_ids.long(), cache.positions.long(), cache.token_ids.long()
    if contexts is not None and len(contexts) >= n_ctx and contexts.shape[1] == T:
        if torch.equal(contexts[ctx, pos], ids):
            return contexts[:n_ctx]
    print("saekit: the dataset no longer matches the activation cache; example windows show the cached tokens "
          "only (dropped positions appear as separators).")
    out = torch.full((n_ctx, T), separator_id(tokenizer), dtype=torch.long)
    out[:, 0] = bos_id(tokenizer)
    out[ctx, pos] = ids
    return out
