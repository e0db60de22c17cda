"""The steering panel on the feature page: edit this feature while the model generates, and compare.

The feature page calls `steering_panel(store, feature_id)` once, at the bottom of the page. `store` is the
open `saekit.features.FeatureStore` (its manifest names the SAE directory, model and hook). The model and
SAE come from `live()` when given (any object with .model, .sae and .lock, e.g. the browser's cached
`LiveModel`), else from a LiveModel this module caches per store. Widget keys start with "steer_".

Generate: baseline and steered continuations from the same seed, side by side (saekit.steer.generate).
Sweep: a small strength sweep on the panel's prompt (saekit.steer_eval.sweep_feature): hit rate, the
probability of the feature's top logit tokens, perplexity ratio and side-effect KL against strength.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
import streamlit as st

from saekit import steer as S
from saekit.errors import SaekitError

DEFAULT_PROMPT = "I think that"
SWEEP = (0.0, 1.0, 2.0, 4.0, 8.0)
NEUTRAL = 2  # neutral prompts for the sweep's side-effect KL (kept small: the panel runs on CPU)


@st.cache_resource(show_spinner="loading the model and SAE …")
def _live_for(path: str):
    from saekit.apps.live import LiveModel

    from saekit.features import FeatureStore

    return LiveModel(FeatureStore(path))


def _typical(store, fid: int) -> tuple[float, float]:
    """(mean activation when firing, max activation) from the store's stats (0 when it never fired)."""
    s = store.stats
    mean = float(np.asarray(s["mean"])[fid]) if "mean" in s else 0.0
    mx = float(np.asarray(s["act_max"])[fid]) if "act_max" in s else 0.0
    return mean, mx


def _edit(mode: str, fid: int, value: float, positions: str, typical: float) -> tuple[S.Edit, Any]:
    """The edit and the scale to apply it with (add strengths are in typical activations when known)."""
    scale = (lambda f: typical) if (mode == "add" and typical > 0) else None
    return S.make_edit(mode, fid, value, positions), scale


def _text_block(title: str, prompt: str, text: str, logprobs: list[float]) -> str:
    mean = sum(logprobs) / max(len(logprobs), 1)
    return (f"<div style='border:1px solid #ddd;border-radius:6px;padding:8px;min-height:6em'>"
            f"<b>{html.escape(title)}</b><br><span style='color:#888'>{html.escape(prompt)}</span>"
            f"{html.escape(text)}<br><small style='color:#888'>mean log-prob {mean:.3f} over "
            f"{len(logprobs)} tokens</small></div>")


