"""The Graph page (`saekit browse STORE --graphs DIR`): an attribution graph (saekit attribute) drawn by layer ×
token position, pruned with sliders (Graph.prune) and scored (replacement / completeness of the pruned graph), a
target-logit picker, hover with each feature's top tokens (its decoder row through the unembedding) and label, a
click that selects a node (its feature page when this browser's store is of that layer's transcoder), pinned
nodes as a subgraph, labelled supernodes saved in DIR/supernodes.json, and an intervention panel that sets or
scales pinned feature nodes in the real model: new top logits and a continuation beside the baseline.

Widget state lives under keys starting "graph_" (browse.py carries them across pages); buttons and the chart use
"gbtn_" / "gchart_" keys (their state cannot be set). The graph's name is in the URL (?page=graph&graph=NAME)."""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import sys
from pathlib import Path

import pandas as pd
import streamlit as st
import torch
from saekit.apps import graph_plot as GP
from saekit.apps.common import goto
from saekit.apps.graph_live import GRAPH_FILE, PATCHING_FILE, GraphModel, NodeEdit, graph_dirs
from saekit.apps.labels import Labels
from saekit.apps.page_patching import describe as describe_patching
from saekit.apps.page_patching import patching_page

from saekit.attribution.graph import Graph
from saekit.errors import SaekitError
from saekit.features import FeatureStore
from saekit.files import read_json, write_json

GRAPHS_ENV = "SAEKIT_GRAPHS"
SUPERNODES = "supernodes.json"
ALL_LOGITS = -1


def graphs_root() -> Path | None:
    """--graphs DIR (after `--` on streamlit's command line) or $SAEKIT_GRAPHS; None when neither is given."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--graphs")
    args, _ = parser.parse_known_args(sys.argv[1:])
    value = args.graphs or os.environ.get(GRAPHS_ENV)
    return Path(value) if value else None


def remember_url() -> None:
    """On a session's first run, keep ?graph=NAME for the page (browse.py rewrites the URL before pages run)."""
    if "graph_url" not in st.session_state:
        st.session_state["graph_url"] = st.query_params.get("graph") or ""


# ----------------------------------------------------------------------------- cached loading

@st.cache_resource(show_spinner="loading the graph …", max_entries=4)
def load_graph(directory: str, stamp: float) -> Graph:
    return Graph.load(directory)


def for_target(graph: Graph, target: int) -> Graph:
    """The graph with its logit weights on one logit node (ALL_LOGITS: each by its probability, as built): pruning
    and scores then measure influence on that logit alone."""
    if target == ALL_LOGITS:
        return graph
    targets = [{**t, "probability": 1.0 if k == target else 0.0} for k, t in enumerate(graph.targets)]
    return dataclasses.replace(graph, targets=targets)


@st.cache_data(show_spinner="pruning …", max_entries=32)
def pruned_view(directory: str, stamp: float, target: int, node_threshold: float, edge_threshold: float):
    """(pruned, scores of the pruned graph, scores of the whole graph, each node's influence) for one setting."""
    g = for_target(load_graph(directory, stamp), target)
    p = g.prune(node_threshold, edge_threshold)
    return p, g.scores(p), g.scores(), g.node_influence()


@st.cache_resource(show_spinner="loading the model and the transcoder set (once per server) …", max_entries=2)
def graph_model(transcoders: str, model: str | None) -> GraphModel:
    return GraphModel(transcoders, model)


