"""Attribution graphs: the local replacement model is exact, edges are direct effects, pruning, scores, files,
validation in the real model and bad input (tiny random Llama with random transcoders; one check on the default
model)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_world, random_transcoders

from saekit.attribution import (
    AttributionConfig,
    LocalReplacement,
    attribute,
    edit_features,
    target_value,
    validate,
)
from saekit.attribution.graph import Graph
from saekit.errors import FileFormatError, SaekitError

PROMPT = "The cat sat on the mat and the dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from saekit.lm import load_model

    world = build_world(tmp_path_factory.getbasetemp() / "feature_world")
    return load_model(str(world["model"])), random_transcoders(2, 32)


@pytest.fixture(scope="module")
def full_graph(tiny):
    model, tcs = tiny
    return attribute(model, tcs, PROMPT, cfg=AttributionConfig(max_feature_nodes=None, batch_size=64), progress=False)


def test_the_local_replacement_model_reproduces_the_logits(tiny):
    model, tcs = tiny
    from saekit.steer import prompt_tokens

    ids = torch.tensor(prompt_tokens(model.tokenizer, PROMPT))
    rep = LocalReplacement(model, tcs, ids)
    real = model(ids[None])[0, -1].float()
    with torch.no_grad():
        assert torch.allclose(rep.forward()["logits"], real, atol=1e-4)
        # without its error nodes it is the replacement model proper, and differs
        assert (rep.forward(errors=False)["logits"] - real).abs().max() > 1e-2
        t = tcs[1]
        x2 = rep.layers[1].ln2(rep.embed + 0)  # shapes only
        assert x2.shape == rep.embed.shape
        # every feature's pre-activation in the frozen forward is the transcoder's on the clean MLP input
        pre = rep.forward()["pre"][rep.layers[1].offset:]
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n == "blocks.1.mlp.hook_in")
        x = cache["blocks.1.mlp.hook_in"][0]
        lay = rep.layers[1]
        ref = (x[lay.positions] @ t.W_enc)[torch.arange(len(lay.latents)), lay.latents] + t.b_enc[lay.latents]
        assert torch.allclose(pre, ref, atol=1e-4)


def test_edges_are_exact_direct_effects(tiny, full_graph):
    """In the frozen model, each target = its constant part + the sum of its edges, and removing one source
    changes every target by exactly its edge weight (features, an error node, a token embedding)."""
    model, tcs = tiny
    g = full_graph
    rep = LocalReplacement(model, tcs, torch.tensor(g.tokens))
    S = g.n_features
    assert S == rep.n_features and g.n_nodes == S + 3 * g.n_pos + len(g.targets)
    with torch.no_grad():
        clean = rep.forward()
        zero = rep.forward(torch.zeros(S), errors=False, embed=torch.zeros_like(rep.embed))
        assert torch.allclose(clean["pre"], zero["pre"] + g.adjacency[:S].sum(1), atol=1e-4)
        for k, t in enumerate(g.targets):
            row = g.adjacency[g.logit_start + k]
            assert torch.isclose(target_value(t, clean["logits"]), target_value(t, zero["logits"]) + row.sum(),
                                 atol=1e-4)
        layer0 = (g.features[:, 0] == 0).nonzero().squeeze(1)
        for s in layer0[torch.tensor([0, len(layer0) // 2, -1])].tolist():
            v = rep.feature_values.clone()
            v[s] = 0
            out = rep.forward(v)
            assert torch.allclose(clean["pre"] - out["pre"], g.adjacency[:S, s], atol=1e-4)
            logit = g.logit_start
            assert torch.isclose(target_value(g.targets[0], clean["logits"]) - target_value(g.targets[0], out["logits"]),
                                 g.adjacency[logit, s], atol=1e-4)
        # a token embedding: remove position 3's
        emb = rep.embed.clone()
        emb[3] = 0
        out = rep.forward(embed=emb)
        assert torch.allclose(clean["pre"] - out["pre"], g.adjacency[:S, g.token_start + 3], atol=1e-4)
        # an error node: layer 0, position 4
        err = rep.layers[0].error.clone()
        rep.layers[0].error[4] = 0
        out = rep.forward()
        rep.layers[0].error.copy_(err)
        assert torch.allclose(clean["pre"] - out["pre"], g.adjacency[:S, g.error_start + 4], atol=1e-4)
    # features never feed their own layer or earlier ones
    L_t, L_s = g.features[:, 0][:, None], g.features[:, 0][None, :]
    assert (g.adjacency[:S, :S][(L_s >= L_t).expand(S, S)] == 0).all()


def test_a_budget_visits_the_most_influential_features_first(tiny, full_graph):
    model, tcs = tiny
    small = attribute(model, tcs, PROMPT, cfg=AttributionConfig(max_feature_nodes=40, batch_size=16,
                                                                 update_interval=1), progress=False)
    assert small.n_features == 40 and small.meta["active_features"] == full_graph.n_features
    # the layer-1 features feed the logits directly, so the first ranking takes them before layer 0's
    full_inf = full_graph.node_influence()[: full_graph.n_features]
    top = {tuple(f) for f in full_graph.features[full_inf.argsort(descending=True)[:10]].tolist()}
    got = {tuple(f) for f in small.features.tolist()}
    assert len(top & got) >= 8
    # the rows it computed equal the full graph's on the shared columns
    i = full_graph.find(*small.features[0].tolist())
    cols = [full_graph.find(*f) for f in small.features.tolist()]
    assert torch.allclose(small.adjacency[0, :40], full_graph.adjacency[i, cols], atol=1e-5)


def test_pruning_and_scores(full_graph):
    g = full_graph
    pr = g.prune(0.8, 0.98)
    assert pr.node_mask[g.token_start:].all()  # tokens and logits stay
    assert pr.node_mask[: g.n_features].sum() < g.n_features
    assert not pr.edge_mask[~pr.node_mask].any() and not pr.edge_mask[:, ~pr.node_mask].any()
    everything = g.prune(1.0, 1.0)
    assert everything.node_mask[: g.n_features].sum() >= pr.node_mask[: g.n_features].sum()
    for s in (g.scores(), g.scores(pr)):
        assert 0.0 < s["replacement"] <= 1.0 and 0.0 < s["completeness"] <= 1.0
    # a graph whose error nodes carry nothing scores 1
    clean = Graph(g.tokens, g.token_strings, g.features, g.activations, g.adjacency.clone(), g.targets, g.n_layers)
    clean.adjacency[:, clean.error_start: clean.token_start] = 0
    assert clean.scores() == pytest.approx({"replacement": 1.0, "completeness": 1.0})
    with pytest.raises(ValueError, match="node_threshold"):
        g.prune(1.5)


def test_graph_files_round_trip_and_refuse_another_model(full_graph, tmp_path):
    full_graph.meta["model"] = "tiny"
    full_graph.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g", model="tiny")
    assert torch.equal(back.adjacency, full_graph.adjacency) and back.targets == full_graph.targets
    assert back.tokens == full_graph.tokens and torch.equal(back.features, full_graph.features)
    with pytest.raises(FileFormatError, match="built on model 'tiny'"):
        Graph.load(tmp_path / "g", model="other")
    (tmp_path / "h").mkdir()
    with pytest.raises(FileFormatError, match="no graph.json"):
        Graph.load(tmp_path / "h")


def test_contrast_targets_read_a_logit_difference(tiny):
    model, tcs = tiny
    ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"][1:3]
    g = attribute(model, tcs, PROMPT, target=tuple(ids), cfg=AttributionConfig(max_feature_nodes=None),
                  progress=False)
    (t,) = g.targets
    assert t["vocab_index"] == ids[0] and t["contrast"] == ids[1]
    rep = LocalReplacement(model, tcs, torch.tensor(g.tokens))
    with torch.no_grad():
        zero = rep.forward(torch.zeros(g.n_features), errors=False, embed=torch.zeros_like(rep.embed))
        assert torch.isclose(target_value(t, rep.logits), target_value(t, zero["logits"]) +
                             g.adjacency[g.logit_start].sum(), atol=1e-4)


def test_validation_ablates_in_the_real_model(tiny, full_graph):
    model, tcs = tiny
    g = full_graph
    clean = edit_features(model, tcs, g.tokens, [])
    assert torch.allclose(clean[0], model(torch.tensor(g.tokens)[None])[0, -1].float(), atol=1e-5)
    # ablating a layer-1 feature (nothing downstream but the logits) moves the logit by its edge exactly: the
    # unembedding is linear and the final norm's denominator barely moves for a small edit
    i = int((g.features[:, 0] == 1).nonzero()[0])
    L, p, f = g.features[i].tolist()
    out = edit_features(model, tcs, g.tokens, [[(L, p, f, -float(g.activations[i]))]])
    measured = target_value(g.targets[0], out[0]) - target_value(g.targets[0], out[1])
    if p == len(g.tokens) - 1:
        assert measured == pytest.approx(-float(g.adjacency[g.logit_start, i]), rel=0.2, abs=1e-3)
    v = validate(model, tcs, g, top=8)
    assert v["nodes"] == 8 and len(v["per_node"]) == 8
    for k in ("ablation", "doubling", "ablation_direct_only"):
        assert -1.0 <= v[k]["rho"] <= 1.0 and v[k]["low"] <= v[k]["rho"] <= v[k]["high"]


def test_bad_input_is_refused_with_what_to_do(tiny):
    model, tcs = tiny
    with pytest.raises(SaekitError, match=r"limit is 5.*--max-tokens"):
        attribute(model, tcs, PROMPT, cfg=AttributionConfig(max_tokens=5), progress=False)
    with pytest.raises(SaekitError, match=r"layer\(s\) 1 have none"):
        attribute(model, {0: tcs[0]}, PROMPT, progress=False)
    with pytest.raises(SaekitError, match="not one"):
        attribute(model, tcs, PROMPT, target="zzqqxxyy unlikely words", progress=False)
    with pytest.raises(SaekitError, match="outside the vocabulary"):
        attribute(model, tcs, PROMPT, target=10**7, progress=False)


def test_the_cli_writes_a_graph_and_a_report(tiny, tmp_path):
    from saekit.cli import main

    model, tcs = tiny
    run = tmp_path / "tc"
    for L, t in tcs.items():
        t.info = {**t.info, "model_arg": model.saekit_id}
        t.save(run / f"blocks.{L}.mlp" / "tc")
    args = ["attribute", "--transcoders", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "g")]
    assert main([*args, "--validate", "6", "--max-feature-nodes", "50"]) == 0
    rep = json.loads((tmp_path / "g" / "report.json").read_text())
    assert rep["feature_nodes"] == 50 and rep["validation"]["nodes"] == 6
    assert rep["strongest_path"][0].startswith("token") and rep["strongest_path"][-1].startswith("logit")
    assert "Validation in the real model" in (tmp_path / "g" / "report.md").read_text()
    assert Graph.load(tmp_path / "g").n_features == 50
    assert main([*args, "--validate", "0"]) == 0  # the same graph again: rebuilt
    other = ["attribute", "--transcoders", str(run), "--prompt", "A dog", "--out", str(tmp_path / "g")]
    assert main([*other, "--validate", "0"]) != 0  # another prompt's graph is there: refused without --overwrite
    assert main([*other, "--validate", "0", "--overwrite"]) == 0


def test_the_default_model_frozen_replacement_is_exact(model):
    """SmolLM2-135M (30 layers, GQA, RMSNorm) with random transcoders: the frozen pieces rebuild the model and
    the edges of a small graph are exact."""
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, d_sae=256, k=8, skip_layers=(3,))
    g = attribute(model, tcs, "The capital of France is", cfg=AttributionConfig(max_feature_nodes=64),
                  progress=False)
    rep = LocalReplacement(model, tcs, torch.tensor(g.tokens))
    with torch.no_grad():
        real = model(torch.tensor(g.tokens)[None])[0, -1].float()
        assert (rep.forward()["logits"] - real).abs().max() < 1e-3 * real.abs().max()
        zero = rep.forward(torch.zeros(rep.n_features), errors=False, embed=torch.zeros_like(rep.embed))
        t = g.targets[0]
        assert torch.isclose(target_value(t, rep.logits), target_value(t, zero["logits"]) +
                             g.adjacency[g.logit_start].sum(), rtol=1e-3, atol=1e-2)
