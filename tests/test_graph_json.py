"""Graph JSON for the circuit-tracer / Neuronpedia graph frontend (saekit/attribution/graph_json.py): its fields and node ids,
the same file circuit-tracer's create_graph_files writes for the same graph (when .venv-ct is there), round trips,
refusals, and `saekit attribute` writing it (tiny random Llama with random transcoders)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import build_world, random_transcoders

from saekit.attribution import AttributionConfig, attribute
from saekit.attribution.graph_json import cantor, frontend_dict, read_graph_json, write_graph_json
from saekit.errors import FileFormatError

ROOT = Path(__file__).resolve().parents[1]
CT_PY = Path(os.environ.get("SAEKIT_CT_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
needs_ct = pytest.mark.skipif(
    not CT_PY.is_file(), reason=f"no circuit-tracer venv at {CT_PY}: run `make peers-ct` (installs circuit-tracer 0.5.0)")
PROMPT = "The cat sat on the mat and the dog"
# circuit-tracer 0.5's frontend/graph_models.py: Model, Metadata, QParams, Node; links are {source, target, weight}
TOP = ["links", "metadata", "nodes", "qParams"]
METADATA = ["node_threshold", "prompt", "prompt_tokens", "scan", "schema_version", "slug", "transcoder_list"]
QPARAMS = ["clickedId", "linkType", "pinnedIds", "sg_pos", "supernodes"]
NODE = ["activation", "clerp", "ctx_idx", "feature", "feature_type", "influence", "is_target_logit", "jsNodeId",
        "layer", "node_id", "reverse_ctx_idx", "run_idx", "token_prob"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from saekit.lm import load_model

    w = build_world(tmp_path_factory.getbasetemp() / "feature_world")
    return w, load_model(str(w["model"])), random_transcoders(2, 32)


@pytest.fixture(scope="module")
def graph(world):
    _, model, tcs = world
    g = attribute(model, tcs, PROMPT, cfg=AttributionConfig(max_feature_nodes=None), progress=False)
    g.meta.update({"model": "tiny", "transcoders": "/sets/tiny-tc"})
    return g


def test_fields_and_node_ids_follow_the_frontend(graph):
    obj = frontend_dict(graph, "g")
    assert sorted(k for k in obj if k != "saekit") == TOP
    assert sorted(obj["metadata"]) == METADATA and sorted(obj["qParams"]) == QPARAMS
    assert all(sorted(nd) == NODE for nd in obj["nodes"])
    assert all(sorted(ln) == ["source", "target", "weight"] for ln in obj["links"])
    m = obj["metadata"]
    assert m["slug"] == "g" and m["scan"] == "saekit/tiny-tc" and m["prompt_tokens"] == graph.token_strings
    by_type: dict[str, list] = {}
    for nd in obj["nodes"]:
        by_type.setdefault(nd["feature_type"], []).append(nd)
    assert set(by_type) == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    f = by_type["cross layer transcoder"][0]
    L, pos, latent = int(f["layer"]), f["ctx_idx"], f["feature"]
    i = graph.find(L, pos, next(k for k in range(64) if cantor(L, k) == latent))
    assert f["node_id"] == f"{L}_{graph.features[i, 2]}_{pos}" and f["activation"] == pytest.approx(float(graph.activations[i]))
    assert [nd["node_id"] for nd in by_type["embedding"]] == [f"E_{t}_{p}" for p, t in enumerate(graph.tokens)]
    logits = by_type["logit"]
    assert [nd["node_id"] for nd in logits] == [f"3_{t['vocab_index']}_{graph.n_pos - 1}" for t in graph.targets]
    assert [nd["is_target_logit"] for nd in logits] == [True] + [False] * (len(logits) - 1)
    assert all(nd["influence"] is None for nd in logits)
    e = by_type["mlp reconstruction error"][0]
    assert e["node_id"] == f"0_{e['layer']}_{e['ctx_idx']}" and e["feature"] == -1
    ids = {nd["node_id"] for nd in obj["nodes"]}
    assert all(ln["source"] in ids and ln["target"] in ids for ln in obj["links"])
    assert 0 < len(obj["links"]) < int((graph.adjacency != 0).sum())  # pruned


def test_round_trips(graph, tmp_path):
    path = write_graph_json(graph, tmp_path / "full.json", full_adjacency=True)
    back = read_graph_json(path, model="tiny", transcoders="/sets/tiny-tc")
    assert torch.equal(back.adjacency, graph.adjacency) and torch.equal(back.features, graph.features)
    assert torch.equal(back.activations, graph.activations) and back.targets == graph.targets
    assert back.tokens == graph.tokens and back.token_strings == graph.token_strings and back.meta == graph.meta
    assert frontend_dict(back, "x") == frontend_dict(graph, "x")
    # the default file restores the pruned graph: its kept feature nodes and edges, every other node
    pruned = graph.prune()
    small = read_graph_json(write_graph_json(graph, tmp_path / "g.json"))
    kept = pruned.node_mask[: graph.n_features].nonzero().squeeze(1)
    obj = json.loads((tmp_path / "g.json").read_text())
    used = [i for i in obj["saekit"]["node_index"] if i < graph.n_features]
    assert torch.equal(small.features, graph.features[used]) and set(used) <= set(kept.tolist())
    assert small.n_nodes == len(used) + graph.n_nodes - graph.n_features
    assert int((small.adjacency != 0).sum()) == len(obj["links"])
    old = torch.tensor(used + list(range(graph.n_features, graph.n_nodes)))
    assert torch.equal(small.adjacency, graph.adjacency[old][:, old] * pruned.edge_mask[old][:, old])
    assert json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"][-1]["slug"] == "g"
    write_graph_json(graph, tmp_path / "g.json")  # listed once
    assert [g["slug"] for g in json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]] == ["full", "g"]


def test_another_model_or_set_or_a_foreign_file_is_refused(graph, tmp_path):
    path = write_graph_json(graph, tmp_path / "g.json")
    with pytest.raises(FileFormatError, match="built on model 'tiny', not 'other'"):
        read_graph_json(path, model="other")
    with pytest.raises(FileFormatError, match="built on transcoders '/sets/tiny-tc'"):
        read_graph_json(path, transcoders="/sets/another")
    obj = json.loads(path.read_text())
    del obj["saekit"]
    (tmp_path / "ct.json").write_text(json.dumps(obj))
    with pytest.raises(FileFormatError, match="without saekit's block"):
        read_graph_json(tmp_path / "ct.json")
    with pytest.raises(FileFormatError, match="does not exist"):
        read_graph_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_graph_json(tmp_path / "bad.json")


def test_saekit_attribute_writes_the_frontend_file(world, tmp_path):
    from saekit.cli import main

    _, model, tcs = world
    run = tmp_path / "tc"
    for L, t in tcs.items():
        t.info = {**t.info, "model_arg": model.saekit_id}
        t.save(run / f"blocks.{L}.mlp" / "tc")
    out = tmp_path / "g"
    assert main(["attribute", "--transcoders", str(run), "--prompt", PROMPT, "--out", str(out), "--validate", "0",
                 "--max-feature-nodes", "30"]) == 0
    g = read_graph_json(out / "graph-frontend.json", transcoders=str(run))
    assert g.tokens == json.loads((out / "graph.json").read_text())["tokens"] and g.n_features <= 30
    assert json.loads((out / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "graph-frontend"


@needs_ct
def test_the_same_file_as_circuit_tracer_writes(world, graph, tmp_path):
    """circuit-tracer's create_graph_files on a circuit_tracer.graph.Graph holding this graph's tensors writes the
    same nodes and links as saekit (same pruning, ids, influence), and the same keys."""
    from safetensors.torch import save_file

    w, _, _ = world
    tok = tmp_path / "tok"  # its transformers 4.57 knows the tokenizer.json class by its old name
    tok.mkdir()
    for f in Path(w["model"]).iterdir():
        if f.name.endswith(".json") or f.suffix == ".jinja":
            shutil.copy(f, tok / f.name)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    save_file({"adjacency": graph.adjacency.contiguous(), "features": graph.features.contiguous(),
               "activations": graph.activations.contiguous(), "tokens": torch.tensor(graph.tokens)}, tmp_path / "g.st")
    (tmp_path / "targets.json").write_text(json.dumps(graph.targets))
    script = f"""
