"""Metric definitions (FVU, nmse, CE recovered, dead/dense) on constructed cases, and the splice-in
evaluation on the real model at a tiny token budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import HOOK

from saekit.config import EvalConfig, SaeConfig
from saekit.errors import DataError, HookError, ShapeError
from saekit.evaluate import ce_recovered, evaluate, fvu, nmse, reconstruction_metrics, report
from saekit.sae import SparseAutoencoder

REQUIRED = {"fvu", "fvu_excl_massive", "nmse", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_sae",
            "ce_zero_ablation", "ce_mean_ablation", "ce_recovered_zero", "ce_recovered_mean", "kl", "tokens"}


def test_fvu_of_the_mean_is_one_and_of_a_perfect_reconstruction_zero():
    x = torch.randn(500, 8) * torch.linspace(0.1, 5, 8) + 3
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, abs=1e-12)
    assert fvu(x, x) == 0.0
    # variance about the mean, not about zero: predicting zero scores far worse than 1 with an offset
    assert fvu(x, torch.zeros_like(x)) > 1.5
    # half the error → a quarter of the unexplained variance
    noise = torch.randn_like(x)
    assert fvu(x, x + noise / 2) == pytest.approx(fvu(x, x + noise) / 4, rel=1e-6)


def lookup_sae() -> SparseAutoencoder:
    """d_in 3, d_sae 4, k 1: latent j < 3 reads axis j; latent 3 reads −(sum) and can never be positive."""
    sae = SparseAutoencoder(SaeConfig(d_in=3, d_sae=4, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0, -1], [0, 1, 0, -1], [0, 0, 1, -1]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]) /
                        torch.tensor([1, 1, 1, math.sqrt(3)])[:, None])
    return sae


def test_fvu_accumulates_over_batches_not_a_mean_of_batch_ratios():
    torch.manual_seed(0)
    sae = lookup_sae()
    x = torch.cat([torch.rand(300, 3) * 10, torch.rand(100, 3) * 0.1])  # batches of very different variance
    m = reconstruction_metrics(sae, x, batch=100)
    x_hat = sae(x)
    assert m["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-12)
    per_batch = [fvu(x[i: i + 100], x_hat[i: i + 100]) for i in range(0, 400, 100)]
    assert abs(sum(per_batch) / 4 - m["fvu"]) > 0.05
    assert reconstruction_metrics(sae, x, batch=7)["fvu"] == pytest.approx(m["fvu"], rel=1e-12)


def test_nmse_is_the_mean_of_per_token_ratios_to_the_raw_norm():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 10.0]])
    x_hat = torch.tensor([[3.0, 3.0], [0.0, 0.0], [0.0, 10.0]])
    # per token: 1/25, 1/1, 0/100 → mean 0.3466…
    assert nmse(x, x_hat) == pytest.approx((1 / 25 + 1 + 0) / 3)
    assert nmse(x, x_hat) != pytest.approx(fvu(x, x_hat))
    assert nmse(x, x) == 0.0


def test_ce_recovered_formula():
    assert ce_recovered(ce_ablated=8.0, ce_sae=4.0, ce_clean=3.0) == pytest.approx(0.8)
    assert ce_recovered(8.0, 3.0, 3.0) == 1.0
    assert ce_recovered(8.0, 8.0, 3.0) == 0.0
    assert ce_recovered(8.0, 9.0, 3.0) == pytest.approx(-0.2)  # worse than ablating: negative
    assert math.isnan(ce_recovered(3.0, 4.0, 3.0))


def test_reconstruction_metrics_dead_dense_and_massive():
    sae = lookup_sae()
    rows = [[1.0, 0, 0]] * 16 + [[0, 2.0, 0]] * 2 + [[0, 0, 1.0]] * 2  # 20 tokens
    x = torch.tensor(rows + [[100.0, 0, 0]])  # a massive token: norm 100 vs median 1
    m = reconstruction_metrics(sae, x, massive_multiple=10.0, dense_threshold=0.1)
    # latent 0 fires on 17/21 (dense), 1 and 2 on 2/21 each (< 10%), latent 3 never (dead)
    assert m["dead_fraction"] == 0.25
    assert m["dense_fraction"] == 0.25
    assert m["l0"] == 1.0
    assert m["massive_tokens"] == 1 and m["tokens"] == 21
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12) and m["fvu_excl_massive"] == pytest.approx(0.0, abs=1e-12)
    # a reconstruction that is perfect on the massive token only: the two FVUs part ways
    with torch.no_grad():
        sae.W_dec[1:3] = 0.0
    m = reconstruction_metrics(sae, x)
    assert m["fvu_excl_massive"] > 10 * m["fvu"]
    x_n = x[:20]
    assert m["fvu_excl_massive"] == pytest.approx(fvu(x_n, sae(x_n)), rel=1e-12)


def test_report_lists_headline_metrics():
    text = report({"fvu": 0.25, "ce_recovered_mean": 0.9, "tokens": 100, "unrelated": 1.0})
    assert "FVU (all tokens but pos 0)" in text and "0.2500" in text and "100" in text and "unrelated" not in text


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def random_sae():
    """A random-init SAE on the default hook (enough to exercise every code path of evaluate)."""
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=256, k=8), seed=0)
    sae.info = {"hook": HOOK}
    return sae


def test_evaluate_on_the_real_model(model, default_contexts, random_sae):
    from saekit.harvest import Harvester, keep_mask
    from saekit.tokens import special_ids

    _, held = default_contexts
    ctx = held.tokens[:8]
    cfg = EvalConfig(tokens=300, batch_contexts=2)
    m = evaluate(model, random_sae, ctx, cfg, progress=False)
    assert REQUIRED <= set(m)
    assert m["tokens"] == 300 and m["hook"] == HOOK
    assert m["ce_zero_ablation"] > m["ce_clean"] and m["ce_mean_ablation"] > m["ce_clean"]
    assert 2.0 < m["ce_clean"] < 6.0  # SmolLM2-135M on BBC news
    assert m["kl"] >= 0 and 0 <= m["dead_fraction"] <= 1 and m["l0"] <= 8
    assert m["ce_recovered_zero"] == pytest.approx(
        (m["ce_zero_ablation"] - m["ce_sae"]) / (m["ce_zero_ablation"] - m["ce_clean"]))
    # the same tokens through the harvester give the same reconstruction metrics
    h = Harvester(model, [HOOK]).harvest(ctx, 300, batch_contexts=2, progress=False)
    direct = reconstruction_metrics(random_sae, h.acts[HOOK])
    for key in ("fvu", "fvu_excl_massive", "nmse", "l0", "dead_fraction"):
        assert m[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-6), key
    # clean CE equals a plain full forward over the evaluated predictions
    used = ctx[: int(h.context_ids.max()) + 1]
    keep = keep_mask(used, special_ids(model.tokenizer))
    keep &= keep.flatten().cumsum(0).view_as(keep) <= 300
    with torch.no_grad():
        logits = model(used)
    pred = keep[:, :-1]
    ce = F.cross_entropy(logits[:, :-1][pred].float(), used[:, 1:][pred]).item()
    assert m["ce_tokens"] == int(pred.sum())
    assert m["ce_clean"] == pytest.approx(ce, rel=1e-4)


def test_evaluate_errors(model, default_contexts, random_sae):
    _, held = default_contexts
    with pytest.raises(DataError, match="fewer than the 100000 asked"):
        evaluate(model, random_sae, held.tokens[:2], EvalConfig(tokens=100_000), progress=False)
    with pytest.raises(HookError, match="blocks.15.hook_resid_pre"):
        evaluate(model, random_sae, held.tokens[:2], EvalConfig(tokens=10), hook="blocks.15.hook_resid_pree",
                 progress=False)
    narrow = SparseAutoencoder.initialized(SaeConfig(d_in=64, d_sae=128, k=4))
    with pytest.raises(ShapeError, match="d_in 64 but blocks.15.hook_resid_pre has width 576"):
        evaluate(model, narrow, held.tokens[:2], EvalConfig(tokens=10), hook=HOOK, progress=False)
    with pytest.raises(HookError, match="records no hook"):
        evaluate(model, narrow, held.tokens[:2], EvalConfig(tokens=10), progress=False)


# ----------------------------------------------------------------------------- chunked CE and KL

class _RowsAreLogits:
    """A stand-in splicer whose `outputs` rows are already logits (evaluate's fallback path)."""

    @staticmethod
    def logits_of(rows):
        return rows.float()


def test_chunked_ce_and_kl_equal_the_unchunked_sums(monkeypatch):
    import saekit.evaluate as ev

    monkeypatch.setattr(ev, "ROWS", 7)  # 50 rows: 7 full blocks and a ragged one
    clean, spliced = torch.randn(50, 300) * 4, torch.randn(50, 300) * 4
    targets = torch.randint(0, 300, (50,))
    nll_c, nll_s, kl = ev._pair_sums(_RowsAreLogits(), clean, spliced, targets)
    logp, logq = F.log_softmax(clean, -1), F.log_softmax(spliced, -1)
    assert nll_c == pytest.approx(F.nll_loss(logp, targets, reduction="sum").item(), rel=1e-6)
    assert nll_s == pytest.approx(F.nll_loss(logq, targets, reduction="sum").item(), rel=1e-6)
    assert kl == pytest.approx((logp.exp() * (logp - logq)).sum().item(), rel=1e-5)
    assert kl == pytest.approx(F.kl_div(logq, logp, log_target=True, reduction="sum").item(), rel=1e-5)
    rows = ev._nll(_RowsAreLogits(), spliced, targets)
    assert torch.allclose(rows, F.nll_loss(logq, targets, reduction="none"), rtol=1e-6, atol=1e-6)


def reference_evaluate(model, sae, ctx, tokens: int, hook: str) -> dict[str, float]:
    """The definitions, straightforwardly: the whole model on every variant (the hook's activation replaced at the
    kept positions: not position 0, not a separator, not past the budget), full-vocabulary log-softmax."""
    from saekit.harvest import keep_mask
    from saekit.tokens import special_ids

    keep = keep_mask(ctx, special_ids(model.tokenizer))
    keep &= keep.flatten().cumsum(0).view_as(keep) <= tokens
    store = {}
    model.run_with_hooks(ctx, fwd_hooks=[(hook, lambda a, hook: store.setdefault("act", a.detach()))])
    act = store["act"]
    x = act[keep]
    m = reconstruction_metrics(sae, x)
    spliced = act.clone()
    spliced[keep] = sae(x)
    variants = {"clean": act, "sae": spliced, "zero": torch.where(keep[..., None], 0.0, act),
                "mean": torch.where(keep[..., None], x.mean(0), act)}
    stacked = torch.cat(list(variants.values()))  # the four variants as one batch of 4 × len(ctx) contexts
    logits = model.run_with_hooks(ctx.repeat(4, 1), fwd_hooks=[(hook, lambda a, hook: stacked)])
    pred = keep[:, :-1]
    targets = ctx[:, 1:][pred]
    logp = {name: F.log_softmax(part[:, :-1][pred].float(), dim=-1) for name, part in zip(variants, logits.chunk(4))}
    for name in variants:
        m[f"ce_{name}"] = F.nll_loss(logp[name], targets).item()
    m["kl"] = F.kl_div(logp["sae"], logp["clean"], log_target=True, reduction="sum").item() / len(targets)
    m["ce_recovered_zero"] = ce_recovered(m["ce_zero"], m["ce_sae"], m["ce_clean"])
    m["ce_recovered_mean"] = ce_recovered(m["ce_mean"], m["ce_sae"], m["ce_clean"])
    m["ce_tokens"] = len(targets)
    return m


def assert_same_metrics(m: dict, ref: dict) -> None:
    assert m["tokens"] == ref["tokens"] and m["ce_tokens"] == ref["ce_tokens"]
    names = {"ce_clean": "ce_clean", "ce_sae": "ce_sae", "ce_zero_ablation": "ce_zero", "ce_mean_ablation": "ce_mean",
             "ce_recovered_zero": "ce_recovered_zero", "ce_recovered_mean": "ce_recovered_mean", "kl": "kl",
             "fvu": "fvu", "fvu_excl_massive": "fvu_excl_massive", "nmse": "nmse", "l0": "l0",
             "dead_fraction": "dead_fraction", "dense_fraction": "dense_fraction"}
    for ours, theirs in names.items():  # a ratio of CE differences magnifies the last bits (threads, batch shapes)
        tol = 1e-4 if ours.startswith("ce_recovered") else 1e-5
        assert m[ours] == pytest.approx(ref[theirs], rel=1e-5, abs=tol), ours


@pytest.fixture(scope="module")
def short_contexts(default_contexts, tokenizer):
    """32-token held-out contexts: two whose only unspliced position is 0 in different batches of 2 (the ablated
    log-probabilities shared across batches), one with a separator inside, one cut by the token budget."""
    from saekit.tokens import special_ids

    ctx = default_contexts[1].tokens[:, :32]
    inner = torch.isin(ctx[:, 1:], torch.tensor(special_ids(tokenizer))).any(1)
    plain, with_sep = (~inner).nonzero()[:, 0], inner.nonzero()[:, 0]
    chosen = ctx[torch.stack([plain[0], with_sep[0], plain[1], plain[2]])]
    return chosen, 31 + 30 + 31 + 18  # the budget ends 18 tokens into the last context


@pytest.fixture(scope="module")
def short_sae():
    return SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=256, k=8), seed=1)


