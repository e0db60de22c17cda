"""Explanations in the browser (from STORE/explanations.sqlite, written by `saekit explain`): a section at the top
of each feature page (the LLM's explanation and its scores; the user's own label stays the feature's name and
wins), matches by explanation text for the Search page, and the Explanations page: every explained feature with its
scores — search, sort and filter by score — and the best- and worst-explained features."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from saekit.apps.common import _from_selection, goto

from saekit.explain import RESULTS, Results
from saekit.features import FeatureStore

SCORE_HELP = ("balanced accuracy of the scorer given this explanation: 0.5 is chance, 1.0 perfect (detection: tell "
              "activating from non-activating excerpts; fuzzing: tell correctly from wrongly marked tokens)")


def _stamp(path: str) -> tuple[float, ...]:
    """Modification times of the results file and its WAL: the cache key that sees a running batch's writes."""
    p = Path(path) / RESULTS
    return tuple(q.stat().st_mtime if q.exists() else 0.0 for q in (p, p.with_name(p.name + "-wal")))


@st.cache_data(show_spinner=False, max_entries=4)
def explained_table(path: str, stamp: tuple[float, ...]) -> pd.DataFrame:
    """One row per explained feature: explanation texts and own-explanation scores (empty without results)."""
    if not (Path(path) / RESULTS).is_file():
        return pd.DataFrame()
    return Results(path, create=False).table()


def _fmt(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{x:.2f}"


def explanation_section(path: str, store: FeatureStore, fid: int, label: str) -> None:
    """Under the feature page's title: the explanation and its scores, when this feature has one."""
    if not (Path(path) / RESULTS).is_file():
        return
    info = Results(path, create=False).feature(fid)
    exps = info["explanations"]
    if not exps:
        return
    own = {(s["explainer"], s["scorer"]): s for s in info["scores"] if s["variant"] == "own"}
    for name in ("llm", "baseline"):
        e = exps.get(name)
        if e is None:
            continue
        scores = " · ".join(f"{kind} {_fmt(own[(name, kind)]['balanced_accuracy'])}"
                            for kind in ("detection", "fuzzing") if (name, kind) in own)
        who = "Explanation (LLM)" if name == "llm" else "Token-profile baseline"
        text = e["text"] if e["text"] is not None else f"(unparseable answer: {e['raw'][:120]!r})"
        st.markdown(f"**{who}:** {text}" + (f"  \n<small>scores: {scores}</small>" if scores else ""),
                    unsafe_allow_html=True, help=SCORE_HELP if scores else None)
    if label:
        st.caption(f"Your label ‘{label}’ names this feature everywhere; the explanation is shown beside it.")
    with st.expander("Scoring details"):
        st.caption(f"LLM: {exps.get('llm', {}).get('llm') or '—'}. ‘shuffled’ rows score this feature's excerpts with "
                   "another feature's explanation: a good explanation scores above them.")
        st.dataframe(pd.DataFrame(info["scores"]), hide_index=True, key=f"explain_scores_{fid}")


def explanation_matches(path: str, query: str) -> pd.DataFrame:
    """Features whose explanation (LLM or baseline) contains the query (any case)."""
    t = explained_table(path, _stamp(path))
    if t.empty or not query:
        return pd.DataFrame()
    text_cols = [c for c in ("llm", "baseline") if c in t.columns]
    hit = pd.concat([t[c].fillna("").str.lower().str.contains(query.lower(), regex=False) for c in text_cols],
                    axis=1).any(axis=1)
    return t[hit].reset_index()


def search_section(path: str, query: str) -> None:
    """The Search page's explanation matches (shown only when the store has explanations)."""
    found = explanation_matches(path, query)
    if found.empty:
        return
    st.subheader("Explanations")
    st.caption(f"{len(found)} features whose explanation contains ‘{query}’ · select a row to open it")
    st.session_state["explain_search_frame"] = found
    st.dataframe(found, hide_index=True, key="explain_search_table", selection_mode="single-row",
                 on_select=lambda: _from_selection("explain_search_table", frame_key="explain_search_frame"))


def explanations_page(path: str, store: FeatureStore, labels) -> None:
    st.title("Explanations")
    t = explained_table(path, _stamp(path))
    if t.empty:
        st.info(f"No explanations yet: run `saekit explain {path} --llm URL` (or --llm local:default).")
        return
    res = Results(path, create=False)
    st.caption(f"{len(t):,} of {store.d_sae:,} features explained · LLM: {res.meta('llm') or '—'} · "
               f"scores: {SCORE_HELP}")
    names = labels.all_labels()
    t = t.reset_index()
    t.insert(1, "label", [names.get(int(i), "") for i in t["feature"]])
    score_cols = [c for c in t.columns if c.endswith(("_detection", "_fuzzing"))]
    c = st.columns([3, 2, 2])
    q = c[0].text_input("Search explanations", key="explain_query", placeholder="e.g. sport")
    by = c[1].selectbox("Sort by", score_cols or ["feature"], key="explain_sort")
    lo, hi = c[2].slider("Score range", 0.0, 1.0, (0.0, 1.0), 0.05, key="explain_range")
    keep = pd.Series(True, index=t.index)
    if q:
        keep &= pd.concat([t[k].fillna("").str.lower().str.contains(q.lower(), regex=False)
                           for k in ("llm", "baseline", "label") if k in t.columns], axis=1).any(axis=1)
    if by in score_cols:
        keep &= t[by].between(lo, hi) | (t[by].isna() & (lo == 0.0))
    shown = t[keep].sort_values(by, ascending=False, na_position="last").reset_index(drop=True)
    if by in score_cols:
        best, worst = st.columns(2)
        for col, title, part in ((best, "Best explained", shown.head(10)),
                                 (worst, "Worst explained", shown.dropna(subset=[by]).tail(10).iloc[::-1])):
            col.subheader(title)
            for _, r in part.iterrows():
                col.button(f"{int(r['feature'])} · {_fmt(r[by])} · {r.get('llm') or r.get('baseline') or ''}"[:120],
                           key=f"explain_{title[:4]}_{int(r['feature'])}", on_click=goto,
                           args=("feature", int(r["feature"])))
    st.subheader("All explained features")
    st.caption(f"{len(shown):,} features match · select a row to open it")
    st.session_state["explain_frame"] = shown
    st.dataframe(shown, hide_index=True, key="explain_table", selection_mode="single-row",
                 on_select=lambda: _from_selection("explain_table", frame_key="explain_frame"),
                 column_config={k: st.column_config.NumberColumn(format="%.2f", help=SCORE_HELP) for k in score_cols})
