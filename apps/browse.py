"""The feature browser: `saekit browse STORE` runs this script with Streamlit (bound to 127.0.0.1).

Pages (one module each): Overview (density histogram, feature map, feature table), Feature (one latent's
page), Your text (run the model live), Search (by token string, by label/notes), and Graph (attribution graphs)
when `--graphs DIR` is given. The page and feature id live in the URL (?page=feature&feature=12; the graph's name:
?page=graph&graph=NAME). The store comes from $SAEKIT_STORE or `-- --store PATH`, the graphs from $SAEKIT_GRAPHS
or `-- --graphs DIR`. The store may be a set of stores (one per SAE of a set): a sidebar picker chooses the SAE,
and the URL carries it (?sae=HOOK&page=feature&feature=12), see apps/set_picker.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import streamlit as st
from saekit.apps.common import PAGES, SLUG, get_labels, get_store, goto, store_path, sync_url
from saekit.apps.explanations import explanations_page
from saekit.apps.page_feature import feature_page
from saekit.apps.page_graph import graph_page, graphs_root, remember_url
from saekit.apps.page_overview import overview_page
from saekit.apps.page_search import search_page
from saekit.apps.page_text import text_page
from saekit.apps.set_picker import pick_store, url_of_pick

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


def list_graph_page(on: bool) -> None:
    """The Graph page exists only when --graphs names graphs: added to (or taken from) the page table that the
    sidebar and the URL check read (the table is shared by every session of the server, and so is --graphs)."""
    if on:
        PAGES["graph"], SLUG["Graph"] = "Graph", "graph"
    else:
        PAGES.pop("graph", None), SLUG.pop("Graph", None)


def main() -> None:
    st.set_page_config(page_title="saekit features", layout="wide")
    graphs = graphs_root()
    list_graph_page(graphs is not None)
    st.set_option("client.toolbarMode", "minimal")  # a local tool: no Deploy button (serve.py passes it too)
    path = str(pick_store(store_path()).resolve())  # a set of stores: the sidebar's SAE picker chooses one
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
    if graphs is not None:
        remember_url()
        for key in [k for k in st.session_state if str(k).startswith("graph_")]:  # the Graph page's widgets keep
            st.session_state[key] = st.session_state[key]  # their values while another page is shown
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
    st.query_params.from_dict({**url_of_pick(), "page": page,
                               **({"feature": str(fid)} if page == "feature" and fid is not None else {}),
                               **({"graph": st.session_state["graph_pick"]}
                                  if page == "graph" and st.session_state.get("graph_pick") else {})})
    if page == "feature" and fid is None:
        st.info(f"Type a feature id (0–{store.d_sae - 1}) in the sidebar.")
        return
    render_page = {"overview": overview_page, "feature": feature_page, "text": text_page, "search": search_page,
                   "graph": graph_page, "explanations": explanations_page}[page]
    try:
        render_page(path, store, labels)
    except SaekitError as e:  # one page fails (a file damaged since the store opened, a model that won't load):
        st.error(f"The {PAGES[page]} page could not be shown: {e}")  # the sidebar and other pages still work
        st.caption("The other pages may still work: pick one in the sidebar.")


main()
