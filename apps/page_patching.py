"""Attribution patching on the Graph page (`saekit attribute --saes SAES --prompts FILE --out DIR`): residual-SAE
features and error nodes ranked by their effect on the metric (integrated gradients and AtP), with the validation
in the real model on top, a chart of the top nodes' estimates beside the measured ablation, and a link to a
feature's page when this browser's store is of that SAE (same hook, same weights)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from saekit.apps.common import goto
from saekit.apps.labels import Labels

from saekit.features import FeatureStore
from saekit.files import read_json


@st.cache_data(show_spinner=False, max_entries=8)
def load_nodes(path: str, stamp: float) -> dict:
    return read_json(Path(path))


def describe(data: dict) -> str:
    """The result's name in the picker: its prompt set."""
    prompts = data.get("prompts", [])
    first = prompts[0]["prompt"] if prompts else ""
    return f"{first!r}" + (f" + {len(prompts) - 1} more prompts (patching)" if len(prompts) > 1 else " (patching)")


def _rho(v: dict) -> str:
    return f"{v['rho']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]"


def patching_page(store: FeatureStore, labels: Labels, directory: Path) -> None:
    path = directory / "nodes.json"
    data = load_nodes(str(path), path.stat().st_mtime)
    meta, prompts, val = data["meta"], data["prompts"], data.get("validation")
    read = prompts[0]["target"] + (f" − {prompts[0]['contrast']}" if prompts[0].get("contrast") else " − mean logit")
    st.title(f"Attribution patching: {len(prompts)} prompt(s)")
    st.caption(f"SAEs {', '.join(data['hooks'])} of `{meta.get('model', '?')}`. Metric: {read!r} at the last position"
               + (" (first prompt; each prompt names its own)" if len(prompts) > 1 else "") + f", mean "
               f"{data['metric']:+.3f}. A node is an SAE latent (its activations at every position summed) or the "
               "SAE's error; its effect is the change of the metric when it is switched off, estimated by integrated "
               f"gradients ({meta.get('ig_steps')} steps) and by attribution patching (AtP), averaged over the prompts.")
    m = st.columns(3)
    if val:
        if "ig" in val:
            m[0].metric("validation ρ, IG", _rho(val["ig"]),
                        help=f"Spearman ρ (95% interval) between IG's estimate and the change measured by ablating "
                             f"each of the top {val['nodes']} feature nodes alone in the real model")
        m[1].metric("validation ρ, AtP", _rho(val["atp"]), help="the same for the AtP estimate")
    else:
        m[0].warning("Not validated (saekit attribute --validate 0): ablate nodes in the real model to see how far "
                     "to trust the ranking.")
    if checks := data.get("ig_completeness"):
        m[2].metric("IG Σ vs all-off", "; ".join(f"{c['ig_sum']:+.2f} / {c['measured']:+.2f}" for c in checks),
                    help="per SAE: the sum of its IG effects against the measured change with every node of it off "
                         "(equal up to the path integral's discretisation)")
    with st.expander(f"The prompts ({len(prompts)})"):
        st.dataframe(pd.DataFrame(prompts), hide_index=True, key="gdf_patch_prompts")

    nodes = data["nodes"]
    c = st.columns([2, 1, 1])
    hooks = c[0].multiselect("SAEs", data["hooks"], default=data["hooks"], key="graph_patch_hooks")
    errors = c[1].toggle("Error nodes", value=True, key="graph_patch_errors")
    top = c[2].number_input("Top nodes", 5, max(5, len(nodes)), min(30, max(5, len(nodes))), key="graph_patch_top")
    shown = [n for n in nodes if n["hook"] in hooks and (errors or not n["error"])][: int(top)]
    store_hook = store.manifest.get("hook")
    same = meta.get("weights", {}).get(store_hook) == store.manifest.get("sae_weights_sha256")
    names = labels.all_labels() if same else {}

    def name(n: dict) -> str:
        return f"{n['hook']} error" if n["error"] else f"{n['hook']} #{n['latent']}"

    fig = go.Figure()
    ys = [name(n) for n in shown][::-1]
    for key, label, colour in (("ig", "IG", "#1f77b4"), ("atp", "AtP", "#ff7f0e"), ("measured", "measured ablation",
                                                                                 "#2ca02c")):
        xs = [n.get(key) for n in shown][::-1]
        if any(x is not None for x in xs):
            fig.add_bar(y=ys, x=xs, name=label, orientation="h", marker_color=colour)
    fig.update_layout(barmode="group", height=max(300, 22 * len(shown) * 2), margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title="effect on the metric of switching the node off", legend_orientation="h")
    st.plotly_chart(fig, key="gchart_patching")
    table = pd.DataFrame({
        "node": [name(n) for n in shown],
        "label": [names.get(n["latent"], "") if n["hook"] == store_hook and not n["error"] else "" for n in shown],
        "IG": [n["ig"] for n in shown],
        "IG 95% over prompts": [("[{:+.3f}, {:+.3f}]".format(*n["ig_interval"]) if n.get("ig_interval") else "")
                                for n in shown],
        "AtP": [n["atp"] for n in shown], "measured": [n.get("measured") for n in shown],
        "activation": [n["activation"] for n in shown]})
    st.dataframe(table, hide_index=True, key="gdf_patching")
    if not same:
        why = (f"this browser's store is of {store_hook}" if store_hook not in data["hooks"] else
               f"this browser's store of {store_hook} was built from other weights than the SAE ranked here")
        st.caption(f"Feature pages open from here for the SAE this browser's store was built from ({why}).")
    elif openable := [n["latent"] for n in shown if n["hook"] == store_hook and not n["error"]]:
        pick = st.selectbox(f"Open a feature of {store_hook} (this browser's store)", openable, key="graph_patch_open",
                            format_func=lambda f: f"#{f} {names.get(f, '')}".strip())
        st.button(f"Open feature {pick}", key="gbtn_patch_open", on_click=goto, args=("feature", pick))
