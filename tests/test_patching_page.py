"""Attribution patching on the Graph page (AppTest): a `saekit attribute --saes` result beside a graph in --graphs,
its validation and ranked nodes shown, filters that change the table, and a feature page opened only for the SAE
this browser's store was built from."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from helpers import BROWSER_SCRIPT, TINY_HOOK, build_store, ok  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_attribution_patching import PROMPTS, random_saes  # noqa: E402

from saekit.attribution.patching import patch_to_dir  # noqa: E402
from saekit.sae import load_sae  # noqa: E402


@pytest.fixture(scope="module")
def patch_world(tmp_path_factory):
    """{graphs, store}: a patching result over the tiny world's SAE (whose store this is) and a random SAE at
    layer 0, and a second result over a set without the store's SAE."""
    root = tmp_path_factory.mktemp("patch_world")
    world = build_store(tmp_path_factory.getbasetemp() / "feature_world")
    other = random_saes(world, hooks=("blocks.0.hook_resid_pre",))["blocks.0.hook_resid_pre"]
    load_sae(world["sae"]).save(root / "set" / TINY_HOOK)
    other.save(root / "set" / "blocks.0.hook_resid_pre")
    other.save(root / "set0" / "blocks.0.hook_resid_pre")
    patch_to_dir(root / "set", PROMPTS, root / "graphs" / "both", ig_steps=4, validate_top=6)
    patch_to_dir(root / "set0", PROMPTS, root / "graphs" / "layer0", ig_steps=0, validate_top=0)
    return {"graphs": root / "graphs", "store": world["store"]}


@pytest.fixture
def app(patch_world, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(patch_world["store"]))
    monkeypatch.setenv("SAEKIT_GRAPHS", str(patch_world["graphs"]))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"] = "graph"
    return at


def nodes_table(at):
    return next(d.value for d in at.dataframe if "IG" in d.value.columns)


def test_the_ranked_nodes_and_their_validation_are_shown(app):
    at = ok(app.run())
    assert at.title[0].value == "Attribution patching: 2 prompt(s)"
    assert any(m.label == "validation ρ, IG" and m.value.count("[") == 1 for m in at.metric)
    table = nodes_table(at)
    assert len(table) > 6
    assert set(table["node"].str.split().str[0]) == {TINY_HOOK, "blocks.0.hook_resid_pre"}
    ig = table["IG"].abs().tolist()
    assert ig == sorted(ig, reverse=True)
    assert table["measured"].notna().sum() == 6  # the validated nodes carry their measured ablation
    # filters: one SAE, no error nodes
    at.multiselect(key="graph_patch_hooks").set_value([TINY_HOOK]).run()
    at.toggle(key="graph_patch_errors").set_value(False).run()
    table = nodes_table(ok(at))
    assert set(table["node"].str.split().str[0]) == {TINY_HOOK} and not table["node"].str.endswith("error").any()


def test_a_feature_of_the_stores_sae_opens_its_page(app):
    at = ok(app.run())
    pick = at.selectbox(key="graph_patch_open").value
    at.button(key="gbtn_patch_open").click().run()
    assert ok(at).session_state["feature_id"] == pick
    assert at.session_state["nav"] == "Feature"


def test_a_set_without_the_stores_sae_says_why_no_page_opens(app):
    at = ok(app.run())
    at.selectbox(key="graph_pick").set_value("layer0").run()
    ok(at)
    assert not [s for s in at.selectbox if s.key == "graph_patch_open"]
    assert any("this browser's store is of blocks.1.hook_resid_pre" in c.value for c in at.caption)
    assert any("Not validated" in w.value for w in at.warning)
