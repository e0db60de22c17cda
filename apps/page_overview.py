"""The Overview page: density histogram, feature map and the feature table."""

from __future__ import annotations

import numpy as np
import streamlit as st
from saekit.apps import render
from saekit.apps.common import _from_selection, base_table, goto, map_figure
from saekit.apps.labels import Labels

from saekit.features import FeatureStore


def overview_page(path: str, store: FeatureStore, labels: Labels) -> None:
    man = store.manifest
    s = store.stats
    density = s["density"]
    st.title("Features")
    st.caption(" · ".join(f"{name} `{man.get(key, '?')}`" for name, key in
                          (("SAE", "sae_dir"), ("hook", "hook"), ("model", "model"), ("dataset", "dataset"))))
    c = st.columns(5)
    c[0].metric("latents", f"{store.d_sae:,}")
    c[1].metric("tokens analysed", f"{store.tokens:,}")
    c[2].metric("never fired", f"{int((density == 0).sum()):,}")
    c[3].metric("dense (>10%)", f"{int((density > 0.1).sum()):,}")
    c[4].metric("median density", f"{np.median(density[density > 0]) if (density > 0).any() else 0:.2e}")

    o = st.columns([3, 1])
    o[0].number_input("Open feature", min_value=0, max_value=store.d_sae - 1, step=1, key="overview_open")
    o[1].button("Open", key="overview_open_btn", type="primary",
                on_click=lambda: goto("feature", st.session_state["overview_open"]))

    left, right = st.columns([2, 3])
    left.plotly_chart(render.density_figure(density), key="density_hist")
    all_labels = labels.all_labels()
    right.plotly_chart(map_figure(path, labels.stamp()), key="map", on_select=lambda: _from_selection("map"),
                       selection_mode="points")
    if man.get("map_method") == "pca":
        right.caption("Map: PCA of the decoder directions (install `umap-learn` and rebuild for a UMAP map).")

    st.subheader("Feature table")
    f = st.columns([3, 2, 1])
    text = f[0].text_input("Filter by top token or label", key="table_filter")
    lo, hi = f[1].slider("log10 density", -8.0, 0.0, (-8.0, 0.0), 0.25, key="table_density")
    hide_dead = f[2].checkbox("hide dead", value=True, key="table_hide_dead")
    df = base_table(path).copy()
    df.insert(1, "label", [all_labels.get(i, "") for i in range(store.d_sae)])
    ld = np.log10(np.maximum(df["density"].to_numpy(), 1e-12))
    keep = ((ld >= lo) & (ld <= hi)) | ((df["density"] == 0) & (lo <= -8))
    if hide_dead:
        keep &= df["density"].to_numpy() > 0
    if text.strip():
        t = text.strip().lower()
        keep &= df["top tokens"].str.lower().str.contains(t, regex=False) | df["label"].str.lower().str.contains(t, regex=False)
    shown = df[keep].reset_index(drop=True)
    st.session_state["table_frame"] = shown
    st.caption(f"{len(shown):,} of {len(df):,} features · click a column to sort · select a row to open it")
    st.dataframe(shown, key="table", hide_index=True, on_select=lambda: _from_selection("table", frame_key="table_frame"),
                 selection_mode="single-row", height=420,
                 column_config={"density": st.column_config.NumberColumn(format="%.2e"),
                                "max": st.column_config.NumberColumn(format="%.3g"),
                                "mean": st.column_config.NumberColumn(format="%.3g")})
