"""The feature page's steering panel under Streamlit's AppTest: generate side by side, run the sweep.
Uses the real default model with a small random SAE (integration), a few tokens per generation."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

pytestmark = pytest.mark.integration


def panel_script():
    import threading
    import types

    import numpy as np
    import streamlit as st
    import torch
    from saekit.apps.steering_panel import steering_panel

    @st.cache_resource
    def live():
        from saekit.config import SaeConfig
        from saekit.lm import load_model
        from saekit.sae import SparseAutoencoder

        torch.set_num_threads(1)  # the shared CPU is oversubscribed
        sae = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=256, k=8), seed=0)
        sae.info["hook"] = "blocks.15.hook_resid_pre"
        return types.SimpleNamespace(model=load_model("default"), sae=sae, lock=threading.Lock())

    class Store:  # the two statistics the panel reads from a FeatureStore
        stats = {"mean": np.full(256, 3.0, dtype=np.float32), "act_max": np.full(256, 9.0, dtype=np.float32)}
        d_sae = 256

    steering_panel(Store(), 5, live=live)


@pytest.fixture(scope="module")
def app(app_test_guard) -> AppTest:
    at = AppTest.from_function(panel_script, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_panel_renders_controls(app):
    assert app.subheader[0].value == "Steering"
    assert [s.label for s in app.selectbox] == ["Mode"]
    assert app.selectbox[0].options == ["add", "clamp", "scale", "ablate"]
    assert "typical activation (3.00" in app.caption[0].value
    labels = [b.label for b in app.button]
    assert labels[0] == "Generate" and labels[1].startswith("Strength sweep")


def test_generate_side_by_side(app):
    app.number_input(key="steer_tokens_5").set_value(3)
    app.number_input(key="steer_strength_5_add").set_value(8.0)
    app.text_input(key="steer_prompt_5").set_value("The market")
    app.button(key="steer_run_5").click().run()
    assert not app.exception, app.exception
    blocks = [m.value for m in app.markdown]
    assert any("<b>baseline</b>" in b for b in blocks)
    assert any("steered: add feature 5 8 × 3" in b for b in blocks)  # strength × typical activation
    assert any("mean log-prob" in b for b in blocks)


def test_sweep_plots(app):
    app.number_input(key="steer_tokens_5").set_value(2)
    app.button(key="steer_sweep_5").click().run()
    assert not app.exception, app.exception
    charts = app.get("plotly_chart")
    assert len(charts) == 1
    table = app.dataframe[0].value
    assert list(table["strength"]) == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert table["ppl_ratio"].iloc[0] == pytest.approx(1.0)
