"""Metrics, defined once: used by training logs, `saekit eval`, benchmarks and the app.

FVU  = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²   (variance about the mean, raw activation scale; numerator and
                                      denominator accumulated over all tokens, not per-batch ratios)
nmse = mean over tokens of ‖x − x̂‖² / ‖x‖²   (OpenAI's normalized_mean_squared_error)
CE loss recovered = (CE_ablated − CE_sae) / (CE_ablated − CE_clean), ablation by zero or by the mean.
Position 0 and special tokens are neither evaluated nor spliced; CE and KL are averaged over the
next-token predictions made at the spliced positions.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import EvalConfig
from .errors import DataError, HookError
from .harvest import MASSIVE_MULTIPLE, keep_mask, massive_mask
from .sae import SparseAutoencoder


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained over all rows of x (see module doc)."""
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)).item()


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-30)).mean().item()


def ce_recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean) if ce_ablated != ce_clean else float("nan")


DRAWS = 1000
"""Bootstrap resamples behind every interval."""

LEVEL = 0.95
"""Coverage of the reported intervals."""


def resample_weights(n: int, draws: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """[draws, n] float64 counts: how often each of n units appears in each bootstrap resample (multinomial)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (draws, n), generator=gen)
    return torch.zeros(draws, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(draws, n, dtype=torch.float64))


def bootstrap(per_unit: dict[str, torch.Tensor], statistic, draws: int = DRAWS, seed: int = 0,
              level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile intervals of statistics of sums over units (contexts, documents, words).

    `per_unit[name]` is [n, ...]: each unit's contribution to a sum. `statistic(sums)` maps sums (each with a
    leading resample axis [draws, ...]) to {metric: [draws]}. The units are resampled with replacement; a metric
    is then recomputed from the resampled sums, so ratios (FVU, CE recovered) are resampled as ratios."""
    n = len(next(iter(per_unit.values())))
    w = resample_weights(n, draws, seed)
    sums = {k: (w @ v.double().reshape(n, -1)).reshape(draws, *v.shape[1:]) for k, v in per_unit.items()}
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    for name, values in statistic(sums).items():
        values = values.double()
        values = values[~values.isnan()]
        out[name] = tuple(torch.quantile(values, q).tolist()) if len(values) else (math.nan, math.nan)
    return out


def group_sum(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """Per-group sums [n, ...] of per-row `values` [rows, ...] (float64) whose group ids are `groups` [rows]."""
    values = values.double()
    return torch.zeros(n, *values.shape[1:], dtype=torch.float64, device=values.device).index_add_(0, groups, values)


def _moments(x: torch.Tensor, x_hat: torch.Tensor, groups: torch.Tensor, n: int, tag: str = "") -> dict[str, torch.Tensor]:
    """Per-context sums from which FVU (about the mean), the legacy explained variance and nmse are rebuilt."""
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).pow(2).sum(1)
    sq = x.pow(2).sum(1)
    return {f"n{tag}": group_sum(torch.ones_like(err), groups, n), f"err{tag}": group_sum(err, groups, n),
            f"sq{tag}": group_sum(sq, groups, n), f"sx{tag}": group_sum(x, groups, n),
            f"ratio{tag}": group_sum(err / sq.clamp_min(1e-30), groups, n)}


def core_statistic(dense_threshold: float):
    """The core metrics of eval.json as functions of per-context sums (see `_context_sums`); a sum absent
    (no CE pass, no latent counts) leaves its metrics out."""
    def fvu_of(s, tag=""):
        var = s[f"sq{tag}"] - s[f"sx{tag}"].pow(2).sum(-1) / s[f"n{tag}"].clamp_min(1)
        return s[f"err{tag}"] / var.clamp_min(1e-30)

    def statistic(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"fvu": fvu_of(s), "explained_variance_about_zero_legacy": 1 - s["err"] / s["sq"],
               "nmse": s["ratio"] / s["n"]}
        if "n_normal" in s:
            out["fvu_excl_massive"] = fvu_of(s, "_normal")
        if "active" in s:
            out["l0"] = s["active"] / s["n"]
        if "fires" in s:  # no dead fraction: see NO_INTERVAL
            out["dense_fraction"] = (s["fires"] / s["n"][..., None] > dense_threshold).double().mean(-1)
        if "pred" in s:
            ce = {k: s[k] / s["pred"] for k in ("clean", "sae", "zero", "mean", "kl")}
            out |= {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
                    "ce_mean_ablation": ce["mean"], "ce_delta": ce["sae"] - ce["clean"], "kl": ce["kl"],
                    "ce_recovered_zero": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
                    "ce_recovered_mean": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])}
        return out
    return statistic


