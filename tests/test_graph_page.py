"""The Graph page (`saekit browse STORE --graphs DIR`) under Streamlit's AppTest, on a graph of the tiny world
(random Llama, random transcoders saved as a set, the store of its layer-1 transcoder): it renders, the sliders
prune as Graph.prune does, pins and supernodes are kept (DIR/supernodes.json), a node opens its feature page only
when the store is of its layer, an intervention shows the logits edit_features gives and a continuation, bad
--graphs paths and ?graph= names say what exists; and once in a real browser."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("streamlit")
from browser_server import browse_server, chromium_page  # noqa: E402
from helpers import (  # noqa: E402
    BROWSER_SCRIPT,
    build_world,
    ok,
    random_transcoders,  # noqa: E402
)
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_attribution import PROMPT  # noqa: E402

from saekit.attribution.graph import Graph  # noqa: E402
from saekit.tokens import Vocab, display_token  # noqa: E402


@pytest.fixture(scope="module")
def graph_world(tmp_path_factory):
    """{graphs, graph, store, set}: one graph folder (graphs/cat) on a saved transcoder set, and the feature store of
    the set's layer-1 transcoder."""
    from saekit.attribution import AttributionConfig, attribute
    from saekit.features import FeatureConfig, analyze
    from saekit.lm import load_model

    root = tmp_path_factory.mktemp("graph_world")
    world = build_world(tmp_path_factory.getbasetemp() / "feature_world")
    tcs = random_transcoders(2, 32)
    tset = root / "transcoders"
    for L, t in tcs.items():
        t.info.update({"model": "tiny-llama", "model_arg": str(world["model"]), "dataset": str(world["data"]),
                       "text_column": "text", "context_size": 32, "heldout_fraction": 0.1, "seed": 0})
        t.save(tset / f"blocks.{L}.mlp" / "tc")
    model = load_model(str(world["model"]))
    graph = attribute(model, tcs, PROMPT, cfg=AttributionConfig(max_feature_nodes=None, batch_size=64), progress=False)
    graph.meta.update({"transcoders": str(tset.resolve()), "prompt": PROMPT})
    graph.save(root / "graphs" / "cat")
    store = root / "store"
    analyze(tset / "blocks.1.mlp" / "tc", store, FeatureConfig(tokens=600, top_n=4, sample_size=6, quantile_groups=2,
                                                               batch_contexts=4, device="cpu"), progress=False)
    return {"graphs": root / "graphs", "graph": root / "graphs" / "cat", "store": store, "set": tset,
            "model": model, "tcs": tcs}


@pytest.fixture
def app(graph_world, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(graph_world["store"]))
    monkeypatch.setenv("SAEKIT_GRAPHS", str(graph_world["graphs"]))
    (graph_world["graph"] / "supernodes.json").unlink(missing_ok=True)
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"] = "graph"
    return at


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def keep_all(at):
    """Both thresholds at 1: every node with an edge is drawn (and can be selected)."""
    at.slider(key="graph_node_threshold").set_value(1.0).run()
    at.slider(key="graph_edge_threshold").set_value(1.0).run()
    return ok(at)


def feature_nodes(at, layer: int) -> list[str]:
    shown = [o.split(" · ")[0] for o in at.selectbox(key="graph_node").options]  # "L0#23@17 · influence …"
    return [o for o in shown if o.startswith(f"L{layer}#")]


def test_the_page_renders_and_the_sliders_prune(app, graph_world):
    at = ok(app.run())
    g = Graph.load(graph_world["graph"])
    assert at.title[0].value == f"Graph: {PROMPT!r}"
    assert len(at.get("plotly_chart")) == 1
    assert "Graph" in at.radio(key="nav").options and at.query_params["graph"] in ("cat", ["cat"])
    kept = int(g.prune(0.8, 0.98).node_mask.sum())
    assert metric(at, "nodes kept") == f"{kept:,} / {g.n_nodes:,}"
    assert metric(at, "replacement score") == f"{g.scores(g.prune(0.8, 0.98))['replacement']:.3f}"
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)  # feature hovers carry the top tokens (and label)
    texts = [t for tr in spec["data"] if tr.get("name") == "feature" for t in tr["hovertext"]]
    assert texts and all("top tokens:" in t for t in texts)
    at.slider(key="graph_node_threshold").set_value(0.3).run()
    fewer = int(g.prune(0.3, 0.98).node_mask.sum())
    assert fewer < kept and metric(ok(at), "nodes kept") == f"{fewer:,} / {g.n_nodes:,}"
    at.selectbox(key="graph_target").set_value(0).run()  # the first logit alone
    one = Graph(g.tokens, g.token_strings, g.features, g.activations, g.adjacency,
                [{**t, "probability": float(k == 0)} for k, t in enumerate(g.targets)], g.n_layers, g.meta)
    assert metric(ok(at), "nodes kept") == f"{int(one.prune(0.3, 0.98).node_mask.sum()):,} / {g.n_nodes:,}"


