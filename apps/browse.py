"""The feature browser: `saekit browse STORE` runs this script with Streamlit (bound to 127.0.0.1).

Pages: Overview (density histogram, feature map, feature table), Feature (one latent's page), Your text
(run the model live), Search (by token string, by label/notes). The page and feature id live in the
URL (?page=feature&feature=12), so pages can be bookmarked and linked. The store comes from
$SAEKIT_STORE or `-- --store PATH`.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.labels import Conflict, Labels
from saekit.apps.steering_panel import steering_panel

from saekit.errors import SaekitError
from saekit.features import FeatureStore
from saekit.tokens import display_token

PAGES = {"overview": "Overview", "feature": "Feature", "text": "Your text", "search": "Search"}
SLUG = {v: k for k, v in PAGES.items()}


def store_path() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store")
    args, _ = parser.parse_known_args(sys.argv[1:])
    path = args.store or os.environ.get("SAEKIT_STORE")
    if not path:
        st.error("No feature store given: run `saekit browse STORE` (or set SAEKIT_STORE).")
        st.stop()
    return Path(path)


@st.cache_resource(show_spinner=False)
def get_store(path: str) -> FeatureStore:
    return FeatureStore(path)


@st.cache_resource(show_spinner=False)
def get_labels(path: str, sae_hash: str | None) -> Labels:
    return Labels(path, sae_hash)


@st.cache_resource(show_spinner="loading the model and SAE …")
def get_live(path: str):
    from saekit.apps.live import LiveModel

    return LiveModel(get_store(path))


@st.cache_resource(show_spinner=False)
def base_table(path: str) -> pd.DataFrame:
    store = get_store(path)
    s = store.stats
    return pd.DataFrame({
        "feature": np.arange(store.d_sae), "density": s["density"], "fires": s["count"], "max": s["act_max"],
        "mean": s["mean"], "top tokens": [store.top_tokens_text(i) for i in range(store.d_sae)],
    })


@st.cache_resource(show_spinner=False, max_entries=2)
def map_figure(path: str, stamp: tuple[int, int]):
    """The feature map (tens of thousands of points): rebuilt only when a label changes."""
    store = get_store(path)
    names = get_labels(path, store.manifest.get("sae_weights_sha256")).all_labels()
    tops = base_table(path)["top tokens"]
    hover = [f"#{i} · {tops[i]}" + (f" · {names[i]}" if i in names else "") for i in range(store.d_sae)]
    return render.map_figure(store.stats["map_xy"], store.stats["density"], hover, store.manifest.get("map_method", "pca"))


# ----------------------------------------------------------------------------- navigation

def goto(page: str, feature: int | None = None) -> None:
    """Widget callback: runs before the next script run, so it may set the widgets' state."""
    st.session_state["nav"] = PAGES[page]
    if feature is not None:
        st.session_state["feature_id"] = int(feature)


def _from_selection(key: str, page: str = "feature", column: str | None = None, frame_key: str | None = None):
    """on_select callback of a chart or table: open the selected feature."""
    sel = st.session_state.get(key, {}).get("selection", {})
    if sel.get("points"):
        point = sel["points"][0]
        fid = point.get("customdata", point.get("point_index"))
        goto(page, int(fid[0] if isinstance(fid, list) else fid))
    elif sel.get("rows") and frame_key:
        frame = st.session_state.get(frame_key)
        if frame is not None and sel["rows"][0] < len(frame):
            goto(page, int(frame.iloc[sel["rows"][0]][column or "feature"]))


def sync_url(d_sae: int) -> None:
    """The URL sets the page on a session's first run; afterwards the session's state sets the URL."""
    qp = st.query_params
    if "nav" not in st.session_state:
        st.session_state["nav"] = PAGES.get(qp.get("page", "overview"), "Overview")
        try:
            st.session_state["feature_id"] = min(max(int(qp.get("feature", 0)), 0), d_sae - 1)
        except ValueError:
            st.session_state["feature_id"] = 0


def feature_label(labels: dict[int, str], i: int) -> str:
    return f"#{i}" + (f" · {labels[i]}" if labels.get(i) else "")


# ----------------------------------------------------------------------------- pages

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


