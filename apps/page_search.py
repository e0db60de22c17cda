"""The Search page: one box over token profiles, top logit tokens, labels and notes; a row opens its feature."""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import _from_selection
from saekit.apps.explanations import search_section
from saekit.apps.labels import Labels

from saekit.features import Example, FeatureStore
from saekit.tokens import display_token

COLUMNS = {  # column → its help in the table header
    "feature": "Click a row to open the feature.",
    "label": "Your label for the feature.",
    "matched in": "Where the query matched: token profile (tokens it fires on), logit tokens (tokens it promotes), "
                  "label, notes; “(substring)”: only inside a longer word.",
    "tokens": "The matched tokens, the one that ranks the row first.",
    "score": "Token-profile score of that token: harmonic mean of rate = fires / (occurrences + prior) and share = "
             "fires / the feature's firings. Rows rank by it (whole-word matches first; blank: no profile match).",
    "fires / occurrences": "The feature's firings on that token / the token's occurrences in the analysed tokens.",
    "logit": "The matched token's logit effect (W_dec·W_U): only when the match came from the top logit tokens, "
             "blank otherwise.",
    "top tokens": "The feature's top token-profile tokens.",
    "max act": "The feature's largest activation in the analysed tokens.",
    "best example": "Its highest-activating context; «» marks the token.",
}


def snippet(ex: Example | None, before: int = 8, after: int = 4) -> str:
    """The example's tokens around its focus as one line, the focus token in «»."""
    if ex is None:
        return ""
    f, pieces = ex.focus, ex.pieces
    focus = pieces[f] or "∅"  # the first bytes of a character that ends in the next token
    text = "".join(pieces[max(0, f - before): f]) + f"«{focus}»" + "".join(pieces[f + 1: f + 1 + after])
    return render.visible(text).strip()


def word_in(query: str, text: str) -> bool:
    """`query` occurs in `text` as whole words (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(query)}(?!\w)", text, re.IGNORECASE) is not None


def search_page(path: str, store: FeatureStore, labels: Labels) -> None:
    st.title("Search")
    c = st.columns([4, 1, 1])
    q = c[0].text_input("Search token profiles, top logit tokens, labels and notes", key="search_query",
                        placeholder="a word, e.g. bank")
    min_count = int(c[1].number_input(
        "min occurrences", min_value=1, value=5, step=1, key="search_min_count",
        help="A token-profile match counts only if the token occurs at least this often in the analysed tokens "
             "(a token seen twice makes any feature look specific to it). Logit tokens come from the weights: "
             "no minimum applies to them."))
    substring = c[2].toggle("substring", key="search_substring",
                            help="Also match tokens, labels and notes that only contain the query inside a longer "
                                 "word (“transport” for “sport”). Whole-word matches still come first.")
    query = q.strip()
    if not query:
        st.caption("A token matches a word when, without its leading space and case, it equals the word.")
        return
    found = store.search_tokens(query, substring=substring, min_count=min_count)
    rows = {h.feature: {"feature": h.feature, "whole": h.whole_word, "matched in": list(h.source),
                        "tokens": " · ".join(display_token(t) for t in h.tokens),
                        "score": h.score, "fires / occurrences": "" if h.fires is None else f"{h.fires} / {h.occurrences}",
                        "logit": "" if h.logit is None else f"{h.logit:+.3f}"} for h in found.hits}
    for e in labels.search(query):
        where = [n for n, text in (("label", e.label), ("notes", e.notes)) if word_in(query, text)]
        whole = bool(where)
        if not whole and not substring:
            continue
        where = where or [n for n, text in (("label", e.label), ("notes", e.notes)) if query.lower() in text.lower()]
        r = rows.setdefault(e.feature, {"feature": e.feature, "whole": whole, "matched in": [], "tokens": "",
                                        "score": None, "fires / occurrences": "", "logit": ""})
        r["matched in"] = where + r["matched in"]
        r["whole"] |= whole
    # whole-word first; within, labels and notes (your own words) first, then by profile score, then the rest
    order = sorted(rows.values(), key=lambda r: (not r["whole"], not ({"label", "notes"} & set(r["matched in"])),
                                                 r["score"] is None, -(r["score"] or 0.0), r["feature"]))
    names = labels.all_labels()  # one query, not one connection per hit
    for r in order:
        i = r["feature"]
        r["label"] = names.get(i, "")
        r["matched in"] = " + ".join(r["matched in"]) + ("" if r.pop("whole") else " (substring)")
        r["score"] = "" if r["score"] is None else f"{r['score']:.3f}"  # text: a blank cell, not “None”
        r["top tokens"] = store.top_tokens_text(i)
        r["max act"] = float(store.stats["act_max"][i])
        r["best example"] = snippet(store.best_example(i))
    frame = pd.DataFrame(order, columns=list(COLUMNS))

    tokens = ", ".join(f"{display_token(s)} ({n:,}×)" for s, n, whole in found.vocab if whole or substring)
    st.caption(f"{len(frame)} features · click a row to open it. "
               + (f"Matching tokens (occurrences): {tokens}. " if tokens else "No token matches the query as a word. ")
               + (f"{found.below_min} features matched only tokens seen fewer than {min_count} times. "
                  if found.below_min else ""))
    if not substring and (inside := [s for s, _, whole in found.vocab if not whole]):
        st.caption(f"{len(inside)} more tokens contain it inside a word (e.g. "
                   f"{', '.join(display_token(s) for s in inside[:4])}): turn on substring to include them.")
    st.session_state["search_frame"] = frame
    st.dataframe(frame, hide_index=True, key="search_table", selection_mode="single-row",
                 on_select=lambda: _from_selection("search_table", frame_key="search_frame"),
                 column_config={k: st.column_config.Column(help=h) for k, h in COLUMNS.items()}
                 | {"max act": st.column_config.NumberColumn(help=COLUMNS["max act"], format="%.3g")})
    search_section(path, query)  # apps/explanations.py: features whose explanation holds the query
