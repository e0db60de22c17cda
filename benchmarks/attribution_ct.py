"""saekit's attribution graph against circuit-tracer's: the same model, prompt, transcoder set and settings.

saekit builds the graph here (saekit.attribution.attribute); the transcoder set is exported with
`saekit convert SET OUT --to circuit-tracer` and the real circuit-tracer (0.5, .venv-ct: `make peers-ct`) builds
its graph in a subprocess with its nnsight backend (its TransformerLens backend cannot read the MLP input of a
Llama: see saekit/interop.py), on the same token ids (BOS first), every active feature a node
(max_feature_nodes None on both), its own choice of logit targets (top logits up to 10 / 95%, as saekit's).
Compared, nodes matched by (layer, position, latent) / (layer, position) / position / token id:
  - Pearson r of edge weights on the unpruned adjacency (entries where either graph has a non-zero edge; also
    per target kind), the largest difference, and the nodes only one side has (activation disagreements);
  - the overlap of the top-50 nodes by influence (each side's own influence code);
  - replacement / completeness scores, each side's own code;
  - wall time of the graph (model loading apart), and each side's frontend JSON (the keys of saekit's
    graph_json against circuit-tracer's create_graph_files).
circuit-tracer loads the model from a local Hugging Face directory, offline; the default model is a GGUF saekit
dequantizes into one (saekit.lm), whose config.json transformers 5 wrote: circuit-tracer's transformers 4.57
reads `rope_theta` (not `rope_parameters`), would try to load the GGUF quantizer named in it, knows no
tokenizer class "TokenizersBackend", refuses a safetensors file without the header tag format=pt and leaves a
tied weight that safetensors stored once under another name (embed_tokens = lm_head) on the meta device, so the
worker reads a copy of the folder with config.json and tokenizer_config.json translated and the weights re-saved
with the tag and the tied alias stored (the same tensors; tokenizer.json linked); the logits of both
sides on the prompt are compared to show it is the same model. If circuit-tracer cannot run the model, the
output says where and why, and the comparison runs on a tiny random Llama with random transcoders (--tiny).

    python benchmarks/attribution_ct.py --json runs/bench/attribution_ct.json           # default model, demo-circuits
    python benchmarks/attribution_ct.py --tiny --json /tmp/ct.json                      # tiny random Llama
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CT_PY = Path(os.environ.get("SAEKIT_CT_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
PROMPT = "The capital of France is"
TINY_PROMPT = "The central bank raised interest rates and the markets fell"
TINY_TEXTS = ["The central bank raised interest rates on Thursday. Markets fell as shares in banks slid.",
              "The striker scored twice as the club won the cup final in front of many fans.",
              "Shares in the mobile phone firm rose after it reported record profits.",
              "The film won three awards, including best actress, at a ceremony in London."]


# ----------------------------------------------------------------------------- circuit-tracer's side (.venv-ct)

def ct_worker(job_path: str) -> None:
    """Runs in .venv-ct: never imports saekit. Writes the graph's tensors and a result JSON; a failure is recorded
    with its stage instead."""
    here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow HF's `kernels` package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    result: dict[str, Any] = {"stage": "import"}
    try:
        from importlib.metadata import version

        from circuit_tracer import ReplacementModel, attribute
        from circuit_tracer.graph import compute_graph_scores, compute_node_influence
        from circuit_tracer.utils.create_graph_files import create_graph_files
        from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
        from safetensors.torch import save_file

        result["versions"] = {p: version(p) for p in ("circuit-tracer", "nnsight", "transformers", "torch")}
        result["stage"] = "load transcoders"
        t0 = time.perf_counter()
        set_dir = Path(job["set_dir"])
        os.environ["CIRCUIT_TRACER_CACHE_DIR"] = str(set_dir.parent)  # its local cache layout: read offline
        transcoders, _ = load_transcoder_from_hub(set_dir.name, device=torch.device("cpu"), dtype=torch.float32)
        result["stage"] = "load model"
        model = ReplacementModel.from_pretrained_and_transcoders(job["model_dir"], transcoders, backend="nnsight",
                                                                 device=torch.device("cpu"), dtype=torch.float32)
        result["load_s"] = time.perf_counter() - t0
        tokens = torch.tensor(job["tokens"])
        result["stage"] = "attribute"
        t0 = time.perf_counter()
        graph = attribute(tokens, model, max_feature_nodes=None, batch_size=job["batch_size"],
                          max_n_logits=job["max_logits"], desired_logit_prob=job["logit_probability"])
        result["attribute_s"] = time.perf_counter() - t0
        result["stage"] = "scores"
        w = torch.zeros(graph.adjacency_matrix.shape[0])
        w[-len(graph.logit_targets):] = graph.logit_probabilities
        influence = compute_node_influence(graph.adjacency_matrix, w)
        replacement, completeness = compute_graph_scores(graph)
        result["stage"] = "frontend json"
        create_graph_files(graph, "circuit-tracer", job["frontend_dir"], scan=graph.scan or "saekit")
        result["stage"] = "logits"
        with torch.no_grad():
            logits, _ = model.get_activations(tokens)
        sel = graph.selected_features
        save_file({"adjacency": graph.adjacency_matrix.float().contiguous(),
                   "features": graph.active_features[sel].long().contiguous(),
                   "activations": graph.activation_values[sel].float().contiguous(),
                   "influence": influence.float().contiguous(), "logits": logits[0, -1].float().contiguous(),
                   "tokens": graph.input_tokens.long().cpu().contiguous()}, job["tensors"])
        result.update({"stage": "done", "n_layers": graph.cfg.n_layers, "active_features": len(graph.active_features),
                       "targets": [{"token": t.token_str, "vocab_index": t.vocab_idx, "probability": float(p)}
                                   for t, p in zip(graph.logit_targets, graph.logit_probabilities)],
                       "scores": {"replacement": replacement, "completeness": completeness}})
    except Exception as e:  # recorded for the report: which stage failed and why
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-6000:]
    Path(job["result"]).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- inputs

def build_tiny(root: Path, d_model: int = 64) -> Path:
    """A random 2-layer Llama (byte-level BPE trained on a few sentences, seed 0) saved to ROOT/tinylm."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lm = root / "tinylm"
    if not (lm / "config.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(TINY_TEXTS, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(fast), hidden_size=d_model, intermediate_size=2 * d_model,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                          pad_token_id=fast.pad_token_id)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # visible norm weights, so that a norm applied wrongly shows
            model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, d_model))
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.save_pretrained(lm)
        fast.save_pretrained(lm)
    return lm