@st.cache_resource(show_spinner=False, max_entries=8)
def store_layer(store_dir: str, transcoders: str) -> tuple[int | None, str]:
    """(the layer whose transcoder in `transcoders` this browser's store was built from, ""), or (None, why not)."""
    from saekit.lm import hook_layer
    from saekit.sae import load_sae

    store = FeatureStore(store_dir)
    man = store.manifest
    if not store.is_transcoder:
        return None, f"this browser's store is of an SAE at {man.get('hook')}, not of a transcoder"
    sae_dir = Path(man.get("sae_dir", "")).resolve()
    if not transcoders or not sae_dir.is_relative_to(Path(transcoders).resolve()):
        return None, f"this browser's store was built from {sae_dir}, which is not in the graph's transcoder set {transcoders}"
    layer = hook_layer(man.get("hook", ""))
    try:
        same = load_sae(sae_dir).weights_hash() == man.get("sae_weights_sha256")
    except SaekitError as e:
        return None, f"the store's transcoder {sae_dir} cannot be read ({e})"
    if not same:
        return None, f"the store was built from other weights than the transcoder now at {sae_dir} (rebuild it: saekit analyze)"
    return layer, ""


# ----------------------------------------------------------------------------- supernodes

def load_supernodes(directory: Path, keys: dict[str, int]) -> tuple[dict[str, list[str]], list[str]]:
    """(name → node keys, keys of nodes this graph does not have) from DIR/supernodes.json."""
    path = directory / SUPERNODES
    if not path.is_file():
        return {}, []
    groups = {g["name"]: list(g["nodes"]) for g in read_json(path).get("supernodes", [])}
    unknown = sorted({k for ks in groups.values() for k in ks if k not in keys})
    return groups, unknown


def save_supernodes(directory: Path, groups: dict[str, list[str]]) -> None:
    write_json(directory / SUPERNODES, {"kind": "saekit-supernodes", "version": 1,
                                        "supernodes": [{"name": n, "nodes": ks} for n, ks in groups.items()]})


def _group(directory: Path, state: str, pinned_key: str) -> None:
    """Button callback: the pinned nodes become a supernode named by the text box, saved at once."""
    name = st.session_state.get(f"graph_supername_{directory}", "").strip()
    members = list(st.session_state.get(pinned_key, []))
    if not name or not members:
        st.session_state["graph_super_msg"] = ("warning", "Pin some nodes and type a name first.")
        return
    groups = st.session_state[state]
    groups[name] = members
    save_supernodes(directory, groups)
    st.session_state["graph_super_msg"] = ("success", f"Saved supernode ‘{name}’ ({len(members)} nodes) to "
                                                      f"{directory / SUPERNODES}.")


def _ungroup(directory: Path, state: str, name: str) -> None:
    st.session_state[state].pop(name, None)
    save_supernodes(directory, st.session_state[state])
    st.session_state["graph_super_msg"] = ("success", f"Removed supernode ‘{name}’.")


def _pin(pinned_key: str, key: str) -> None:
    pins = list(st.session_state.get(pinned_key, []))
    st.session_state[pinned_key] = [k for k in pins if k != key] if key in pins else pins + [key]


def _select_from_chart(chart_key: str, node_key: str, names: dict[int, str]) -> None:
    points = st.session_state.get(chart_key, {}).get("selection", {}).get("points", [])
    if points:
        i = points[0].get("customdata")
        i = i[0] if isinstance(i, list) else i
        if i is not None and int(i) in names:
            st.session_state[node_key] = names[int(i)]


# ----------------------------------------------------------------------------- the page

def result_name(directory: Path) -> str:
    """A result's name in the picker: a graph's prompt, or a patching result's prompt set."""
    if (directory / GRAPH_FILE).is_file():
        return repr(read_json(directory / GRAPH_FILE).get("meta", {}).get("prompt", ""))
    return describe_patching(read_json(directory / PATCHING_FILE))


