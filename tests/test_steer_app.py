"""The feature page's steering panel under Streamlit's AppTest, on the tiny store (its tiny Llama and SAE load in
well under a second): the strengths spelled out, streamed generation equal to `generate`, the steered features'
tokens highlighted and counted, several features at once, the path and speed shown, the strength sweep; and in a
real browser (Debian chromium), the tokens arriving one by one."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("streamlit")
from browser_server import browse_server, chromium_page  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from saekit import steer as S  # noqa: E402
from saekit.features import FeatureStore  # noqa: E402


def panel_script(store_path: str, fid: int):
    from saekit.apps.steering_panel import steering_panel

    from saekit.features import FeatureStore

    steering_panel(FeatureStore(store_path), fid)


@pytest.fixture(scope="module")
def store(tiny_store) -> FeatureStore:
    return FeatureStore(tiny_store["store"])


@pytest.fixture(scope="module")
def fid(store) -> int:
    return int(np.argsort(-store.stats["count"])[0])  # the feature that fires most


@pytest.fixture(scope="module")
def world(tiny_store):
    """The tiny model and SAE, loaded here as the panel's LiveModel loads them."""
    from saekit.lm import load_model
    from saekit.sae import load_sae

    return load_model(str(tiny_store["model"])), load_sae(tiny_store["sae"])


