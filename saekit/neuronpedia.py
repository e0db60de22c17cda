"""Export a feature store to Neuronpedia's dashboard format: the batch files SAEDashboard's Neuronpedia runner
writes (sae-dashboard 0.8.0), so saekit's dashboards can be uploaded to Neuronpedia as they are.

    out/batch-0.json … batch-N.json   {model_id, layer, sae_set, sae_id_suffix, features: [...]}, in latent order
    out/skipped_indexes.json          {model_id, layer, sae_set, log_sparsity, skipped_indexes}: latents that never
                                      fired on the analysed tokens (Neuronpedia creates them as dead)
    out/manifest.json                 which store, SAE and options, and how each field was filled (FIELDS)

A feature holds the keys of SAEDashboard's NeuronpediaDashboardFeature; what saekit puts in each is in FIELDS.
Every value comes from the store, except those that need the weights: with `weights` (the default) the store's
SAE and model are loaded for the neuron alignment, the logit histogram and vocabulary-centred logit values (the
numbers SAEDashboard writes, from TransformerLens' centred unembedding); without, those are left empty or as stored,
and the manifest says so.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import NeuronpediaConfig
from .errors import FileFormatError, SaekitError
from .features.config import hist_edges, hist_quantiles
from .features.store import CONTEXTS, FeatureStore
from .files import claim_output, read_json, read_tensors, replacing, write_json
from .version import __version__

EXPORT_KIND = "saekit-neuronpedia-export"
MANIFEST = "manifest.json"
ROUND = 3  # decimals, as SAEDashboard's converter rounds every float it writes

# What each feature field holds in our export, and how it differs from SAEDashboard's (recorded in the manifest).
FIELDS = {
    "activations": "the store's top examples (bin_min -1, bin_max the latent's max activation, bin_contains -1), then "
                   "one group per quantile band, highest first (bin_min/bin_max its activation bounds, bin_contains "
                   "the fraction of analysed tokens in it); each a window of the store's contexts (position 0 left "
                   "out, as SAEDashboard does) with one string and value per token. SAEDashboard: the top 20 token "
                   "positions (several may share a context) and equal-width intervals of [0, max], each a whole "
                   "context",
    "pos_str/pos_values, neg_str/neg_values": "top and bottom logit tokens of W_dec[f] ⊙ final-norm weight · W_U",
    "frac_nonzero": "firings / analysed tokens (position 0, separators and massive tokens are not analysed)",
    "freq_hist_data_bar_values/heights": "the store's log-spaced activation histogram re-binned to equal-width bars "
                                         "over [lowest non-empty bin edge, max] (counts spread evenly within a "
                                         "6.6%-wide bin): bar centres and whole counts summing to the firings",
    "logits_hist_data_bar_values/heights": "histogram of the latent's logit effect over the whole vocabulary "
                                           "(needs the weights)",
    "neuron_alignment_indices/values/l1": "the 3 largest entries of W_dec[f] and their share of its L1 norm "
                                          "(needs the weights)",
    "correlated_features_indices/l1": "the 3 nearest latents by decoder cosine, and that cosine (SAEDashboard: "
                                      "activation correlation with latents of the same batch of 128)",
    "correlated_features_pearson, correlated_neurons_*": "empty: they need activation correlations, which the "
                                                          "store does not keep",
    "decoder_weights_dist, vector": "empty, as SAEDashboard writes them for residual-stream SAEs",
    "n_prompts_total": "contexts the store keeps: every analysed context up to the last that holds a shown example",
    "dfa_*": "left out (SAEDashboard writes empty ones; they serve attention-output SAEs only)",
}
TABLE_ROWS = 3  # rows of SAEDashboard's feature tables (FeatureTablesConfig(n_rows=3) in its Neuronpedia runner)


def layer_of(hook: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def _r(x: np.ndarray | list[float]) -> list[float]:
    return np.round(np.asarray(x, dtype=np.float64), ROUND).tolist()


def equal_width_hist(counts: np.ndarray, max_value: float, bins: int) -> tuple[list[float], list[int]]:
    """A latent's log-spaced histogram (the store's fixed bins) as `bins` equal-width bars over [lowest non-empty
    edge, max_value]: (bar centres, whole counts). The counts' piecewise-linear CDF is read at the bar edges and
    rounded, so the heights sum to the firings exactly."""
    total = int(counts.sum())
    if total == 0:
        return [], []
    edges = hist_edges()
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    lo = float(edges[int(np.nonzero(counts)[0][0])])
    hi = max(float(max_value), lo * (1 + 1e-6))
    bar = np.linspace(lo, hi, bins + 1)
    cdf = np.interp(bar, edges, cum)
    cdf[-1] = total  # every firing is ≤ max
    heights = np.diff(np.round(cdf)).astype(int)
    return _r((bar[:-1] + bar[1:]) / 2), heights.tolist()


def band_examples(value: np.ndarray, ctx: np.ndarray, counts: np.ndarray, groups: int, per_group: int
                  ) -> list[tuple[float, float, float, float, np.ndarray]]:
    """The store's quantile groups for one latent (FeatureStore._groups' rule): bands between activation quantiles
    read from its histogram, highest first, each with up to `per_group` sampled firings spread over the band.
    Returns (q_lo, q_hi, lo, hi, sample slots)."""
    if counts.sum() == 0:
        return []
    qs = np.linspace(0, 1, groups + 1)
    edges = hist_quantiles(counts, qs)
    edges[0], edges[-1] = 0.0, np.inf
    valid = ctx >= 0
    out = []
    for g in range(groups - 1, -1, -1):
        idx = np.nonzero(valid & (value >= edges[g]) & (value < edges[g + 1]))[0]
        if len(idx) > per_group:  # the sample is sorted by value (descending): spread the picks over the band
            idx = idx[np.linspace(0, len(idx) - 1, per_group).round().astype(int)]
        out.append((float(qs[g]), float(qs[g + 1]), float(edges[g]), float(edges[g + 1]), idx))
    return out


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class _Windows:
    """Example windows cut from the store's contexts: tokens as display strings (one per token, multi-byte
    characters whole on their last token) and the latent's activation on each."""

    def __init__(self, store: FeatureStore):
        self.tokens = read_tensors(store.path / CONTEXTS, required=("tokens",))["tokens"].numpy()
        cfg = store.manifest["config"]
        self.before, self.width = int(cfg["window_before"]), int(cfg["window_before"]) + 1 + int(cfg["window_after"])
        self.vocab = store.vocab
        # A token whose bytes decode on their own shows as itself; a window made only of such tokens needs no
        # stream decoding (Vocab.pieces), which is the slow part of writing thousands of windows.
        text = [self.vocab.token_bytes(t) for t in range(len(self.vocab))]
        self.whole = np.array([_decodes(b) for b in text], dtype=bool)
        self.text = [b.decode("utf-8", errors="replace") for b in text]

    def __call__(self, c: int, p: int, acts: np.ndarray) -> dict[str, Any]:
        T = self.tokens.shape[1]
        if not 0 <= c < len(self.tokens) or not 0 <= p < T:
            raise FileFormatError(f"an example points at context {c}, position {p}, outside the store's contexts "
                                  f"{self.tokens.shape}; rebuild the store with `saekit analyze`.")
        start = p - self.before
        lo, hi = max(1, start), min(T, start + self.width)  # position 0 (BOS) never fires: left out, as SAEDashboard does
        ids = self.tokens[c, lo:hi]
        ok = ids < len(self.whole)
        pieces = ([self.text[t] for t in ids.tolist()] if ok.all() and self.whole[ids].all()
                  else self.vocab.pieces(ids.tolist()))
        return {"tokens": pieces, "values": _r(acts[lo - start: hi - start]),
                "qualifying_token_index": p - lo}