def graph_page(path: str, store: FeatureStore, labels: Labels) -> None:
    root = graphs_root()
    if root is None:
        raise SaekitError("no graphs given: run `saekit browse STORE --graphs DIR`.")
    dirs = graph_dirs(root)
    names = {(d.name if d != root else root.name): d for d in dirs}
    if "graph_pick" not in st.session_state:  # the first visit: ?graph=NAME, else the first graph
        asked = st.session_state.get("graph_url", "")
        if asked and asked not in names:  # never another graph in its place: say what exists
            st.session_state["graph_url_problem"] = (f"There is no graph {asked!r} in {root} — graphs: "
                                                     f"{', '.join(names)}.")
        st.session_state["graph_pick"] = asked if asked in names else None if asked else next(iter(names))
    elif st.session_state["graph_pick"] not in names:
        st.session_state["graph_pick"] = None
    if (problem := st.session_state.get("graph_url_problem")) and st.session_state["graph_pick"] is None:
        st.title("Nothing at this address")
        st.error(problem)
    pick = st.selectbox("Graph", list(names), key="graph_pick", placeholder="pick a graph",
                        on_change=lambda: st.session_state.pop("graph_url_problem", None),
                        format_func=lambda n: f"{n} — {result_name(names[n])}")
    if pick is None:
        return
    st.session_state.pop("graph_url_problem", None)
    st.query_params["graph"] = pick
    directory = names[pick]
    if not (directory / GRAPH_FILE).is_file():
        patching_page(store, labels, directory)
        return
    stamp = (directory / "graph.safetensors").stat().st_mtime if (directory / "graph.safetensors").exists() else 0.0
    graph = load_graph(str(directory), stamp)
    show_graph(path, store, labels, graph, directory, stamp)


def show_graph(path: str, store: FeatureStore, labels: Labels, graph: Graph, directory: Path, stamp: float) -> None:
    meta = graph.meta
    prompt = meta.get("prompt") or "".join(graph.token_strings[1:])
    st.title(f"Graph: {prompt!r}")
    st.caption(f"{graph.n_features:,} feature nodes (of {meta.get('active_features', graph.n_features):,} active), "
               f"{graph.n_layers} layers × {graph.n_pos} positions, model `{meta.get('model', '?')}`, transcoders "
               f"`{meta.get('transcoders', '?')}`. Rows: token embeddings at the bottom, each layer's features "
               "(circles) and transcoder errors (grey squares), the logits on top; edges blue where they raise their "
               "target, red where they lower it, wider for larger |weight|.")
    c = st.columns([1, 1, 2])
    for k, v in (("graph_node_threshold", 0.8), ("graph_edge_threshold", 0.98), ("graph_target", ALL_LOGITS),
                 ("graph_hover_tokens", True), ("graph_iseed", 0), ("graph_itokens", 20), ("graph_itemp", 1.0)):
        st.session_state.setdefault(k, v)  # defaults here, not in the widgets: browse.py sets their state each run
    node_t = c[0].slider("Node threshold", 0.0, 1.0, step=0.01, key="graph_node_threshold",
                         help="keep the nodes holding this share of the influence on the target logits")
    edge_t = c[1].slider("Edge threshold", 0.0, 1.0, step=0.01, key="graph_edge_threshold",
                         help="then the edges holding this share of the edge influence among them")
    options = [ALL_LOGITS] + list(range(len(graph.targets)))
    target = c[2].selectbox("Target logit", options, key="graph_target", format_func=lambda k: (
        "all logit nodes, by probability" if k == ALL_LOGITS else
        f"{graph.targets[k]['token']!r} (p = {graph.targets[k]['probability']:.3f})"))
    pruned, kept_scores, full_scores, influence = pruned_view(str(directory), stamp, target, node_t, edge_t)
    m = st.columns(4)
    m[0].metric("nodes kept", f"{int(pruned.node_mask.sum()):,} / {graph.n_nodes:,}")
    m[1].metric("edges kept", f"{int(pruned.edge_mask.sum()):,}")
    m[2].metric("replacement score", f"{kept_scores['replacement']:.3f}",
                help=f"whole graph {full_scores['replacement']:.3f}: the share of the tokens' influence on the target "
                     "that flows through features rather than error nodes")
    m[3].metric("completeness score", f"{kept_scores['completeness']:.3f}",
                help=f"whole graph {full_scores['completeness']:.3f}: the influence-weighted share of the nodes' "
                     "inputs that come from features and tokens rather than errors")

    keys = GP.node_keys(graph)
    name_of = {i: k for k, i in keys.items()}
    pinned_key, super_key = f"graph_pinned_{directory}", f"graph_super_{directory}"
    if super_key not in st.session_state:
        groups, unknown = load_supernodes(directory, keys)
        st.session_state[super_key] = groups
        if unknown:
            st.warning(f"{directory / SUPERNODES} names nodes this graph does not have ({', '.join(unknown[:5])}"
                       f"{' …' if len(unknown) > 5 else ''}); they are left out of the drawing.")
    st.session_state.setdefault(pinned_key, [])
    pinned = [keys[k] for k in st.session_state[pinned_key] if k in keys]
    subgraph = st.toggle("Show only the pinned nodes", key="graph_only_pinned", disabled=not pinned)
    layer_of_store, why_not = store_layer(path, str(meta.get("transcoders", "")))
    names = labels.all_labels() if layer_of_store is not None else {}
    with_tokens = st.toggle("Top tokens in the hover (loads the model and the transcoder set once)",
                            key="graph_hover_tokens")
    gm, gm_problem = None, ""
    if with_tokens or st.session_state.get(f"gi_result_{directory}"):
        try:
            gm = graph_model(str(meta.get("transcoders", "")), meta.get("model"))
        except SaekitError as e:
            gm_problem = str(e)
            st.warning(f"No top tokens or interventions: {e}")
    drawn, _ = GP.kept(graph, pruned, pinned if subgraph and pinned else None)
    feats = [(graph.node(int(i))["layer"], graph.node(int(i))["latent"]) for i in drawn
             if int(i) < graph.error_start]
    tops = gm.top_tokens(feats) if gm is not None and with_tokens else {}
    hover = {int(i): hover_text(graph, int(i), influence, tops, names, layer_of_store)
             for i in drawn}
    supers = {n: [keys[k] for k in ks if k in keys] for n, ks in st.session_state[super_key].items()}
    fig = GP.figure(graph, pruned, hover, pinned if subgraph and pinned else None, pinned, supers)
    node_key = "graph_node"
    st.plotly_chart(fig, key="gchart_graph", on_select=lambda: _select_from_chart("gchart_graph", node_key, name_of),
                    selection_mode="points")

    node_panel(graph, drawn, influence, name_of, keys, pinned_key, layer_of_store, why_not, tops, names, node_key)
    supernode_panel(graph, directory, keys, pinned_key, super_key)
    intervention_panel(graph, directory, keys, pinned_key, gm, gm_problem)


