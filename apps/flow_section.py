"""The Flow section of the feature page and the per-layer flow plot of the overview, for a store whose SAE belongs
to a set with a computed flow (`saekit flow SET`). The flow store is $SAEKIT_FLOW, else SET/flow beside the
store's SAE or one folder up (SET/HOOK/SAE: the default of `saekit flow`); without one the sections say how to make it.

A store with no flow store shows neither section.
Nodes in other layers belong to other SAEs of the set, each with its own store: they are named `hook:latent`
(with the command that browses them); nodes of this store's SAE open its feature page, and so do nodes whose SAE
has a store in the browsed set (`saekit browse SET`: the picker switches to it)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
from saekit.apps.common import goto
from saekit.apps.set_picker import browsed_set, goto_node

from saekit.errors import SaekitError
from saekit.features import FeatureStore
from saekit.flow import CLASSES, FLOW_FILE, FlowStore

KIND_COLOUR = {"resid": "#4c78a8", "attn": "#f58518", "mlp": "#54a24b"}
CLASS_COLOUR = {"persisting": "#4c78a8", "transformed": "#b279a2", "mlp": "#54a24b", "attention": "#f58518",
                "new": "#bab0ac"}
KIND_OFFSET = {"resid": 0.0, "attn": -0.4, "mlp": -0.2}  # a block's SAE at L−1 sits between resid L−1 and resid L


def hook_of(store: FeatureStore) -> str:
    return str(store.manifest.get("hook"))


def flow_path(store: FeatureStore) -> Path | None:
    if env := os.environ.get("SAEKIT_FLOW"):
        return Path(env)
    sae_dir = store.manifest.get("sae_dir")
    for root in (Path(sae_dir).parents[:2] if sae_dir else ()):  # SET/SAE or SET/HOOK/SAE
        if (root / "flow" / FLOW_FILE).is_file():
            return root / "flow"
    return None


@st.cache_resource(show_spinner="reading the flow store …")
def get_flow(path: str) -> FlowStore:
    return FlowStore(path)


def flow_for(store: FeatureStore) -> tuple[FlowStore | None, str]:
    """(the flow store covering this store's hook, or None with why not)."""
    path = flow_path(store)
    if path is None:
        return None, ("No feature flow for this SAE: if it belongs to a set of SAEs over many layers, run "
                      "`saekit flow SET` (or set SAEKIT_FLOW to a flow store).")
    try:
        flow = get_flow(str(path.resolve()))
    except SaekitError as e:
        return None, f"The flow store {path} cannot be read: {e}"
    hooks, hook = [m.hook for m in flow.set.members], hook_of(store)
    if hook not in hooks:
        return None, f"The flow store {path} covers {', '.join(hooks[:4])}…, not this store's {hook}."
    if flow.set.by_hook(hook).d_sae != store.d_sae:
        return None, f"The flow store {path} holds another SAE on {hook} (d_sae {flow.set.by_hook(hook).d_sae})."
    return flow, ""


def flow_figure(nodes: list[dict], edges: list[dict], focus: tuple[str, int]):
    """Layers as columns (a block's SAE of layer L−1 between resid L−1 and resid L), nodes as features, edges
    by cosine (width) and source kind (colour)."""
    import plotly.graph_objects as go

    pos: dict[tuple[str, int], tuple[float, float]] = {}
    for x in sorted({n["layer"] + KIND_OFFSET[n["kind"]] for n in nodes}):
        column = [n for n in nodes if n["layer"] + KIND_OFFSET[n["kind"]] == x]
        for j, n in enumerate(sorted(column, key=lambda n: n["latent"])):
            pos[(n["hook"], n["latent"])] = (x + (1 if n["kind"] != "resid" else 0), j - (len(column) - 1) / 2)
    fig = go.Figure()
    for e in edges:
        (x0, y0), (x1, y1) = pos[tuple(e["source"])], pos[tuple(e["target"])]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 1 + 6 * max(e["cos"], 0), "color": KIND_COLOUR[e["kind"]]}))
    fig.add_trace(go.Scatter(
        x=[pos[(n["hook"], n["latent"])][0] for n in nodes], y=[pos[(n["hook"], n["latent"])][1] for n in nodes],
        mode="markers+text", text=[f"{n['kind']} {n['latent']}" for n in nodes], textposition="top center",
        customdata=[f"{n['hook']}:{n['latent']}" for n in nodes], showlegend=False,
        hovertemplate="%{customdata}<br>%{hovertext}<extra></extra>",
        hovertext=[f"class: {n['class']}" if n["class"] else f"{n['kind']} output SAE" for n in nodes],
        marker={"size": [18 if (n["hook"], n["latent"]) == focus else 11 for n in nodes],
                "color": [CLASS_COLOUR.get(n["class"], KIND_COLOUR[n["kind"]]) for n in nodes],
                "line": {"width": 1, "color": "#333"}}))
    for kind, colour in KIND_COLOUR.items():  # legend of edge colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": colour, "width": 4},
                                 name=f"from {kind}"))
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": -0.1},
                      xaxis={"title": "layer", "dtick": 1}, yaxis={"visible": False},
                      title="Flow graph (edge width: cosine; node colour: class)")
    return fig