NO_INTERVAL = {"dead_fraction": "a latent silent on the evaluated contexts is silent on every resample of them, so "
                                 "a bootstrap can only raise the dead fraction: it has no honest bootstrap interval"}
"""Metrics of eval.json that get no interval, and why (written into eval.json beside the intervals)."""

FIRES_LIMIT = 1 << 24
"""Largest contexts × latents matrix of firing counts kept for the dead/dense intervals (128 MB in float64)."""


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, massive_multiple: float = MASSIVE_MULTIPLE,
                           dense_threshold: float = 0.1, batch: int = 4096,
                           massive_threshold: float | None = None, target: torch.Tensor | None = None) -> dict[str, Any]:
    """FVU (all tokens and without massive ones), nmse, L0, dead and dense fractions on activations x (of the
    `target` for a transcoder reading x). Massive tokens: target norm above `massive_threshold` (the one recorded
    at harvest), else above `massive_multiple` × the median norm of the target."""
    return _reconstruction(sae, x, massive_multiple, dense_threshold, batch, massive_threshold, target)[0]


def _reconstruction(sae: SparseAutoencoder, src: torch.Tensor, massive_multiple: float, dense_threshold: float,
                    batch: int, massive_threshold: float | None, target: torch.Tensor | None = None,
                    groups: torch.Tensor | None = None, n_groups: int = 0
                    ) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
    """(reconstruction_metrics, x̂, per-group sums): evaluate splices the very x̂ it measured. `src` is what the
    dictionary reads, `target` what it predicts (`src` for an SAE). With `groups` (each row's context) the sums
    behind every metric are also kept per context, for the bootstrap."""
    x = src if target is None else target
    parts = []
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=x.device)
    per_ctx_fires = groups is not None and n_groups * sae.cfg.d_sae <= FIRES_LIMIT
    ctx_fires = torch.zeros(n_groups if per_ctx_fires else 0, sae.cfg.d_sae, dtype=torch.float64, device=x.device)
    active = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    l0 = 0.0
    for i in range(0, len(x), batch):  # one encode per batch serves the reconstruction and the counts
        v, idx = sae.encode(src[i: i + batch])
        parts.append(sae.decode(v, idx, src[i: i + batch]))
        on = v > 0
        l0 += on.sum().item()
        active[i: i + len(v)] = on.sum(1).double()
        fires += torch.bincount(idx[on], minlength=sae.cfg.d_sae)
        if per_ctx_fires:
            rows = groups[i: i + len(v)][:, None].expand_as(idx)[on]
            ctx_fires.index_put_((rows, idx[on]), torch.ones_like(rows, dtype=torch.float64), accumulate=True)
    x_hat = torch.cat(parts)
    norms = x.norm(dim=1)
    massive = norms > massive_threshold if massive_threshold is not None else massive_mask(norms, massive_multiple)
    normal = ~massive
    freq = fires.float() / len(x)
    sums: dict[str, torch.Tensor] = {}
    if groups is not None:
        sums = _moments(x, x_hat, groups, n_groups) | _moments(x[normal], x_hat[normal], groups[normal], n_groups,
                                                               "_normal")
        sums["active"] = group_sum(active, groups, n_groups)
        if per_ctx_fires:
            sums["fires"] = ctx_fires
    return {
        "fvu": fvu(x, x_hat),
        "fvu_excl_massive": fvu(x[normal], x_hat[normal]),
        "explained_variance_about_zero_legacy": 1 - ((x - x_hat).double().pow(2).sum() / x.double().pow(2).sum()).item(),
        "nmse": nmse(x, x_hat),
        "l0": l0 / len(x),
        "dead_fraction": (fires == 0).float().mean().item(),
        "dense_fraction": (freq > dense_threshold).float().mean().item(),
        "massive_tokens": int(massive.sum()),
        "tokens": len(x),
    }, x_hat, sums


