"""Feature flow across layers: the SAE set (manifest, refusals), chunked matching, classification of planted
persisting / MLP-made / attention-made / transformed / new directions, the stored flow and its graph, the data
check on constructed co-activations, and the command end to end on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit.config import FlowConfig, HarvestConfig
from saekit.errors import SaekitError
from saekit.flow import (
    CLASSES,
    FlowStore,
    check_chain,
    classify,
    compute_flow,
    data_check,
    read_set,
    save_flow,
    top_matches,
)
from saekit.runner import dictionaries_in
from saekit.sae import SaeConfig, SparseAutoencoder, load_sae

D_IN, D_SAE = 256, 64
PLANTED = {0: "persisting", 1: "mlp", 2: "attention", 3: "new", 4: "transformed"}


def _save(root: Path, hook: str, W: torch.Tensor, model: str = "test/model", k: int = 3, info: dict | None = None
          ) -> Path:
    sae = SparseAutoencoder(SaeConfig(d_in=W.shape[1], d_sae=W.shape[0], k=k))
    W = W / W.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.t())
    sae.info = {**(info or {}), "hook": hook, "model": model}
    return sae.save(root / hook)


def _random(gen: torch.Generator, n: int = D_SAE) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=gen)


def planted_set(root: Path, layers=(3, 4, 5), blocks: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SAEs on resid_pre of `layers` (and attn_out/mlp_out of all but the last), with resid layer 4's
    features 0–4 planted as PLANTED says (relative to the layer 3 SAEs)."""
    gen = torch.Generator().manual_seed(seed)
    W = {}
    for layer in layers:
        W[f"blocks.{layer}.hook_resid_pre"] = _random(gen)
        if blocks and layer != layers[-1]:
            W[f"blocks.{layer}.hook_attn_out"] = _random(gen)
            W[f"blocks.{layer}.hook_mlp_out"] = _random(gen)
    r3, r4 = W["blocks.3.hook_resid_pre"], W["blocks.4.hook_resid_pre"]
    unit = lambda v: v / v.norm()  # noqa: E731
    r4[0] = unit(r3[7]) + 0.2 * unit(torch.randn(D_IN, generator=gen))
    if blocks:
        r4[1] = unit(W["blocks.3.hook_mlp_out"][5]) + 0.2 * unit(torch.randn(D_IN, generator=gen))
        r4[2] = unit(W["blocks.3.hook_attn_out"][9]) + 0.2 * unit(torch.randn(D_IN, generator=gen))
        r4[4] = unit(r3[11]) + unit(W["blocks.3.hook_mlp_out"][12])
    for hook, w in W.items():
        _save(root, hook, w)
    return W


def flow_of(root: Path, **kw) -> tuple[dict, dict]:
    s = read_set(dictionaries_in(root), root)
    return compute_flow(s, FlowConfig(check_tokens=0, **kw), progress=False)


def test_top_matches_is_the_dense_argmax(gen):
    t, s = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1), \
        torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    cos, idx = top_matches(t, s, k=3, chunk=64)
    full = t @ s.t()
    v, i = full.topk(3, dim=1)
    assert torch.allclose(cos, v, atol=1e-6) and torch.equal(idx.long(), i)


def test_planted_directions_are_recovered(tmp_path):
    planted_set(tmp_path)
    tensors, summary = flow_of(tmp_path)
    cls = tensors["class/4"]
    for latent, want in PLANTED.items():
        assert CLASSES[int(cls[latent])] == want, (latent, CLASSES[int(cls[latent])])
    assert int(tensors["decoder/4/resid/idx"][0, 0]) == 7
    assert int(tensors["decoder/4/mlp/idx"][1, 0]) == 5
    assert int(tensors["decoder/4/attn/idx"][2, 0]) == 9
    # the random rest of the layer is new: random 256-d directions are far below the threshold
    assert (cls[5:] == CLASSES.index("new")).all()
    assert summary["layers"]["4"]["shares"]["persisting"] == pytest.approx(1 / D_SAE)
    # tied SAEs: the encoder variant finds the same matches
    assert summary["layers"]["4"]["top1_resid_agreement"] == 1.0
    assert summary["target_layers"] == [4, 5]


