"""`saekit attribute`: a graph of a prompt on a transcoder set, its report (scores, top nodes, the strongest
path, validation) and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import AttributionConfig
from .build import attribute
from .graph import Graph
from .graph_json import write_graph_json
from .validate import validate

# ----------------------------------------------------------------------------- `saekit attribute`

def strongest_path(graph: Graph, target: int = 0) -> list[int]:
    """From a logit node back to a token: at each step the input with the largest |direct effect|."""
    node, path = graph.logit_start + target, [graph.logit_start + target]
    while node < graph.error_start or node >= graph.logit_start:
        row = graph.adjacency[node].clone()
        row[graph.error_start: graph.token_start] = 0  # errors explain nothing: follow features and tokens
        if not row.abs().any():
            break
        node = int(row.abs().argmax())
        path.append(node)
    return path[::-1]


def describe_node(graph: Graph, i: int) -> str:
    n = graph.node(i)
    if n["kind"] == "feature":
        return f"L{n['layer']}#{n['latent']}@{n['position']} ({graph.token_strings[n['position']]!r}, a={n['activation']:.2f})"
    if n["kind"] == "token":
        return f"token {n['token']!r}@{n['position']}"
    if n["kind"] == "logit":
        return f"logit {n['token']!r} (p={n['probability']:.2f})"
    return f"error L{n['layer']}@{n['position']}"


def attribution_report(graph: Graph, validation: dict[str, Any] | None, node_threshold: float = 0.8,
                       edge_threshold: float = 0.98) -> tuple[dict[str, Any], str]:
    """(report.json's content, report.md's text) of a graph: targets, size, scores, top nodes, the strongest
    path and the validation."""
    pruned = graph.prune(node_threshold, edge_threshold)
    full, kept = graph.scores(), graph.scores(pruned)
    inf = graph.node_influence()
    S = graph.n_features
    top = inf[:S].argsort(descending=True)[:10].tolist()
    path = strongest_path(graph)
    m = graph.meta
    rep = {"prompt_tokens": graph.token_strings, "targets": graph.targets, "feature_nodes": S,
           "active_features": m.get("active_features"), "nodes": graph.n_nodes,
           "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": int(pruned.edge_mask.sum()),
           "scores": full, "scores_pruned": kept, "thresholds": [node_threshold, edge_threshold],
           "top_features": [{**graph.node(i), "influence": float(inf[i]),
                             "direct_effect_on_target": float(graph.adjacency[graph.logit_start, i])} for i in top],
           "strongest_path": [describe_node(graph, i) for i in path], "validation": validation,
           "seconds": m.get("seconds"), "seconds_per_batch": m.get("seconds_per_batch"),
           "backward_batches": m.get("backward_batches")}
    lines = [f"# Attribution graph: {''.join(graph.token_strings)!r}", "",
             "Targets: " + ", ".join(f"{t['token']!r} (p={t['probability']:.3f})" for t in graph.targets),
             f"{S:,} feature nodes of {m.get('active_features', S):,} active; {graph.n_nodes:,} nodes; built in "
             f"{m.get('seconds', 0):.1f} s ({m.get('backward_batches')} backward batches, "
             f"{m.get('seconds_per_batch', 0):.2f} s each).", "",
             "| graph | nodes | replacement score | completeness score |", "|---|---|---|---|",
             f"| unpruned | {graph.n_nodes:,} | {full['replacement']:.3f} | {full['completeness']:.3f} |",
             f"| pruned ({node_threshold}, {edge_threshold}) | {int(pruned.node_mask.sum()):,} | "
             f"{kept['replacement']:.3f} | {kept['completeness']:.3f} |", "",
             "Strongest path: " + " → ".join(describe_node(graph, i) for i in path), "",
             "| feature | influence | direct effect on the first target |", "|---|---|---|"]
    lines += [f"| {describe_node(graph, i)} | {inf[i]:.4f} | {graph.adjacency[graph.logit_start, i]:+.3f} |"
              for i in top]
    if validation:
        a, d = validation["ablation"], validation["doubling"]
        lines += ["", f"**Validation in the real model** (top {validation['nodes']} feature nodes by influence, target "
                  f"{validation['target']!r}): Spearman ρ between the graph's predicted and the measured change of "
                  f"the target — ablation {a['rho']:+.2f} [{a['low']:+.2f}, {a['high']:+.2f}], doubling "
                  f"{d['rho']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] (95% intervals); direct edges alone, "
                  f"ablation {validation['ablation_direct_only']['rho']:+.2f}."]
    return rep, "\n".join(lines) + "\n"


def attribute_to_dir(transcoders_dir: str | Path, prompt: str, out: str | Path, target: str | None = None,
                     cfg: AttributionConfig | None = None, validate_top: int = 20, model_arg: str | None = None,
                     device: str = "cpu", overwrite: bool = False) -> Graph:
    """`saekit attribute`: the graph of `prompt` on a transcoder set → OUT/graph.json + graph.safetensors,
    OUT/report.md + report.json (scores, top nodes, the strongest path, validation in the real model)."""
    from ..config import DataConfig
    from ..files import claim_output, read_json, write_json
    from ..lm import load_model
    from ..runner import check_every_layer, transcoder_set

    def differs(p: Path) -> str | None:
        meta = read_json(p / "graph.json").get("meta", {})
        same = meta.get("prompt") == prompt and meta.get("transcoders") == str(Path(transcoders_dir).resolve())
        return None if same else f"of {meta.get('prompt')!r} on {meta.get('transcoders')}"

    out = claim_output(out, "an attribution graph", lambda p: (p / "graph.json").is_file(), overwrite, differs)
    tcs = transcoder_set(transcoders_dir, "an attribution graph is built on transcoders")
    first = tcs[min(tcs)]
    data = DataConfig.from_manifest(first.info, model=model_arg)
    model = load_model(data.model, device)
    check_every_layer(tcs, model.cfg.n_layers, Path(transcoders_dir), "an attribution graph needs a transcoder at "
                      "every MLP", "or point --transcoders at a complete set")
    graph = attribute(model, tcs, prompt, target or None, cfg)
    graph.meta.update({"transcoders": str(Path(transcoders_dir).resolve()), "prompt": prompt})
    validation = validate(model, tcs, graph, validate_top) if validate_top else None
    rep, md = attribution_report(graph, validation)
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out)
    write_graph_json(graph, out / "graph-frontend.json")  # opens in circuit-tracer's / Neuronpedia's graph frontend
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(md)
    print(md)
    return graph
