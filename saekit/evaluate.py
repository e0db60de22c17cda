"""Metrics, defined once: used by training logs, `saekit eval`, benchmarks and the app.

FVU  = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²   (variance about the mean, raw activation scale; numerator and
                                      denominator accumulated over all tokens, not per-batch ratios)
nmse = mean over tokens of ‖x − x̂‖² / ‖x‖²   (OpenAI's normalized_mean_squared_error)
CE loss recovered = (CE_ablated − CE_sae) / (CE_ablated − CE_clean), ablation by zero or by the mean.
Position 0 and special tokens are neither evaluated nor spliced; CE and KL are averaged over the
next-token predictions made at the spliced positions.
"""

from __future__ import annotations

import time
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


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, massive_multiple: float = MASSIVE_MULTIPLE,
                           dense_threshold: float = 0.1, batch: int = 4096,
                           massive_threshold: float | None = None) -> dict[str, Any]:
    """FVU (all tokens and without massive ones), nmse, L0, dead and dense fractions on activations x.
    Massive tokens: norm above `massive_threshold` (the one recorded at harvest), else above
    `massive_multiple` × the median norm of x."""
    parts = []
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=x.device)
    l0 = 0.0
    for i in range(0, len(x), batch):  # one encode per batch serves the reconstruction and the counts
        v, idx = sae.encode(x[i: i + batch])
        parts.append(sae.decode(v, idx))
        on = v > 0
        l0 += on.sum().item()
        fires += torch.bincount(idx[on], minlength=sae.cfg.d_sae)
    x_hat = torch.cat(parts)
    norms = x.norm(dim=1)
    massive = norms > massive_threshold if massive_threshold is not None else massive_mask(norms, massive_multiple)
    normal = ~massive
    freq = fires.float() / len(x)
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
    }


class _Splicer:
    """Runs the model with the hook's activation replaced; uses start_at_layer for resid_pre hooks so
    the shared prefix is computed once per batch instead of once per variant."""

    def __init__(self, model, hook: str):
        from .lm import check_hooks, hook_layer

        check_hooks(model, [hook])
        self.model, self.hook = model, hook
        layer = hook_layer(hook)
        self.layer = layer if layer is not None and hook.endswith("hook_resid_pre") and layer > 0 else None

    def activations(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            return self.model(tokens, stop_at_layer=self.layer)
        from .harvest import Harvester

        return Harvester(self.model, [self.hook]).forward(tokens)[self.hook]

    def logits(self, tokens: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            return self.model(act, start_at_layer=self.layer)
        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, lambda a, hook: act.to(a.dtype))])


@torch.no_grad()
def evaluate(model, sae: SparseAutoencoder, contexts: torch.Tensor, cfg: EvalConfig | None = None,
             hook: str | None = None, progress: bool = True) -> dict[str, Any]:
    """All metrics of the SAE spliced into `model` at its hook on held-out `contexts` [n, T]."""
    from .tokens import special_ids

    cfg = cfg or EvalConfig()
    hook = hook or sae.hook
    if hook is None:
        raise HookError("the SAE records no hook; pass hook='blocks.L.hook_resid_pre'.")
    splice = _Splicer(model, hook)
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
        rows = keep.any(1)  # contexts with nothing to evaluate would cost 5 forwards for nothing
        if not rows.any():
            continue
        toks, keep = toks[rows], keep[rows]
        act = splice.activations(toks).float()
        if act.shape[-1] != sae.cfg.d_in:
            from .errors import ShapeError

            raise ShapeError(f"the SAE has d_in {sae.cfg.d_in} but {hook} has width {act.shape[-1]}.")
        batches.append((toks, keep, act))
        have += int(keep.sum())
        if have >= cfg.tokens:
            break
    if have < cfg.tokens:
        raise DataError(f"the held-out contexts give {have} tokens, fewer than the {cfg.tokens} asked; "
                        "lower --eval-tokens or raise the held-out fraction.")
    x = torch.cat([a[k] for _, k, a in batches])
    recorded = sae.info.get("massive_threshold") if cfg.massive_multiple is None else None
    multiple = MASSIVE_MULTIPLE if cfg.massive_multiple is None else cfg.massive_multiple
    out = reconstruction_metrics(sae, x, multiple, cfg.dense_threshold, massive_threshold=recorded)
    out["massive_threshold_from"] = ("the harvest (recorded in the SAE)" if recorded is not None else
                                     f"{multiple:g}× the evaluated tokens' median norm")
    mean_act = x.mean(0)

    # Pass 2: CE and KL with the SAE, zero and mean splices (unkept positions keep their activation).
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    n_pred = 0
    for toks, keep, act in tqdm(batches, desc="eval", disable=not progress, dynamic_ncols=True):
        pred = keep[:, :-1]  # next-token predictions made at spliced positions
        targets = toks[:, 1:][pred]
        variants = {
            "clean": act,
            "sae": torch.where(keep[..., None], sae(act.reshape(-1, act.shape[-1])).view_as(act), act),
            "zero": torch.where(keep[..., None], torch.zeros_like(act), act),
            "mean": torch.where(keep[..., None], mean_act.expand_as(act), act),
        }
        logp_clean = None
        for name, a in variants.items():
            logp = F.log_softmax(splice.logits(toks, a)[:, :-1][pred].float(), dim=-1)
            sums[name] += F.nll_loss(logp, targets, reduction="sum").item()
            if name == "clean":
                logp_clean = logp
            elif name == "sae":
                sums["kl"] += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        n_pred += len(targets)
    ce = {k: v / max(n_pred, 1) for k, v in sums.items()}
    out |= {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
        "ce_delta": ce["sae"] - ce["clean"],
        "ce_recovered_zero": ce_recovered(ce["zero"], ce["sae"], ce["clean"]),
        "ce_recovered_mean": ce_recovered(ce["mean"], ce["sae"], ce["clean"]),
        "kl": ce["kl"], "ce_tokens": n_pred,
        "hook": hook, "eval_config": asdict(cfg), "seconds": time.perf_counter() - start,
    }
    return out


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
    for label, key in rows:
        if key in metrics:
            v = metrics[key]
            lines.append(f"  {label:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {label:<{width}}  {v}")
    return "\n".join(lines)
