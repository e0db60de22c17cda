"""What every page of the browser shares: the cached store, labels and live model, the page names, and
navigation (the page and feature id live in the URL, ?page=feature&feature=12, so pages can be bookmarked)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.labels import Labels

from saekit.errors import SaekitError
from saekit.features import FeatureStore

PAGES = {"overview": "Overview", "feature": "Feature", "text": "Your text", "search": "Search",
         "explanations": "Explanations"}  # explanations: apps/explanations.py (saekit explain's results)
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


def run_live(path: str, text: str, button: str):
    """The model and SAE run on `text` now (a LiveResult), or None after saying why not: an empty text box, or a
    model that cannot be loaded. `button` names what the user presses, for the message."""
    if not text.strip():
        st.warning(f"The text box is empty: type some text, then press {button}.")
        return None
    try:
        return get_live(path).run(text)
    except SaekitError as e:
        st.error(str(e))
        return None


@st.cache_resource(show_spinner=False)
def base_table(path: str) -> pd.DataFrame:
    store = get_store(path)
    s = store.stats
    return pd.DataFrame({
        "feature": np.arange(store.d_sae), "density": s["density"], "fires": s["count"], "max": s["act_max"],
        "mean": s["mean"], "top tokens": [store.top_tokens_text(i) for i in range(store.d_sae)],
    })


@st.cache_resource(show_spinner=False, max_entries=2)
def map_figure(path: str, stamp: tuple[int, int], highlight: np.ndarray | None = None):
    """The feature map (tens of thousands of points): rebuilt only when a label or the highlighted set changes."""
    store = get_store(path)
    names = get_labels(path, store.manifest.get("sae_weights_sha256")).all_labels()
    tops = base_table(path)["top tokens"]
    hover = [f"#{i} · {tops[i]}" + (f" · {names[i]}" if i in names else "") for i in range(store.d_sae)]
    return render.map_figure(store.stats["map_xy"], store.stats["density"], hover, store.manifest.get("map_method", "pca"),
                             highlight)


# ----------------------------------------------------------------------------- navigation

def goto(page: str, feature: int | None = None) -> None:
    """Widget callback: runs before the next script run, so it may set the widgets' state."""
    st.session_state["nav"] = PAGES[page]
    st.session_state.pop("url_problem", None)  # the reader moved on from a bad URL
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


def parse_url(page: str | None, feature: str | None, d_sae: int) -> tuple[str, int | None, str | None]:
    """(page, feature id, problem) from the URL's ?page= and ?feature=. A bad value is never mapped to a
    neighbour (feature 99999 is not shown as the last feature): it comes back as a problem to show, saying what
    is wrong and what exists. No page means the overview; the feature page without a feature opens feature 0."""
    asked = page or "overview"
    page = asked.strip().lower()
    if page not in PAGES:
        return "overview", None, f"There is no page {asked!r} — pages: {', '.join(PAGES)}."
    if page != "feature" or feature is None:
        return page, 0 if page == "feature" else None, None
    try:
        fid = int(feature.strip())
    except ValueError:
        return page, None, f"{feature!r} is not a feature id: the store's features are numbered 0–{d_sae - 1}."
    if not 0 <= fid < d_sae:
        return page, None, f"Feature {fid} does not exist: the store's features are numbered 0–{d_sae - 1}."
    return page, fid, None


def sync_url(d_sae: int) -> None:
    """The URL sets the page and feature on a session's first run (a bad one leaves a `url_problem` for the
    page to show); afterwards the session's state sets the URL."""
    if "nav" in st.session_state:
        return
    qp = st.query_params
    page, fid, problem = parse_url(qp.get("page"), qp.get("feature"), d_sae)
    st.session_state["nav"] = PAGES[page]
    if fid is not None:
        st.session_state["feature_id"] = fid
    if problem:
        st.session_state["url_problem"] = problem


def feature_label(labels: dict[int, str], i: int) -> str:
    return f"#{i}" + (f" · {labels[i]}" if labels.get(i) else "")


def feature_name(store: FeatureStore, labels: dict[int, str], i: int) -> str:
    """"#12 · its label", or "#12 · its top tokens" when it has no label."""
    from saekit.tokens import display_token

    tops = [display_token(store.vocab.token_str(t)) for t in store.stats["top_tokens"][i][:3] if t >= 0]
    return render.feature_name(i, labels.get(i, ""), tops)