def test_residual_only_sets_classify_persisting_or_new(tmp_path):
    planted_set(tmp_path, blocks=False)
    tensors, summary = flow_of(tmp_path)
    assert CLASSES[int(tensors["class/4"][0])] == "persisting"
    assert summary["sources"] == {"resid": True, "attn": False, "mlp": False}
    assert not any(k.endswith("/mlp/cos") for k in tensors)


def test_classify_rules():
    best = {"resid": torch.tensor([0.9, 0.9, 0.1, 0.1, 0.1, 0.1]), "attn": torch.tensor([0.1, 0.6, 0.7, 0.6, 0.2, 0.8]),
            "mlp": torch.tensor([0.1, 0.1, 0.2, 0.65, 0.3, 0.1])}
    assert [CLASSES[i] for i in classify(best, 0.5)] == ["persisting", "transformed", "attention", "mlp", "new",
                                                         "attention"]


def test_set_refusals_name_what_is_wrong(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for layer in (3, 4, 6):
        _save(tmp_path / "gap", f"blocks.{layer}.hook_resid_pre", _random(gen))
    with pytest.raises(SaekitError, match="layer 5 is missing"):
        check_chain(read_set(dictionaries_in(tmp_path / "gap"), tmp_path / "gap"))
    _save(tmp_path / "models", "blocks.3.hook_resid_pre", _random(gen), model="a")
    _save(tmp_path / "models", "blocks.4.hook_resid_pre", _random(gen), model="b")
    with pytest.raises(SaekitError, match="different models .*a: blocks.3.*b: blocks.4"):
        read_set(dictionaries_in(tmp_path / "models"), tmp_path / "models")
    _save(tmp_path / "widths", "blocks.3.hook_resid_pre", _random(gen))
    _save(tmp_path / "widths", "blocks.4.hook_resid_pre", _random(gen, 32))
    with pytest.raises(SaekitError, match=r"widths \(d_sae\) \(64: blocks.3.hook_resid_pre; 32: blocks.4"):
        read_set(dictionaries_in(tmp_path / "widths"), tmp_path / "widths")
    for layer in (3, 4, 5):
        _save(tmp_path / "blocks", f"blocks.{layer}.hook_resid_pre", _random(gen))
    _save(tmp_path / "blocks", "blocks.3.hook_mlp_out", _random(gen))
    with pytest.raises(SaekitError, match="none on blocks.4.hook_mlp_out"):
        check_chain(read_set(dictionaries_in(tmp_path / "blocks"), tmp_path / "blocks"))
    _save(tmp_path / "other", "blocks.3.hook_resid_post", _random(gen))
    with pytest.raises(SaekitError, match="hook_resid_post; a flow set holds"):
        read_set(dictionaries_in(tmp_path / "other"), tmp_path / "other")


def test_brace_ranges_expand_once():
    h = HarvestConfig(hooks="blocks.{8..10}.hook_resid_pre,blocks.{8..9}.hook_attn_out")
    assert h.hooks == ["blocks.8.hook_resid_pre", "blocks.9.hook_resid_pre", "blocks.10.hook_resid_pre",
                       "blocks.8.hook_attn_out", "blocks.9.hook_attn_out"]
    with pytest.raises(SaekitError, match="runs backwards"):
        HarvestConfig(hooks=["blocks.{9..8}.hook_resid_pre"])


def test_store_round_trip_and_graph(tmp_path):
    planted_set(tmp_path / "set")
    s = read_set(dictionaries_in(tmp_path / "set"), tmp_path / "set")
    cfg = FlowConfig(check_tokens=0)
    tensors, summary = compute_flow(s, cfg, progress=False)
    out = save_flow(tmp_path / "flow", s, cfg, tensors, summary, {"ran": False, "why": "skipped in a test"})
    store = FlowStore(out)
    assert store.class_of(4, 0) == "persisting"
    pred = store.predecessors("blocks.4.hook_resid_pre", 4, min_cos=0.5)
    assert {(p["kind"], p["latent"]) for p in pred} == {("resid", 11), ("mlp", 12)}
    succ = store.successors("blocks.3.hook_resid_pre", 7, min_cos=0.5)
    assert [(q["hook"], q["latent"]) for q in succ] == [("blocks.4.hook_resid_pre", 0)]
    nodes, edges = store.graph("blocks.4.hook_resid_pre", 4)
    assert {(n["hook"], n["latent"]) for n in nodes} == {("blocks.4.hook_resid_pre", 4), ("blocks.3.hook_resid_pre", 11),
                                                          ("blocks.3.hook_mlp_out", 12)}
    assert len(edges) == 2
    with pytest.raises(SaekitError, match="feature 64 does not exist .*d_sae 64"):
        store.predecessors("blocks.4.hook_resid_pre", 64)
    report = (out / "report.md").read_text()
    assert "| 4 |" in report and "Not run — skipped in a test" in report


def test_data_check_separates_matches_from_random(tmp_path):
    """Tokens built from sparse codes of the layer 3 SAEs; resid 4 = resid 3 + attn 3 + mlp 3 (as in the model):
    matched pairs co-fire, random same-density pairs do not."""
    W = planted_set(tmp_path)
    s = read_set(dictionaries_in(tmp_path), tmp_path)
    cfg = FlowConfig(check_tokens=2000, check_min_fires=3)
    tensors, _ = compute_flow(s, cfg, progress=False)
    gen = torch.Generator().manual_seed(1)
    n = 2000

    def sparse_acts(w: torch.Tensor) -> torch.Tensor:
        codes = torch.zeros(n, w.shape[0])
        idx = torch.stack([torch.randperm(w.shape[0], generator=gen)[:2] for _ in range(n)])
        codes.scatter_(1, idx, 1 + torch.rand(n, 2, generator=gen))
        return codes @ torch.nn.functional.normalize(w, dim=1)

    acts = {h: sparse_acts(w) for h, w in W.items()}
    acts["blocks.4.hook_resid_pre"] = sum(acts[f"blocks.3.hook_{h}"] for h in ("resid_pre", "attn_out", "mlp_out"))
    acts["blocks.5.hook_resid_pre"] = sum(acts[f"blocks.4.hook_{h}"] for h in ("resid_pre", "attn_out", "mlp_out"))
    check = data_check(s, tensors, cfg, acts)
    o = check["overall"]
    assert check["ran"] and o["resid/corr_top_n"] > 0
    assert o["precision_persisting"] > o["precision_random"] + 0.3
    assert check["layers"]["4"]["persisting_links"] == 2  # features 0 (persisting) and 4 (transformed)


def test_flow_command_on_a_set_without_model_data(tmp_path, capsys):
    from saekit.cli import main

    planted_set(tmp_path / "set")
    assert main(["flow", str(tmp_path / "set"), "--out", str(tmp_path / "graph"), "--check-tokens", "0"]) == 0
    assert (tmp_path / "set" / "sae_set.json").is_file()
    printed = capsys.readouterr().out
    assert "persisting" in printed and "Not run — skipped: --check-tokens 0" in printed
    assert main(["flow", str(tmp_path / "set"), "--out", str(tmp_path / "graph"), "--check-tokens", "0"]) == 0
    assert main(["flow", str(tmp_path / "set"), "--out", str(tmp_path / "set" / "blocks.3.hook_resid_pre"),
                 "--check-tokens", "0"]) == 2
    assert load_sae(tmp_path / "set" / "blocks.3.hook_resid_pre").cfg.d_sae == D_SAE


def test_data_check_on_the_real_model(model, tmp_path, capsys):
    """A random set on layers 2–3 of the default model whose resid 3 features 0–99 copy resid 2's: on held-out
    text the copied pairs co-fire far more often than random same-density pairs (the residual stream carries
    them), and `saekit flow`'s report prints the check."""
    from saekit.files import read_json
    from saekit.flow import FLOW_FILE, run_flow

    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(0)
    info = {"model": "test/model", "model_arg": "default", "dataset": "default", "context_size": 128,
            "heldout_fraction": 0.05, "seed": 0}
    W = {h: torch.nn.functional.normalize(torch.randn(256, d, generator=gen), dim=1)
         for h in ("blocks.2.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.3.hook_resid_pre")}
    W["blocks.3.hook_resid_pre"][:100] = W["blocks.2.hook_resid_pre"][:100]
    for hook, w in W.items():
        sae = SparseAutoencoder(SaeConfig(d_in=d, d_sae=256, k=16))
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.t())
        sae.info = {"hook": hook, **info}
        sae.save(tmp_path / "set" / hook)
    out = run_flow(tmp_path / "set", dictionaries_in(tmp_path / "set"), tmp_path / "flow",
                   FlowConfig(check_tokens=256, check_min_fires=3), model=model)
    check = read_json(out / FLOW_FILE)["data_check"]
    o = check["overall"]
    assert check["ran"] and check["tokens"] == 256 and check["split"] == "held-out"
    assert check["layers"]["3"]["persisting_links"] >= 50
    assert o["precision_persisting"] > o["precision_random"] + 0.2
    assert o["resid/corr_top"] > o["resid/corr_random"]
    assert "Precision of persisting links" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the browser's Flow sections