def hover_text(graph: Graph, i: int, influence: torch.Tensor, tops, names, store_layer_: int | None) -> str:
    n = graph.node(i)
    inf = f"influence {float(influence[i]):.4f}"
    if n["kind"] == "feature":
        L, f = n["layer"], n["latent"]
        lines = [f"<b>L{L} #{f}</b> at {n['position']}: {graph.token_strings[n['position']]!r}",
                 f"activation {n['activation']:.3g} · {inf}"]
        if (L, f) in tops:
            lines.append("top tokens: " + html.escape(" ".join(tops[(L, f)])))
        if store_layer_ == L and names.get(f):
            lines.append(f"label: {html.escape(names[f])}")
        return "<br>".join(lines)
    if n["kind"] == "error":
        return f"<b>error L{n['layer']}</b> at {n['position']}: what the transcoder misses there<br>{inf}"
    if n["kind"] == "token":
        return f"<b>token</b> {n['token']!r} at {n['position']}<br>{inf}"
    return f"<b>logit</b> {n['token']!r}<br>probability {n['probability']:.3f}"


def node_panel(graph, drawn, influence, name_of, keys, pinned_key, layer_of_store, why_not, tops, names,
               node_key) -> None:
    st.subheader("Node")
    order = sorted((int(i) for i in drawn), key=lambda i: -float(influence[i]))
    options = [name_of[i] for i in order]
    if st.session_state.get(node_key) not in options:
        st.session_state[node_key] = None
    pick = st.selectbox("Selected node (or click one in the graph)", options, key=node_key,
                        placeholder="pick a node", format_func=lambda k: f"{k} · influence {float(influence[keys[k]]):.4f}")
    if pick is None:
        return
    i = keys[pick]
    n = graph.node(i)
    c = st.columns([3, 1, 1])
    c[0].markdown(hover_text(graph, i, influence, tops, names, layer_of_store), unsafe_allow_html=True)
    pinned = pick in st.session_state.get(pinned_key, [])
    c[1].button("Unpin" if pinned else "Pin", key="gbtn_pin", on_click=_pin, args=(pinned_key, pick))
    if n["kind"] == "feature":
        if layer_of_store == n["layer"]:
            c[2].button(f"Open feature {n['latent']}", key="gbtn_open", on_click=goto, args=("feature", n["latent"]))
        else:
            why = why_not or f"this browser's store is of layer {layer_of_store}'s transcoder"
            c[2].caption(f"No feature page for layer {n['layer']}: {why}. Browse a store of layer {n['layer']}'s "
                         "transcoder (saekit analyze on it) to open its features.")
    inputs = graph.adjacency[i]
    outputs = graph.adjacency[:, i]
    rows = [("input from", j, float(inputs[j])) for j in inputs.abs().argsort(descending=True)[:5].tolist()
            if inputs[j] != 0] + [("output to", j, float(outputs[j]))
                                  for j in outputs.abs().argsort(descending=True)[:5].tolist() if outputs[j] != 0]
    if rows:
        st.dataframe(pd.DataFrame({"edge": [r[0] for r in rows], "node": [name_of[r[1]] for r in rows],
                                   "weight": [r[2] for r in rows]}), hide_index=True, key="gdf_node_edges")