def _rows(flow: FlowStore, matches: list[dict]) -> list[dict]:
    return [{"feature": f"{m['hook']}:{m['latent']}", "cosine": round(m["cos"], 3), "from": m["kind"],
             "class": (flow.class_of(m["layer"], m["latent"]) if m["kind"] == "resid" else None) or "—"}
            for m in matches]


def flow_section(store: FeatureStore, fid: int) -> None:
    """Predecessors and successors with cosine, kind and class, and the layered flow graph (nothing for a store
    whose SAE has no flow store)."""
    if flow_path(store) is None:
        return
    st.subheader("Flow across layers")
    flow, why = flow_for(store)
    if flow is None:
        st.caption(why)
        return
    hook = hook_of(store)
    me = flow.set.by_hook(hook)
    cls = flow.class_of(me.layer, fid) if me.kind == "resid" else None
    t = flow.cfg.threshold
    st.caption((f"Class: **{cls}**. " if cls else "")
               + f"Matched by {flow.cfg.variant} cosine against the SAEs one step earlier (threshold {t}); "
               f"flow store `{flow.path}`.")
    pred = flow.predecessors(hook, fid) if me.kind == "resid" else []
    succ = flow.successors(hook, fid, min_cos=t)
    c = st.columns(2)
    c[0].markdown("**Predecessors** (layer L−1)")
    if pred:
        c[0].dataframe(_rows(flow, pred), hide_index=True, key=f"flow_pred_{fid}")
    else:
        c[0].caption("none: this SAE is the first layer of the set" if me.kind == "resid" else
                     "an attention/MLP-output feature: it is a source, matched only to the next residual layer")
    c[1].markdown(f"**Successors** (next residual layer, cosine ≥ {t})")
    if succ:
        c[1].dataframe(_rows(flow, succ), hide_index=True, key=f"flow_succ_{fid}")
    else:
        c[1].caption("none above the threshold")
    nodes, edges = flow.graph(hook, fid)
    if edges:
        st.plotly_chart(flow_figure(nodes, edges, (hook, fid)), key=f"flow_graph_{fid}")
    else:
        st.caption(f"No link above cosine {t} either way: the flow graph is this feature alone.")
    same = sorted({n["latent"] for n in nodes if n["hook"] == hook and n["latent"] != fid})
    for j in same:
        st.button(f"open feature {j}", key=f"flow_open_{j}", on_click=goto, args=("feature", j))
    stores = browsed_set()
    others = sorted({(n["hook"], n["latent"]) for n in nodes if n["hook"] != hook},
                    key=lambda n: ([m.hook for m in flow.set.members].index(n[0]), n[1]))
    for h, j in [(h, j) for h, j in others if h in stores]:  # open in its own store: the picker switches
        st.button(f"open {h}:{j}", key=f"flow_open_{h}_{j}", on_click=goto_node, args=(stores, h, j))
    if lacking := sorted({h for h, _ in others if h not in stores}, key=[m.hook for m in flow.set.members].index):
        st.caption(f"Nodes on {', '.join(lacking)} belong to SAEs without a store in this browser: build one with "
                   "`saekit analyze SAE_DIR` (it lands in SAE_DIR/../store), then `saekit browse SET` browses the "
                   "set's stores together (the node names its hook and latent).")


def flow_overview(store: FeatureStore) -> None:
    """Per residual layer, the share of features that persist / are transformed / come from MLP / from attention /
    are new (the paper's headline plot)."""
    if flow_path(store) is None:
        return
    flow, why = flow_for(store)
    st.subheader("Feature flow by layer")
    if flow is None:
        st.caption(why)
        return
    import plotly.graph_objects as go

    shares = flow.shares()
    layers = sorted(shares)
    fig = go.Figure([go.Bar(x=layers, y=[shares[lay][c] for lay in layers], name=c, marker_color=CLASS_COLOUR[c])
                     for c in CLASSES])
    fig.update_layout(barmode="stack", height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis_tickformat=".0%",
                      xaxis={"title": "residual layer", "dtick": 1}, yaxis_title="share of features",
                      title=f"Where each residual feature comes from (threshold {flow.cfg.threshold})")
    st.plotly_chart(fig, key="flow_overview")
    st.caption(f"This store's SAE: {hook_of(store)}. From `{flow.path}`.")