@pytest.fixture
def flow_world(tiny_store, tmp_path) -> Path:
    """A flow store over the tiny store's SAE (resid layer 1) and random SAEs at layer 0 whose resid features 0–9
    copy the tiny SAE's: its features 0–9 persist from layer 0."""
    sae = load_sae(tiny_store["sae"])
    gen = torch.Generator().manual_seed(1)  # not the tiny SAE's init seed (0): its rows would match one for one
    root = tmp_path / "set"
    sae.save(root / "blocks.1.hook_resid_pre")
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"):
        W = torch.randn(64, 32, generator=gen)
        if hook == "blocks.0.hook_resid_pre":
            W[:10] = sae.W_dec.detach()[:10]
        _save(root, hook, W, model=sae.info["model"], k=4)
    s = read_set(dictionaries_in(root), root)
    cfg = FlowConfig(threshold=0.9, check_tokens=0)
    return save_flow(tmp_path / "flow", s, cfg, *compute_flow(s, cfg, progress=False), {"ran": False, "why": "test"})


def test_flow_section_on_the_feature_page(flow_world, tiny_store, monkeypatch, app_test_guard):
    from helpers import BROWSER_SCRIPT, ok
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    monkeypatch.setenv("SAEKIT_FLOW", str(flow_world))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"], at.query_params["feature"] = "feature", "5"
    ok(at.run())
    assert "Flow across layers" in [h.value for h in at.subheader]
    assert any("Class: **persisting**" in c.value for c in at.caption)
    pred = next(d.value for d in at.dataframe if list(d.value.columns) == ["feature", "cosine", "from", "class"])
    assert pred.iloc[0]["feature"] == "blocks.0.hook_resid_pre:5" and pred.iloc[0]["cosine"] == pytest.approx(1.0)
    assert set(pred["from"]) == {"resid", "attn", "mlp"}
    charts = [c for c in at.get("plotly_chart") if "flow_graph_5" in str(c.proto.id)]
    assert len(charts) == 1
    assert pred.iloc[0]["class"] == "—"  # layer 0 is the set's first: no class
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"] = "overview"
    ok(at.run())
    assert "Feature flow by layer" in [h.value for h in at.subheader]


