"""An attribution graph as the JSON of the circuit-tracer / Neuronpedia graph frontend, and back.

circuit-tracer's `utils/create_graph_files.py` writes, for one pruned graph, `SLUG.json`:
  metadata  {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version}
  qParams   {pinnedIds, supernodes, linkType, clickedId, sg_pos}
  nodes     the kept nodes that an edge touches (plus every token and logit), each
            {node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
             reverse_ctx_idx, jsNodeId, clerp, influence, activation}
  links     [{source, target, weight}] the kept edges (weight = the direct effect of source on target)
and lists the slug in the folder's `graph-metadata.json`. Node ids (its conventions, kept verbatim):
  feature   "L_latent_pos"   feature = Cantor pairing of (L, latent), layer "L",  "cross layer transcoder"
  error     "0_L_pos"        feature −1, layer "L",                                 "mlp reconstruction error"
  token     "E_tokenid_pos"  feature = pos, layer "E",                              "embedding"
  logit     "(n+1)_id_pos"   feature = token id, layer str(n_layers + 1),           "logit"
Influence is each node's cumulative share of influence in influence order (Graph.prune's `cumulative`, as
circuit-tracer's `prune_graph`). A feature at layer 0 with latent < n_layers shares its id with an error node
there ("0_L_pos"): circuit-tracer's format has that collision, so saekit's own block below names nodes by index.

The frontend ignores other top-level keys; saekit's sit under "saekit": the graph's tokens, targets (with
contrasts), metadata and scores, the unpruned graph's index of every node in `nodes`, the nodes of every link,
and the feature nodes it restores. Reading the file back gives the pruned graph (the kept feature nodes, every
error / token / logit node, the kept edges), or the whole graph exactly when it was written with
`full_adjacency=True` (the dense adjacency, base64 float32: for small graphs; graph.safetensors holds any).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError
from ..files import atomic_write
from .graph import GRAPH_KIND, Graph

KEY = "saekit"
FORMAT_VERSION = 1
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}


def cantor(x: int, y: int) -> int:
    """The frontend's feature number of (layer, latent)."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(graph: Graph, i: int, influence: float) -> dict[str, Any]:
    """Node i in the frontend's fields, in its key order."""
    n = graph.node(i)
    kind, p = n["kind"], n["position"]
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
    if kind == "feature":
        L, f = n["layer"], n["latent"]
        return {"node_id": f"{L}_{f}_{p}", "feature": cantor(L, f), "layer": str(L), "ctx_idx": p,
                "feature_type": FEATURE_TYPES[kind], **base, "jsNodeId": f"{L}_{f}-0", "clerp": "",
                "influence": influence, "activation": n["activation"]}
    if kind == "error":
        L = n["layer"]
        return {"node_id": f"0_{L}_{p}", "feature": -1, "layer": str(L), "ctx_idx": p,
                "feature_type": FEATURE_TYPES[kind], **base, "jsNodeId": f"{L}_{p}-0", "clerp": "",
                "influence": influence, "activation": None}
    if kind == "token":
        t = graph.tokens[p]
        return {"node_id": f"E_{t}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": FEATURE_TYPES[kind],
                **base, "jsNodeId": f"E_{t}-{p}", "clerp": "", "influence": influence, "activation": None}
    layer, v, prob = str(graph.n_layers + 1), n["vocab_index"], float(n["probability"])
    # a contrast "A|B" is named by A's id (circuit-tracer gives arbitrary targets ids past the vocabulary)
    return {"node_id": f"{layer}_{v}_{p}", "feature": v, "layer": layer, "ctx_idx": p, "feature_type": "logit",
            "token_prob": prob, "is_target_logit": i == graph.logit_start, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"L_{v}-{p}", "clerp": f'Output "{n["token"]}" (p={prob:.3f})', "influence": None,
            "activation": None}


def default_scan(graph: Graph) -> str:
    """Which transcoders the graph was built on, as the frontend's `scan` (export_circuit_tracer's default)."""
    tc = graph.meta.get("transcoders")
    return f"saekit/{Path(tc).name}" if tc else "saekit"


def frontend_dict(graph: Graph, slug: str, scan: str | None = None, node_threshold: float = 0.8,
                  edge_threshold: float = 0.98, full_adjacency: bool = False) -> dict[str, Any]:
    """The frontend's JSON object of `graph` pruned at (node_threshold, edge_threshold), with saekit's block."""
    pruned = graph.prune(node_threshold, edge_threshold)
    cumulative = pruned.cumulative.tolist()
    kept = pruned.node_mask.nonzero().squeeze(1).tolist()
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)  # row-major: by target, then source
    on = set(kept)
    pairs = [(s, t) for s, t in zip(sources.tolist(), targets.tolist()) if s in on and t in on]
    used = {i for pair in pairs for i in pair} | set(range(graph.token_start, graph.n_nodes))
    index = [i for i in kept if i in used]
    pos = {i: k for k, i in enumerate(index)}
    nodes = [_node(graph, i, cumulative[i]) for i in index]
    A = graph.adjacency
    links = [{"source": nodes[pos[s]]["node_id"], "target": nodes[pos[t]]["node_id"], "weight": float(A[t, s])}
             for s, t in pairs]
    restored = list(range(graph.n_features)) if full_adjacency else [i for i in index if i < graph.n_features]
    own: dict[str, Any] = {
        "kind": "saekit-graph-frontend", "format_version": FORMAT_VERSION, "graph": graph.to_dict(),
        "thresholds": [node_threshold, edge_threshold], "scores": graph.scores(), "scores_pruned": graph.scores(pruned),
        "unpruned": {"nodes": graph.n_nodes, "feature_nodes": graph.n_features},
        "node_index": index, "link_nodes": [[pos[s], pos[t]] for s, t in pairs],
        "restores": "full" if full_adjacency else "pruned",
        "features": graph.features[restored].tolist(), "activations": graph.activations[restored].tolist()}
    if full_adjacency:
        own["adjacency"] = base64.b64encode(A.float().contiguous().numpy().astype("<f4").tobytes()).decode()
    metadata = {"slug": slug, "scan": scan or default_scan(graph), "transcoder_list": [],
                "prompt_tokens": list(graph.token_strings), "prompt": "".join(graph.token_strings),
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links, KEY: own}