import json, torch
from safetensors.torch import load_file
from transformers import AutoConfig
from circuit_tracer.graph import Graph
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.utils.create_graph_files import create_graph_files
from circuit_tracer.utils.tl_nnsight_mapping import convert_nnsight_config_to_transformerlens
t = load_file("{tmp_path / 'g.st'}")
targets = json.load(open("{tmp_path / 'targets.json'}"))
g = Graph(input_string="", input_tokens=t["tokens"], active_features=t["features"],
          adjacency_matrix=t["adjacency"], cfg=convert_nnsight_config_to_transformerlens(AutoConfig.from_pretrained("{tok}")),
          selected_features=torch.arange(len(t["features"])), activation_values=t["activations"],
          logit_targets=[LogitTarget(token_str=x["token"], vocab_idx=x["vocab_index"]) for x in targets],
          logit_probabilities=torch.tensor([x["probability"] for x in targets]), scan="saekit/tiny-tc")
create_graph_files(g, "ct", "{tmp_path / 'ct'}")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(CT_PY), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "ct" / "ct.json").read_text())
    ours = frontend_dict(graph, "ct")
    assert sorted(k for k in ours if k != "saekit") == sorted(theirs)
    assert sorted(theirs["metadata"]) == METADATA and sorted(theirs["qParams"]) == QPARAMS
    assert {k: v for k, v in ours["metadata"].items() if k != "prompt"} == \
        {k: v for k, v in theirs["metadata"].items() if k != "prompt"}
    assert ours["qParams"] == theirs["qParams"]
    assert [nd["node_id"] for nd in ours["nodes"]] == [nd["node_id"] for nd in theirs["nodes"]]
    for a, b in zip(ours["nodes"], theirs["nodes"]):
        assert sorted(a) == sorted(b) == NODE
        for k in NODE:
            assert a[k] == (pytest.approx(b[k], rel=1e-5, abs=1e-7) if isinstance(b[k], float) else b[k]), (a, b, k)
    assert [(ln["source"], ln["target"]) for ln in ours["links"]] == [(ln["source"], ln["target"]) for ln in theirs["links"]]
    assert [ln["weight"] for ln in ours["links"]] == pytest.approx([ln["weight"] for ln in theirs["links"]], rel=1e-6)