@torch.no_grad()
def _weight_fields(store: FeatureStore, cfg: NeuronpediaConfig, sae_dir: str | None, model_arg: str | None,
                   model=None) -> dict[str, Any]:
    """Neuron alignment, logit histograms and each latent's mean logit effect over the vocabulary, from the store's
    SAE (its weights checked against the store's hash) and model."""
    from .lm import load_model, unembedding
    from .sae import load_sae

    man = store.manifest
    sae_path = Path(sae_dir or man.get("sae_dir", ""))
    if not (sae_path / "cfg.json").is_file():
        raise FileFormatError(f"the store's SAE {sae_path} is missing; pass --sae DIR (the SAE the store was built "
                              f"from), or --no-weights to export from the store alone.")
    sae = load_sae(sae_path)
    if man.get("sae_weights_sha256") and sae.weights_hash() != man["sae_weights_sha256"]:
        raise FileFormatError(f"{sae_path} holds other weights (hash {sae.weights_hash()}) than the store was built "
                              f"from ({man['sae_weights_sha256']}); pass the right --sae, or rebuild the store.")
    W_dec = sae.W_dec.detach().float()
    top = W_dec.topk(TABLE_ROWS, dim=1)
    l1 = W_dec.abs().sum(1, keepdim=True)
    out: dict[str, Any] = {"align_idx": top.indices.numpy(), "align_val": top.values.numpy(),
                           "align_l1": (top.values.abs() / l1).numpy()}
    if model is None:
        name = model_arg or man.get("model_arg") or man.get("model")
        print(f"saekit: loading model {name!r} for the logit histograms", flush=True)
        model = load_model(name)
    W_U, norm = unembedding(model)
    W_U = W_U.float()
    if norm is not None:
        W_dec = W_dec * norm.float()
    n, B = W_dec.shape[0], cfg.hist_bins
    mean, heights, centres = np.zeros(n), np.zeros((n, B), dtype=np.int64), np.zeros((n, B))
    for lo in range(0, n, 256):  # 256 × vocab logits at a time
        logits = W_dec[lo: lo + 256] @ W_U
        m = logits.mean(1, keepdim=True)
        logits -= m  # centred over the vocabulary, like TransformerLens' center_unembed (SAEDashboard's numbers)
        a, b = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
        width = (b - a).clamp_min(1e-12) / B
        bins = ((logits - a) / width).floor().long().clamp_(0, B - 1)
        heights[lo: lo + 256] = torch.zeros(len(logits), B, dtype=torch.long).scatter_add_(
            1, bins, torch.ones_like(bins)).numpy()
        centres[lo: lo + 256] = (a + width * (torch.arange(B) + 0.5)).numpy()
        mean[lo: lo + 256] = m.squeeze(1).double().numpy()
    return out | {"logit_mean": mean, "logit_hist": heights, "logit_centres": centres}


