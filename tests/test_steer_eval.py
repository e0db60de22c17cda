"""`saekit steer-eval` and `saekit steer`: the pure parts (verdict, table, figure, prompts, feature picking)
fast; the sweep and both commands on the real default model at tiny sizes (integration)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saekit import steer_eval as E
from saekit.config import SaeConfig
from saekit.errors import DataError
from saekit.sae import SparseAutoencoder

HOOK = "blocks.15.hook_resid_pre"


def fake_rows():
    rows = []
    for f in (3, 9):
        rows.append(dict(feature=f, method="none", strength=0.0, mode="add", hit=0.1, any=0.2, act=0.5, p_top=0.01,
                         ppl=10.0, ppl_ratio=1.0, kl=0.0))
        for m in ("sae", "dom"):
            for s, hit, ratio in ((2.0, 0.3, 1.2), (4.0, 0.6, 1.4), (8.0, 0.9, 3.0)):
                rows.append(dict(feature=f, method=m, strength=s, mode="add", hit=hit if m == "sae" else hit / 3,
                                 any=1.0, act=2.0, p_top=0.1, ppl=10 * ratio, ppl_ratio=ratio, kl=s / 10))
    return rows


def test_verdict_picks_best_hit_within_perplexity_limit():
    v = {(r["feature"], r["method"]): r for r in E.verdict(fake_rows())}
    assert v[(3, "sae")]["strength"] == 4.0 and v[(3, "sae")]["gain"] == pytest.approx(0.5)
    assert v[(9, "dom")]["hit"] == pytest.approx(0.2)
    none = E.verdict([r if r["method"] == "none" else {**r, "ppl_ratio": 9.0} for r in fake_rows()])
    assert all(x["strength"] is None for x in none)


def test_table_and_figure(tmp_path):
    text = E.table(fake_rows())
    lines = text.splitlines()
    assert "ppl×" in lines[0] and len(lines) == 2 + len(fake_rows())
    assert "unsteered" in text and "sae-add" in text and "diff-mean" in text
    path = E.figure(fake_rows(), tmp_path / "fig.html")
    html = path.read_text()
    assert "f3 SAE add" in html and "f9 diff-of-means" in html and "perplexity" in html


def test_prompts_shipped_and_checked(tmp_path):
    p = E.default_prompts()
    assert len(p["steer"]) >= 8 and len(p["neutral"]) >= 8
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"steer": ["a"]}))
    with pytest.raises(DataError, match="neutral"):
        E.default_prompts(str(bad))


def test_pick_features_by_frequency_band():
    n, d = 1000, 50
    indices = torch.zeros(n, 1, dtype=torch.long)
    indices[:10, 0] = 7   # 1%: inside the band
    indices[10:, 0] = 2   # 99%: dense, outside
    values = torch.ones(n, 1)
    assert E.pick_features(values, indices, d, 3) == [7]


def test_rows_share_one_unsteered_row():
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=64, k=4))
    sae.info["hook"] = HOOK
    ref = E.FeatureRef(5, 2.0, 0.01, torch.arange(3), ["a", "b", "c"], dom=torch.ones(576) / 24)
    rows = E._rows([0, 1, 3], ["sae", "dom"])
    assert rows == [("none", 0.0), ("sae", 1.0), ("sae", 3.0), ("dom", 1.0), ("dom", 3.0)]
    (st,) = E._steerings(sae, ref, rows, "add", "all", [])  # no flow companions: one Steering
    x = torch.randn(5, 3, 576)
    y = st(x.clone())
    assert torch.equal(y[0], x[0])
    torch.testing.assert_close(y[2, 1:] - x[2, 1:], 6.0 * sae.W_dec[5].detach().expand(2, -1))
    torch.testing.assert_close((y[4, 1:] - x[4, 1:]).norm(dim=-1), torch.full((2,), 6.0))  # same norm as SAE add


# ----------------------------------------------------------------------------- real model, tiny sizes

@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from saekit.lm import load_model

    yield load_model("default")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sae_and_acts(model, tmp_path_factory):
    """A small random SAE saved to disk and a tiny activation cache of real activations."""
    from saekit.cache import ActivationCache
    from saekit.harvest import Harvester
    from saekit.steer import prompt_tokens

    texts = E.default_prompts()["neutral"]
    ids = [prompt_tokens(model.tokenizer, t) for t in texts]
    T = min(map(len, ids))
    h = Harvester(model, [HOOK]).harvest(torch.tensor([i[:T] for i in ids]), len(texts) * (T - 1) - 8,
                                         progress=False)
    cache = tmp_path_factory.mktemp("acts")
    ActivationCache.write(cache, h, {"model": "default"})
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=128, k=8), sample=h.acts[HOOK], seed=0)
    sae_dir = tmp_path_factory.mktemp("sae")
    sae.info = {"hook": HOOK, "model_arg": "default", "activations": str(cache)}
    sae.save(sae_dir)
    return sae, h.acts[HOOK], sae_dir, cache


@pytest.mark.integration
def test_sweep_runs_and_unsteered_row_is_reference(model, sae_and_acts):
    sae, x, _, _ = sae_and_acts
    cfg = E.SteerEvalConfig(strengths=[0, 8], n_prompts=1, n_neutral=1, max_new_tokens=3, auto_features=1,
                            dom_examples=4)
    res = E.run(model, sae, cfg, x=x, progress=False)
    rows = res["rows"]
    assert [(r["method"], r["strength"]) for r in rows] == [("none", 0.0), ("sae", 8.0), ("dom", 8.0)]
    assert rows[0]["ppl_ratio"] == 1.0 and rows[0]["kl"] == 0.0
    assert rows[1]["kl"] > 0 and rows[2]["kl"] > 0
    assert all(math.isfinite(r["ppl"]) and 0 <= r["hit"] <= 1 and 0 <= r["p_top"] <= 1 for r in rows)
    assert len(res["verdict"]) == 2 and res["features"][0]["baseline"]


@pytest.mark.integration
def test_cli_steer_and_steer_eval(sae_and_acts, tmp_path, capsys):
    from saekit.cli import main

    _, _, sae_dir, cache = sae_and_acts
    assert main(["steer", "--sae", str(sae_dir), "--feature", "3", "--strength", "40", "--prompt", "Stocks",
                 "--max-new-tokens", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "steered: add feature 3 40" in out and "raw units" in out
    assert main(["steer", "--sae", str(sae_dir), "--feature", "999", "--prompt", "x", "--mode", "ablate"]) == 2
    assert "out of range" in capsys.readouterr().err
    out_dir = tmp_path / "se"
    assert main(["steer-eval", "--sae", str(sae_dir), "--out", str(out_dir), "--strengths", "4", "--n-prompts", "1",
                 "--n-neutral", "1", "--max-new-tokens", "2", "--auto-features", "1", "--dom-examples", "4",
                 "--activations", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "best hit rate" in out
    res = json.loads((out_dir / "steer_eval.json").read_text())
    assert len(res["rows"]) == 3 and (out_dir / "steer_eval.html").is_file()