def feature_page(path: str, store: FeatureStore, labels: Labels) -> None:
    fid = int(st.session_state.get("feature_id", 0))
    f = store.feature(fid)
    entry = labels.get(fid)
    st.title(f"Feature {fid}" + (f" — {entry.label}" if entry.label else ""))
    c = st.columns(4)
    c[0].metric("density", f"{f.density:.3%}", help=f"fires on {f.count:,} of {f.tokens:,} tokens")
    c[1].metric("fires", f"{f.count:,}")
    c[2].metric("max activation", f"{f.max:.3g}")
    c[3].metric("mean activation", f"{f.mean:.3g}", help="over the tokens it fires on")
    special = {int(i) for i in np.nonzero(store.vocab.special)[0]}

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Top activations")
        if f.top:
            st.markdown(render.examples_html(f.top, f.max, special), unsafe_allow_html=True)
        else:
            st.info("This latent never fired on the analysed tokens.")
        if f.groups:
            st.subheader("Quantile groups")
            st.caption("Each band holds an equal share of the latent's firings; examples are sampled at random within it.")
            for g in f.groups:
                with st.expander(f"{g.q_lo:.0%}–{g.q_hi:.0%} of firings · activation {g.lo:.3g} – "
                                 f"{'max' if g.hi == float('inf') else format(g.hi, '.3g')} · {len(g.examples)} shown",
                                 expanded=g.q_hi >= 1.0):
                    if g.examples:
                        st.markdown(render.examples_html(g.examples, f.max, special), unsafe_allow_html=True)
                    else:
                        st.caption("no sampled example in this band")
    with right:
        st.plotly_chart(render.hist_figure(f), key=f"hist_{fid}")
        st.subheader("Logit effects")
        st.caption("(W_dec[f] ⊙ final-norm weight) · W_U: tokens this direction promotes and suppresses.")
        lc = st.columns(2)
        lc[0].dataframe(pd.DataFrame({"promoted": [display_token(t) for _, t, _ in f.logits_top],
                                      "logit": [v for _, _, v in f.logits_top]}), hide_index=True, key="logits_top")
        lc[1].dataframe(pd.DataFrame({"suppressed": [display_token(t) for _, t, _ in f.logits_bottom],
                                      "logit": [v for _, _, v in f.logits_bottom]}), hide_index=True, key="logits_bottom")
        st.subheader("Token profile")
        st.caption("Tokens it fires on, ranked by the harmonic mean of its rate on the token (fires / occurrences, "
                   "normalised by token frequency) and the share of its firings on the token.")
        st.dataframe(pd.DataFrame([{"token": display_token(p["string"]), "fires": p["fires"], "occurrences": p["token_count"],
                                    "rate": p["rate"], "share": p["share"], "mean act": p["mean_act"]} for p in f.profile]),
                     hide_index=True, key="profile")
        st.subheader("Neighbours")
        st.caption("Latents with the most similar decoder direction (cosine).")
        names = labels.all_labels()
        for j, cos in f.neighbours:
            st.button(f"{feature_label(names, j)} · cos {cos:.2f} · {store.top_tokens_text(j)}", key=f"nb_{j}",
                      on_click=goto, args=("feature", j))

    st.subheader("Label and notes")
    if labels.sae_hash and labels.sae_hash != store.manifest.get("sae_weights_sha256"):
        st.warning("These labels were written for different SAE weights (the store was rebuilt from another SAE).")
    with st.form(key=f"label_form_{fid}"):
        label = st.text_input("Label", value=entry.label, key=f"label_{fid}")
        notes = st.text_area("Notes", value=entry.notes, key=f"notes_{fid}")
        if st.form_submit_button("Save"):
            try:
                labels.save(fid, label, notes, expected_version=entry.version)
                st.success("Saved.")
                st.rerun()
            except Conflict as e:
                st.error(f"Not saved: another session changed this feature meanwhile (now “{e.current.label}”). "
                         "Reload the page to see it, then edit again.")

    # Steering panel: rendered by apps/steering_panel.py.
    steering_panel(store, fid, live=lambda: get_live(path))  # shares the page's model and SAE


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


# ----------------------------------------------------------------------------- main

def main() -> None:
    st.set_page_config(page_title="saekit features", layout="wide")
    path = str(store_path().resolve())
    try:  # FeatureStore checks every file's header: a missing or damaged store is reported here, once
        store = get_store(path)
    except SaekitError as e:
        st.error(f"Cannot open the feature store: {e}")
        st.stop()
    try:
        labels = get_labels(path, store.manifest.get("sae_weights_sha256"))
    except sqlite3.Error as e:
        st.error(f"Cannot open the labels database {Path(path) / 'labels.sqlite'} ({e}). If the store's directory "
                 "is read-only, copy the store somewhere writable and browse the copy; if the file is damaged, "
                 "move it aside (it holds your labels and notes) and reload to start an empty one.")
        st.stop()
    sync_url(store.d_sae)
    with st.sidebar:
        st.radio("Page", list(PAGES.values()), key="nav")
        st.number_input("Feature", min_value=0, max_value=store.d_sae - 1, step=1, key="feature_id")
        st.caption(f"store `{path}`")
    page = SLUG[st.session_state["nav"]]
    st.query_params.from_dict({"page": page, **({"feature": str(st.session_state["feature_id"])} if page == "feature" else {})})
    render_page = {"overview": overview_page, "feature": feature_page, "text": text_page, "search": search_page}[page]
    try:
        render_page(path, store, labels)
    except SaekitError as e:  # one page fails (a file damaged since the store opened, a model that won't load):
        st.error(f"The {PAGES[page]} page could not be shown: {e}")  # the sidebar and other pages still work
        st.caption("The other pages may still work: pick one in the sidebar.")


main()