def supernode_panel(graph, directory: Path, keys, pinned_key, super_key) -> None:
    st.subheader("Pinned nodes and supernodes")
    st.multiselect("Pinned nodes", list(keys), key=pinned_key, placeholder="pin nodes here or with the Pin button")
    c = st.columns([3, 1])
    c[0].text_input("Supernode name", key=f"graph_supername_{directory}", placeholder="e.g. ‘capital cities’")
    c[1].button("Group pinned nodes", key="gbtn_group", on_click=_group, args=(directory, super_key, pinned_key))
    if msg := st.session_state.pop("graph_super_msg", None):
        getattr(st, msg[0])(msg[1])
    for name, members in st.session_state[super_key].items():
        r = st.columns([4, 1])
        r[0].markdown(f"**{html.escape(name)}**: {', '.join(members)}")
        r[1].button("Remove", key=f"gbtn_ungroup_{name}", on_click=_ungroup, args=(directory, super_key, name))


def intervention_panel(graph, directory: Path, keys, pinned_key, gm: GraphModel | None, gm_problem: str) -> None:
    st.subheader("Intervention")
    st.caption("Set or scale the pinned feature nodes in the real model: each edit adds Δ·W_dec[f] to the MLP output of "
               "its layer at its position (set to v: Δ = v − a; scale by s: Δ = (s − 1)·a). Shown: the new top logits "
               "against the clean run, and a continuation generated beside the baseline from the same seed.")
    feats = [k for k in st.session_state.get(pinned_key, []) if k in keys and keys[k] < graph.error_start]
    if not feats:
        st.info("Pin feature nodes (circles) to intervene on them.")
        return
    edits = []
    for k in feats:
        n = graph.node(keys[k])
        c = st.columns([2, 1, 1])
        c[0].markdown(f"`{k}` · activation {n['activation']:.3g}")
        mode = c[1].selectbox("Mode", ["scale", "set"], key=f"graph_imode_{k}", label_visibility="collapsed")
        st.session_state.setdefault(f"graph_ival_{k}_{mode}", 0.0)
        value = c[2].number_input("Value" if mode == "set" else "Factor", step=0.5,
                                  key=f"graph_ival_{k}_{mode}", label_visibility="collapsed",
                                  help="× 0 ablates the node" if mode == "scale" else "its new activation")
        edits.append(NodeEdit(n["layer"], n["position"], n["latent"], n["activation"], mode, float(value)))
    c = st.columns(3)
    seed = int(c[0].number_input("Seed", min_value=0, step=1, key="graph_iseed"))
    tokens = int(c[1].number_input("Tokens", min_value=1, max_value=200, step=5, key="graph_itokens"))
    temperature = float(c[2].number_input("Temperature", min_value=0.0, max_value=2.0, step=0.1, key="graph_itemp"))
    result_key = f"gi_result_{directory}"
    left, right = st.columns(2)
    boxes = [left.empty(), right.empty()]
    if st.button("Run intervention", key="gbtn_intervene", type="primary"):
        if gm is None:
            try:
                gm = graph_model(str(graph.meta.get("transcoders", "")), graph.meta.get("model"))
            except SaekitError as e:
                st.error(f"Cannot intervene: {e}")
                return
        try:
            st.session_state[result_key] = run_intervention(gm, graph, edits, seed, tokens, temperature, boxes)
        except SaekitError as e:
            st.error(str(e))
            return
    if res := st.session_state.get(result_key):
        show_result(res, boxes)