def random_set(model_arg: str, prompt: str, run: Path, d_sae: int, k: int, skip_layers: tuple[int, ...] = ()) -> Path:
    """A random BatchTopK transcoder per MLP of `model_arg` (skip paths on `skip_layers`), saved as a saekit run.
    Each threshold lets at most 2k latents of a prompt token through, so circuit-tracer's JumpReLU and saekit's
    BatchTopK (which looks at the top 4k candidates) fire the same latents."""
    from saekit.config import SaeConfig
    from saekit.lm import load_model, mlp_pair
    from saekit.sae import SparseAutoencoder
    from saekit.steer import prompt_tokens

    if run.is_dir():
        return run
    model = load_model(model_arg)
    ids = torch.tensor(prompt_tokens(model.tokenizer, prompt))
    names = [mlp_pair(L)[0] for L in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n in names)
    d = model.cfg.d_model
    for L in range(model.cfg.n_layers):
        t = SparseAutoencoder.initialized(SaeConfig(d_in=d, d_sae=d_sae, k=k, transcoder=True, skip=L in skip_layers,
                                                    architecture="batchtopk"), seed=L, init="independent")
        with torch.no_grad():
            t.b_enc.fill_(0.1)
            if t.W_skip is not None:
                t.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(L))
            pre = (cache[names[L]][0] - t.input_shift) @ t.W_enc + t.b_enc
            t.threshold.fill_(pre[1:].topk(2 * k, dim=-1).values[:, -1].max().item() + 1e-3)  # no tie at the cut
        t.info = {"hook": names[L], "hook_out": mlp_pair(L)[1], "kind": "transcoder", "model": model_arg,
                  "model_arg": model_arg, "context_size": 32}
        t.save(run / f"blocks.{L}.mlp" / "tc")
    return run


