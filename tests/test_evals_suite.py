"""The suite end to end on the tiny world (core + probing + TPP; eval.json and report.html), its refusals, and
the first-letter task on the real model."""

from __future__ import annotations

import json

import pytest
from helpers import HOOK, TEXTS, build_world

from saekit.config import EvalConfig, SuiteConfig
from saekit.errors import SaekitError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite_world")
    w = build_world(root)
    labelled = root / "labelled"
    for label, texts in (("money", [TEXTS[0], TEXTS[3]]), ("games", [TEXTS[2], TEXTS[4]])):
        (labelled / label).mkdir(parents=True)
        for i in range(16):
            (labelled / label / f"{i}.txt").write_text(f"{texts[i % 2]} Number {i}.")
    from saekit.sae import load_sae

    sae = load_sae(w["sae"])  # recorded under the id saekit gives a model loaded from that folder
    sae.info = {**sae.info, "model": str(w["model"])}
    return w | {"labelled": labelled, "sae": sae.save(root / "sae-suite")}


def test_suite_writes_eval_json_and_report_with_intervals(world):
    from saekit.evals.suite import run_suite

    suite = SuiteConfig(suite="core,probing,tpp", probe_dataset=str(world["labelled"]), probe_k=[1, 2], tpp_latents=2,
                        probe_test_fraction=0.25, probe_context=24)
    [m] = run_suite([world["sae"]], EvalConfig(tokens=150, batch_contexts=4), suite, device="cpu", progress=False)
    saved = json.loads((world["sae"] / "eval.json").read_text())
    assert saved["fvu"] == pytest.approx(m["fvu"]) and "fvu" in saved["intervals"] and saved["contexts"] > 0
    p = saved["probing"]
    assert p["classes"] == ["games", "money"] and p["test_documents"] == 8 and 0 <= p["sae_k1"] <= 1
    assert set(p["intervals"]) >= {"sae_k1", "raw_k2", "raw_all", "sae_last_token_k1"}
    assert "tpp" in saved["tpp"] and set(saved["suite"]["seconds"]) == {"core", "probing", "tpp"}
    page = (world["sae"] / "report.html").read_text()
    assert "Sparse probing" in page and "TPP" in page and "[" in page


def test_suite_refuses_an_sae_of_another_model(world, tmp_path):
    from saekit.evals.suite import run_suite
    from saekit.sae import load_sae

    sae = load_sae(world["sae"])
    sae.info = {**sae.info, "model": "another/model"}
    other = sae.save(tmp_path / "other")
    with pytest.raises(SaekitError, match="trained on 'another/model'"):
        run_suite([other], EvalConfig(tokens=100), SuiteConfig(suite="core"), device="cpu", progress=False)


def test_first_letter_task_on_the_real_model(model):
    from saekit.config import SaeConfig
    from saekit.evals.absorption import absorption, word_task
    from saekit.sae import SparseAutoencoder

    task = word_task(model, HOOK, n_words=400, examples=2, progress=False)
    assert task.acts.shape == (task.words, 576) and task.words > 300
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=128, k=8), seed=0)
    out = absorption(task, sae)
    assert out["probe_accuracy"] > 0.3  # 26-way: chance is ~0.06
    assert 0 <= out["mean_absorption_fraction"] <= 1 and 0 <= out["absorption_rate"] <= 1