def export_neuronpedia(store_path: str | Path, out: str | Path, cfg: NeuronpediaConfig | None = None,
                       sae_dir: str | None = None, model_arg: str | None = None, model=None,
                       overwrite: bool = False) -> Path:
    """Write the store at `store_path` as Neuronpedia dashboard batches into `out` (see module doc). `out` may
    already hold an export (it is replaced); anything else there is refused unless `overwrite`. The folder is
    written beside `out` and swapped in when complete."""
    cfg = cfg or NeuronpediaConfig()
    start = time.perf_counter()
    store = FeatureStore(store_path)
    out = Path(out)
    claim_output(out, "a Neuronpedia export", lambda p: (p / MANIFEST).is_file()
                 and read_json(p / MANIFEST).get("kind") == EXPORT_KIND, overwrite)
    man = store.manifest
    layer = cfg.layer if cfg.layer is not None else layer_of(man.get("hook", ""))
    if layer is None:
        raise SaekitError(f"the store's hook {man.get('hook')!r} names no block (blocks.L.…): pass --layer L, the "
                          "layer Neuronpedia files the SAE under.")
    weights = _weight_fields(store, cfg, sae_dir, model_arg, model) if cfg.weights else None
    header = {"model_id": cfg.model_id or man["model"], "layer": layer, "sae_set": cfg.sae_set,
              "sae_id_suffix": cfg.sae_id_suffix or None}
    s = store.stats
    count, act_max, tokens = s["count"], s["act_max"], store.tokens
    col = {k: store.column(k) for k in ("hist", "top_value", "top_ctx", "top_pos", "top_acts", "sample_value",
                                        "sample_ctx", "sample_pos", "sample_acts", "neighbour_id", "neighbour_cos")}
    has_logits = "logit_top_token" in store.feature_keys
    if has_logits:
        col |= {k: store.column(k) for k in ("logit_top_token", "logit_top_value", "logit_bottom_token",
                                             "logit_bottom_value")}
    windows = _Windows(store)
    vocab = store.vocab
    groups = int(man["config"]["quantile_groups"])
    n_prompts, context_size = int(windows.tokens.shape[0]), int(man.get("context_size", windows.tokens.shape[1]))
    live = [int(i) for i in np.nonzero(count > 0)[0]]

    def feature(i: int) -> dict[str, Any]:
        acts = []
        top = np.nonzero(col["top_ctx"][i] >= 0)[0]
        for j in top:
            acts.append({"bin_min": -1, "bin_max": round(float(act_max[i]), ROUND), "bin_contains": -1,
                         **windows(int(col["top_ctx"][i, j]), int(col["top_pos"][i, j]), col["top_acts"][i, j])})
        for q_lo, q_hi, lo, hi, idx in band_examples(col["sample_value"][i], col["sample_ctx"][i], col["hist"][i],
                                                     groups, cfg.group_size):
            band = {"bin_min": round(lo, ROUND), "bin_max": round(min(hi, float(act_max[i])), ROUND),
                    "bin_contains": round((q_hi - q_lo) * float(count[i]) / max(tokens, 1), 6)}
            acts += [{**band, **windows(int(col["sample_ctx"][i, j]), int(col["sample_pos"][i, j]),
                                        col["sample_acts"][i, j])} for j in idx]
        shift = float(weights["logit_mean"][i]) if weights is not None else 0.0
        f: dict[str, Any] = {
            "feature_index": i,
            "neuron_alignment_indices": weights["align_idx"][i].tolist() if weights else [],
            "neuron_alignment_values": _r(weights["align_val"][i]) if weights else [],
            "neuron_alignment_l1": _r(weights["align_l1"][i]) if weights else [],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": col["neighbour_id"][i, :TABLE_ROWS].tolist(),
            "correlated_features_l1": _r(col["neighbour_cos"][i, :TABLE_ROWS]),
            "correlated_features_pearson": [],
            "neg_str": [vocab.token_str(t) for t in col["logit_bottom_token"][i]] if has_logits else [],
            "neg_values": _r(col["logit_bottom_value"][i] - shift) if has_logits else [],
            "pos_str": [vocab.token_str(t) for t in col["logit_top_token"][i]] if has_logits else [],
            "pos_values": _r(col["logit_top_value"][i] - shift) if has_logits else [],
            "frac_nonzero": float(count[i]) / max(tokens, 1),
        }
        f["freq_hist_data_bar_values"], f["freq_hist_data_bar_heights"] = equal_width_hist(
            col["hist"][i], float(act_max[i]), cfg.hist_bins)
        f["logits_hist_data_bar_heights"] = weights["logit_hist"][i].tolist() if weights else []
        f["logits_hist_data_bar_values"] = _r(weights["logit_centres"][i]) if weights else []
        return f | {"n_prompts_total": n_prompts, "n_tokens_in_prompt": context_size, "dataset": man.get("dataset", ""),
                    "decoder_weights_dist": [], "activations": acts, "vector": []}

    batches = [live[b: b + cfg.features_per_batch] for b in range(0, len(live), cfg.features_per_batch)]
    manifest = {
        "kind": EXPORT_KIND, "format": "SAEDashboard 0.8.0 Neuronpedia batch JSON (NeuronpediaDashboardBatch)",
        "saekit_version": __version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": str(store.path.resolve()), "store_created_at": man.get("created_at"), "sae_dir": man.get("sae_dir"),
        "sae_weights_sha256": man.get("sae_weights_sha256"), "hook": man.get("hook"),
        # a transcoder's latents read `hook` (the MLP input) and write `hook_out`: Neuronpedia files them by layer
        "dictionary": store.dictionary, "hook_out": man.get("hook_out", man.get("hook")), **header,
        "config": asdict(cfg), "latents": store.d_sae, "exported": len(live), "skipped_dead": store.d_sae - len(live),
        "batches": len(batches), "tokens_analysed": tokens,
        "logit_values": ("centred over the vocabulary (as SAEDashboard's)" if weights is not None
                         else "as stored (not centred: the weights were not read)") if has_logits else "none in the store",
        "fields": FIELDS if weights is not None else {**FIELDS, "weights": "not read (--no-weights): neuron alignment "
                                                      "and logit histograms are empty"},
    }
    with replacing(out) as staged:
        for b, ids in enumerate(batches):
            (staged / f"batch-{b}.json").write_text(json.dumps({**header, "features": [feature(i) for i in ids]},
                                                               allow_nan=False))
        dead = [int(i) for i in np.nonzero(count == 0)[0]]
        (staged / "skipped_indexes.json").write_text(json.dumps({  # as SAEDashboard writes it (layer as text)
            "model_id": header["model_id"], "layer": str(layer), "sae_set": cfg.sae_set,
            # skipped: below one firing in the analysed tokens, i.e. log10 density < log10(1 / tokens)
            "log_sparsity": round(-math.log10(max(tokens, 1)), 3), "skipped_indexes": dead}))
        write_json(staged / MANIFEST, manifest | {"seconds": time.perf_counter() - start})
    print(f"neuronpedia export: {len(live):,} latents in {len(batches)} batch files ({store.d_sae - len(live)} dead "
          f"ones listed in skipped_indexes.json) → {out}"
          + ("" if weights is not None else "\n  --no-weights: neuron alignment and logit histograms left empty, "
                                            "logit values not centred"))
    return out