SUFFIX_TOLERANCE = 1e-3
"""Largest |Δ logit| (relative to the largest |logit|, at least 1) the shortcut path may show against a plain
forward on the check context; a broken shortcut differs by whole units."""

ROWS = 256
"""Predictions whose full-vocabulary log-probabilities are held at once (per variant)."""


def _pass_through(*args, **kwargs):
    """A skipped module: its (first) input is its output."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _skipping(modules):
    """Modules that pass their input through while the context lasts."""
    for module in modules:  # object.__setattr__: the bridge forwards a plain setattr to the wrapped HF module
        object.__setattr__(module, "forward", _pass_through)
    try:
        yield
    finally:
        for module in modules:
            if "forward" in vars(module):
                object.__delattr__(module, "forward")


class _Splicer:
    """Runs the model from the SAE's hook on, the hook's activation replaced.

    Shortcut (`fast`), for a hook in block L: the prefix (blocks < L) runs once per context (`prefix`); every
    variant runs only blocks ≥ L, from the residual entering block L with the hook's activation replaced where
    the hook sits (the bridge's start_at_layer alone would still run blocks < L on the injected residual and
    discard them), and stops before the unembedding, so that logits are made only for the predicting positions,
    a few rows at a time (`logits_of`). `check` compares the shortcut with a plain forward once; if they differ
    (an architecture whose blocks do not chain like this, or with work after its unembedding) every variant runs
    the whole model with a replacing hook instead."""

    def __init__(self, model, hook: str, read: str | None = None):
        from .lm import check_hooks, hook_layer, stop_layer

        check_hooks(model, [hook] + ([read] if read else []))
        self.model, self.hook, self.read = model, hook, read
        layer = hook_layer(hook)
        entry = f"blocks.{layer}.hook_resid_pre"
        blocks = getattr(model, "blocks", None)
        self.unembed = getattr(model, "unembed", None)
        self.fast = (layer is not None and entry in model.hook_dict and blocks is not None and layer < len(blocks)
                     and isinstance(self.unembed, torch.nn.Module))
        # the hook is the residual entering block L: a variant is that residual (no hook needed), and variants
        # with equal inputs have equal outputs (evaluate shares the ablated contexts' log-probabilities)
        self.direct = self.fast and model.hook_dict[hook] is model.hook_dict[entry]
        self.layer, self.entry = layer, entry
        self.skip = list(blocks)[:layer] if self.fast else []
        if self.fast:  # a hook in block L fires when blocks < L + 1 run (prefix: blocks < L for resid_pre L > 0)
            self.stop = layer + 1 if layer + 1 < model.cfg.n_layers else None
        else:
            self.stop = stop_layer(model, [hook])
        self.check_error: float | None = None

    def prefix(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the hook's activation, the residual entering block L, the `read` hook's activation — a transcoder's
        input; the hook's own otherwise) [B, T, d] on clean `tokens`."""
        if self.direct and self.layer > 0 and self.read is None:
            act = self.model(tokens, stop_at_layer=self.layer)
            return act, act, act
        store: dict[str, torch.Tensor] = {}

        def saver(name: str):
            def save(a, hook):
                store[name] = a.detach()
            return save

        hooks = [(self.hook, saver("act"))] + ([(self.entry, saver("entry"))] if self.fast and not self.direct else [])
        hooks += [(self.read, saver("read"))] if self.read else []
        self.model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=self.stop)
        return store["act"], store.get("entry", store["act"]), store.get("read", store["act"])

    def outputs(self, tokens: torch.Tensor, entry: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per position, what `logits_of` turns into logits: the final hidden state [B, T, d_model] on the
        shortcut, else the logits [B, T, vocab]; with the hook's activation replaced by `act` (`entry`: the clean
        residual entering block L, unused when the hook is that residual)."""
        def replace(a, hook):
            return act.to(a.dtype)

        if not self.fast:
            return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, replace)])
        with _skipping([*self.skip, self.unembed]):
            if self.direct:
                return self.model(act, start_at_layer=self.layer)
            return self.model.run_with_hooks(entry, fwd_hooks=[(self.hook, replace)], start_at_layer=self.layer)

    def logits_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] (float32) of rows [n, ·] taken from `outputs`."""
        return (self.unembed(rows) if self.fast else rows).float()

    def check(self, tokens: torch.Tensor, entry: torch.Tensor, act: torch.Tensor) -> None:
        """Compare the shortcut on one clean context with a plain forward; fall back if they differ."""
        if not self.fast:
            return
        ref = self.model(tokens[:1]).float()
        try:
            got = self.logits_of(self.outputs(tokens[:1], entry[:1], act[:1])[0])[None]
            err = (got - ref).abs().max().item() if got.shape == ref.shape else math.inf
            why = f"logits differ by {err:.3g}"
        except Exception as e:  # noqa: BLE001 — any failure of the shortcut means: use the plain path
            err, why = math.inf, f"{type(e).__name__}: {e}"
        self.check_error = err
        if not err <= SUFFIX_TOLERANCE * max(1.0, ref.abs().max().item()):
            warnings.warn(f"evaluate: running the model from {self.entry} does not reproduce a full forward "
                          f"({why}); every variant runs the whole model instead (slower).", stacklevel=3)
            self.fast = self.direct = False