def ct_model_dir(hf_dir: Path, out: Path) -> tuple[Path, list[str]]:
    """A copy of a Hugging Face model folder that transformers 4.57 reads as transformers 5 does: config.json
    translated (rope_parameters → rope_theta / rope_scaling; the GGUF quantization_config dropped: the weights
    are already dequantized fp32), tokenizer_config.json's transformers-5 tokenizer class named as 4.57 knows it,
    untagged safetensors re-saved with format=pt, every other file linked. Returns (folder, what was changed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    changes = []
    if "quantization_config" in cfg:
        changes.append(f"dropped quantization_config {cfg.pop('quantization_config')} (weights already fp32)")
    rope = cfg.pop("rope_parameters", None)
    if rope:
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        changes.append(f"rope_parameters {rope} → rope_theta {cfg['rope_theta']}"
                       + (f", rope_scaling {cfg.get('rope_scaling')}" if "rope_scaling" in cfg else ""))
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    tok = json.loads((hf_dir / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for a tokenizer.json tokenizer
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        changes.append("tokenizer_class TokenizersBackend → PreTrainedTokenizerFast (the same tokenizer.json)")
    rewrite = {"config.json", "tokenizer_config.json"}
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            meta, names = st.metadata() or {}, set(st.keys())
        # safetensors' save_model stores a tied tensor once and names its aliases in the header
        # ({"model.embed_tokens.weight": "lm_head.weight"}): transformers 5 reads them, 4.57 leaves the alias
        # unloaded (on the meta device); and 4.57 refuses a header without format=pt
        aliases = {k: v for k, v in meta.items() if v in names and k not in names}
        if meta.get("format") != "pt" or aliases:
            rewrite.add(f.name)
            if not (out / f.name).is_file():
                tensors = load_file(str(f))
                tensors.update({k: tensors[v].clone() for k, v in aliases.items()})
                save_file(tensors, str(out / f.name), metadata={"format": "pt"})
            changes.append(f"{f.name} re-saved with the header tag format=pt"
                           + (f" and its tied aliases stored ({aliases})" if aliases else "") + " (the same tensors)")
    for f in hf_dir.iterdir():
        if f.name not in rewrite and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return out, changes


# ----------------------------------------------------------------------------- the comparison

def node_keys(features: torch.Tensor, n_layers: int, n_pos: int, logit_ids: list[int]) -> list[tuple]:
    """A key per node, in circuit-tracer's (and saekit's) node order."""
    keys: list[tuple] = [("feature", *map(int, f)) for f in features.tolist()]
    keys += [("error", L, p) for L in range(n_layers) for p in range(n_pos)]
    keys += [("token", p) for p in range(n_pos)]
    keys += [("logit", int(v)) for v in logit_ids]
    return keys


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))


def compare(sk, ct: dict[str, torch.Tensor], ct_info: dict[str, Any], top: int = 50) -> dict[str, Any]:
    """Edge weights, node sets, top nodes by influence and scores of saekit's graph `sk` against circuit-tracer's."""
    ks = node_keys(sk.features, sk.n_layers, sk.n_pos, [t["vocab_index"] for t in sk.targets])
    kc = node_keys(ct["features"], ct_info["n_layers"], len(ct["tokens"]),
                   [t["vocab_index"] for t in ct_info["targets"]])
    pos_c = {key: i for i, key in enumerate(kc)}
    common = [(i, pos_c[key]) for i, key in enumerate(ks) if key in pos_c]
    i_s = torch.tensor([a for a, _ in common])
    i_c = torch.tensor([b for _, b in common])
    As = sk.adjacency[i_s][:, i_s]
    Ac = ct["adjacency"][i_c][:, i_c]
    either = (As != 0) | (Ac != 0)
    diff = (As - Ac).abs()
    row_kind = [ks[i][0] for i in i_s.tolist()]
    by_target = {}
    for kind in ("feature", "logit"):
        rows = torch.tensor([r == kind for r in row_kind])
        m = either & rows[:, None]
        if m.any():
            by_target[kind] = {"pearson": pearson(As[m], Ac[m]), "edges": int(m.sum())}
    only_s = [ks[i] for i in range(len(ks)) if ks[i] not in pos_c]
    set_s = set(ks)
    only_c = [key for key in kc if key not in set_s]
    feat = torch.tensor([ks[a][0] == "feature" for a, _ in common])
    act_s = sk.activations[i_s[feat]]
    act_c = ct["activations"][i_c[feat]]

    def top_nodes(keys: list[tuple], inf: torch.Tensor, features_only: bool) -> set:
        ok = [i for i, key in enumerate(keys) if key[0] != "logit" and (key[0] == "feature" or not features_only)]
        order = inf[ok].argsort(descending=True)[:top]
        return {keys[ok[int(j)]] for j in order}

    inf_s = sk.node_influence()
    overlap = {name: len(top_nodes(ks, inf_s, f) & top_nodes(kc, ct["influence"], f)) / top
               for name, f in (("all_nodes", False), ("feature_nodes", True))}
    return {"nodes": {"saekit": len(ks), "circuit_tracer": len(kc), "matched": len(common),
                      "features_only_saekit": sum(k[0] == "feature" for k in only_s),
                      "features_only_circuit_tracer": sum(k[0] == "feature" for k in only_c),
                      "logits_only_saekit": [k[1] for k in only_s if k[0] == "logit"],
                      "logits_only_circuit_tracer": [k[1] for k in only_c if k[0] == "logit"],
                      "activation_max_abs_diff": float((act_s - act_c).abs().max()) if len(act_s) else 0.0},
            "edges": {"pearson": pearson(As[either], Ac[either]), "pearson_all_entries": pearson(As, Ac),
                      "nonzero_edges": int(either.sum()), "by_target": by_target,
                      "max_abs_diff": float(diff.max()), "max_abs_weight": float(Ac.abs().max()),
                      "relative_max_diff": float(diff.max() / Ac.abs().max().clamp_min(1e-30)),
                      "sign_disagreements": int(((As > 0) & (Ac < 0) | (As < 0) & (Ac > 0)).sum())},
            "top50_overlap": overlap,
            "scores": {"saekit": sk.scores(), "circuit_tracer": ct_info["scores"]}}


def frontend_keys(sk, ct_file: Path) -> dict[str, Any]:
    """saekit's graph JSON against circuit-tracer's create_graph_files output: key sets at each level, and the
    share of node ids the two pruned graphs have in common."""
    from saekit.attribution.graph_json import KEY, frontend_dict

    ours = frontend_dict(sk, "saekit")
    theirs = json.loads(ct_file.read_text())

    def keys(obj: dict) -> dict[str, list[str]]:
        return {"top": sorted(k for k in obj if k != KEY), "metadata": sorted(obj["metadata"]),
                "qParams": sorted(obj["qParams"]), "node": sorted({k for nd in obj["nodes"] for k in nd}),
                "link": sorted({k for ln in obj["links"] for k in ln})}

    a, b = keys(ours), keys(theirs)
    ids_a, ids_b = {nd["node_id"] for nd in ours["nodes"]}, {nd["node_id"] for nd in theirs["nodes"]}
    return {"same_keys": a == b, "saekit": a, "circuit_tracer": b,
            "pruned_nodes": {"saekit": len(ids_a), "circuit_tracer": len(ids_b),
                             "jaccard": len(ids_a & ids_b) / max(len(ids_a | ids_b), 1)},
            "pruned_links": {"saekit": len(ours["links"]), "circuit_tracer": len(theirs["links"])}}


def run_pair(model_arg: str, run_dir: Path, prompt: str, work: Path, args) -> dict[str, Any]:
    """Both graphs of `prompt` on one model and transcoder set, and their comparison."""
    from safetensors.torch import load_file

    from saekit.attribution import attribute
    from saekit.config import AttributionConfig
    from saekit.interop import convert
    from saekit.lm import load_model, model_id, resolve
    from saekit.runner import check_every_layer, transcoder_set
    from saekit.steer import prompt_tokens

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": model_arg, "transcoders": str(run_dir), "prompt": prompt}
    t0 = time.perf_counter()
    model = load_model(model_arg)
    tcs = transcoder_set(run_dir, "the comparison needs transcoders")
    check_every_layer(tcs, model.cfg.n_layers, run_dir, "the graph needs a transcoder at every MLP",
                      "or pass --transcoders of a complete set")
    out["saekit_load_s"] = time.perf_counter() - t0
    ids = prompt_tokens(model.tokenizer, prompt)
    cfg = AttributionConfig(max_feature_nodes=None, batch_size=args.batch_size, max_tokens=max(64, len(ids)))
    t0 = time.perf_counter()
    sk = attribute(model, tcs, ids, cfg=cfg, progress=False)
    out["saekit_attribute_s"] = time.perf_counter() - t0
    with torch.no_grad():
        sk_logits = model(torch.tensor(ids)[None])[0, -1].float()
    out.update({"model_id": model_id(model), "tokens": ids, "token_strings": sk.token_strings,
                "active_features": sk.meta["active_features"], "saekit_nodes": sk.n_nodes,
                "saekit_targets": sk.targets, "saekit_peak_rss_gb": _rss_gb(resource.RUSAGE_SELF)})
    set_dir = convert(run_dir, work / "ct-cache" / "saekit-set", to="circuit-tracer", overwrite=True)
    model_dir, changes = ct_model_dir(Path(resolve(model_arg)[0]), work / "ct-model")
    out["ct_model_dir_changes"] = changes
    job = {"set_dir": str(set_dir), "model_dir": str(model_dir), "tokens": ids, "batch_size": args.ct_batch_size,
           "max_logits": cfg.max_logits, "logit_probability": cfg.logit_probability, "threads": args.threads,
           "tensors": str(work / "ct-graph.safetensors"), "frontend_dir": str(work / "ct-frontend"),
           "result": str(work / "ct-result.json")}
    (work / "ct-job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([str(args.ct_python), str(Path(__file__).resolve()), "--ct-worker", str(work / "ct-job.json")],
                          env=env, capture_output=True, text=True, timeout=args.timeout)
    out["circuit_tracer_process_s"] = time.perf_counter() - t0
    out["circuit_tracer_peak_rss_gb"] = _rss_gb(resource.RUSAGE_CHILDREN)
    if not Path(job["result"]).is_file():
        out["circuit_tracer"] = {"stage": "start", "error": f"worker exit {done.returncode}", "stderr": done.stderr[-4000:]}
        return out
    info = json.loads(Path(job["result"]).read_text())
    out["circuit_tracer"] = info
    if info.get("error"):
        out["circuit_tracer"]["stderr"] = done.stderr[-3000:]
        return out
    ct = load_file(job["tensors"])
    out["logits_max_abs_diff"] = float((ct["logits"] - sk_logits).abs().max())
    out["same_tokens"] = ct["tokens"].tolist() == ids
    out["comparison"] = compare(sk, ct, info)
    out["times"] = {"saekit_s": out["saekit_attribute_s"], "circuit_tracer_s": info["attribute_s"],
                    "ratio_ct_over_saekit": info["attribute_s"] / out["saekit_attribute_s"]}
    out["frontend_json"] = frontend_keys(sk, work / "ct-frontend" / "circuit-tracer.json")
    if any(t.W_skip is not None for t in tcs.values()):
        out["skip_gradient_check"] = skip_check(model, tcs, ids, cfg, sk, ct)
    return out


def skip_check(model, tcs, ids: list[int], cfg, sk, ct: dict[str, torch.Tensor]) -> dict[str, float]:
    """Where the set has skip paths: the feature → logit edges with and without saekit's gradient through the
    skip paths (W_skip zeroed in copies: the error nodes change, so only feature columns are compared), against
    circuit-tracer's."""
    import copy

    from saekit.attribution import attribute

    flat = {L: copy.deepcopy(t) for L, t in tcs.items()}
    for t in flat.values():
        if t.W_skip is not None:
            with torch.no_grad():
                t.W_skip.zero_()
    no_skip = attribute(model, flat, ids, cfg=cfg, progress=False)
    keyc = {tuple(f): i for i, f in enumerate(ct["features"].tolist())}
    out = {}
    for name, g in (("with_skip_gradient", sk), ("without_skip_gradient", no_skip)):
        shared = [(i, keyc[tuple(f)]) for i, f in enumerate(g.features.tolist()) if tuple(f) in keyc]
        a = g.adjacency[g.logit_start:, [i for i, _ in shared]]
        b = ct["adjacency"][-len(g.targets):, [j for _, j in shared]]
        out[name] = pearson(a.flatten(), b.flatten())
    return {"feature_to_logit_pearson_" + k: v for k, v in out.items()}