def test_no_flow_section_without_a_flow_store(tiny_store, monkeypatch, app_test_guard):
    from helpers import BROWSER_SCRIPT, ok
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    monkeypatch.delenv("SAEKIT_FLOW", raising=False)
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"], at.query_params["feature"] = "feature", "5"
    ok(at.run())
    assert "Flow across layers" not in [h.value for h in at.subheader]


def test_flow_figure_places_layers_as_columns(tmp_path):
    from saekit.apps.flow_section import flow_figure

    planted_set(tmp_path / "set")
    s = read_set(dictionaries_in(tmp_path / "set"), tmp_path / "set")
    cfg = FlowConfig(check_tokens=0)
    store = FlowStore(save_flow(tmp_path / "flow", s, cfg, *compute_flow(s, cfg, progress=False), {"ran": False}))
    nodes, edges = store.graph("blocks.4.hook_resid_pre", 4)
    fig = flow_figure(nodes, edges, ("blocks.4.hook_resid_pre", 4))
    markers = next(t for t in fig.data if t.mode == "markers+text")
    xs = dict(zip(markers.customdata, markers.x))
    assert xs == {"blocks.4.hook_resid_pre:4": 4, "blocks.3.hook_resid_pre:11": 3, "blocks.3.hook_mlp_out:12": 3.8}


