"""Bootstrap intervals over contexts: coverage in a simulation with a known true value, and the intervals
`evaluate` writes on the tiny model."""

from __future__ import annotations

import pytest
import torch
from helpers import build_world

from saekit.evaluate import _moments, bootstrap, core_statistic, report, with_interval


def simulated_contexts(gen: torch.Generator, n_ctx: int = 100, per_ctx: int = 20, d: int = 4):
    """Tokens whose contexts differ in mean and in reconstruction error: x = μ_c + ε, x̂ = x + η_c with
    μ_c ~ N(0, I), ε ~ N(0, I), η_c ~ N(0, s_c² I), s_c² ~ U(0.1, 0.5). True FVU = E[s²] / (1 + 1) = 0.15."""
    mu = torch.randn(n_ctx, 1, d, generator=gen)
    s2 = 0.1 + 0.4 * torch.rand(n_ctx, 1, 1, generator=gen)
    x = mu + torch.randn(n_ctx, per_ctx, d, generator=gen)
    x_hat = x + s2.sqrt() * torch.randn(n_ctx, per_ctx, d, generator=gen)
    groups = torch.arange(n_ctx).repeat_interleave(per_ctx)
    return x.reshape(-1, d), x_hat.reshape(-1, d), groups


def test_context_bootstrap_covers_the_true_fvu_in_at_least_90_of_100_repeats():
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for rep in range(100):
        x, x_hat, groups = simulated_contexts(gen)
        ci = bootstrap(_moments(x, x_hat, groups, 100), core_statistic(0.1), draws=400, seed=rep)["fvu"]
        covered += ci[0] <= 0.15 <= ci[1]
    assert covered >= 90, covered


def test_bootstrap_resamples_ratios_as_ratios_and_drops_nan_draws():
    # a ratio of sums: every resample of identical units gives the same ratio
    ci = bootstrap({"a": torch.full((10,), 2.0), "b": torch.full((10,), 4.0)}, lambda s: {"r": s["a"] / s["b"]})
    assert ci["r"] == pytest.approx((0.5, 0.5))
    ci = bootstrap({"a": torch.zeros(5)}, lambda s: {"r": s["a"] / s["a"]})
    assert ci["r"][0] != ci["r"][0]  # all draws undefined → nan, not an error


def test_report_prints_value_and_interval():
    assert with_interval(0.18, (0.176, 0.184), 3) == "0.180 [0.176, 0.184]"
    text = report({"fvu": 0.18, "intervals": {"fvu": [0.176, 0.184]}, "tokens": 10, "contexts": 2,
                   "interval_method": "95% percentile bootstrap over 2 contexts (1000 resamples)", "ce_tokens": 9})
    assert "0.1800 [0.1760, 0.1840]" in text and "over 2 contexts" in text


def test_evaluate_writes_intervals_around_its_point_estimates(tmp_path):
    from saekit.config import EvalConfig
    from saekit.data import load_contexts
    from saekit.evaluate import evaluate
    from saekit.lm import load_model
    from saekit.sae import load_sae

    world = build_world(tmp_path)
    model = load_model(str(world["model"]))
    sae = load_sae(world["sae"])
    train, _ = load_contexts(model.tokenizer, str(world["data"]), 32, 0.0, 0)
    m = evaluate(model, sae, train.tokens, EvalConfig(tokens=600, batch_contexts=4), progress=False)
    assert m["contexts"] >= 600 // 31 and m["tokens"] == 600
    assert "dead_fraction" not in m["intervals"] and "dead_fraction" in m["no_interval"]
    for key in ("fvu", "fvu_excl_massive", "nmse", "l0", "dense_fraction", "ce_clean", "ce_sae",
                "ce_recovered_zero", "ce_recovered_mean", "kl"):
        lo, hi = m["intervals"][key]
        assert lo <= m[key] + 1e-9 and m[key] <= hi + 1e-9, (key, lo, m[key], hi)
    assert m["intervals"]["fvu"][1] > m["intervals"]["fvu"][0]  # a real spread, not a point
