"""The Your-text page: run the model and SAE on the user's text now."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import _from_selection, feature_label, get_live, goto
from saekit.apps.labels import Labels

from saekit.errors import SaekitError
from saekit.features import FeatureStore
from saekit.tokens import display_token

DEFAULT_TEXT = "The central bank raised interest rates by a quarter of a percentage point on Thursday."


def text_page(path: str, store: FeatureStore, labels: Labels) -> None:
    st.title("Your text")
    st.caption("Runs the model and SAE on your text now: per-token activations of the strongest features.")
    text = st.text_area("Text", value=DEFAULT_TEXT, key="user_text", height=100)
    n = st.slider("features shown", 3, 30, 10, key="text_n")
    if st.button("Run", type="primary", key="text_run"):
        try:
            st.session_state["live"] = (text, get_live(path).run(text))
        except SaekitError as e:
            st.error(str(e))
            return
    if "live" not in st.session_state:
        st.info("Press Run.")
        return
    ran_text, res = st.session_state["live"]
    if ran_text != text:
        st.caption("The text changed since the last run; press Run to update.")
    names = labels.all_labels()
    top = res.strongest(n)
    if not len(top):
        st.warning("No feature fired on this text (position 0 and special tokens are not encoded).")
        return
    rows = [feature_label(names, int(i)) for i in top]
    st.plotly_chart(render.heatmap_figure(res.dense(top), res.pieces, rows), key="text_heatmap")
    st.caption("Open a feature:")
    cols = st.columns(min(len(top), 6))
    for k, i in enumerate(top):
        cols[k % len(cols)].button(feature_label(names, int(i)), key=f"text_open_{i}", on_click=goto,
                                   args=("feature", int(i)))
    st.subheader("Features on one token")
    positions = [t for t in range(len(res.tokens)) if res.kept[t]]
    best = max(positions, key=lambda t: res.values[t].max(), default=0)
    pos = st.selectbox("Token", positions, index=positions.index(best) if positions else 0, key="text_token",
                       format_func=lambda t: f"{t}: {display_token(res.pieces[t])}")
    ranked = res.ranked(int(pos)) if positions else []
    table = pd.DataFrame([{"feature": i, "activation": v, "label": names.get(i, ""),
                           "density": float(store.stats["density"][i]), "top tokens": store.top_tokens_text(i)}
                          for i, v in ranked])
    st.session_state["text_frame"] = table
    st.dataframe(table, hide_index=True, key="text_table", selection_mode="single-row",
                 on_select=lambda: _from_selection("text_table", frame_key="text_frame"),
                 column_config={"density": st.column_config.NumberColumn(format="%.2e")})
