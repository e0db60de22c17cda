"""The Overview page: one filter (text, density, dead) over the density histogram, the feature map and the feature
table: the table lists the matching features, the charts draw them over the rest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import _from_selection, base_table, goto, map_figure
from saekit.apps.flow_section import flow_overview
from saekit.apps.labels import Labels

from saekit.features import FeatureStore

PLOTLY_CONFIG = {"displaylogo": False, "scrollZoom": True}


def overview_page(path: str, store: FeatureStore, labels: Labels) -> None:
    man = store.manifest
    density = store.stats["density"]
    all_labels = labels.all_labels()
    st.title("Features")
    st.caption(source_caption(store))
    if quality := quality_caption(man):
        st.caption(quality)
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

    st.subheader("Filter")
    f = st.columns([3, 2, 1])
    text = f[0].text_input("Filter by top token or label", key="table_filter",
                           help="features whose top tokens or label contain this text (any case)")
    lo, hi = f[1].slider("log10 density", -8.0, 0.0, (-8.0, 0.0), 0.25, key="table_density")
    hide_dead = f[2].checkbox("hide dead", value=True, key="table_hide_dead")
    df = base_table(path).copy()
    df.insert(1, "label", [all_labels.get(i, "") for i in range(store.d_sae)])
    keep = matching(df, text, lo, hi, hide_dead)
    live = density > 0

    left, right = st.columns([2, 3])
    left.subheader("Density")
    all_live = bool(keep[live].all())  # the histogram shows live latents only
    left.caption(f"{int(live.sum()):,} live latents, {int((~live).sum()):,} never fired"
                 + ("" if all_live else f"; blue: the {int((keep & live).sum()):,} matching the filter"))
    left.plotly_chart(render.density_figure(density, None if all_live else keep, (lo, hi)),
                      key="density_hist", config=PLOTLY_CONFIG)
    right.subheader("Feature map")
    right.caption(map_caption(man) + " · " + (f"all {store.d_sae:,} features shown" if keep.all() else
                  f"**{int(keep.sum()):,} of {store.d_sae:,} features match the filter** (coloured; the rest grey)")
                  + " · click a point to open its page")
    right.plotly_chart(map_figure(path, labels.stamp(), None if keep.all() else keep), key="map",
                       on_select=lambda: _from_selection("map"), selection_mode="points", config=PLOTLY_CONFIG)

    st.subheader("Feature table")
    shown = df[keep].reset_index(drop=True)
    st.session_state["table_frame"] = shown
    st.caption(f"{len(shown):,} of {len(df):,} features · click a column to sort · select a row to open it")
    st.dataframe(shown, key="table", hide_index=True, on_select=lambda: _from_selection("table", frame_key="table_frame"),
                 selection_mode="single-row", height=420,
                 column_config={"density": st.column_config.NumberColumn(format="%.2e"),
                                "max": st.column_config.NumberColumn(format="%.3g"),
                                "mean": st.column_config.NumberColumn(format="%.3g")})
    flow_overview(store)  # apps/flow_section.py: only when the SAE's set has a flow store


def source_caption(store: FeatureStore) -> str:
    """What the latents are and where they come from: the dictionary, its hook (a transcoder: input → output), the
    model and dataset."""
    man = store.manifest
    if store.is_transcoder:
        where = (f"{store.dictionary} `{man.get('sae_dir', '?')}` · reads the MLP input, writes the MLP output: "
                 f"`{store.hooks_text}` (examples are its encoder's activations on the input; logit effects are of "
                 "what it writes)")
    else:
        where = f"SAE `{man.get('sae_dir', '?')}` · hook `{man.get('hook', '?')}`"
    return " · ".join([where, f"model `{man.get('model', '?')}`", f"dataset `{man.get('dataset', '?')}`"])


def quality_caption(man: dict) -> str:
    """The dictionary's held-out numbers from `saekit eval` (eval.json of these weights), when the store has them: FVU
    of what it predicts (a transcoder: the MLP output), L0 and CE recovered."""
    q = man.get("quality")
    if not q or "fvu" not in q:
        return ""
    parts = [f"FVU of `{q.get('of', man.get('hook', '?'))}` {q['fvu']:.3f}"]
    parts += [f"L0 {q['l0']:.1f}"] if "l0" in q else []
    parts += [f"CE recovered {q['ce_recovered_zero']:.3f}"] if "ce_recovered_zero" in q else []
    tokens = f" on {q['tokens']:,} tokens" if "tokens" in q else ""
    return "held-out evaluation (saekit eval" + tokens + "): " + " · ".join(parts)


def matching(df: pd.DataFrame, text: str, lo: float, hi: float, hide_dead: bool) -> np.ndarray:
    """The filter as a mask over features (the table's rows, the map's coloured points): log10 density in [lo, hi]
    (dead latents count as in range when lo is the slider's floor), alive if `hide_dead`, and top tokens or label
    containing `text` (any case)."""
    d = df["density"].to_numpy()
    ld = np.log10(np.maximum(d, 1e-12))
    keep = ((ld >= lo) & (ld <= hi)) | ((d == 0) & (lo <= -8))
    if hide_dead:
        keep &= d > 0
    if t := text.strip().lower():
        keep &= (df["top tokens"].str.lower().str.contains(t, regex=False)
                 | df["label"].str.lower().str.contains(t, regex=False)).to_numpy()
    return keep


def map_caption(man: dict) -> str:
    """What the map is, and the declared reason when it is PCA (stores before map_note: umap-learn was missing)."""
    method = man.get("map_method", "pca")
    note = man.get("map_note") or ("UMAP of the decoder directions" if method == "umap" else
                                   "PCA: umap-learn was not installed when this store was built (install it and "
                                   "rebuild the store with `saekit analyze` for a UMAP map)")
    recall = man.get("map_neighbour_recall")
    kept = f"; a point's 10 nearest map neighbours hold {recall:.0%} of its 10 nearest decoder neighbours" if recall is not None else ""
    return f"{note}{kept}"
