"""`saekit analyze` (+ `saekit export-neuronpedia`) against SAEDashboard's Neuronpedia runner: the same SAE, model
and tokens; the time of each, and what each page holds, field by field.

  saekit        analyze: one pass over the tokens (one model forward; every latent's statistics reduced from the
                sparse codes), then export_neuronpedia (the store as Neuronpedia batch JSON)
  SAEDashboard  sae-dashboard 0.8.0, NeuronpediaRunner.run: per batch of 128 latents, SaeVisRunner over ALL the
                tokens (the hook's activations are computed on the first batch, cached on disk and reloaded for the
                next; every batch encodes every token with the whole SAE and keeps its 128 latents), then its
                Neuronpedia converter writes batch-N.json. It runs with .venv-dash's python (`make bench-dashboard`
                builds that venv: its pins clash with ours).

The model. transformer-lens 2.x (SAEDashboard pins < 3) cannot load the default model: HookedTransformer.from_pretrained
accepts only the models of its own table (231 names, no SmolLM2), reads their configs from the hub, and has no GGUF
reader (transformers 4.56 needs the `gguf` package for that, and its LlamaConfig does not read transformers 5's
`rope_parameters`, so rope_theta would fall back to 10,000). The worker therefore builds the same model by hand: the
GGUF weights saekit dequantized (its HF-directory cache) → transformers' LlamaForCausalLM → transformer-lens' own
convert_llama_weights → a HookedSAETransformer configured from the GGUF's config and processed as from_pretrained does
(fold_ln, center_unembed, fold_value_biases). Its hook activations are checked against saekit's on every run.

The SAE. saekit writes SAELens' layout; SAEDashboard calls sae.fold_W_dec_norm(), which sae-lens 6.x refuses for
a TopK SAE unless rescale_acts_by_decoder_norm is set (so SAEDashboard 0.8.0 cannot run a plain TopK SAE with the
sae-lens it installs). Our decoder rows are unit-norm (checked), so the SAELens copy sets it and no number changes.

Cost. SAEDashboard's time is linear in the number of latent batches: every batch after the first costs the same
(it re-encodes every token with the whole SAE and redoes the statistics), and the first also runs the model. It
runs on two subset sizes (--batches, separate processes, a fresh activation cache each); the larger run gives the
per-batch cost, (run − first batch) / (batches − 1), and the run over every latent is EXTRAPOLATED from it (the
table says so); the slope between the two runs' totals checks the linearity. Wall and process CPU time (all
threads) are both reported: the machine is shared, CPU time is the steadier figure, and the load average is printed
beside them. Model loading is timed apart.

    python benchmarks/saedashboard.py --sae runs/demo/k32-d4608 --contexts 512 --batches 2,6   (make bench-dashboard)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH = 128  # SAEDashboard's n_features_at_a_time in its Neuronpedia runner
TOKENS_PER_FORWARD = 32  # its n_prompts_in_forward_pass (prompts per model forward)


class Clock:
    """Wall and process CPU time (all threads) of named phases, and the load average at each lap."""

    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        self.phases: dict[str, dict[str, float]] = {}

    def lap(self, name: str) -> dict[str, float]:
        t, c = time.perf_counter(), time.process_time()
        self.phases[name] = {"wall_s": t - self.t, "cpu_s": c - self.c, "load1": os.getloadavg()[0]}
        self.t, self.c = t, c
        return self.phases[name]


# ----------------------------------------------------------------------------- SAEDashboard side (.venv-dash)

def build_tl2_model(hf_dir: Path, tok_dir: Path):
    """The default model (any Llama-architecture HF directory saekit wrote) as a transformer-lens 2.x
    HookedSAETransformer, offline: see the module doc for why from_pretrained cannot."""
    from sae_lens import HookedSAETransformer
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    c = json.loads((hf_dir / "config.json").read_text())
    if c.get("model_type") != "llama":
        raise SystemExit(f"{hf_dir}: model_type {c.get('model_type')!r}; this benchmark builds Llama models only")
    rope = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    cfg = HookedTransformerConfig(
        d_model=c["hidden_size"], d_head=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        n_heads=c["num_attention_heads"], d_mlp=c["intermediate_size"], n_layers=c["num_hidden_layers"], n_ctx=2048,
        eps=c["rms_norm_eps"], d_vocab=c["vocab_size"], act_fn="silu", n_key_value_heads=c["num_key_value_heads"],
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], final_rms=True, gated_mlp=True,
        rotary_base=float(rope), original_architecture="LlamaForCausalLM", default_prepend_bos=False,
        dtype=torch.float32, device="cpu")
    skip = ("quantization_config", "rope_parameters", "dtype", "architectures", "transformers_version")
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in c.items() if k not in skip}, rope_theta=float(rope)))
    sd = load_file(str(hf_dir / "model.safetensors"))
    for a, b in (("model.embed_tokens.weight", "lm_head.weight"), ("lm_head.weight", "model.embed_tokens.weight")):
        if a not in sd and b in sd:  # tied embeddings: a saved copy may keep either one
            sd[a] = sd[b]
    hf.load_state_dict(sd, strict=True)
    # transformers 5 wrote the tokenizer; 4.56 reads its tokenizer.json. The separator <|endoftext|> is made the pad
    # token, so SAEDashboard's ignore set {pad, bos, eos} leaves out what saekit leaves out (all special tokens).
    vocab = json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]
    special = {t["content"]: t["id"] for t in vocab}
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    sep = "<|endoftext|>" if "<|endoftext|>" in special else tc.get("eos_token")
    PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token=tc.get("bos_token"),
                            eos_token=tc.get("eos_token"), pad_token=sep, unk_token=tc.get("unk_token")
                            ).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = HookedSAETransformer(cfg, tokenizer=tok)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=True, center_writing_weights=True,
                                      center_unembed=True, fold_value_biases=True)
    model.eval()
    return model


def dash_worker(job: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    import sae_dashboard.neuronpedia.neuronpedia_runner as npr
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
    from safetensors.torch import load_file

    clock = Clock()
    work = Path(job["work"])
    model = build_tl2_model(Path(job["hf_dir"]), work / "tokenizer")
    check = load_file(job["check"])
    with torch.no_grad():
        _, cache = model.run_with_cache(check["tokens"], names_filter=job["hook"], stop_at_layer=job["layer"] + 1)
    got = cache[job["hook"]][check["ctx"].long(), check["pos"].long()]
    rel = ((got - check["acts"]).norm(dim=1) / check["acts"].norm(dim=1)).max().item()
    clock.lap("model")
    tokens = load_file(job["tokens"])["tokens"]

    class Offline(npr.NeuronpediaRunner):
        """The runner with the model built above, the given tokens, and its activation cache in `work`."""

        def _initialize_model(self):
            self.model = model
            self.hook_name = self.sae.cfg.metadata.hook_name

        def _setup_activation_store(self):
            self.activations_store = None
            self.cached_activations_dir = work / "cached_activations"

        def get_tokens(self):
            return tokens

    batches: list[dict[str, float]] = []

    class TimedVis(npr.SaeVisRunner):
        def run(self, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = super().run(*a, **k)
            batches.append({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                            "load1": os.getloadavg()[0]})
            return out

    npr.SaeVisRunner = TimedVis
    cfg = NeuronpediaRunnerConfig(
        sae_set="saekit-bench", sae_path=job["sae_saelens"], from_local_sae=True, outputs_dir=str(work / "out"),
        huggingface_dataset_path=job["dataset"], n_prompts_total=len(tokens), n_tokens_in_prompt=tokens.shape[1],
        n_prompts_in_forward_pass=TOKENS_PER_FORWARD, n_features_at_a_time=PER_BATCH, start_batch=0,
        end_batch=job["batches"] - 1, sae_dtype="float32", model_dtype="float32", ignore_positions=[0],
        ignore_high_activation_norm_multiple=job["massive_multiple"])
    runner = Offline(cfg)
    clock.lap("init")
    runner.run()
    clock.lap("run")
    (work / "vocab.json").write_text(json.dumps(runner.vocab_dict))
    return {"side": "saedashboard", "batches": job["batches"], "phases": clock.phases, "batch_times": batches,
            "out": runner.cfg.outputs_dir, "vocab": str(work / "vocab.json"), "activation_max_rel_err": rel,
            "versions": {d: version(d) for d in ("sae-dashboard", "sae-lens", "transformer-lens", "transformers",
                                                  "torch")}}


# ----------------------------------------------------------------------------- saekit side (.venv)

def saekit_worker(job: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    from safetensors.torch import save_file

    from saekit.config import NeuronpediaConfig
    from saekit.features import FeatureConfig, analyze
    from saekit.harvest import Harvester
    from saekit.lm import load_model
    from saekit.neuronpedia import export_neuronpedia

    clock = Clock()
    model = load_model(job["model_arg"])
    clock.lap("model")
    work = Path(job["work"])
    cfg = FeatureConfig(tokens=job["kept_tokens"], batch_contexts=16)
    analyze(job["sae_dir"], work / "store", cfg, model=model, progress=False, overwrite=True)
    clock.lap("analyze")
    export_neuronpedia(work / "store", work / "neuronpedia", NeuronpediaConfig(), model=model, overwrite=True)
    clock.lap("export")
    from safetensors.torch import load_file

    tokens = load_file(job["tokens"])["tokens"][:4]  # the activations SAEDashboard's model must reproduce
    acts, _, pos, ctx = next(Harvester(model, [job["hook"]]).batches(tokens, 4))
    save_file({"tokens": tokens.contiguous(), "acts": acts[job["hook"]].contiguous(), "ctx": ctx.contiguous(),
               "pos": pos.contiguous()}, job["check"])
    man = json.loads((work / "store" / "manifest.json").read_text())
    return {"side": "saekit", "phases": clock.phases, "store_timings": man["timings"], "tokens": man["tokens"],
            "tokens_seen": man["tokens_seen"], "massive_excluded": man["massive_excluded"],
            "versions": {d: version(d) for d in ("saekit", "transformer-lens", "transformers", "torch")}}


# ----------------------------------------------------------------------------- orchestration (.venv)

def prepare(args) -> dict[str, Any]:
    """The SAE in SAELens layout, the contexts both sides read (the SAE's own dataset, packed as saekit packs it),
    and the number of tokens saekit analyses in them (position 0 and special tokens left out, as SAEDashboard's
    ignore lists do)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from saekit.config import DataConfig
    from saekit.data import load_contexts
    from saekit.harvest import keep_mask
    from saekit.interop import convert
    from saekit.lm import hook_layer, resolve
    from saekit.sae import load_sae
    from saekit.tokens import special_ids

    sae = load_sae(args.sae)
    if sae.cfg.architecture != "topk" or not sae.hook or hook_layer(sae.hook) is None:
        raise SystemExit(f"{args.sae}: a TopK SAE at a blocks.L hook is needed (got {sae.cfg.architecture}, {sae.hook})")
    data = DataConfig.from_manifest(sae.info)
    hf_dir, model_id = resolve(data.model)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    contexts = load_contexts(tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                             data.text_column)[0].tokens[: args.contexts]
    work = Path(args.workdir)
    save_file({"tokens": contexts.contiguous()}, str(work / "tokens.safetensors"))
    saelens = convert(args.sae, work / "sae-saelens", to="saelens", overwrite=True)
    # SAEDashboard calls sae.fold_W_dec_norm(), which sae-lens 6.x refuses for a TopK SAE unless
    # rescale_acts_by_decoder_norm is set. Our decoder rows are unit-norm, so setting it changes no number.
    norm_err = float((sae.W_dec.detach().norm(dim=1) - 1).abs().max())
    if norm_err > 1e-5:
        raise SystemExit(f"{args.sae}: decoder rows are not unit-norm (max |norm - 1| {norm_err:.1e})")
    cfg_path = Path(saelens) / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rescale_acts_by_decoder_norm": True}, indent=2))
    kept = int(keep_mask(contexts, special_ids(tokenizer)).sum())
    return {"sae_dir": str(Path(args.sae).resolve()), "sae_saelens": str(saelens), "hf_dir": str(hf_dir),
            "model_arg": data.model, "model_id": model_id, "dataset": data.dataset, "hook": sae.hook,
            "layer": hook_layer(sae.hook), "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "contexts": len(contexts),
            "context_size": contexts.shape[1], "kept_tokens": kept, "tokens": str(work / "tokens.safetensors"),
            "check": str(work / "check.safetensors"),
            "massive_multiple": float(sae.info.get("massive_multiple") or 10.0), "decoder_norm_err": norm_err}


def run_worker(side: str, python: str, job: dict[str, Any]) -> dict[str, Any]:
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    print(f"  {side} {'' if side == 'saekit' else str(job['batches']) + ' batches '}… (load {load0:.1f})", flush=True)
    run = subprocess.run([python, str(Path(__file__).resolve()), "--worker", side, str(work / "job.json")], env=env,
                         cwd=work, capture_output=True, text=True)
    (work / "log.txt").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"{side} worker failed (exit {run.returncode}); its log: {work / 'log.txt'}\n"
                         f"{run.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads((work / "result.json").read_text())
    result["process"] = {"wall_s": time.perf_counter() - t0, "cpu_s": (after.ru_utime + after.ru_stime)
                         - (before.ru_utime + before.ru_stime), "load1_start": load0, "load1_end": os.getloadavg()[0]}
    p = result["phases"]
    print("    " + ", ".join(f"{k} {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} s CPU" for k, v in p.items()), flush=True)
    return result


def fit(dash: list[dict[str, Any]], n_batches: int) -> dict[str, Any]:
    """Per-batch cost and the whole SAE extrapolated from the larger run. Every batch after the first does the same
    work (the first also runs the model and caches its activations): its cost is the median of those batches (a
    median, because other users' load slows single batches 2-4× on this shared machine) plus each batch's share of
    the run's JSON writing. Linearity check: the slope between the two runs' totals (noisier: it holds the first
    batches' forwards)."""
    import statistics

    a, b = sorted(dash, key=lambda r: r["batches"])
    out: dict[str, Any] = {"n_batches": n_batches}
    for key in ("wall_s", "cpu_s"):
        times = [t[key] for t in b["batch_times"]]
        writing = (b["phases"]["run"][key] - sum(times)) / b["batches"]
        per_batch = statistics.median(times[1:]) + writing
        out[key] = {"first_batch": times[0], "per_batch": per_batch, "later_batches": times[1:],
                    "later_batches_small_run": [t[key] for t in a["batch_times"][1:]],
                    "slope_between_runs": (b["phases"]["run"][key] - a["phases"]["run"][key]) / (b["batches"] - a["batches"]),
                    "all_latents": times[0] + writing + (n_batches - 1) * per_batch}
    return out


# ----------------------------------------------------------------------------- what the pages hold

CONTENTS = [  # (item, saekit store, SAEDashboard / Neuronpedia batch)
    ("top examples", "20, at most one per context; window 24 before + 8 after", "20 top token positions (a context "
     "may repeat); whole context"),
    ("groups below the top", "5 quantile bands (equal shares of firings) × 5 sampled", "5 equal-width intervals of "
     "[0, max] × 5 sampled (the low ones hold most firings)"),
    ("activation histogram", "324 fixed log-spaced bins (6.6% wide), all firings", "50 equal-width bins over "
     "[min, max] of the firings"),
    ("density", "firings / analysed tokens", "firings / all token positions (from a title: 3 decimals of a %)"),
    ("logit tables", "top/bottom 10 of W_dec·(w_norm ⊙ W_U)", "top/bottom 10 of W_dec·W_U (TL folds w_norm in and "
     "centres W_U)"),
    ("logit histogram", "— (export: from SAE + model)", "50 bins over the vocabulary"),
    ("neighbours / correlated", "10 nearest by decoder cosine, all latents; 2-D UMAP map", "3 most correlated by "
     "activation, only among the same batch of 128"),
    ("correlated neurons", "—", "3 input dimensions by activation correlation"),
    ("neuron alignment", "— (export: from W_dec)", "3 largest W_dec entries, share of L1"),
    ("per-token values", "window activations (fp16)", "whole-context activations (4 decimals)"),
    ("token profile", "10 tokens by rate × share harmonic mean", "—"),
]


def compare(result_dash: dict[str, Any], work: Path, info: dict[str, Any]) -> list[tuple[str, str]]:
    """Our export against SAEDashboard's, for the latents its larger run covered (see each row's test)."""
    import numpy as np

    from saekit.features import FeatureStore
    from saekit.neuronpedia import layer_of

    theirs: dict[int, dict] = {}
    header: dict[str, Any] = {}
    for f in sorted(Path(result_dash["out"]).glob("batch-*.json")):
        b = json.loads(f.read_text())
        header = {k: v for k, v in b.items() if k != "features"}
        theirs |= {int(x["feature_index"]): x for x in b["features"]}
    ours: dict[int, dict] = {}
    for f in sorted((work / "saekit" / "neuronpedia").glob("batch-*.json")):
        ours |= {int(x["feature_index"]): x for x in json.loads(f.read_text())["features"] if int(x["feature_index"]) in theirs}
    store = FeatureStore(work / "saekit" / "store")
    vocab = {int(k): v for k, v in json.loads(Path(result_dash["vocab"]).read_text()).items()}
    to_id: dict[str, int] = {}
    for i, s in vocab.items():
        to_id.setdefault(s, i)
    both = sorted(set(theirs) & set(ours))
    dead = sorted(set(theirs) - set(ours))
    rows: list[tuple[str, str]] = [("latents compared", f"{len(both)} (+{len(dead)} that never fired: in our "
                                    "skipped_indexes.json instead)")]
    ids = lambda strs: [to_id.get(s, -1) for s in strs]  # noqa: E731
    same_pos = np.mean([ids(theirs[i]["pos_str"]) == store.column("logit_top_token")[i].tolist() for i in both])
    same_neg = np.mean([ids(theirs[i]["neg_str"]) == store.column("logit_bottom_token")[i].tolist() for i in both])
    dv = max(max(abs(a - b) for a, b in zip(theirs[i]["pos_values"] + theirs[i]["neg_values"],
                                             ours[i]["pos_values"] + ours[i]["neg_values"])) for i in both)
    rows.append(("pos_str / neg_str (as token ids)", f"identical lists for {same_pos:.1%} / {same_neg:.1%} of latents"))
    rows.append(("pos_values / neg_values", f"max |Δ| {dv:.4f} (both centred over the vocabulary)"))
    lh = np.mean([theirs[i]["logits_hist_data_bar_heights"] == ours[i]["logits_hist_data_bar_heights"] for i in both])
    lv = max(max(abs(a - b) for a, b in zip(theirs[i]["logits_hist_data_bar_values"],
                                             ours[i]["logits_hist_data_bar_values"])) for i in both)
    rows.append(("logits_hist_data_*", f"identical heights for {lh:.1%} of latents; bar values max |Δ| {lv:.4f}"))
    na = np.mean([theirs[i]["neuron_alignment_indices"] == ours[i]["neuron_alignment_indices"] for i in both])
    nv = max(max(abs(a - b) for a, b in zip(theirs[i]["neuron_alignment_values"] + theirs[i]["neuron_alignment_l1"],
                                             ours[i]["neuron_alignment_values"] + ours[i]["neuron_alignment_l1"]))
             for i in both)
    rows.append(("neuron_alignment_*", f"identical indices for {na:.1%}; values and l1 max |Δ| {nv:.4f}"))
    all_pos = info["contexts"] * info["context_size"]
    fz = np.array([(theirs[i]["frac_nonzero"] * all_pos / store.tokens) / ours[i]["frac_nonzero"] - 1 for i in both])
    rows.append(("frac_nonzero", f"theirs × positions/analysed tokens vs ours: median |rel Δ| "
                 f"{np.median(np.abs(fz)):.2%}, max {np.abs(fz).max():.2%} (theirs is read from a title: 3 decimals of a %)"))
    mx = np.array([theirs[i]["activations"][0]["bin_max"] / ours[i]["activations"][0]["bin_max"] - 1 for i in both
                   if theirs[i]["activations"]])
    rows.append(("max activation (top group bin_max)", f"median |rel Δ| {np.median(np.abs(mx)):.1e}, max "
                 f"{np.abs(mx).max():.1e}"))
    hs = np.array([sum(theirs[i]["freq_hist_data_bar_heights"]) / max(sum(ours[i]["freq_hist_data_bar_heights"]), 1)
                   - 1 for i in both])
    mean_t = np.array([np.average(theirs[i]["freq_hist_data_bar_values"], weights=theirs[i]["freq_hist_data_bar_heights"])
                       for i in both])
    mean_o = np.array([np.average(ours[i]["freq_hist_data_bar_values"], weights=ours[i]["freq_hist_data_bar_heights"])
                       for i in both])
    rows.append(("freq_hist_data_* (firings, mean)", f"firing counts: median |rel Δ| {np.median(np.abs(hs)):.2%}; "
                 f"histogram means: median |rel Δ| {np.median(np.abs(mean_t / mean_o - 1)):.2%}"))
    # top examples: their activation holds a whole context from position 1 → find which context it is
    from safetensors.torch import load_file

    ctx_tokens = load_file(info["tokens"])["tokens"]
    key = {tuple(vocab[int(t)] for t in row[1:]): c for c, row in enumerate(ctx_tokens.tolist())}
    top1 = overlap = n = 0
    for i in both:
        top = [a for a in theirs[i]["activations"] if a["bin_min"] == -1]
        pos_t = [(key.get(tuple(a["tokens"]), -1), a["qualifying_token_index"] + 1) for a in top]
        o_ctx, o_pos = store.column("top_ctx")[i], store.column("top_pos")[i]
        pos_o = [(int(c), int(p)) for c, p in zip(o_ctx, o_pos) if c >= 0]
        if not pos_t or not pos_o:
            continue
        n += 1
        top1 += pos_t[0] == pos_o[0]
        ctx_t = {c for c, _ in pos_t}
        overlap += len(ctx_t & {c for c, _ in pos_o}) / len(ctx_t)
    rows.append(("top example (context, position)", f"same top-1 for {top1 / max(n, 1):.1%} of latents; their "
                 f"top-20 contexts among ours: {overlap / max(n, 1):.1%} on average"))
    corr = np.mean([len(set(theirs[i]["correlated_features_indices"]) & set(ours[i]["correlated_features_indices"]))
                    / 3 for i in both])
    rows.append(("correlated_features_indices", f"{corr:.1%} shared (theirs: activation correlation within the batch; "
                 f"ours: decoder cosine over all latents)"))
    rows.append(("batch header", f"theirs {header.get('model_id')}, layer {header.get('layer')}; ours the same model "
                 f"id and layer {layer_of(info['hook'])}"))
    return rows


def table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), *map(line, rows)])


