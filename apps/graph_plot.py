"""Drawing an attribution graph (saekit.attribution.graph.Graph) with plotly: nodes laid out by layer (rows: token embeddings
at the bottom, then each layer's feature and error nodes, the logits on top) × token position (columns; the nodes
of one cell spread across it), edges coloured by the sign of their weight (blue promotes, red suppresses) with
width and opacity growing with |weight|. Edges are drawn as a few traces (one per sign × weight band), so a graph
of thousands of edges stays one quick figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saekit.attribution.graph import Graph, Pruned

BANDS = 4  # weight bands per sign: widths 0.6 … 4.5 px
KIND_STYLE = {"feature": ("circle", "#636efa"), "error": ("square", "#b0b0b0"), "token": ("diamond", "#2ca02c"),
              "logit": ("star", "#ff7f0e")}
SUPER_COLOURS = ["#e377c2", "#17becf", "#bcbd22", "#8c564b", "#9467bd", "#d62728"]


@dataclass
class Drawn:
    """What a figure shows: node indices, their (x, y), and the kept edges (target, source, weight)."""

    nodes: np.ndarray  # [M] graph node indices
    x: np.ndarray
    y: np.ndarray
    edges: list[tuple[int, int, float]]


def node_key(graph: Graph, i: int) -> str:
    """A name of node i that stays meaningful outside this graph's numbering (supernodes.json):
    "L3#120@5" (feature), "E3@5" (error), "T@5" (token), "logit:1234" (its vocabulary index)."""
    n = graph.node(i)
    return {"feature": lambda: f"L{n['layer']}#{n['latent']}@{n['position']}",
            "error": lambda: f"E{n['layer']}@{n['position']}", "token": lambda: f"T@{n['position']}",
            "logit": lambda: f"logit:{n['vocab_index']}"}[n["kind"]]()


def node_keys(graph: Graph) -> dict[str, int]:
    return {node_key(graph, i): i for i in range(graph.n_nodes)}


def kept(graph: Graph, pruned: Pruned, only: Sequence[int] | None = None) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """(nodes, edges) of the pruned graph; with `only`, the subgraph of those nodes and the kept edges among them."""
    mask = pruned.node_mask.clone()
    if only is not None:
        mask = torch.zeros_like(mask)
        mask[list(only)] = True
    nodes = mask.nonzero().squeeze(1)
    em = pruned.edge_mask & mask[:, None] & mask[None, :]
    t, s = em.nonzero(as_tuple=True)
    w = graph.adjacency[t, s]
    return nodes.numpy(), [(int(a), int(b), float(c)) for a, b, c in zip(t, s, w)]


def layout(graph: Graph, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = token position (the nodes of one layer and position spread over ±0.4 of it, in node order),
    y = layer + 1 (0: token embeddings, n_layers + 1: logits)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i in nodes.tolist():
        n = graph.node(i)
        y = graph.n_layers + 1 if n["kind"] == "logit" else n["layer"] + 1
        cells.setdefault((n["position"], y), []).append(i)
    where: dict[int, tuple[float, float]] = {}
    for (p, y), members in cells.items():
        k = len(members)
        offsets = np.linspace(-0.4, 0.4, k) if k > 1 else np.zeros(1)
        for i, dx in zip(members, offsets):
            where[i] = (p + float(dx), float(y))
    xy = np.array([where[i] for i in nodes.tolist()]).reshape(-1, 2)
    return xy[:, 0], xy[:, 1]


def figure(graph: Graph, pruned: Pruned, hover: dict[int, str], only: Sequence[int] | None = None,
           pinned: Sequence[int] = (), supernodes: dict[str, list[int]] | None = None, height: int = 640):
    """The plotly figure of the pruned graph (or the subgraph of `only`). `hover[i]`: node i's hover text;
    pinned nodes are drawn larger with a black outline, supernode members ringed in their group's colour.
    Every node marker carries its graph index as customdata (a click selects it)."""
    import plotly.graph_objects as go

    nodes, edges = kept(graph, pruned, only)
    x, y = layout(graph, nodes)
    pos = {int(i): (a, b) for i, a, b in zip(nodes, x, y)}
    fig = go.Figure()
    top = max((abs(w) for *_, w in edges), default=1.0) or 1.0
    for sign, colour in ((1, "44,127,184"), (-1, "215,48,39")):
        for b in range(BANDS):
            lo, hi = top * b / BANDS, top * (b + 1) / BANDS
            xs: list[float | None] = []
            ys: list[float | None] = []
            for t, s, w in edges:
                if np.sign(w) == sign and (lo < abs(w) <= hi or (b == 0 and abs(w) <= hi)):
                    xs += [pos[s][0], pos[t][0], None]
                    ys += [pos[s][1], pos[t][1], None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line=dict(width=0.6 + 1.3 * b, color=f"rgba({colour},{0.25 + 0.22 * b:.2f})")))
    for kind, (symbol, colour) in KIND_STYLE.items():
        sel = [k for k, i in enumerate(nodes.tolist()) if graph.node(i)["kind"] == kind]
        if not sel:
            continue
        idx = nodes[sel]
        size = [14 if int(i) in pinned else 9 for i in idx]
        fig.add_trace(go.Scatter(
            x=x[sel], y=y[sel], mode="markers", name=kind, customdata=idx, hovertext=[hover.get(int(i), "") for i in idx],
            hoverinfo="text", marker=dict(symbol=symbol, color=colour, size=size,
                                          line=dict(width=[2 if int(i) in pinned else 0 for i in idx], color="black"))))
    for c, (name, members) in enumerate((supernodes or {}).items()):
        there = [i for i in members if i in pos]
        if there:
            fig.add_trace(go.Scatter(x=[pos[i][0] for i in there], y=[pos[i][1] for i in there], mode="markers",
                                     name=f"supernode: {name}", hoverinfo="skip",
                                     marker=dict(size=20, color="rgba(0,0,0,0)",
                                                 line=dict(width=3, color=SUPER_COLOURS[c % len(SUPER_COLOURS)]))))
    ticks = ["tokens"] + [f"L{L}" for L in range(graph.n_layers)] + ["logits"]
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=10, r=10, t=10, b=10),
                      legend=dict(orientation="h", y=-0.12), clickmode="event+select", dragmode="pan")
    fig.update_xaxes(tickvals=list(range(graph.n_pos)), ticktext=[f"{p}: {graph.token_strings[p]!r}"
                                                                  for p in range(graph.n_pos)],
                     range=[-0.6, graph.n_pos - 0.4], showgrid=False)
    fig.update_yaxes(tickvals=list(range(graph.n_layers + 2)), ticktext=ticks, range=[-0.6, graph.n_layers + 1.6],
                     showgrid=True, zeroline=False)
    return fig