def write_graph_json(graph: Graph, path: str | Path, slug: str | None = None, scan: str | None = None,
                     node_threshold: float = 0.8, edge_threshold: float = 0.98, full_adjacency: bool = False,
                     index: bool = True) -> Path:
    """Write PATH (slug: its stem) and, with `index`, list it in PATH's folder's graph-metadata.json, so that
    circuit-tracer's local server (`circuit_tracer.frontend.local_server.serve(data_dir=folder)`) and the
    Neuronpedia upload find it."""
    path = Path(path)
    obj = frontend_dict(graph, slug or path.stem, scan, node_threshold, edge_threshold, full_adjacency)
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda p: p.write_text(text))
    if index:
        listing = path.parent / "graph-metadata.json"
        try:
            graphs = json.loads(listing.read_text())["graphs"] if listing.is_file() else []
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FileFormatError(f"{listing} is not a graph listing ({e}); remove it and write again.") from e
        graphs = [g for g in graphs if g.get("slug") != obj["metadata"]["slug"]] + [obj["metadata"]]
        atomic_write(listing, lambda p: p.write_text(json.dumps({"graphs": graphs}, indent=2)))
    return path


def read_graph_json(path: str | Path, model: str | None = None, transcoders: str | None = None) -> Graph:
    """The graph of a file `write_graph_json` wrote (pruned, or whole when written with full_adjacency); refused
    when `model` / `transcoders` are given and differ from those it was built on."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{path} does not exist: write one with `saekit attribute --out DIR` "
                              "(DIR/graph-frontend.json).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}).") from e
    own = obj.get(KEY) if isinstance(obj, dict) else None
    if not isinstance(own, dict) or own.get("kind") != "saekit-graph-frontend":
        what = "a graph-frontend file without saekit's block (written by circuit-tracer?)" if isinstance(obj, dict) \
            and "nodes" in obj and "links" in obj else "no graph-frontend file"
        raise FileFormatError(f"{path} is {what}: only files saekit wrote can be read back (their '{KEY}' block "
                              "holds the token ids, targets and node indices the frontend's fields lack).")
    if own.get("format_version", 0) > FORMAT_VERSION:
        raise FileFormatError(f"{path} has saekit graph-frontend format {own['format_version']}, newer than this "
                              f"saekit reads ({FORMAT_VERSION}): update saekit.")
    info = own["graph"]
    if info.get("kind") != GRAPH_KIND:
        raise FileFormatError(f"{path}: its '{KEY}' block holds no saekit attribution graph.")
    meta = info.get("meta", {})
    for what, want in (("model", model), ("transcoders", transcoders)):
        have = meta.get(what)
        if want is None or have is None:
            continue
        same = have == want or (what == "transcoders" and str(Path(want).resolve()) == have)
        if not same:
            raise FileFormatError(f"{path} was built on {what} {have!r}, not {want!r}: rebuild it with `saekit "
                                  "attribute` on these.")
    tokens, n_layers, targets = info["tokens"], info["n_layers"], info["targets"]
    features = torch.tensor(own["features"], dtype=torch.long).reshape(-1, 3)
    activations = torch.tensor(own["activations"], dtype=torch.float32)
    S, n, K = len(features), len(tokens), len(targets)
    N = S + (n_layers + 1) * n + K
    if own["restores"] == "full":
        raw = base64.b64decode(own["adjacency"])
        if len(raw) != 4 * N * N:
            raise FileFormatError(f"{path}: the adjacency holds {len(raw) // 4} numbers, not {N}×{N}; the file is "
                                  "damaged: write it again.")
        A = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(N, N).clone()
    else:
        S0 = own["unpruned"]["feature_nodes"]
        kept = [i for i in own["node_index"] if i < S0]
        new = {i: k for k, i in enumerate(kept)}

        def moved(i: int) -> int:  # index in the unpruned graph → in the restored one
            return new[i] if i < S0 else i - S0 + S

        if len(kept) != S:
            raise FileFormatError(f"{path}: {len(kept)} feature nodes listed but {S} restored; the file is damaged.")
        A = torch.zeros(N, N)
        index, links = own["node_index"], obj["links"]
        if len(links) != len(own["link_nodes"]):
            raise FileFormatError(f"{path}: {len(links)} links but {len(own['link_nodes'])} in its '{KEY}' block; "
                                  "was it edited? Write it again.")
        for (s, t), link in zip(own["link_nodes"], links):
            A[moved(index[t]), moved(index[s])] = link["weight"]
    return Graph(tokens, info["token_strings"], features, activations, A, targets, n_layers, meta)