def test_report_warns_when_the_saes_share_their_init(tmp_path):
    gen = torch.Generator().manual_seed(0)
    W = _random(gen)
    for layer in (3, 4):
        _save(tmp_path / "set", f"blocks.{layer}.hook_resid_pre", W + 0.05 * _random(gen))
    s = read_set(dictionaries_in(tmp_path / "set"), tmp_path / "set")
    cfg = FlowConfig(check_tokens=0)
    tensors, summary = compute_flow(s, cfg, progress=False)
    assert summary["layers"]["4"]["same_index_top1"]["resid"] == 1.0
    out = save_flow(tmp_path / "flow", s, cfg, tensors, summary, {"ran": False})
    assert "share their random initialization" in (out / "report.md").read_text()
    planted_set(tmp_path / "planted")
    p = read_set(dictionaries_in(tmp_path / "planted"), tmp_path / "planted")
    out = save_flow(tmp_path / "flow2", p, cfg, *compute_flow(p, cfg, progress=False), {"ran": False})
    assert "share their random initialization" not in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- steering along the flow

@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    """The tiny world's model, its SAE at resid layer 1 and a layer 0 set whose resid feature 9 is the layer 1
    feature 5's direction: the flow path of 5 is [1:5, 0:9]."""
    from helpers import build_world

    from saekit.lm import load_model

    root = tmp_path_factory.mktemp("tiny_flow")
    world = build_world(root / "world")
    sae1 = load_sae(world["sae"])
    gen = torch.Generator().manual_seed(1)  # not the tiny SAE's init seed (0): its rows would match one for one
    sae1.save(root / "set" / "blocks.1.hook_resid_pre")
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"):
        W = torch.randn(64, 32, generator=gen)
        if hook == "blocks.0.hook_resid_pre":
            W[9] = sae1.W_dec.detach()[5]
        _save(root / "set", hook, W, model=sae1.info["model"], k=4, info=sae1.info)  # its dataset: reference tokens
    s = read_set(dictionaries_in(root / "set"), root / "set")
    cfg = FlowConfig(threshold=0.9, check_tokens=0)
    flow = FlowStore(save_flow(root / "flow", s, cfg, *compute_flow(s, cfg, progress=False), {"ran": False}))
    saes = {m.hook: load_sae(m.path) for m in s.members}
    model = load_model(str(world["model"]))
    toks = torch.tensor([model.tokenizer("The bank said the striker won the final.")["input_ids"]])
    return model, flow, saes, toks


def test_flow_path_follows_top_residual_matches(tiny_flow):
    from saekit.flow_steer import Step, flow_edits, flow_path

    _, flow, _, _ = tiny_flow
    path = flow_path(flow, "blocks.1.hook_resid_pre", 5)
    assert [(s.hook, s.latent) for s in path] == [("blocks.1.hook_resid_pre", 5), ("blocks.0.hook_resid_pre", 9)]
    assert path[1].cos == pytest.approx(1.0, abs=1e-5)
    edits = flow_edits(path, "add", 8.0)
    assert [(h, e.feature, e.value) for h, e in edits] == [("blocks.1.hook_resid_pre", 5, 4.0),
                                                           ("blocks.0.hook_resid_pre", 9, 4.0)]
    assert [e.value for _, e in flow_edits(path, "scale", 3.0)] == [3.0, 3.0]
    assert flow_path(flow, "blocks.1.hook_resid_pre", 6) == [Step("blocks.1.hook_resid_pre", 6, 1.0)]  # no link
    with pytest.raises(SaekitError, match="add, scale and clamp"):
        flow_edits(path, "ablate", 0.0)


