"""`saekit browse SET`: a set of feature stores (one per SAE) as one app, under Streamlit's AppTest. The tiny
world's 2-layer model gets a second random SAE at blocks.0.hook_resid_pre whose features 0–9 copy the tiny SAE's
(at blocks.1.hook_resid_pre), each SAE with the store `saekit analyze` writes by default (SET/HOOK/store), and the
set's flow store in SET/flow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BROWSER_SCRIPT, TINY_HOOK, ok

from saekit.config import FlowConfig
from saekit.errors import SaekitError
from saekit.features import FeatureConfig, analyze
from saekit.flow import compute_flow, read_set, save_flow
from saekit.runner import dictionaries_in
from saekit.sae import load_sae

HOOK0 = "blocks.0.hook_resid_pre"


def _tiny_config() -> FeatureConfig:
    return FeatureConfig(tokens=600, top_n=4, sample_size=6, quantile_groups=2, batch_contexts=4, device="cpu")


@pytest.fixture(scope="module")
def tiny_set(tiny_store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sae_set")
    sae = load_sae(tiny_store["sae"])
    sae.save(root / TINY_HOOK / "sae")
    other = load_sae(tiny_store["sae"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        other.W_dec.copy_(torch.randn(other.W_dec.shape, generator=gen))
        other.W_dec[:10] = sae.W_dec[:10]  # features 0–9 persist from layer 0 to layer 1
        other.W_enc.copy_(other.W_dec.t())
    other.info = {**sae.info, "hook": HOOK0}
    other.save(root / HOOK0 / "sae")
    for hook in (HOOK0, TINY_HOOK):
        analyze(root / hook / "sae", root / hook / "store", _tiny_config(), progress=False)
    s = read_set(dictionaries_in(root), root)
    cfg = FlowConfig(threshold=0.9, check_tokens=0)
    save_flow(root / "flow", s, cfg, *compute_flow(s, cfg, progress=False), {"ran": False, "why": "test"})
    return root


@pytest.fixture
def app(tiny_set, monkeypatch, app_test_guard):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_STORE", str(tiny_set))
    monkeypatch.delenv("SAEKIT_FLOW", raising=False)
    return AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)


def shown_store(at) -> str:
    return next(c.value for c in at.sidebar.caption if c.value.startswith("store `"))


def test_picker_lists_the_set_in_layer_order_and_switches_the_store(app, tiny_set):
    at = ok(app.run())
    picker = at.selectbox(key="sae_pick")
    assert picker.options == [HOOK0, TINY_HOOK] and picker.value == HOOK0
    assert f"{HOOK0}/store" in shown_store(at)
    assert at.query_params["sae"] == HOOK0
    ok(picker.set_value(TINY_HOOK).run())
    assert f"{TINY_HOOK}/store" in shown_store(at)
    assert at.query_params["sae"] == TINY_HOOK and at.query_params["page"] == "overview"


@pytest.mark.parametrize("query", [{"sae": TINY_HOOK, "feature": "5"}, {"feature": f"{TINY_HOOK}:5"}])
def test_the_url_opens_a_feature_in_its_sae_store(app, query):
    at = app
    at.query_params.update({"page": "feature", **query})
    ok(at.run())
    assert at.selectbox(key="sae_pick").value == TINY_HOOK
    assert f"{TINY_HOOK}/store" in shown_store(at)
    assert at.title[0].value.startswith("Feature 5")
    assert at.query_params["feature"] == "5"


def test_a_bad_sae_in_the_url_says_which_exist(app):
    app.query_params.update({"sae": "blocks.7.hook_resid_pre", "page": "feature", "feature": "5"})
    at = app.run()
    assert not at.exception
    assert any("no SAE 'blocks.7.hook_resid_pre'" in e.value and f"{HOOK0}, {TINY_HOOK}" in e.value for e in at.error)
    assert at.title[0].value == "Nothing at this address"


def test_flow_links_open_the_node_in_its_own_store(app):
    app.query_params.update({"sae": TINY_HOOK, "page": "feature", "feature": "5"})
    at = ok(app.run())
    assert any("Class: **persisting**" in c.value for c in at.caption)
    link = next(b for b in at.button if b.label == f"open {HOOK0}:5")
    ok(link.click().run())
    assert at.selectbox(key="sae_pick").value == HOOK0
    assert f"{HOOK0}/store" in shown_store(at)
    assert at.title[0].value.startswith("Feature 5")
    assert at.query_params["sae"] == HOOK0 and at.query_params["feature"] == "5"


def test_a_set_without_stores_names_the_saes_and_the_command(tiny_store, tmp_path, monkeypatch, app_test_guard):
    from saekit.apps.serve import browse
    from streamlit.testing.v1 import AppTest

    load_sae(tiny_store["sae"]).save(tmp_path / "set" / TINY_HOOK / "sae")
    with pytest.raises(SaekitError, match=rf"(?s)without one: {TINY_HOOK}.*saekit analyze .*{TINY_HOOK}/sae"):
        browse(tmp_path / "set", port=8599)  # no server starts
    monkeypatch.setenv("SAEKIT_STORE", str(tmp_path / "set"))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=60).run()
    assert any("holds no feature store" in e.value and "saekit analyze" in e.value for e in at.error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaekitError, match="neither a feature store nor an SAE"):
        browse(tmp_path / "empty", port=8599)
