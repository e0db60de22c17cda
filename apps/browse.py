"""The feature browser: `saekit browse STORE` runs this script with Streamlit (bound to 127.0.0.1).

Pages (one module each): Overview (density histogram, feature map, feature table), Feature (one latent's
page), Your text (run the model live), Search (by token string, by label/notes). The page and feature id
live in the URL (?page=feature&feature=12). The store comes from $SAEKIT_STORE or `-- --store PATH`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import streamlit as st
from saekit.apps.common import PAGES, SLUG, get_labels, get_store, store_path, sync_url
from saekit.apps.page_feature import feature_page
from saekit.apps.page_overview import overview_page
from saekit.apps.page_search import search_page
from saekit.apps.page_text import text_page

from saekit.errors import SaekitError


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