def sweep_figure(rows: list[dict[str, Any]], feature: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    xs = [r["strength"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("does it steer?", "what does it cost?"),
                        specs=[[{"secondary_y": True}, {"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=xs, y=[r["hit"] for r in rows], name="hit rate", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=xs, y=[r["p_top"] for r in rows], name="p(top logit tokens)", mode="lines+markers",
                             line=dict(dash="dot")), 1, 1, secondary_y=True)
    fig.add_trace(go.Scatter(x=xs, y=[r["ppl_ratio"] for r in rows], name="perplexity ratio", mode="lines+markers"),
                  1, 2)
    fig.add_trace(go.Scatter(x=xs, y=[r["kl"] for r in rows], name="KL on neutral text", mode="lines+markers",
                             line=dict(dash="dot")), 1, 2, secondary_y=True)
    fig.add_hline(y=1.5, line_dash="dash", line_color="grey", row=1, col=2)
    fig.update_xaxes(title_text="strength")
    fig.update_yaxes(title_text="hit rate", row=1, col=1)
    fig.update_yaxes(title_text="p(top tokens)", row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="perplexity / unsteered", row=1, col=2)
    fig.update_yaxes(title_text="KL (nats/token)", row=1, col=2, secondary_y=True)
    fig.update_layout(title=f"feature {feature}: strength sweep", template="plotly_white", height=380,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def steering_panel(store, feature_id: int, live: Callable[[], Any] | None = None) -> None:
    fid = int(feature_id)
    st.subheader("Steering")
    typical, act_max = _typical(store, fid)
    units = (f"add strength is in units of this feature's typical activation ({typical:.2f}, its mean when it "
             f"fires); clamp values are raw (its max is {act_max:.2f}); scale is a factor."
             if typical > 0 else "This feature never fired in the store: add strengths are raw.")
    st.caption("Edits this feature at the SAE's hook on every token, generated ones included; clamp/scale/ablate "
               "keep the SAE's reconstruction error. Baseline and steered text share the seed. " + units)
    c1, c2, c3, c4 = st.columns(4)
    mode = c1.selectbox("Mode", S.MODES, key=f"steer_mode_{fid}")
    default = {"add": 4.0, "clamp": round(act_max or 10.0, 2), "scale": 2.0, "ablate": 0.0}[mode]
    strength = c2.number_input("Strength" if mode == "add" else "Value" if mode == "clamp" else "Factor",
                               value=default, step=1.0, key=f"steer_strength_{fid}_{mode}", disabled=mode == "ablate")
    seed = int(c3.number_input("Seed", value=0, min_value=0, step=1, key=f"steer_seed_{fid}"))
    tokens = int(c4.number_input("Tokens", value=30, min_value=1, max_value=200, step=5, key=f"steer_tokens_{fid}"))
    c5, c6 = st.columns([3, 1])
    prompt = c5.text_input("Prompt", value=DEFAULT_PROMPT, key=f"steer_prompt_{fid}")
    temperature = c6.number_input("Temperature", value=1.0, min_value=0.0, max_value=2.0, step=0.1,
                                  key=f"steer_temp_{fid}")
    b1, b2 = st.columns(2)
    run = b1.button("Generate", key=f"steer_run_{fid}", type="primary")
    sweep = b2.button(f"Strength sweep ({', '.join(f'{s:g}' for s in SWEEP[1:])})", key=f"steer_sweep_{fid}",
                      disabled=mode in ("ablate",), help="add/clamp sweep these in typical activations; scale as factors")
    if run or sweep:
        try:
            lm = live() if live is not None else _live_for(str(store.path))
        except SaekitError as e:
            st.error(str(e))
            return
        try:
            with lm.lock:
                if run:
                    edit, scale = _edit(mode, fid, float(strength), "all", typical)
                    with st.spinner("generating …"):
                        g = S.generate(lm.model, lm.sae, prompt, edit, seed, tokens, float(temperature), scale=scale)
                    st.session_state[f"steer_result_{fid}"] = g
                else:
                    st.session_state[f"steer_sweep_result_{fid}"] = _sweep(lm, fid, mode, prompt, seed, tokens,
                                                                           float(temperature), typical)
        except SaekitError as e:
            st.error(str(e))
            return
    g = st.session_state.get(f"steer_result_{fid}")
    if g is not None:
        left, right = st.columns(2)
        left.markdown(_text_block("baseline", g.prompt, g.baseline, g.baseline_logprobs), unsafe_allow_html=True)
        right.markdown(_text_block("steered: " + "; ".join(g.edits), g.prompt, g.steered, g.steered_logprobs),
                       unsafe_allow_html=True)
        st.caption(f"seed {g.seed}, temperature {g.temperature:g}")
    rows = st.session_state.get(f"steer_sweep_result_{fid}")
    if rows:
        st.plotly_chart(sweep_figure(rows, fid), key=f"steer_sweep_chart_{fid}")
        st.dataframe([{k: r[k] for k in ("strength", "hit", "act", "p_top", "ppl", "ppl_ratio", "kl")} for r in rows],
                     hide_index=True, key=f"steer_sweep_table_{fid}")


def _sweep(lm, fid: int, mode: str, prompt: str, seed: int, tokens: int, temperature: float,
           typical: float) -> list[dict[str, Any]]:
    from saekit.steer_eval import default_prompts, simple_ref, sweep_feature

    if mode == "add" and typical <= 0:
        raise SaekitError("this feature never fired in the store, so it has no typical activation to sweep in.")
    ref = simple_ref(lm.model, lm.sae, fid, typical if typical > 0 else 1.0)
    with st.spinner("sweeping strengths …"):
        return sweep_feature(lm.model, lm.sae, ref, list(SWEEP), [prompt], default_prompts()["neutral"][:NEUTRAL],
                             mode, "all", tokens, temperature, seed, progress=False)
