"""saekit export-neuronpedia: the batch JSON SAEDashboard's Neuronpedia runner writes, from the tiny store.

Schema: the keys and types of sae-dashboard 0.8.0's NeuronpediaDashboardBatch / Feature / Activation `to_dict`.
Values: each field against the store it came from (FeatureStore.feature, the very rows the browser shows) or
against the weights, recomputed here the straightforward way. The comparison with SAEDashboard's own export of the
same SAE runs in .venv-dash (`make bench-dashboard`) and is skipped without it."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.cli import main as cli
from saekit.config import NeuronpediaConfig
from saekit.errors import OutputError
from saekit.features import FeatureStore, hist_edges
from saekit.neuronpedia import EXPORT_KIND, band_examples, equal_width_hist, export_neuronpedia

ROOT = Path(__file__).resolve().parents[1]
DASH_PY = ROOT / ".venv-dash/bin/python"

BATCH_KEYS = {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
FEATURE_KEYS = {  # NeuronpediaDashboardFeature.to_dict, sae-dashboard 0.8.0
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
    "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
    "activations", "vector"}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}


def batches(out: Path) -> list[dict]:
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]


def features(out: Path) -> dict[int, dict]:
    return {f["feature_index"]: f for b in batches(out) for f in b["features"]}


@pytest.fixture(scope="module")
def export(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("np") / "export"
    export_neuronpedia(tiny_store["store"], out, NeuronpediaConfig(features_per_batch=7, sae_set="tiny"))
    return out


@pytest.fixture(scope="module")
def weights(tiny_store) -> dict[str, torch.Tensor]:
    """W_dec and the logit effects (final-norm weight applied) of every latent over the whole vocabulary."""
    from saekit.lm import load_model, unembedding
    from saekit.sae import load_sae

    sae = load_sae(tiny_store["sae"])
    W_U, norm = unembedding(load_model(str(tiny_store["model"])))
    W_dec = sae.W_dec.detach().double()
    return {"W_dec": W_dec, "logits": (W_dec * norm.double()) @ W_U.double()}


def test_schema_and_batches(tiny_store, export):
    store = FeatureStore(tiny_store["store"])
    count = store.stats["count"]
    live = [int(i) for i in np.nonzero(count > 0)[0]]
    bs = batches(export)
    assert [len(b["features"]) for b in bs] == [len(live[i: i + 7]) for i in range(0, len(live), 7)]
    assert [f["feature_index"] for b in bs for f in b["features"]] == live  # in latent order, every live latent
    for b in bs:
        assert set(b) == BATCH_KEYS
        assert b["layer"] == int(store.manifest["hook"].split(".")[1]) and b["sae_set"] == "tiny"
        assert b["model_id"] == store.manifest["model"] and b["sae_id_suffix"] is None
        for f in b["features"]:
            assert set(f) == FEATURE_KEYS
            assert isinstance(f["frac_nonzero"], float) and isinstance(f["n_prompts_total"], int)
            assert all(isinstance(v, str) for v in f["pos_str"] + f["neg_str"])
            for a in f["activations"]:
                assert set(a) == ACTIVATION_KEYS
                assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
                assert 0 <= a["qualifying_token_index"] < len(a["tokens"])
    skipped = json.loads((export / "skipped_indexes.json").read_text())
    assert skipped["skipped_indexes"] == [int(i) for i in np.nonzero(count == 0)[0]]
    assert skipped["layer"] == str(bs[0]["layer"]) and skipped["log_sparsity"] == round(-math.log10(store.tokens), 3)
    man = json.loads((export / "manifest.json").read_text())
    assert man["kind"] == EXPORT_KIND and man["exported"] == len(live) and man["batches"] == len(bs)


def test_examples_and_groups_are_the_stores(tiny_store, export):
    """Top examples and quantile bands hold exactly what the browser shows (less position 0)."""
    store = FeatureStore(tiny_store["store"])
    exported = features(export)
    checked = 0
    for i, f in exported.items():
        page = store.feature(i)
        acts = f["activations"]
        top = [a for a in acts if a["bin_min"] == -1]
        assert len(top) == len(page.top)
        for a, e in zip(top, page.top):
            drop = 1 if e.position - e.focus == 0 else 0  # the window started at position 0 (BOS): left out
            assert a["tokens"] == e.pieces[drop:]
            assert a["values"] == pytest.approx(e.acts[drop:], abs=1e-3)
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(e.value, rel=1e-3, abs=1e-3)
            assert a["bin_max"] == pytest.approx(page.max, abs=1e-3) and a["bin_contains"] == -1
        bands = [a for a in acts if a["bin_min"] != -1]
        shown = [(g, e) for g in page.groups for e in g.examples]
        assert len(bands) == len(shown)
        for a, (g, e) in zip(bands, shown):
            assert a["bin_min"] == pytest.approx(g.lo, abs=1e-3)
            assert a["bin_max"] == pytest.approx(min(g.hi, page.max), abs=1e-3)
            assert a["bin_contains"] == pytest.approx((g.q_hi - g.q_lo) * page.density, abs=1e-6)
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(e.value, rel=1e-3, abs=1e-3)
        assert f["frac_nonzero"] == pytest.approx(page.density)
        assert f["correlated_features_indices"] == [j for j, _ in page.neighbours[:3]]
        assert f["correlated_features_l1"] == pytest.approx([c for _, c in page.neighbours[:3]], abs=1e-3)
        checked += len(acts)
    assert checked > 0


def test_weight_fields(tiny_store, export, weights):
    """Logit tables centred over the vocabulary (SAEDashboard's numbers), the logit histogram over the whole
    vocabulary and the neuron alignment, against the weights recomputed here."""
    store = FeatureStore(tiny_store["store"])
    logits, W_dec = weights["logits"], weights["W_dec"]
    for i, f in features(export).items():
        row = logits[i] - logits[i].mean()
        top, bottom = row.topk(len(f["pos_values"])), row.topk(len(f["neg_values"]), largest=False)
        assert f["pos_values"] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert f["neg_values"] == pytest.approx(bottom.values.tolist(), abs=2e-3)
        assert f["pos_str"] == [store.vocab.token_str(t) for t in top.indices.tolist()]
        heights, centres = f["logits_hist_data_bar_heights"], f["logits_hist_data_bar_values"]
        assert sum(heights) == logits.shape[1] and len(heights) == 50
        width = (row.max() - row.min()).item() / 50
        assert centres[0] == pytest.approx(row.min().item() + width / 2, abs=2e-3)
        assert np.diff(centres) == pytest.approx(width, abs=2e-3)
        expect = torch.histc(row.float(), bins=50, min=row.min().item(), max=row.max().item())
        assert np.abs(np.array(heights) - expect.numpy()).sum() <= 2  # values on a bar edge may fall either side
        align = W_dec[i].topk(3)
        assert f["neuron_alignment_indices"] == align.indices.tolist()
        assert f["neuron_alignment_values"] == pytest.approx(align.values.tolist(), abs=1e-3)
        assert f["neuron_alignment_l1"] == pytest.approx((align.values / W_dec[i].abs().sum()).tolist(), abs=1e-3)
        hist = f["freq_hist_data_bar_heights"]
        assert sum(hist) == store.feature(i).count and len(hist) == 50


def test_equal_width_hist():
    """Counts re-binned from the log-spaced bins keep their total, lie inside [lowest edge, max] and put each
    count in the bar its log bin overlaps."""
    edges = hist_edges()
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    counts[[150, 151, 170]] = [10, 30, 5]  # 150: [edges[150], edges[151])
    values, heights = equal_width_hist(counts, float(edges[171]) * 0.999, 4)
    assert sum(heights) == 45 and len(values) == 4 and all(h >= 0 for h in heights)
    assert values[0] > edges[150] and values[-1] < edges[171]
    assert equal_width_hist(np.zeros_like(counts), 0.0, 4) == ([], [])
    one = np.zeros_like(counts)
    one[100] = 7
    assert equal_width_hist(one, float(edges[101]), 3)[1] == [2, 3, 2]  # spread evenly within the one bin


def test_band_examples_spread_over_the_band():
    value = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, -1.0])
    ctx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, -1])
    counts = np.zeros(len(hist_edges()) - 1, dtype=np.int64)
    b = np.searchsorted(hist_edges(), value[:9]) - 1
    np.add.at(counts, b, 1)
    (q_lo, q_hi, lo, hi, idx), = band_examples(value, ctx, counts, 1, 3)
    assert (q_lo, q_hi, lo, hi) == (0.0, 1.0, 0.0, math.inf)
    assert idx.tolist() == [0, 4, 8]  # first, middle, last of the sorted sample; the empty slot (ctx -1) never


def test_no_weights_exports_from_the_store_alone(tiny_store, tmp_path, capsys):
    store = FeatureStore(tiny_store["store"])
    out = tmp_path / "np"
    export_neuronpedia(tiny_store["store"], out, NeuronpediaConfig(weights=False), sae_dir=str(tmp_path / "gone"))
    assert "--no-weights" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert "not centred" in man["logit_values"] and "weights" in man["fields"]
    for i, f in features(out).items():
        assert f["neuron_alignment_indices"] == [] and f["logits_hist_data_bar_heights"] == []
        assert f["pos_values"] == pytest.approx(store.column("logit_top_value")[i].tolist(), abs=1e-3)


def test_cli(tiny_store, tmp_path, capsys):
    out = tmp_path / "np"
    args = ["export-neuronpedia", str(tiny_store["store"]), "--out", str(out), "--features-per-batch", "1000",
            "--sae-set", "res-tiny", "--sae-id-suffix", "k8", "--model-id", "tiny-llama"]
    assert cli(args) == 0
    (b,) = batches(out)
    assert (b["model_id"], b["sae_set"], b["sae_id_suffix"]) == ("tiny-llama", "res-tiny", "k8")
    assert cli(args) == 0  # an export there is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(["export-neuronpedia", str(tiny_store["store"]), "--out", str(other)]) == 2
    assert "choose an empty or new --out" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert cli(["export-neuronpedia", str(tiny_store["store"]), "--out", str(tmp_path / "x"),
                "--features-per-batch", "0"]) == 2
    assert "--features-per-batch" in capsys.readouterr().err
    with pytest.raises(OutputError):
        export_neuronpedia(tiny_store["store"], other)


@pytest.mark.skipif(not DASH_PY.is_file(), reason="needs .venv-dash with sae-dashboard 0.8.0 (`make bench-dashboard` "
                                                 "builds it) to run SAEDashboard on the same SAE")
def test_against_saedashboard(tiny_store, export, tmp_path):
    """SAEDashboard's Neuronpedia runner on the same SAE, model and contexts (benchmarks/saedashboard.py's worker):
    what both compute from the weights must agree exactly, and the activations up to their different rules."""
    from safetensors.torch import save_file

    from saekit.harvest import Harvester
    from saekit.interop import convert
    from saekit.lm import load_model

    store = FeatureStore(tiny_store["store"])
    from safetensors.torch import load_file

    ctx = load_file(str(Path(tiny_store["store"]) / "contexts.safetensors"))["tokens"].long()
    save_file({"tokens": ctx.contiguous()}, str(tmp_path / "tokens.safetensors"))
    model = load_model(str(tiny_store["model"]))
    acts, _, pos, cid = next(Harvester(model, [store.manifest["hook"]]).batches(ctx[:2], 2))
    save_file({"tokens": ctx[:2].contiguous(), "acts": acts[store.manifest["hook"]].contiguous(),
               "ctx": cid.contiguous(), "pos": pos.contiguous()}, str(tmp_path / "check.safetensors"))
    saelens = convert(tiny_store["sae"], tmp_path / "saelens", to="saelens")
    cfg_path = Path(saelens) / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rescale_acts_by_decoder_norm": True}))
    job = {"work": str(tmp_path / "dash"), "hf_dir": str(tiny_store["model"]), "sae_saelens": str(saelens),
           "tokens": str(tmp_path / "tokens.safetensors"), "check": str(tmp_path / "check.safetensors"),
           "hook": store.manifest["hook"], "layer": int(store.manifest["hook"].split(".")[1]), "dataset": "tiny",
           "massive_multiple": 10.0, "batches": 1}
    Path(job["work"]).mkdir()
    (Path(job["work"]) / "job.json").write_text(json.dumps(job))
    run = subprocess.run([str(DASH_PY), str(ROOT / "benchmarks/saedashboard.py"), "--worker", "saedashboard",
                          str(Path(job["work"]) / "job.json")], cwd=job["work"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((Path(job["work"]) / "result.json").read_text())
    assert result["activation_max_rel_err"] < 1e-4  # the same model
    theirs = {f["feature_index"]: f for p in Path(result["out"]).glob("batch-*.json")
              for f in json.loads(p.read_text())["features"]}
    ours = features(export)
    both = sorted(set(theirs) & set(ours))
    assert both
    for i in both:
        t, o = theirs[i], ours[i]
        assert o["neuron_alignment_indices"] == t["neuron_alignment_indices"]
        assert o["neuron_alignment_values"] == pytest.approx(t["neuron_alignment_values"], abs=2e-3)
        assert o["pos_values"] == pytest.approx(t["pos_values"], abs=2e-3)
        assert o["neg_values"] == pytest.approx(t["neg_values"], abs=2e-3)
        assert np.abs(np.array(o["logits_hist_data_bar_heights"]) - t["logits_hist_data_bar_heights"]).sum() <= 2
        assert o["logits_hist_data_bar_values"] == pytest.approx(t["logits_hist_data_bar_values"], abs=2e-3)
        top_t = [a for a in t["activations"] if a["bin_min"] == -1]
        if top_t:  # the same largest activation (theirs rounds to 3 decimals; ours from fp32)
            assert o["activations"][0]["bin_max"] == pytest.approx(top_t[0]["bin_max"], rel=1e-3, abs=2e-3)


def test_dead_latents_are_skipped(tiny_store, tmp_path):
    """Latents that never fired get no page: they are listed in skipped_indexes.json (Neuronpedia makes them dead)."""
    import shutil

    from safetensors.torch import load_file, save_file

    store = tmp_path / "store"
    shutil.copytree(tiny_store["store"], store)
    stats = load_file(str(store / "stats.safetensors"))
    stats["count"][[3, 10]] = 0
    save_file(stats, str(store / "stats.safetensors"))
    out = tmp_path / "np"
    export_neuronpedia(store, out, NeuronpediaConfig(weights=False))
    assert json.loads((out / "skipped_indexes.json").read_text())["skipped_indexes"] == [3, 10]
    exported = features(out)
    assert 3 not in exported and 10 not in exported and len(exported) == len(stats["count"]) - 2
    assert json.loads((out / "manifest.json").read_text())["skipped_dead"] == 2
