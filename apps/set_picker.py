"""The sidebar's SAE picker when `saekit browse SET` names a set of stores (apps/set_stores.py finds them): it
switches the store every page shows, and the URL carries it (?sae=HOOK&feature=N; ?feature=HOOK:N works too,
feature ids across a set being `hook:latent`). A single store has no picker and browses as before."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from saekit.apps.common import get_store, goto, store_path
from saekit.apps.set_stores import analyze_commands, is_store, open_set, saes_without_store

from saekit.errors import SaekitError

# what survives a switch of SAE: the page, the feature id, the typed text and the Graph page (not tied to a
# store); everything else (results, labels being edited, a live run of the other SAE) belongs to the old store
_KEPT = ("nav", "sae_pick", "feature_id", "feature_test_text")
_KEPT_PREFIXES = ("graph", "gbtn", "gchart", "gdf")


@st.cache_data(ttl=30, show_spinner=False)  # a store built while the app runs shows up within 30 s
def set_stores(root: str) -> dict[str, str]:
    return {hook: str(path) for hook, path in open_set(root).items()}


@st.cache_data(ttl=30, show_spinner=False)
def _lacking(root: str, hooks: tuple[str, ...]) -> list[tuple[str, Path]]:
    return saes_without_store(Path(root), dict.fromkeys(hooks, Path()))


def browsed_set() -> dict[str, str]:
    """{hook: store} of the browsed set, or {} when one store is browsed."""
    root = store_path()
    return {} if is_store(root) else set_stores(str(root.resolve()))


def _clamp_feature(store: str) -> None:
    try:
        d_sae = get_store(store).d_sae
    except SaekitError:  # the page says what is wrong with the store
        return
    if st.session_state.get("feature_id", 0) >= d_sae:
        st.session_state.pop("feature_id")


def _switched(stores: dict[str, str]) -> None:
    """on_change of the picker (and first step of goto_node): drop what belongs to the previous store."""
    for key in [k for k in st.session_state if k not in _KEPT and not str(k).startswith(_KEPT_PREFIXES)]:
        del st.session_state[key]  # url_problem too: the reader moved on
    _clamp_feature(stores[st.session_state["sae_pick"]])


def goto_node(stores: dict[str, str], hook: str, latent: int) -> None:
    """Widget callback: open feature `latent` of the SAE on `hook` in that SAE's store."""
    st.session_state["sae_pick"] = hook
    _switched(stores)
    goto("feature", latent)


def _sync_url(hooks: list[str]) -> None:
    """The URL picks the SAE on a session's first run; a hook the set lacks is a problem saying which it has."""
    sae, feature = st.query_params.get("sae"), st.query_params.get("feature")
    if feature and ":" in feature:  # hook:latent — the latent goes on to the page's own URL check
        sae, st.query_params["feature"] = feature.rsplit(":", 1)
    st.session_state["sae_pick"] = hooks[0]
    if sae is None:
        return
    if sae.strip() in hooks:
        st.session_state["sae_pick"] = sae.strip()
    else:
        st.session_state["url_problem"] = f"There is no SAE {sae!r} in this set — its SAEs: {', '.join(hooks)}."


def pick_store(root: Path) -> Path:
    """The store the pages show: `root` itself when it is a store, else the one picked in the sidebar among the
    set's stores (a set without any says which SAEs lack one and the command that builds it, and stops)."""
    if is_store(root):
        return root
    try:
        stores = set_stores(str(root.resolve()))
    except SaekitError as e:
        st.error(f"Cannot browse the set: {e}")
        st.stop()
    hooks = list(stores)
    if "sae_pick" not in st.session_state or st.session_state["sae_pick"] not in stores:
        _sync_url(hooks)
    with st.sidebar:
        st.selectbox("SAE", hooks, key="sae_pick", on_change=_switched, args=(stores,),
                     help=f"The set's {len(hooks)} feature stores, in layer order.")
        if lacking := _lacking(str(root.resolve()), tuple(hooks)):
            st.caption(f"No store yet for {', '.join(h for h, _ in lacking)}: build with\n\n```\n"
                       f"{analyze_commands(lacking).strip()}\n```")
    return Path(stores[st.session_state["sae_pick"]])


def url_of_pick() -> dict[str, str]:
    """The picked SAE for the page's URL ({} for a single store)."""
    return {"sae": st.session_state["sae_pick"]} if "sae_pick" in st.session_state else {}
