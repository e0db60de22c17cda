"""The Feature page: one latent's label and notes (editable in place), a test on the user's text, examples,
histogram, logit effects, token profile, neighbours, and steering."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import feature_label, get_live, goto, run_live
from saekit.apps.explanations import explanation_section
from saekit.apps.flow_section import flow_section
from saekit.apps.labels import Conflict, Entry, Labels
from saekit.apps.steering_panel import steering_panel

from saekit.features import Example, Feature, FeatureStore
from saekit.tokens import display_token


def feature_page(path: str, store: FeatureStore, labels: Labels) -> None:
    fid = int(st.session_state.get("feature_id", 0))
    f = store.feature(fid)
    entry = labels.get(fid)
    st.title(f"Feature {fid}" + (f" — {entry.label}" if entry.label else ""))
    if store.is_transcoder:
        st.caption(f"A {store.dictionary} latent (`{store.hooks_text}`): it reads the MLP's input and writes into its "
                   "output. Activations are its encoder's, on the MLP input.")
    label_header(store, labels, fid, entry)
    explanation_section(path, store, fid, entry.label)  # apps/explanations.py: only when `saekit explain` ran
    c = st.columns(4)
    c[0].metric("density", f"{f.density:.3%}", help=f"fires on {f.count:,} of {f.tokens:,} tokens")
    c[1].metric("fires", f"{f.count:,}")
    c[2].metric("max activation", f"{f.max:.3g}")
    c[3].metric("mean activation", f"{f.mean:.3g}", help="over the tokens it fires on")
    special = {int(i) for i in np.nonzero(store.vocab.special)[0]}
    try_on_text(path, f, special)

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Top activations")
        if f.top:
            st.markdown(render.examples_html(f.top, f.max, special), unsafe_allow_html=True)
        else:
            st.info("This latent never fired on the analysed tokens.")
        if f.groups:
            st.subheader("Quantile groups")
            st.caption("Each band holds an equal share of the latent's firings; examples are sampled at random within "
                       "it. One band is drawn at a time (the page stays quick with thousands of tokens per band).")
            names = [f"{g.q_lo:.0%}–{g.q_hi:.0%}" for g in f.groups]
            pick = st.segmented_control("Band of firings", names, default=names[-1], key=f"band_{fid}")
            g = f.groups[names.index(pick) if pick in names else -1]
            st.caption(f"activation {g.lo:.3g} – {'max' if g.hi == float('inf') else format(g.hi, '.3g')} · "
                       f"{len(g.examples)} examples")
            if g.examples:
                st.markdown(render.examples_html(g.examples, f.max, special), unsafe_allow_html=True)
            else:
                st.caption("no sampled example in this band")
    with right:
        st.plotly_chart(render.hist_figure(f), key=f"hist_{fid}")
        st.subheader("Logit effects")
        st.caption("(W_dec[f] ⊙ final-norm weight) · W_U: tokens this direction promotes and suppresses."
                   + (f" W_dec[f] is what the {store.dictionary} latent adds to the MLP output, and so to the residual "
                      "stream." if store.is_transcoder else ""))
        lc = st.columns(2)
        lc[0].dataframe(pd.DataFrame({"promoted": [display_token(t) for _, t, _ in f.logits_top],
                                      "logit": [v for _, _, v in f.logits_top]}), hide_index=True, key="logits_top")
        lc[1].dataframe(pd.DataFrame({"suppressed": [display_token(t) for _, t, _ in f.logits_bottom],
                                      "logit": [v for _, _, v in f.logits_bottom]}), hide_index=True, key="logits_bottom")
        st.subheader("Token profile")
        st.caption("Tokens it fires on, ranked by the harmonic mean of its rate on the token (fires / occurrences, "
                   "normalised by token frequency) and the share of its firings on the token.")
        frame, columns = render.profile_table(f.profile)
        st.dataframe(frame, column_config=columns, hide_index=True, key="profile")
        st.subheader("Neighbours")
        st.caption("Latents with the most similar decoder direction (cosine).")
        names = labels.all_labels()
        for j, cos in f.neighbours:
            st.button(f"{feature_label(names, j)} · cos {cos:.2f} · {store.top_tokens_text(j)}", key=f"nb_{j}",
                      on_click=goto, args=("feature", j))

    flow_section(store, fid)  # apps/flow_section.py: only when the SAE's set has a flow store

    # Steering panel: rendered by apps/steering_panel.py.
    steering_panel(store, fid, live=lambda: get_live(path))  # shares the page's model and SAE


# ----------------------------------------------------------------------------- label and notes, near the title

def _save_label(labels: Labels, fid: int, expected_version: int) -> None:
    """The Save button's callback: it runs before the next script run, so the title and the confirmation
    show the saved label on that very run (no st.rerun that would wipe a message)."""
    label, notes = st.session_state[f"label_{fid}"], st.session_state[f"notes_{fid}"]
    try:
        saved = labels.save(fid, label, notes, expected_version=expected_version)
    except Conflict as e:
        st.session_state["label_status"] = {"feature": fid, "conflict": e.current}
        return
    st.session_state["label_status"] = {"feature": fid, "saved": saved}
    st.session_state[f"label_popover_{fid}"] = False  # saved: close the editor (after a conflict it stays open)


def label_header(store: FeatureStore, labels: Labels, fid: int, entry: Entry) -> None:
    """The label and notes under the title, an Edit popover beside them, and what the last Save did."""
    left, right = st.columns([6, 1], vertical_alignment="center")
    with left:
        notes = " ".join(entry.notes.split())  # one line: the full notes are in Edit label
        st.caption(("" if entry.label else "No label yet: Edit label names what it fires on. ")
                   + (f"Notes: {notes[:200]}{'…' if len(notes) > 200 else ''}" if notes else "No notes."))
        if labels.sae_hash and labels.sae_hash != store.manifest.get("sae_weights_sha256"):
            st.warning("These labels were written for different SAE weights (the store was rebuilt from another SAE).")
    with right.popover("Edit label", icon=":material/edit:", width="stretch", key=f"label_popover_{fid}",
                       on_change="rerun"):
        with st.form(key=f"label_form_{fid}", border=False):
            st.text_input("Label", value=entry.label, key=f"label_{fid}")
            st.text_area("Notes", value=entry.notes, key=f"notes_{fid}")
            st.form_submit_button("Save", type="primary", on_click=_save_label, args=(labels, fid, entry.version))
    status = st.session_state.get("label_status") or {}
    if status.get("feature") != fid:
        return
    if (saved := status.get("saved")) and saved.version == entry.version:  # until someone saves again
        at = time.strftime("%H:%M", time.localtime(saved.updated_at))
        st.success(f"Saved label ‘{saved.label}’ at {at}." if saved.label else f"Saved (no label) at {at}.")
    elif current := status.get("conflict"):
        st.error(f"Not saved: another session changed this feature meanwhile (now ‘{current.label}’, shown above). "
                 "Your text is still in Edit label: Save again to replace theirs with it.")


# ----------------------------------------------------------------------------- this feature on the user's text

def try_on_text(path: str, f: Feature, special: set[int]) -> None:
    """A text box that runs the model and SAE now and colours the text by this feature's activation
    (the last text run stays, so opening another feature shows that one on it)."""
    with st.form("feature_test_form", border=False):
        c = st.columns([6, 1], vertical_alignment="bottom")
        text = c[0].text_input("Test this feature on your text", key="feature_test_text",
                               placeholder="Type a text and press Enter to see where this feature fires")
        if c[1].form_submit_button("Test", key="feature_test_run", width="stretch"):
            if (res := run_live(path, text, "Test")) is None:
                return
            st.session_state["feature_test"] = res
    if "feature_test" not in st.session_state:
        return
    res = st.session_state["feature_test"]
    acts = res.dense(np.array([f.id]))[0]
    top = int(acts.argmax())
    ex = Example(float(acts[top]), -1, top, res.tokens, res.pieces, acts.tolist(), top)
    # coloured on the store's scale, so the shade means what it means in the examples below
    st.markdown(render.examples_html([ex], f.max if f.max > 0 else ex.value, special), unsafe_allow_html=True)
    ratio = f" ({ex.value / f.max:.0%} of it)" if f.max > 0 else ""
    found = (f"Max activation on your text {ex.value:.3g} (on ‘{display_token(res.pieces[top])}’); the store's max "
             f"{f.max:.3g}{ratio}." if ex.value > 0 else
             f"Feature {f.id} does not fire on this text (the store's max {f.max:.3g}).")
    cut = f" Only the first {len(res.tokens)} of the text's {res.total} tokens were run." if res.truncated else ""
    st.caption(f"{found} Position 0 and special tokens are not encoded.{cut}")