def _rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux: KiB


def summary(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"{res['model']}: {res['error']}"
    if "comparison" not in res:
        ct = res.get("circuit_tracer", {})
        return f"{res['model']}: circuit-tracer failed at {ct.get('stage')!r}: {ct.get('error')}"
    c, t = res["comparison"], res["times"]
    s = c["scores"]
    rows = [f"{res['model']} / {res['transcoders']}: {len(res['tokens'])} tokens, {res['active_features']:,} active "
            f"features, {c['nodes']['matched']:,} of {c['nodes']['saekit']:,} / {c['nodes']['circuit_tracer']:,} nodes "
            f"matched; logits differ by {res['logits_max_abs_diff']:.2g}",
            "| measure | saekit | circuit-tracer |", "|---|---|---|",
            f"| edge Pearson r (non-zero entries, n={c['edges']['nonzero_edges']:,}) | {c['edges']['pearson']:.6f} | |",
            f"| largest edge difference / largest edge | {c['edges']['relative_max_diff']:.2g} | |",
            f"| top-50 overlap by influence (all / features) | {c['top50_overlap']['all_nodes']:.2f} / "
            f"{c['top50_overlap']['feature_nodes']:.2f} | |",
            f"| replacement score | {s['saekit']['replacement']:.4f} | {s['circuit_tracer']['replacement']:.4f} |",
            f"| completeness score | {s['saekit']['completeness']:.4f} | {s['circuit_tracer']['completeness']:.4f} |",
            f"| graph wall time (s) | {t['saekit_s']:.2f} | {t['circuit_tracer_s']:.2f} |",
            f"| frontend JSON keys equal | {res['frontend_json']['same_keys']} | |"]
    if "skip_gradient_check" in res:
        rows.append("skip paths: feature → logit edge r against circuit-tracer, saekit with / without its gradient "
                    "through them: " + " / ".join(f"{v:.6f}" for v in res["skip_gradient_check"].values()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct-worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="default")
    p.add_argument("--transcoders", default=str(ROOT / "runs" / "demo-circuits"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--tiny", action="store_true", help="only the tiny random Llama with random transcoders")
    p.add_argument("--tiny-skip", action="store_true", help="with the tiny model, also a set with a skip path on layer 1")
    p.add_argument("--random-transcoders", action="store_true",
                   help="the model with random BatchTopK transcoders (d_sae 512, k 8) instead of --transcoders")
    p.add_argument("--batch-size", type=int, default=256, help="saekit's targets per backward batch")
    p.add_argument("--ct-batch-size", type=int, default=256, help="circuit-tracer's batch_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--ct-python", type=Path, default=CT_PY)
    p.add_argument("--workdir")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.ct_worker:
        return ct_worker(args.ct_worker)
    if not args.ct_python.is_file():
        raise SystemExit(f"no circuit-tracer python at {args.ct_python}: run `make peers-ct` (circuit-tracer 0.5.0).")
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]
    from saekit.errors import SaekitError

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attribution-ct-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": _machine(), "threads": args.threads}
    if not args.tiny:
        try:
            run = (random_set(args.model, args.prompt, work / "default" / "random-set", 512, 8)
                   if args.random_transcoders else Path(args.transcoders))
            res["default"] = run_pair(args.model, run, args.prompt, work / "default", args)
            print(summary(res["default"]), flush=True)
        except SaekitError as e:  # e.g. an incomplete set: said, and the tiny comparison runs instead
            res["default"] = {"model": args.model, "transcoders": args.transcoders, "error": str(e)}
            print(f"{args.model}: {e}", flush=True)
    if args.tiny or "comparison" not in res.get("default", {}):
        lm = build_tiny(work / "tiny")
        for name, skip in (("tiny", ()), ("tiny_skip", (1,)))[: 2 if args.tiny_skip else 1]:
            run = random_set(str(lm), TINY_PROMPT, work / name / "tc", 256, 8, skip)
            res[name] = run_pair(str(lm), run, TINY_PROMPT, work / name, args)
            print(summary(res[name]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}"


if __name__ == "__main__":
    main()