def _nll(splice: _Splicer, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token NLL [n] (float32) of `rows` [n, ·] (from splice.outputs) and their targets [n]."""
    return torch.cat([F.nll_loss(F.log_softmax(splice.logits_of(rows[i: i + ROWS]), dim=-1), targets[i: i + ROWS],
                                 reduction="none") for i in range(0, len(rows), ROWS)])


def _pair_rows(splice: _Splicer, clean: torch.Tensor, spliced: list[torch.Tensor], targets: torch.Tensor
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per row [n] (float64): NLL clean, and for each variant in `spliced` its NLL and KL(p_clean ‖ p_variant), of
    rows [n, ·] of splice.outputs at the same predictions; each clean log-softmax is made once and serves every
    variant's KL right away."""
    parts = []
    for i in range(0, len(clean), ROWS):
        t = targets[i: i + ROWS]
        logp = F.log_softmax(splice.logits_of(clean[i: i + ROWS]), dim=-1)
        rows = [F.nll_loss(logp, t, reduction="none")]
        for variant in spliced:
            logq = F.log_softmax(splice.logits_of(variant[i: i + ROWS]), dim=-1)
            rows += [F.nll_loss(logq, t, reduction="none"), F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)]
        parts.append(torch.stack(rows).double())
    rows = torch.cat(parts, 1) if parts else torch.zeros(1 + 2 * len(spliced), 0, dtype=torch.float64)
    return rows[0], list(rows[1::2]), list(rows[2::2])


def _pair_sums(splice: _Splicer, clean: torch.Tensor, spliced: torch.Tensor, targets: torch.Tensor
               ) -> tuple[float, float, float]:
    """(Σ NLL clean, Σ NLL spliced, Σ KL(p_clean ‖ p_spliced)) over the rows of `_pair_rows`."""
    nll_clean, (nll_spliced,), (kl,) = _pair_rows(splice, clean, [spliced], targets)
    return nll_clean.sum().item(), nll_spliced.sum().item(), kl.sum().item()


def evaluate(model, sae: SparseAutoencoder, contexts: torch.Tensor, cfg: EvalConfig | None = None,
             hook: str | None = None, progress: bool = True) -> dict[str, Any]:
    """All metrics of the SAE spliced into `model` at its hook on held-out `contexts` [n, T] (see
    `evaluate_many`)."""
    return evaluate_many(model, [sae], contexts, cfg, hook, progress)[0]


def _hooks_of(model, saes: list[SparseAutoencoder], hook: str | None) -> tuple[str, str | None]:
    """(the hook every dictionary splices, the hook a transcoder reads or None); dictionaries of another hook,
    kind or width are refused, since they could not share the passes."""
    keys = {(hook or s.hook, s.hook_out if s.is_transcoder else None, s.cfg.d_in, s.cfg.out_dim) for s in saes}
    if len(keys) > 1:
        raise HookError(f"evaluated together, dictionaries must share hook, kind and width; got {len(keys)} kinds "
                        f"({', '.join(sorted(str(k[0]) for k in keys))}). Evaluate them one group at a time.")
    sae = saes[0]
    hook = hook or sae.hook
    if hook is None:
        raise HookError("the SAE records no hook; pass hook='blocks.L.hook_resid_pre'.")
    if not sae.is_transcoder:
        return hook, None
    from .lm import check_pair

    if sae.hook_out is None:
        raise HookError("the transcoder records no output hook (saekit.hook_out in its cfg.json).")
    read, out = check_pair(model, hook, sae.hook_out)  # read the MLP's input, splice its output
    return out, read