def run_intervention(gm: GraphModel, graph: Graph, edits: list[NodeEdit], seed: int, tokens: int,
                     temperature: float, boxes) -> dict:
    from saekit.apps.steering_panel import _box

    base, new = gm.logits(graph, edits)
    pb, pn = base.softmax(-1), new.softmax(-1)
    top = torch.cat([pn.topk(10).indices, pb.topk(5).indices]).unique(sorted=False)
    top = top[pn[top].argsort(descending=True)]
    table = pd.DataFrame({"token": [gm.token(int(t)) for t in top], "p edited": pn[top].tolist(),
                          "p clean": pb[top].tolist(), "Δ logit": (new[top] - base[top]).tolist()})
    targets = pd.DataFrame({"target": [t["token"] for t in graph.targets],
                            "Δ logit": [float(new[t["vocab_index"]] - base[t["vocab_index"]]) for t in graph.targets]})
    titles = ["baseline", "edited: " + "; ".join(e.describe() for e in edits)]
    pieces: list[list[str]] = [[], []]
    with gm.lock, gm.stream(graph, edits, seed, tokens, temperature) as steps:
        for t in steps:
            pieces[t.row].append(t.piece)
            boxes[t.row].markdown(_box(titles[t.row], steps_prompt(gm, graph), pieces[t.row], {}),
                                  unsafe_allow_html=True)
        g = steps.generation
    return {"table": table, "targets": targets, "generation": g, "titles": titles}


def steps_prompt(gm: GraphModel, graph: Graph) -> str:
    return gm.tokenizer.decode(graph.tokens[1:])


def show_result(res: dict, boxes) -> None:
    from saekit.apps.steering_panel import _box

    g = res["generation"]
    boxes[0].markdown(_box(res["titles"][0], g.prompt, g.baseline_pieces, {}, g.baseline_logprobs), unsafe_allow_html=True)
    boxes[1].markdown(_box(res["titles"][1], g.prompt, g.steered_pieces, {}, g.steered_logprobs), unsafe_allow_html=True)
    c = st.columns([3, 2])
    c[0].markdown("**Top logits after the edit** (next token after the prompt)")
    c[0].dataframe(res["table"], hide_index=True, key="gdf_ilogits",
                   column_config={k: st.column_config.NumberColumn(format="%.4f") for k in ("p edited", "p clean", "Δ logit")})
    c[1].markdown("**The graph's target logits**")
    c[1].dataframe(res["targets"], hide_index=True, key="gdf_itargets")
    st.caption(f"{len(g.baseline_tokens)} + {len(g.steered_tokens)} tokens in {g.seconds:.2f} s · {g.path} · seed "
               f"{g.seed}, temperature {g.temperature:g}")