def test_flow_steering_is_exact_and_restores(tiny_flow):
    from saekit.flow_steer import flow_edits, flow_path, steer_flow

    model, flow, saes, toks = tiny_flow
    path = flow_path(flow, "blocks.1.hook_resid_pre", 5)
    clean = model(toks)
    n_hooks = sum(len(hp._forward_hooks) for hp in model.hook_dict.values())
    for mode, identity in (("add", 0.0), ("scale", 1.0)):  # edits that change nothing are the identity, bit for bit
        with steer_flow(model, saes, flow_edits(path, mode, identity)):
            assert torch.equal(model(toks), clean)
    # add 8 along the flow = 4·W_dec[9] at resid 0 and 4·W_dec[5] at resid 1, on every position but BOS
    seen = {}

    def grab(name):
        def fn(act, hook):
            seen[name] = act.detach().clone()
        return fn

    hooks = [(h, grab(h)) for h in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")]
    with model.hooks(fwd_hooks=hooks):
        model(toks)
    x0 = dict(seen)
    d0 = 4.0 * saes["blocks.0.hook_resid_pre"].W_dec[9].detach()
    d1 = 4.0 * saes["blocks.1.hook_resid_pre"].W_dec[5].detach()

    def by_hand(act, hook):
        act[:, 1:] += d0 if hook.name == "blocks.0.hook_resid_pre" else d1
        return act

    with model.hooks(fwd_hooks=[(h, by_hand) for h, _ in hooks]):
        want = model(toks)
    with steer_flow(model, saes, flow_edits(path, "add", 8.0)) as steerings, model.hooks(fwd_hooks=hooks):
        got = model(toks)
    assert len(steerings) == 2 and all(s.calls == 1 for s in steerings)
    torch.testing.assert_close(seen["blocks.0.hook_resid_pre"][:, 1:] - x0["blocks.0.hook_resid_pre"][:, 1:],
                               d0.expand_as(x0["blocks.0.hook_resid_pre"][:, 1:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, clean)
    assert torch.equal(model(toks), clean)  # restored
    with pytest.raises(RuntimeError), steer_flow(model, saes, flow_edits(path, "add", 8.0)):
        raise RuntimeError("boom")
    assert torch.equal(model(toks), clean)
    assert sum(len(hp._forward_hooks) for hp in model.hook_dict.values()) == n_hooks
    with pytest.raises(SaekitError, match="missing blocks.0.hook_resid_pre"):
        with steer_flow(model, {"blocks.1.hook_resid_pre": saes["blocks.1.hook_resid_pre"]}, flow_edits(path, "add", 1.0)):
            pass


def test_flow_steered_generation(tiny_flow):
    """Baseline and flow-steered rows from one seed: a zero add leaves the steered row equal to the baseline; a
    strong add changes it, with each layer's hook called on every step, the same with and without the KV cache."""
    from saekit.flow_steer import flow_edits, flow_path, generate_flow

    model, flow, saes, _ = tiny_flow
    path = flow_path(flow, "blocks.1.hook_resid_pre", 5)
    g0 = generate_flow(model, saes, flow_edits(path, "add", 0.0), "The bank said", seed=3, max_new_tokens=6)
    assert g0.steered_tokens == g0.baseline_tokens
    outs = [generate_flow(model, saes, flow_edits(path, "add", 60.0), "The bank said", seed=3, max_new_tokens=6,
                          temperature=0.0, use_cache=c) for c in (True, False)]
    assert outs[0].steered_tokens == outs[1].steered_tokens and outs[0].baseline_tokens == outs[1].baseline_tokens
    # the tiny random model repeats one token greedily: the steering shows in the log-probs
    assert max(abs(a - b) for a, b in zip(outs[0].steered_logprobs, outs[0].baseline_logprobs)) > 1e-3
    assert g0.steered_logprobs == g0.baseline_logprobs
    assert outs[0].edits == ["add feature 5 30 at blocks.1.hook_resid_pre", "add feature 9 30 at blocks.0.hook_resid_pre"]


def test_steer_cli_along_the_flow(tiny_flow, capsys):
    from saekit.cli import main

    _, flow, _, _ = tiny_flow
    sae_dir = flow.set.by_hook("blocks.1.hook_resid_pre").path
    argv = ["steer", "--flow", str(flow.path), "--sae", sae_dir, "--feature", "5", "--mode", "add", "--strength", "8",
            "--prompt", "The bank said", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "flow path: blocks.1.hook_resid_pre:5 ← blocks.0.hook_resid_pre:9 (cos 1.00)" in out
    assert "add feature 9 4 at blocks.0.hook_resid_pre" in out and "strength in raw units" in out
    assert main(argv[:6] + ["70"] + argv[7:]) == 2
    assert "feature 70 does not exist in blocks.1.hook_resid_pre (its SAE has d_sae 64" in capsys.readouterr().err


# ----------------------------------------------------------------------------- steer-eval along the flow

def test_flow_rows_share_the_sweep(tiny_flow):
    """Flow rows sit in the same batch as the single-layer rows: with the predecessor's typical activation set to 0
    its edit vanishes, and the flow add of 2s (split over 2 layers) equals the single-layer add of s."""
    from saekit.steer_eval import Companion, FeatureRef, sweep_feature

    model, _, saes, _ = tiny_flow
    sae = saes["blocks.1.hook_resid_pre"]
    ref = FeatureRef(5, 1.0, 0.1, torch.tensor([3, 4]), ["a", "b"])
    kw = dict(prompts=["The bank said"], neutral=["The striker won."], max_new_tokens=4, progress=False)
    idle = sweep_feature(model, sae, ref, [0, 4, 8], flow=[Companion(saes["blocks.0.hook_resid_pre"], 9, 0.0)], **kw)
    by = {(r["method"], r["strength"]): r for r in idle}
    assert [r["method"] for r in idle] == ["none", "sae", "sae", "flow", "flow"] and by[("flow", 8.0)]["path"] == 2
    for key in ("hit", "ppl", "kl", "p_top"):
        assert by[("flow", 8.0)][key] == pytest.approx(by[("sae", 4.0)][key], rel=1e-4, abs=1e-7)
    live = sweep_feature(model, sae, ref, [0, 8], flow=[Companion(saes["blocks.0.hook_resid_pre"], 9, 1.0)], **kw)
    assert live[0]["kl"] == 0.0 and live[2]["kl"] != pytest.approx(by[("flow", 8.0)]["kl"], rel=1e-3)


def test_equal_perplexity_comparison_interpolates_inside_the_range():
    from saekit.flow_eval import at_equal_perplexity, hit_at

    def row(m, s, ppl, hit):
        return {"feature": 1, "method": m, "strength": s, "ppl_ratio": ppl, "hit": hit}

    rows = [row("none", 0, 1.0, 0.0), row("sae", 4, 2.0, 0.2), row("sae", 8, 4.0, 0.4),
            row("flow", 4, 1.5, 0.3), row("flow", 8, 3.0, 0.5)]
    assert hit_at([(1.0, 0.0, 0), (2.0, 0.2, 4)], 1.5) == pytest.approx(0.1) and hit_at([(1.0, 0.0, 0)], 2.0) is None
    c = at_equal_perplexity(rows)
    pts = {(p["method"], p["strength"]): p for p in c["points"]}
    assert pts[("flow", 4)]["other_hit"] == pytest.approx(0.1) and pts[("flow", 4)]["delta"] == pytest.approx(0.2)
    assert pts[("sae", 4)]["other_hit"] == pytest.approx(0.3 + 0.2 / 3) and pts[("sae", 4)]["delta"] == pytest.approx(0.1 + 0.2 / 3)
    assert pts[("sae", 8)]["other_hit"] is None and pts[("sae", 8)]["delta"] is None  # beyond flow's ppl× 3
    assert c["matched"] == 3 and c["flow_better"] == 1 and c["mean_delta"] > 0


def test_steer_eval_cli_along_the_flow(tiny_flow, tmp_path, capsys):
    from saekit.cli import main

    _, flow, _, _ = tiny_flow
    sae_dir = flow.set.by_hook("blocks.1.hook_resid_pre").path
    argv = ["steer-eval", "--flow", str(flow.path), "--sae", sae_dir, "--features", "5", "--strengths", "4,16",
            "--n-prompts", "1", "--n-neutral", "1", "--max-new-tokens", "3", "--no-baseline", "--reference-tokens",
            "400", "--out", str(tmp_path / "ev")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "flow path: blocks.1.hook_resid_pre:5 ← blocks.0.hook_resid_pre:9 (cos 1.00)" in out
    assert "flow-add" in out and "sae-add" in out and "at equal perplexity increase" in out
    res = json.loads((tmp_path / "ev" / "steer_eval.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"none", "sae", "flow"} and "mean_delta" in res["comparison"]
    assert (tmp_path / "ev" / "steer_eval.html").is_file()
    assert main(argv[:6] + ["6"] + argv[7:-1] + [str(tmp_path / "ev6")]) == 2
    assert "feature 6 of blocks.1.hook_resid_pre has no residual predecessor with cosine ≥ 0.9" in capsys.readouterr().err