@pytest.mark.parametrize("hook", [HOOK, "blocks.0.hook_resid_pre", "blocks.15.hook_mlp_out"])
def test_evaluate_equals_the_straightforward_definitions(model, short_contexts, short_sae, hook, recwarn):
    from saekit.evaluate import _Splicer

    ctx, tokens = short_contexts
    splice = _Splicer(model, hook)
    assert splice.fast and splice.direct == hook.endswith("hook_resid_pre")  # shared ablations only at resid_pre
    m = evaluate(model, short_sae, ctx, EvalConfig(tokens=tokens, batch_contexts=2), hook=hook, progress=False)
    assert not [w for w in recwarn if "does not reproduce" in str(w.message)]  # the shortcut was taken
    assert m["tokens"] == tokens
    assert_same_metrics(m, reference_evaluate(model, short_sae, ctx, tokens, hook))
    assert m["kl"] > 0 and m["ce_zero_ablation"] > m["ce_clean"]


def test_evaluate_falls_back_to_full_forwards_when_the_shortcut_differs(model, short_contexts, short_sae,
                                                                        monkeypatch):
    import saekit.evaluate as ev

    ctx, tokens = short_contexts
    monkeypatch.setattr(ev, "SUFFIX_TOLERANCE", -1.0)  # no shortcut can pass the check now
    with pytest.warns(UserWarning, match="does not reproduce a full forward"):
        m = evaluate(model, short_sae, ctx, EvalConfig(tokens=tokens, batch_contexts=2), hook=HOOK, progress=False)
    assert_same_metrics(m, reference_evaluate(model, short_sae, ctx, tokens, HOOK))


