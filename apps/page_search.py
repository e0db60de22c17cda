"""The Search page: features by token string, label or notes."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from saekit.apps.common import _from_selection, goto
from saekit.apps.labels import Labels

from saekit.features import FeatureStore


def search_page(path: str, store: FeatureStore, labels: Labels) -> None:
    st.title("Search")
    c = st.columns([3, 1])
    q = c[0].text_input("Token string (matches token profiles and top logit tokens)", key="search_token")
    exact = c[1].checkbox("whole token", key="search_exact", help="match the whole token (spaces ignored), not a substring")
    if q:
        hits = store.search_tokens(q, exact=exact)
        st.caption(f"{len(hits)} features")
        frame = pd.DataFrame(hits, columns=["feature", "tokens", "profile_rate", "logit", "density"])
        names = labels.all_labels()  # one query, not one connection per hit
        frame.insert(1, "label", [names.get(int(i), "") for i in frame["feature"]] if len(frame) else [])
        st.session_state["search_frame"] = frame
        st.dataframe(frame, hide_index=True, key="search_table", selection_mode="single-row",
                     on_select=lambda: _from_selection("search_table", frame_key="search_frame"))
        for i in frame["feature"][:8]:
            st.button(f"open #{i}", key=f"search_open_{i}", on_click=goto, args=("feature", int(i)))
    q2 = st.text_input("Label or notes text", key="search_label")
    if q2.strip():
        found = labels.search(q2.strip())
        st.caption(f"{len(found)} labelled features")
        for e in found:
            st.button(f"#{e.feature} · {e.label or '(no label)'} — {e.notes[:80]}", key=f"label_open_{e.feature}",
                      on_click=goto, args=("feature", e.feature))