@torch.no_grad()
def evaluate_many(model, saes: list[SparseAutoencoder], contexts: torch.Tensor, cfg: EvalConfig | None = None,
                  hook: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """All metrics of each dictionary of `saes` (one hook) spliced into `model` on held-out `contexts` [n, T].

    Work: the model up to the hook once per context (pass 1); from the hook on (pass 2), per batch the clean
    contexts and each dictionary's x̂-spliced ones in shared forwards, and the zero- and mean-ablated ones once per
    distinct input — for a residual-stream hook every context whose only unspliced position is 0 has the same
    ablated input (the BOS residual, then the fill), so its log-probabilities are made once for the whole
    evaluation. Pass 1, the clean and the ablated passes are the same for every dictionary, so n dictionaries cost
    one pass 1, one clean and ablated pass 2 and n spliced ones. CE and KL come from log-probabilities at the
    predicting positions only, `ROWS` at a time; each clean log-softmax serves every dictionary's KL."""
    from .tokens import special_ids

    cfg = cfg or EvalConfig()
    if not saes:
        return []
    hook, read = _hooks_of(model, saes, hook)
    first = saes[0]
    splice = _Splicer(model, hook, read)
    special = special_ids(model.tokenizer)
    device = next(model.parameters()).device
    start = time.perf_counter()

    # Pass 1: the hook's activations on exactly cfg.tokens kept tokens (needed first for the mean).
    batches, have = [], 0
    for lo in range(0, len(contexts), cfg.batch_contexts):
        toks = contexts[lo: lo + cfg.batch_contexts].to(device)
        keep = keep_mask(toks, special)
        csum = keep.flatten().cumsum(0).view_as(keep)
        keep &= csum <= cfg.tokens - have  # exact budget: drop kept tokens past it
        rows = keep.any(1)  # contexts with nothing to evaluate would cost forwards for nothing
        if not rows.any():
            continue
        toks, keep = toks[rows], keep[rows]
        act, entry, src = splice.prefix(toks)
        if src.shape[-1] != first.cfg.d_in or act.shape[-1] != first.cfg.out_dim:
            from .errors import ShapeError

            if not read:
                raise ShapeError(f"the SAE has d_in {first.cfg.d_in} but {hook} has width {act.shape[-1]}.")
            raise ShapeError(f"the transcoder has d_in {first.cfg.d_in} and d_out {first.cfg.out_dim}, but {read} has "
                             f"width {src.shape[-1]} and {hook} {act.shape[-1]}.")
        batches.append((toks, keep, act, entry, src[keep].float()))
        have += int(keep.sum())
        if have >= cfg.tokens:
            break
    if have < cfg.tokens:
        raise DataError(f"the held-out contexts give {have} tokens, fewer than the {cfg.tokens} asked; "
                        "lower --eval-tokens or raise the held-out fraction.")
    x = torch.cat([a[k].float() for _, k, a, _, _ in batches])
    src = torch.cat([b[4] for b in batches]) if read else x
    batches = [b[:4] for b in batches]
    # contexts are the bootstrap's unit: each kept token's (and prediction's) context, numbered over batches
    starts = [0]
    for toks, *_ in batches:
        starts.append(starts[-1] + len(toks))
    n_ctx = starts[-1]
    groups = torch.cat([k.nonzero()[:, 0] + lo for (_, k, _, _), lo in zip(batches, starts)])
    multiple = MASSIVE_MULTIPLE if cfg.massive_multiple is None else cfg.massive_multiple
    outs, x_hats, per_sae = [], [], []
    for sae in saes:
        recorded = sae.info.get("massive_threshold") if cfg.massive_multiple is None else None
        out, x_hat, per_ctx = _reconstruction(sae, src, multiple, cfg.dense_threshold, 4096, recorded,
                                              x if read else None, groups, n_ctx)
        out |= {"kind": sae.kind, "architecture": sae.cfg.architecture} | ({"hook_in": read} if read else {})
        out["massive_threshold_from"] = ("the harvest (recorded in the SAE)" if recorded is not None else
                                         f"{multiple:g}× the evaluated tokens' median norm")
        outs.append(out)
        x_hats.append(x_hat)
        per_sae.append(per_ctx | {k: torch.zeros(n_ctx, dtype=torch.float64, device=device) for k in ("sae", "kl")})
    fills = {"zero": torch.zeros_like(x[0]), "mean": x.mean(0)}

    # Pass 2: CE and KL with each dictionary's, the zero and the mean splice (unkept positions keep their activation).
    base = {k: torch.zeros(n_ctx, dtype=torch.float64, device=device) for k in ("clean", "zero", "mean", "pred")}
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # ablation → (position-0 input, log-probabilities)
    done = 0
    toks0, _, act0, entry0 = batches[0]
    splice.check(toks0, entry0, act0)
    # contexts per forward: the shortcut holds hidden states only, the plain path full logits
    per_forward = 2 * cfg.batch_contexts if splice.fast else cfg.batch_contexts
    variants = len(saes) + 1
    for b, (toks, keep, act, entry) in enumerate(tqdm(batches, desc="eval", disable=not progress, dynamic_ncols=True)):
        pred = keep[:, :-1]  # next-token predictions made at spliced positions
        targets = toks[:, 1:]
        c0 = starts[b]
        base["pred"][c0: c0 + len(toks)] = pred.sum(1).double()
        n_keep = int(keep.sum())
        spliced = []
        for x_hat in x_hats:
            a = act.clone()
            a[keep] = x_hat[done: done + n_keep].to(act.dtype)
            spliced.append(a)
        done += n_keep

        # clean and every x̂ side by side, `per_forward` contexts a forward; the plain path holds every variant's
        # full logits until the log-softmax, so it takes fewer contexts at once
        step = max(1, per_forward // (2 if splice.fast else variants))
        for lo in range(0, len(toks), step):
            s = slice(lo, lo + step)
            n = len(toks[s])
            outs_s = [splice.outputs(toks[s].repeat(len(part), 1), entry[s].repeat(len(part), 1, 1), torch.cat(part))
                      for part in _chunks([act[s]] + [v[s] for v in spliced], max(1, per_forward // max(n, 1)))]
            o = torch.cat(outs_s)
            rows_of = [o[i * n: (i + 1) * n, :-1][pred[s]] for i in range(variants)]
            del o, outs_s
            ctx_of_row = pred[s].nonzero()[:, 0] + c0 + lo
            nll_clean, nll_sae, kl = _pair_rows(splice, rows_of[0], rows_of[1:], targets[s][pred[s]])
            base["clean"].index_add_(0, ctx_of_row, nll_clean.to(device))
            for sums_i, nll_i, kl_i in zip(per_sae, nll_sae, kl):
                sums_i["sae"].index_add_(0, ctx_of_row, nll_i.to(device))
                sums_i["kl"].index_add_(0, ctx_of_row, kl_i.to(device))

        # ablations: a context whose ablated input equals an earlier one's (resid_pre hook, only position 0
        # unspliced) reuses that one's log-probabilities; the others run in forwards
        only_bos = ~keep[:, 0] & keep[:, 1:].all(1)
        jobs, reuse = [], []  # (ablation, context, ablated activation, kept for reuse); (ablation, context)
        for name, fill in fills.items():
            ablated = torch.where(keep[..., None], fill.to(act.dtype), act)
            for c in range(len(toks)):
                if splice.direct and only_bos[c]:
                    first_input = shared[name][0] if name in shared else next(
                        (a[0] for j, _, a, kept in jobs if kept and j == name), None)
                    if first_input is None:  # the first such context: its log-probabilities are kept for the others
                        jobs.append((name, c, ablated[c], True))
                        continue
                    if torch.equal(ablated[c, 0], first_input):
                        reuse.append((name, c))
                        continue
                jobs.append((name, c, ablated[c], False))
        for lo in range(0, len(jobs), per_forward):
            part = jobs[lo: lo + per_forward]
            idx = torch.tensor([c for _, c, _, _ in part], device=toks.device)
            o = splice.outputs(toks[idx], entry[idx], torch.stack([a for _, _, a, _ in part]))
            at_pred = o[:, :-1][pred[idx]]
            del o
            nll = _nll(splice, at_pred, targets[idx][pred[idx]])
            counts = pred[idx].sum(1).tolist()
            for (name, c, a, kept), job_rows, job_nll in zip(part, at_pred.split(counts), nll.split(counts)):
                base[name][c0 + c] += job_nll.double().sum()
                if kept:
                    shared[name] = (a[0].clone(), torch.cat([F.log_softmax(splice.logits_of(r), dim=-1)
                                                             for r in job_rows.split(ROWS)]))
        for name, c in reuse:
            base[name][c0 + c] += F.nll_loss(shared[name][1], targets[c][pred[c]], reduction="sum").item()
    n_pred = int(base["pred"].sum())
    seconds = time.perf_counter() - start
    for out, per_ctx in zip(outs, per_sae):
        per_ctx |= base
        sums = {k: per_ctx[k].sum().item() for k in ("clean", "sae", "zero", "mean", "kl")}
        out |= ce_metrics(sums, n_pred) | {"hook": hook, "eval_config": asdict(cfg)}
        out |= intervals_of(per_ctx, core_statistic(cfg.dense_threshold)) | {"no_interval": NO_INTERVAL}
        out["seconds"] = seconds
        if len(saes) > 1:
            out["evaluated_with"] = f"{len(saes)} dictionaries in one pass (the seconds are the shared pass's)"
    return outs


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def intervals_of(per_unit: dict[str, torch.Tensor], statistic, unit: str = "contexts") -> dict[str, Any]:
    """eval.json's interval entries: {"intervals": {metric: [lo, hi]}, unit: n, "interval_method": …}."""
    per_unit = {k: v.cpu() for k, v in per_unit.items()}
    n = len(next(iter(per_unit.values())))
    ci = bootstrap(per_unit, statistic)
    return {"intervals": {k: list(v) for k, v in ci.items()}, unit: n,
            "interval_method": f"{LEVEL:.0%} percentile bootstrap over {n} {unit} ({DRAWS} resamples)"}


@torch.no_grad()
def evaluate_replacement(model, transcoders: list[SparseAutoencoder], contexts: torch.Tensor,
                         cfg: EvalConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """The replacement model: every MLP of `transcoders` replaced by its transcoder at once (error terms dropped),
    each reading the input its predecessors' replacements produced. CE and KL against the clean model on
    held-out `contexts`; the baselines zero- or mean-ablate those same MLPs (the mean of each MLP's output over the
    evaluated tokens, from the clean pass). Positions that are never evaluated (0, separators) keep the real MLPs,
    as in `evaluate`."""
    from .lm import check_pair, hook_layer
    from .tokens import special_ids

    cfg = cfg or EvalConfig()
    if not transcoders or not all(t.is_transcoder for t in transcoders):
        raise HookError("the replacement model replaces MLPs: every dictionary must be a transcoder.")
    pairs = [check_pair(model, t.hook, t.hook_out) for t in transcoders]
    layers = [hook_layer(p[0]) for p in pairs]
    if len(set(layers)) != len(layers):
        raise HookError(f"two transcoders replace the same MLP (layers {sorted(layers)}); keep one per layer.")
    special = special_ids(model.tokenizer)
    device = next(model.parameters()).device
    start = time.perf_counter()
    state: dict[str, Any] = {}

    def replacing(t: SparseAutoencoder, out_hook: str):
        def read(a, hook):
            if state["mode"] == "tc":
                state[out_hook] = t(a[state["keep"]].float())
            return a

        def write(a, hook):
            keep = state["keep"]
            if state["mode"] == "clean":
                state["sums"][out_hook] += a[keep].double().sum(0)
                return a
            fill = state[out_hook] if state["mode"] == "tc" else state["fill"][out_hook]
            a = a.clone()
            a[keep] = fill.to(a.dtype)
            return a
        return read, write

    hooks = []
    for t, (hin, hout) in zip(transcoders, pairs, strict=True):
        read, write = replacing(t.to(device), hout)
        hooks += [(hin, read), (hout, write)]
    sums = dict.fromkeys(("clean", "sae", "zero", "mean", "kl"), 0.0)
    state["sums"] = {hout: torch.zeros(t.cfg.out_dim, dtype=torch.float64, device=device)
                     for t, (_, hout) in zip(transcoders, pairs)}
    batches, have = [], 0
    for lo in range(0, len(contexts), cfg.batch_contexts):
        toks = contexts[lo: lo + cfg.batch_contexts].to(device)
        keep = keep_mask(toks, special)
        keep &= keep.flatten().cumsum(0).view_as(keep) <= cfg.tokens - have
        if keep.any():
            batches.append((toks, keep))
            have += int(keep.sum())
        if have >= cfg.tokens:
            break
    if have < cfg.tokens:
        raise DataError(f"the held-out contexts give {have} tokens, fewer than the {cfg.tokens} asked; "
                        "lower --eval-tokens or raise the held-out fraction.")
    n_pred = sum(int(k[:, :-1].sum()) for _, k in batches)

    def nll_of(toks: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
        logp = F.log_softmax(logits[:, :-1][keep[:, :-1]].float(), dim=-1)
        return logp, F.nll_loss(logp, toks[:, 1:][keep[:, :-1]], reduction="sum")

    # clean, replaced and zero-ablated per batch (the clean pass also sums each MLP's output for the mean fill);
    # then mean-ablated once the means are known
    for toks, keep in tqdm(batches, desc="replacement model", disable=not progress, dynamic_ncols=True):
        state |= {"mode": "clean", "keep": keep}
        logp, nll = nll_of(toks, keep)
        sums["clean"] += nll.item()
        state["mode"] = "tc"
        logq, nll = nll_of(toks, keep)
        sums["sae"] += nll.item()
        sums["kl"] += F.kl_div(logq, logp, log_target=True, reduction="sum").item()
        del logp, logq
        state |= {"mode": "fill", "fill": {h: torch.zeros(len(v), device=device) for h, v in state["sums"].items()}}
        sums["zero"] += nll_of(toks, keep)[1].item()
    state["fill"] = {h: (v / have).float() for h, v in state["sums"].items()}
    for toks, keep in tqdm(batches, desc="replacement model: mean-ablated", disable=not progress, dynamic_ncols=True):
        state |= {"mode": "fill", "keep": keep}
        sums["mean"] += nll_of(toks, keep)[1].item()
    out = ce_metrics(sums, n_pred)
    return {"kind": "replacement", "layers": layers, "transcoders": len(transcoders), **out,
            "tokens": have, "eval_config": asdict(cfg), "seconds": time.perf_counter() - start}


def ce_metrics(sums: dict[str, float], n_pred: int) -> dict[str, float]:
    """eval.json's CE/KL entries from summed NLLs of the clean, sae, zero and mean passes and the summed KL."""
    ce = {k: v / max(n_pred, 1) for k, v in sums.items()}
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
        "ce_delta": ce["sae"] - ce["clean"],
        "ce_recovered_zero": ce_recovered(ce["zero"], ce["sae"], ce["clean"]),
        "ce_recovered_mean": ce_recovered(ce["mean"], ce["sae"], ce["clean"]),
        "kl": ce["kl"], "ce_tokens": n_pred,
    }


def report(metrics: dict[str, Any]) -> str:
    """A short human table of the headline metrics."""
    rows = [("FVU (all tokens but pos 0)", "fvu"), ("FVU without massive tokens", "fvu_excl_massive"),
            ("normalised MSE", "nmse"), ("L0", "l0"), ("dead fraction", "dead_fraction"),
            ("dense fraction", "dense_fraction"), ("CE clean", "ce_clean"), ("CE with SAE", "ce_sae"),
            ("CE zero-ablation", "ce_zero_ablation"), ("CE mean-ablation", "ce_mean_ablation"),
            ("CE recovered vs zero", "ce_recovered_zero"), ("CE recovered vs mean", "ce_recovered_mean"),
            ("KL(clean‖SAE)", "kl"), ("tokens", "tokens")]
    width = max(len(r[0]) for r in rows)
    lines = []
    ci = metrics.get("intervals", {})
    for label, key in rows:
        if key in metrics:
            v = metrics[key]
            lines.append(f"  {label:<{width}}  {with_interval(v, ci.get(key))}" if isinstance(v, float)
                         else f"  {label:<{width}}  {v}")
    if "interval_method" in metrics:
        lines.append(f"  [intervals: {metrics['interval_method']}; CE over {metrics.get('ce_tokens', '?')} predictions]")
    return "\n".join(lines)


def with_interval(value: float, interval: list[float] | tuple[float, float] | None, digits: int = 4) -> str:
    """`0.1800 [0.1760, 0.1840]` (the value alone when it has no interval)."""
    if not interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