def cpu_info() -> str:
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores; avx2 {'avx2' in flags}, avx512_bf16 {'avx512_bf16' in flags}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=str(ROOT / "runs/demo/k32-d4608"), help="saekit SAE directory (the demo's)")
    p.add_argument("--contexts", type=int, default=512, help="contexts of the SAE's dataset both sides read")
    p.add_argument("--batches", default="2,6", help="two SAEDashboard run sizes, in batches of 128 latents")
    p.add_argument("--dash-python", default=str(ROOT / ".venv-dash/bin/python"), help="python of the SAEDashboard venv")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--summarize", metavar="JSON", help="print the tables of a run saved with --json (its work folder "
                                                     "must still exist) instead of running")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, job_path = args.worker
        job = json.loads(Path(job_path).read_text())
        result = (saekit_worker if side == "saekit" else dash_worker)(job)
        (Path(job["work"]) / "result.json").write_text(json.dumps(result, default=str))
        return
    if args.summarize:
        saved = json.loads(Path(args.summarize).read_text())
        work = Path(saved["info"]["tokens"]).parent
        summarize(saved["info"], saved["saekit"], saved["saedashboard"], work, args.json)
        return
    sizes = sorted({int(b) for b in args.batches.split(",")})
    if len(sizes) != 2 or sizes[0] < 1:
        raise SystemExit("--batches takes two different run sizes, e.g. 2,4 (batches of 128 latents)")
    if not Path(args.dash_python).is_file():
        raise SystemExit(f"no SAEDashboard python at {args.dash_python}: run `make bench-dashboard` (it builds .venv-dash)")
    if not (Path(args.sae) / "cfg.json").is_file():
        raise SystemExit(f"no SAE at {args.sae}: run `make demo`, or pass --sae DIR")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="saekit-dash-"))
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = str(work)
    print(f"SAEDashboard vs saekit analyze; work in {work}\n{cpu_info()}", flush=True)
    info = prepare(args)
    n_batches = math.ceil(info["d_sae"] / PER_BATCH)
    if sizes[1] > n_batches:
        raise SystemExit(f"--batches {args.batches}: the SAE has only {n_batches} batches of {PER_BATCH} latents")
    print(f"SAE {info['sae_dir']} ({info['d_sae']} latents, k {info['k']}, {info['hook']}); {info['contexts']} "
          f"contexts × {info['context_size']} = {info['kept_tokens']:,} analysed tokens", flush=True)
    base = {k: info[k] for k in ("tokens", "check", "hook", "layer", "dataset", "massive_multiple")}
    sk = run_worker("saekit", sys.executable, {**base, "work": str(work / "saekit"), "sae_dir": info["sae_dir"],
                                               "model_arg": info["model_arg"], "kept_tokens": info["kept_tokens"]})
    if sk["tokens_seen"] != info["kept_tokens"]:
        raise SystemExit(f"saekit analysed {sk['tokens_seen']} tokens, not the {info['kept_tokens']} of the contexts")
    dash = [run_worker("saedashboard", args.dash_python, {**base, "work": str(work / f"dash-{b}"), "batches": b,
                                                          "hf_dir": info["hf_dir"], "sae_saelens": info["sae_saelens"]})
            for b in sizes]
    summarize(info, sk, dash, work, args.json)


