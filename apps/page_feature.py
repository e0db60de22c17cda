"""The Feature page: one latent's examples, histogram, logit effects, token profile, neighbours, label and steering."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from saekit.apps import render
from saekit.apps.common import feature_label, get_live, goto
from saekit.apps.labels import Conflict, Labels
from saekit.apps.steering_panel import steering_panel

from saekit.features import FeatureStore
from saekit.tokens import display_token


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