@pytest.mark.parametrize("fast", [True, False])
def test_evaluating_together_equals_evaluating_each_alone(model, short_contexts, short_sae, fast, monkeypatch):
    """evaluate_many shares pass 1, the clean and the ablated passes: every SAE's metrics and intervals must be
    those of its own evaluate call, on the shortcut and on the plain path."""
    import warnings

    import saekit.evaluate as ev

    ctx, tokens = short_contexts
    if not fast:
        monkeypatch.setattr(ev, "SUFFIX_TOLERANCE", -1.0)
    other = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=128, k=4), seed=2)
    third = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=256, k=16, architecture="batchtopk"), seed=3)
    cfg = EvalConfig(tokens=tokens, batch_contexts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = ev.evaluate_many(model, [short_sae, other, third], ctx, cfg, hook=HOOK, progress=False)
        alone = [evaluate(model, s, ctx, cfg, hook=HOOK, progress=False) for s in (short_sae, other, third)]
    assert len({m["ce_sae"] for m in together}) == 3  # three different SAEs, three different CEs
    for m, ref in zip(together, alone):
        for key in ("fvu", "nmse", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_zero_ablation",
                    "ce_mean_ablation", "kl", "ce_recovered_zero", "tokens", "ce_tokens"):
            assert m[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-6), key
        for key, (lo, hi) in ref["intervals"].items():
            assert m["intervals"][key] == pytest.approx([lo, hi], rel=1e-5, abs=1e-6), key


def test_dictionaries_of_different_hooks_are_not_evaluated_together(model, short_sae):
    from saekit.evaluate import evaluate_many

    one, other = (SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=128, k=4), seed=s) for s in (1, 2))
    one.info["hook"], other.info["hook"] = HOOK, "blocks.3.hook_resid_pre"
    with pytest.raises(HookError, match="must share hook"):
        evaluate_many(model, [one, other], torch.zeros(1, 8, dtype=torch.long))