def summarize(info: dict[str, Any], sk: dict[str, Any], dash: list[dict[str, Any]], work: Path,
              json_out: str | None = None) -> None:
    """Print the time table, the ratio, the page contents and the field-by-field comparison (and save them)."""
    n_batches = math.ceil(info["d_sae"] / PER_BATCH)
    f = fit(dash, n_batches)
    ours = {k: sk["phases"]["analyze"][k] + sk["phases"]["export"][k] for k in ("wall_s", "cpu_s")}
    st = sk["store_timings"]
    rows = [
        ("saekit: analyze (one pass, all latents)", f"{sk['phases']['analyze']['wall_s']:.1f}",
         f"{sk['phases']['analyze']['cpu_s']:.1f}", f"its model forward {st['forward_seconds']:.1f} s wall "
         f"({info['kept_tokens'] / max(st['forward_seconds'], 1e-9):,.0f} tokens/s)"),
        ("saekit: export-neuronpedia (all latents)", f"{sk['phases']['export']['wall_s']:.1f}",
         f"{sk['phases']['export']['cpu_s']:.1f}", "logit histograms over the vocabulary"),
        *[(f"SAEDashboard: {r['batches']} batches ({r['batches'] * PER_BATCH} latents)", f"{r['phases']['run']['wall_s']:.1f}",
           f"{r['phases']['run']['cpu_s']:.1f}", "load " + "/".join(f"{t['load1']:.1f}" for t in r["batch_times"]))
          for r in dash],
        ("SAEDashboard: per batch after the first (median)", f"{f['wall_s']['per_batch']:.1f}", f"{f['cpu_s']['per_batch']:.1f}",
         f"slope between the runs {f['wall_s']['slope_between_runs']:.1f} / {f['cpu_s']['slope_between_runs']:.1f}; "
         f"first batch (runs the model) {f['wall_s']['first_batch']:.1f} / {f['cpu_s']['first_batch']:.1f}; later "
         "batches " + "/".join(f"{t:.0f}" for t in f["wall_s"]["later_batches"]) + " s wall"),
        (f"SAEDashboard: all {info['d_sae']} latents (EXTRAPOLATED, {n_batches} batches)",
         f"{f['wall_s']['all_latents']:.0f}", f"{f['cpu_s']['all_latents']:.0f}",
         f"first batch + {n_batches - 1} × per batch"),
        ("model load (not in the times above)", f"{sk['phases']['model']['wall_s']:.1f} / "
         f"{dash[-1]['phases']['model']['wall_s']:.1f}", f"{sk['phases']['model']['cpu_s']:.1f} / "
         f"{dash[-1]['phases']['model']['cpu_s']:.1f}", "saekit bridge / TL2 built by hand"),
    ]
    ratio = {k: f[k]["all_latents"] / ours[k] for k in ("wall_s", "cpu_s")}
    print(f"\n{info['kept_tokens']:,} tokens ({info['contexts']} contexts of the SAE's dataset), {info['d_sae']} latents, "
          f"{info['hook']}; activations of SAEDashboard's model vs saekit's: max rel. error "
          f"{max(r['activation_max_rel_err'] for r in dash):.1e}\n")
    print(table(rows, ("what", "wall s", "CPU s", "note")))
    print(f"\nSAEDashboard (all latents, extrapolated) / saekit (analyze + export): {ratio['wall_s']:.1f}× wall, "
          f"{ratio['cpu_s']:.1f}× CPU\n")
    print(table(CONTENTS, ("page item", "saekit store", "SAEDashboard / Neuronpedia")))
    cmp_rows = compare(dash[-1], work, info)
    print("\nOur Neuronpedia export vs SAEDashboard's, field by field:")
    print(table(cmp_rows, ("field", "agreement")))
    out = {"machine": cpu_info(), "info": info, "saekit": sk, "saedashboard": dash, "fit": f, "ratio": ratio,
           "compare": cmp_rows, "python": platform.python_version()}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
