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


def test_sweep_trains_from_one_stream_then_compare_draws_the_frontier(world, tmp_path, capsys):
    from saekit import cli
    from saekit.evals.compare import compare

    out = tmp_path / "sweep"
    code = cli.main([str(a) for a in (
        "sweep", "--model", world["model"], "--dataset", world["data"], "--hook", "blocks.1.hook_resid_pre",
        "--context-size", 32, "--heldout-fraction", 0.1, "--tokens", 1500, "--batch-contexts", 8,
        "--architectures", "topk,batchtopk", "--k", 4, "--d-sae", 64, "--epochs", 1, "--batch-size", 128,
        "--eval-tokens", 150, "--eval-batch-contexts", 4, "--suite", "core,probing,tpp",
        "--probe-dataset", world["labelled"], "--probe-k", "1,2", "--tpp-latents", 2, "--probe-context", 24,
        "--device", "cpu", "--out", out)])
    assert code == 0, capsys.readouterr().err
    evals = sorted(out.rglob("eval.json"))
    assert len(evals) == 2
    got = compare(out)
    rows = got["rows"]
    assert {r["architecture"] for r in rows} == {"topk", "batchtopk"}
    assert all(r["fvu_ci"] and r["probing_k1"] is not None and r["tpp"] is not None for r in rows)
    # one best per compared metric; the other SAE is either significantly worse ('') or within its interval ('≈')
    assert sum(v == "★" for k, v in got["marks"].items() if k.endswith(":fvu")) == 1
    page = (out / "compare.html").read_text()
    assert "L0 frontier" in page and "sortBy" in page and (out / "compare.md").is_file()


def test_sweep_refuses_several_hooks_before_training(world, tmp_path, capsys):
    from saekit import cli

    out = tmp_path / "mixed"
    code = cli.main([str(a) for a in ("sweep", "--model", world["model"], "--dataset", world["data"], "--hooks",
                                      "blocks.0.hook_resid_pre,blocks.1.hook_resid_pre", "--device", "cpu", "--out", out)])
    assert code == 2 and "one hook" in capsys.readouterr().err and not out.exists()


def test_compare_marks_overlapping_intervals_not_significant():
    from saekit.evals.compare import METRICS, marks

    rows = [{"fvu": 0.20, "fvu_ci": [0.19, 0.21]}, {"fvu": 0.205, "fvu_ci": [0.20, 0.215]},
            {"fvu": 0.30, "fvu_ci": [0.29, 0.31]}]
    for r in rows:
        for col in (c for c, *_ in METRICS if c != "fvu"):
            r[col], r[f"{col}_ci"] = None, None
    m = marks(rows)
    assert (m[(0, "fvu")], m[(1, "fvu")], m[(2, "fvu")]) == ("★", "≈", "")