@pytest.fixture
def app(tiny_store, fid, app_test_guard) -> AppTest:
    at = AppTest.from_function(panel_script, args=(str(tiny_store["store"]), fid), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_controls_and_strengths_spelled_out(app, store, fid):
    typical, act_max = float(store.stats["mean"][fid]), float(store.stats["act_max"][fid])
    assert app.subheader[0].value == "Steering"
    assert app.selectbox(key=f"steer_mode_{fid}").options == ["add", "clamp", "scale", "ablate"]
    labels = [b.label for b in app.button]
    assert "Generate" in labels and f"Strength sweep of feature {fid} (1, 2, 4, 8)" in labels
    assert f"**4 × {typical:.3g} = {4 * typical:.4g}** added along `W_dec[{fid}]`" in texts(app)
    app.selectbox(key=f"steer_mode_{fid}").set_value("clamp").run()
    assert f"set to {round(act_max, 2):g}**" in texts(ok(app))  # the default clamp value is the feature's max
    app.selectbox(key=f"steer_mode_{fid}").set_value("scale").run()
    app.number_input(key=f"steer_strength_{fid}_scale").set_value(3.0).run()
    assert f"**× 3** wherever it fires: a typical firing {typical:.3g} becomes {3 * typical:.4g}" in texts(ok(app))
    app.selectbox(key=f"steer_mode_{fid}").set_value("ablate").run()
    assert f"a typical firing removes {typical:.3g}·`W_dec[{fid}]`" in texts(ok(app))
    assert app.button(key=f"steer_sweep_{fid}").disabled


def test_generate_streams_what_generate_gives_highlighted_and_timed(app, store, fid, world):
    model, sae = world
    app.number_input(key=f"steer_tokens_{fid}").set_value(12)
    app.number_input(key=f"steer_strength_{fid}_add").set_value(8.0)
    app.number_input(key=f"steer_seed_{fid}").set_value(3)
    app.text_input(key=f"steer_prompt_{fid}").set_value("The cat")
    ok(app.button(key=f"steer_run_{fid}").click().run())
    g = app.session_state[f"steer_result_{fid}"]["generation"]
    typical = float(store.stats["mean"][fid])
    want = S.generate(model, sae, "The cat", [S.add(fid, 8.0)], seed=3, max_new_tokens=12, scale=lambda f: typical)
    assert (g.baseline_tokens, g.steered_tokens) == (want.baseline_tokens, want.steered_tokens)
    assert g.steered_tokens != g.baseline_tokens  # the edit did something
    assert "".join(g.steered_pieces) == g.steered and "".join(g.baseline_pieces) == g.baseline
    blocks = texts(app)
    assert "<b>baseline</b>" in blocks and f"<b>steered: add #{fid} 8 × {typical:.3g} = {8 * typical:.4g}</b>" in blocks
    assert "▌" not in blocks  # the streaming cursor is gone once both rows are done
    # highlighted and counted: the same counts from the store's profile and logit tokens, computed here
    feat = store.feature(fid)
    fires = {p["string"].strip().lower() for p in feat.profile[:10]} - {""}
    promotes = {s.strip().lower() for _, s, _ in feat.logits_top[:10]} - {""}
    for pieces in (g.baseline_pieces, g.steered_pieces):
        n_fires = sum(p.strip().lower() in fires for p in pieces)
        n_prom = sum(p.strip().lower() in promotes for p in pieces)
        assert f"over {len(pieces)} tokens · {n_fires} fires-on · {n_prom} promoted tokens" in blocks
    assert blocks.count("rgba(255,110,0,.35)") >= 1  # the legend at least
    caption = app.caption[-1].value
    assert caption.startswith(f"{len(g.baseline_tokens)} + {len(g.steered_tokens)} tokens in ")
    assert "tokens/s" in caption and "plain HF model, KV cache, 1 CPU thread" in caption  # the fast path ran
    assert not app.warning


def test_several_features_at_once(app, store, fid, world):
    model, sae = world
    app.button(key=f"steer_xadd_{fid}").click().run()
    nb = store.feature(fid).neighbours[0][0]
    assert ok(app).number_input(key=f"steer_xf_{fid}_0").value == nb  # starts at the nearest neighbour
    other = int(np.argsort(-store.stats["count"])[1])
    app.number_input(key=f"steer_xf_{fid}_0").set_value(other).run()
    app.selectbox(key=f"steer_mode_{fid}_0").set_value("clamp").run()
    app.number_input(key=f"steer_strength_{fid}_0_clamp").set_value(5.0)
    app.number_input(key=f"steer_tokens_{fid}").set_value(8)
    ok(app.button(key=f"steer_run_{fid}").click().run())
    g = app.session_state[f"steer_result_{fid}"]["generation"]
    typical = float(store.stats["mean"][fid])
    edits = [S.add(fid, 4.0), S.clamp(other, 5.0)]
    want = S.generate(model, sae, "I think that", edits, seed=0, max_new_tokens=8, scale=lambda f: typical)
    assert (g.baseline_tokens, g.steered_tokens) == (want.baseline_tokens, want.steered_tokens)
    assert f"; clamp #{other} to 5</b>" in texts(app)
    spelled = texts(app)  # both rows spelled out
    assert f"**4 × {typical:.3g} = {4 * typical:.4g}** added along `W_dec[{fid}]`" in spelled
    assert f"feature {other}'s activation **set to 5**" in spelled
    app.button(key=f"steer_xdel_{fid}_0").click().run()
    assert not [n for n in ok(app).number_input if n.key == f"steer_xf_{fid}_0"]


def test_highlighting_marks_escapes_and_counts():
    from saekit.apps.steering_panel import marked_html

    marks = {"paris": {"fires": [3]}, "france": {"fires": [3], "promotes": [3, 9]}}
    body, counts = marked_html([" Paris", " <b>", "France", "\n", " paris"], marks)
    assert counts == {"fires": 3, "promotes": 1}
    assert body.count("<span") == 3 and "&lt;b&gt;" in body and "<br>" in body
    assert "a token it promotes (top logit effect) of features 3, 9" in body


def test_sweep_plots(app, fid):
    app.number_input(key=f"steer_tokens_{fid}").set_value(2)
    ok(app.button(key=f"steer_sweep_{fid}").click().run())
    assert len(app.get("plotly_chart")) == 1
    table = app.dataframe[0].value
    assert list(table["strength"]) == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert table["ppl_ratio"].iloc[0] == pytest.approx(1.0)


@pytest.fixture
def server(tiny_store):
    with browse_server(tiny_store["store"]) as url:
        yield url


@pytest.mark.browser
def test_tokens_stream_into_a_real_browser(server, fid, tmp_path):
    """A real `saekit browse` server and Debian's chromium: the steered box shows partial continuations (the
    streaming cursor, fewer characters than at the end) before the finished one. 200 greedy tokens of the tiny model
    and their page updates take long enough (~1 s) for a poll every 20 ms to see intermediate states."""
    import time

    from playwright.sync_api import expect

    with chromium_page(1400, 1600) as page:
        page.goto(f"{server}/?page=feature&feature={fid}")
        page.get_by_label("Tokens").fill("200")
        page.get_by_label("Tokens").press("Enter")
        expect(page.get_by_label("Tokens")).to_have_value("200")
        page.get_by_label("Temperature").fill("0")  # greedy: the tiny model writes all 200 tokens, no stop token
        page.get_by_label("Temperature").press("Enter")
        expect(page.get_by_label("Temperature")).to_have_value("0.00")
        page.get_by_role("button", name="Generate").click()
        steered = page.locator("[data-testid=stMarkdownContainer]").filter(has_text="steered: add")
        states: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline and not (states and "mean log-prob" in states[-1]):
            text = steered.first.inner_text() if steered.count() else ""
            if text and (not states or text != states[-1]):
                states.append(text)
            time.sleep(0.02)
        page.screenshot(path=str(tmp_path / "steering.png"), full_page=True)
    assert states and "mean log-prob" in states[-1] and "▌" not in states[-1], states[-1:]
    partial = [s for s in states if "▌" in s]
    assert partial, "no intermediate state seen: the tokens did not stream"
    print(f"{len(partial)} partial states seen before the finished text")
    assert all(len(s) < len(states[-1]) for s in partial)
    assert (tmp_path / "steering.png").stat().st_size > 10_000
