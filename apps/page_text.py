"""The Your-text page: run the model and SAE on the user's text now."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import _from_selection, feature_name, goto, run_live
from saekit.apps.labels import Labels
from saekit.apps.live import MAX_TOKENS, LiveResult

from saekit.features import FeatureStore

DEFAULT_TEXT = "The central bank raised interest rates by a quarter of a percentage point on Thursday."
ABOVE_MAX = 2.0  # an activation this many times the store's maximum for the feature is flagged
UNSEEN = "above anything seen in the analysed corpus"


def best_position(res: LiveResult) -> int | None:
    """The encoded token with the strongest activation (None when no token was encoded)."""
    positions = [t for t in range(len(res.tokens)) if res.kept[t]]
    return max(positions, key=lambda t: res.values[t].max(), default=None)


def corpus_note(act: float, act_max: float) -> str:
    """How a live activation compares with the largest the store saw for that feature."""
    if act_max <= 0:
        return f"never fired in the analysed corpus — {UNSEEN}"
    ratio = act / act_max
    return f"{ratio:.1f}× the corpus max — {UNSEEN}" if ratio > ABOVE_MAX else ""


def text_page(path: str, store: FeatureStore, labels: Labels) -> None:
    st.title("Your text")
    what = (f"{store.dictionary} (its encoder on the MLP input `{store.manifest.get('hook')}`)" if store.is_transcoder
            else "SAE")
    st.caption(f"Runs the model and {what} on your text now (its first {MAX_TOKENS} tokens): per-token activations "
               "of the strongest features.")
    text = st.text_area("Text", value=DEFAULT_TEXT, key="user_text", height=100)
    n = st.slider("features shown", 3, 30, 10, key="text_n")
    if st.button("Run", type="primary", key="text_run"):
        if (res := run_live(path, text, "Run")) is None:
            return
        st.session_state["live"] = (text, res)
        # A new run lands: point the token selector at this text's strongest token. Its old value is a position
        # in the previous text, and the selector would keep showing that text's token.
        st.session_state["text_token"] = best_position(res)
    if "live" not in st.session_state:
        st.info("Press Run.")
        return
    ran_text, res = st.session_state["live"]
    if ran_text != text:
        st.caption("The text changed since the last run; press Run to update.")
    if res.truncated:
        st.warning(f"The text is long: used the first {len(res.tokens)} of its {res.total} tokens (BOS included); "
                   f"at most {MAX_TOKENS} are run.")
    names = labels.all_labels()
    top = res.strongest(n)
    if not len(top):
        st.warning("No feature fired on this text (position 0 and special tokens are not encoded).")
        return
    rows = [feature_name(store, names, int(i)) for i in top]
    st.plotly_chart(render.heatmap_figure(res.dense(top), res.pieces, rows), key="text_heatmap")
    st.caption("Open a feature:")
    cols = st.columns(min(len(top), 6))
    for k, (i, row) in enumerate(zip(top, rows)):
        cols[k % len(cols)].button(row, key=f"text_open_{i}", on_click=goto, args=("feature", int(i)))
    st.subheader("Features on one token")
    positions = [t for t in range(len(res.tokens)) if res.kept[t]]
    if not positions:
        return
    if st.session_state.get("text_token") not in positions:  # back on the page after its widget state was dropped
        st.session_state["text_token"] = best_position(res)
    pos = st.selectbox("Token", positions, key="text_token",
                       format_func=lambda t: f"{t}: {render.piece_text(res.pieces[t])}")
    act_max = store.stats["act_max"]
    table = pd.DataFrame([{"feature": i, "activation": v, "label": names.get(i, ""),
                           "vs corpus": corpus_note(v, float(act_max[i])),
                           "density": float(store.stats["density"][i]), "top tokens": store.top_tokens_text(i)}
                          for i, v in res.ranked(int(pos))])
    st.session_state["text_frame"] = table
    if len(table) and (flagged := int((table["vs corpus"] != "").sum())):
        st.caption(f"{flagged} of these activations exceed {ABOVE_MAX:g}× the largest the feature reached on the "
                   "analysed corpus (see “vs corpus”): the text is unlike what the feature was studied on.")
    st.dataframe(table, hide_index=True, key="text_table", selection_mode="single-row",
                 on_select=lambda: _from_selection("text_table", frame_key="text_frame"),
                 column_config={"density": st.column_config.NumberColumn(format="%.2e"),
                                "vs corpus": st.column_config.TextColumn(help=f"flagged when above {ABOVE_MAX:g}× the "
                                                                         "feature's max on the analysed corpus")})
