"""The feature browser: `saekit browse STORE` runs this script with Streamlit (bound to 127.0.0.1).

Pages (one module each): Overview (density histogram, feature map, feature table), Feature (one latent's
page), Your text (run the model live), Search (by token string, by label/notes). The page and feature id
live in the URL (?page=feature&feature=12). The store comes from $SAEKIT_STORE or `-- --store PATH`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import streamlit as st
from saekit.apps.common import PAGES, SLUG, get_labels, get_store, goto, store_path, sync_url
from saekit.apps.page_feature import feature_page
from saekit.apps.page_overview import overview_page
from saekit.apps.page_search import search_page
from saekit.apps.page_text import text_page

from saekit.errors import SaekitError
from saekit.features import FeatureStore


def _moved() -> None:
    """on_change of the sidebar widgets: the reader left the bad address behind."""
    st.session_state.pop("url_problem", None)


def url_problem_page(problem: str, store: FeatureStore) -> None:
    """What a bad address (?page=foo, ?feature=99999) gets instead of another page passed off as the one asked for."""
    st.title("Nothing at this address")
    st.error(problem)
    last = store.d_sae - 1
    if st.session_state["nav"] == PAGES["feature"]:
        st.caption(f"Type a feature id (0–{last}) in the sidebar, or:")
        c = st.columns(3)
        c[0].button("Open feature 0", key="url_open_first", on_click=goto, args=("feature", 0))
        c[1].button(f"Open feature {last} (the last)", key="url_open_last", on_click=goto, args=("feature", last))
        c[2].button("Open the overview", key="url_open_overview", on_click=goto, args=("overview",))
    else:
        st.caption("Open one of the pages:")
        for col, (slug, name) in zip(st.columns(len(PAGES)), PAGES.items()):
            col.button(name, key=f"url_open_{slug}", on_click=goto, args=(slug,))


def main() -> None:
    st.set_page_config(page_title="saekit features", layout="wide")
    st.set_option("client.toolbarMode", "minimal")  # a local tool: no Deploy button (serve.py passes it too)
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
    if "feature_id" in st.session_state:  # keep the id while the Feature page (and its box) is not shown
        st.session_state["feature_id"] = st.session_state["feature_id"]
    with st.sidebar:
        st.radio("Page", list(PAGES.values()), key="nav", on_change=_moved)
        page = SLUG[st.session_state["nav"]]
        if page == "feature":  # the other pages have no use for a feature id
            # a bad ?feature= leaves the box empty rather than showing some other id; otherwise it starts at 0
            empty = {"value": None} if "url_problem" in st.session_state and "feature_id" not in st.session_state else {}
            st.number_input("Feature", min_value=0, max_value=store.d_sae - 1, step=1, key="feature_id",
                            on_change=_moved, placeholder=f"0–{store.d_sae - 1}", **empty)
        st.caption(f"store `{path}`")
    if problem := st.session_state.get("url_problem"):  # the address stays as typed until the reader moves on
        url_problem_page(problem, store)
        return
    fid = st.session_state.get("feature_id")
    st.query_params.from_dict({"page": page, **({"feature": str(fid)} if page == "feature" and fid is not None else {})})
    if page == "feature" and fid is None:
        st.info(f"Type a feature id (0–{store.d_sae - 1}) in the sidebar.")
        return
    render_page = {"overview": overview_page, "feature": feature_page, "text": text_page, "search": search_page}[page]
    try:
        render_page(path, store, labels)
    except SaekitError as e:  # one page fails (a file damaged since the store opened, a model that won't load):
        st.error(f"The {PAGES[page]} page could not be shown: {e}")  # the sidebar and other pages still work
        st.caption("The other pages may still work: pick one in the sidebar.")


main()