def test_pins_supernodes_and_the_feature_page(app, graph_world):
    at = keep_all(ok(app.run()))
    l1, l0 = feature_nodes(at, 1), feature_nodes(at, 0)
    assert l1 and l0
    at.selectbox(key="graph_node").set_value(l0[0]).run()
    assert any("No feature page for layer 0" in c.value for c in ok(at).caption)  # the store is layer 1's
    at.button(key="gbtn_pin").click().run()
    at.selectbox(key="graph_node").set_value(l1[0]).run()
    at.button(key="gbtn_pin").click().run()
    pinned_key = f"graph_pinned_{graph_world['graph']}"
    assert ok(at).session_state[pinned_key] == [l0[0], l1[0]]
    at.text_input(key=f"graph_supername_{graph_world['graph']}").set_value("cat words").run()
    at.button(key="gbtn_group").click().run()
    saved = json.loads((graph_world["graph"] / "supernodes.json").read_text())
    assert saved["supernodes"] == [{"name": "cat words", "nodes": [l0[0], l1[0]]}]
    assert any("cat words" in m.value for m in ok(at).markdown)
    latent = int(l1[0].split("#")[1].split("@")[0])
    at.button(key="gbtn_open").click().run()
    assert ok(at).title[0].value.startswith(f"Feature {latent}")
    fresh = ok(AppTest.from_file(BROWSER_SCRIPT, default_timeout=120))  # a new session reads supernodes.json
    fresh.query_params["page"] = "graph"
    fresh.run()
    assert any("cat words" in m.value for m in ok(fresh).markdown)


def test_the_intervention_shows_new_logits_and_a_continuation(app, graph_world):
    from saekit.attribution import edit_features

    at = ok(app.run())
    node = feature_nodes(at, 0)[0]
    at.multiselect(key=f"graph_pinned_{graph_world['graph']}").set_value([node]).run()
    ok(at).button(key="gbtn_intervene").click().run()
    table = next(d.value for d in ok(at).dataframe if "p edited" in d.value.columns)
    g = Graph.load(graph_world["graph"])
    L, f, p = int(node[1:node.index("#")]), int(node[node.index("#") + 1:node.index("@")]), int(node.split("@")[1])
    i = g.find(L, p, f)
    logits = edit_features(graph_world["model"], graph_world["tcs"], g.tokens, [[(L, p, f, -float(g.activations[i]))]])
    probs = logits.softmax(-1)
    vocab = Vocab.from_tokenizer(graph_world["model"].tokenizer)
    want = {display_token(vocab.token_str(int(t))): float(probs[0, t]) for t in probs[0].topk(3).indices}
    got = dict(zip(table["token"], table["p edited"]))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4)
    html = "".join(m.value for m in at.markdown)
    assert "baseline" in html and "edited: " in html and "mean log-prob" in html


def test_bad_graphs_and_graph_names_say_what_exists(app, graph_world, monkeypatch, tmp_path, capsys):
    from saekit.cli import main

    app.query_params["graph"] = "nope"
    at = app.run()
    assert [e.value for e in at.error] == [f"There is no graph 'nope' in {graph_world['graphs']} — graphs: cat."]
    monkeypatch.setenv("SAEKIT_GRAPHS", str(tmp_path / "absent"))
    bad = AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)
    bad.query_params["page"] = "graph"
    bad.run()
    assert "does not exist" in bad.error[0].value and "saekit attribute" in bad.error[0].value
    assert main(["browse", str(graph_world["store"]), "--graphs", str(tmp_path / "absent")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["browse", str(graph_world["store"]), "--graphs", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds no attribution graph" in err


@pytest.mark.browser
def test_the_graph_page_in_a_real_browser(graph_world, tmp_path):
    from playwright.sync_api import expect

    with browse_server(graph_world["store"], "--graphs", str(graph_world["graphs"])) as url:
        with chromium_page() as page:
            t0 = time.perf_counter()
            page.goto(url + "/?page=graph&graph=cat")
            expect(page.get_by_role("heading", name="Graph:")).to_be_visible()
            expect(page.locator(".js-plotly-plot").first).to_be_visible()
            print(f"graph page (cold, model load included): {time.perf_counter() - t0:.2f} s")
            page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
            errors = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')
            assert errors.count() == 0, [e.inner_text()[:300] for e in errors.all()]
            assert "graph=cat" in page.url
    assert (tmp_path / "graph.png").stat().st_size > 10_000
