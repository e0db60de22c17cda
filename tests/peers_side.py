"""Peer-side half of tests/test_interop.py and tests/test_interop_transcoders.py, run with a peers' python
(.venv-peers: sae-lens, eai-sparsify; .venv-ct: circuit-tracer).

It never imports saekit: it loads and writes SAEs and transcoders with the peers' own code only, so what it
reports is what a SAELens, sparsify or circuit-tracer user would see. Usage: python tests/peers_side.py JOB.json,
where the job is {"x": inputs.safetensors, "tasks": [{"op": ..., ...}, ...]}; each task writes its outputs (dense
latents "acts" [N, d_sae], "recon" from them and "forward" [N, d_out]; per layer "acts.L" … for a transcoder set)
to task["out"]. Only the packages a task uses are imported.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype).scatter_(1, indices, values)


def saelens_outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        acts = sae.encode(x)
        return {"acts": acts.float(), "recon": sae.decode(acts).float(), "forward": sae(x).float()}


def sparsify_outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        enc = sae.encode(x)
        acts = dense(enc.top_acts.float(), enc.top_indices, sae.num_latents)
        return {"acts": acts, "recon": sae.decode(enc.top_acts, enc.top_indices).float(),
                "forward": sae(x).sae_out.float()}


def circuit_tracer_outputs(transcoders, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for layer, tc in enumerate(transcoders):
            acts = tc.encode(x)
            out |= {f"acts.{layer}": acts.float(), f"recon.{layer}": tc.decode(acts, x).float(),
                    f"forward.{layer}": tc(x).float()}
    return out


def perturb(module: torch.nn.Module, names: tuple[str, ...], seed: int) -> None:
    """Non-zero biases, so that a wrong bias convention shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = module.get_parameter(name)
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def run(task: dict, x: torch.Tensor) -> dict:
    op = task["op"]
    info: dict = {}
    if op == "saelens_load":  # an SAE directory written by saekit, opened unchanged by SAELens
        from sae_lens import SAE

        sae = SAE.load_from_disk(task["dir"])
        out = saelens_outputs(sae, x)
        info = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                "hook_name": sae.cfg.metadata.hook_name, "k": getattr(sae.cfg, "k", None),
                "d_out": getattr(sae.cfg, "d_out", None), "hook_name_out": sae.cfg.metadata.hook_name_out}
        if task.get("resave"):
            sae.save_model(task["resave"])
    elif op == "sparsify_load":  # a sparsify folder written by saekit, opened by sparsify
        from sparsify import SparseCoder

        sae = SparseCoder.load_from_disk(task["dir"])
        out = sparsify_outputs(sae, x)
        info = {"k": sae.cfg.k, "num_latents": sae.num_latents, "d_in": sae.d_in}
        if task.get("resave"):
            sae.save_to_disk(task["resave"])
    elif op == "saelens_make":  # SAEs made and saved by SAELens's own training classes
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        d_in, d_sae, k = task["d_in"], task["d_sae"], task["k"]
        if task["kind"] == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        else:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k,
                                                        apply_b_dec_to_input=task.get("apply_b_dec_to_input", True)))
        torch.manual_seed(task.get("seed", 0))
        perturb(sae, ("b_enc", "b_dec"), task.get("seed", 0))
        with torch.no_grad():  # decoder rows of different norms, as after training with rescaling
            sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        if task["kind"] == "batchtopk":
            # A threshold above every token's 2k-th pre-activation: at most 2k latents pass per token
            # (saekit's BatchTopK inference considers the top 4k candidates of each token).
            with torch.no_grad():
                _, pre = sae.encode_with_hidden_pre(x)
                sae.topk_threshold = pre.topk(2 * k, dim=-1).values[:, -1].max().double()
            info["threshold"] = float(sae.topk_threshold)
            sae.save_inference_model(task["dir"])  # JumpReLU with the threshold
            from sae_lens import SAE

            out = saelens_outputs(SAE.load_from_disk(task["dir"]), x)
        elif task.get("training_format"):
            sae.save_model(task["dir"])  # training layout: rescale_acts_by_decoder_norm, unfolded norms
            out = saelens_outputs(sae, x)
        else:
            out = saelens_outputs(sae, x)
            sae.save_inference_model(task["dir"])
        info["cfg"] = json.load(open(f"{task['dir']}/cfg.json"))
    elif op == "saelens_make_transcoder":  # a transcoder made and saved by SAELens's own classes
        import sae_lens.saes.transcoder as T
        from sae_lens import SAE

        kind = task["kind"]  # transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder
        cls = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
               "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}[kind]
        cfg = getattr(T, cls + "Config")(d_in=task["d_in"], d_sae=task["d_sae"], d_out=task["d_in"],
                                         apply_b_dec_to_input=False)
        cfg.metadata.hook_name, cfg.metadata.hook_name_out = task["hook"], task["hook_out"]
        torch.manual_seed(task.get("seed", 0))
        sae = getattr(T, cls)(cfg)
        perturb(sae, ("b_enc", "b_dec"), task.get("seed", 0))
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
            if "skip" in kind:
                sae.W_skip.copy_(0.1 * torch.randn(sae.W_skip.shape))
            if "jumprelu" in kind:  # one threshold for every latent, above each token's 2k-th pre-activation
                pre = x @ sae.W_enc + sae.b_enc
                sae.threshold.fill_(pre.topk(2 * task["k"], dim=-1).values[:, -1].max().item())
                info["threshold"] = float(sae.threshold[0])
        sae.save_model(task["dir"])
        out = saelens_outputs(SAE.load_from_disk(task["dir"]), x)
        info["cfg"] = json.load(open(f"{task['dir']}/cfg.json"))
    elif op == "ct_load":  # a transcoder set written by saekit, loaded by circuit-tracer's own loader
        import os
        from pathlib import Path

        import yaml
        from circuit_tracer.transcoder import TranscoderSet
        from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

        folder = Path(task["dir"])
        # what ReplacementModel.from_pretrained(model, NAME) calls, with CIRCUIT_TRACER_CACHE_DIR=PARENT: a set in
        # its local cache layout is read from there (offline: anything else would go to the Hub and fail)
        os.environ["CIRCUIT_TRACER_CACHE_DIR"] = str(folder.parent)
        transcoders, _ = load_transcoder_from_hub(folder.name, device=torch.device("cpu"))
        assert isinstance(transcoders, TranscoderSet), type(transcoders)
        out = circuit_tracer_outputs(transcoders, x)
        first = transcoders[0]
        info = {"n_layers": len(transcoders), "d_transcoder": transcoders.d_transcoder, "d_model": first.d_model,
                "feature_input_hook": transcoders.feature_input_hook,
                "feature_output_hook": transcoders.feature_output_hook, "scan": transcoders.scan,
                "skip_connection": transcoders.skip_connection,
                "activation": type(first.activation_function).__name__,
                "lazy_decoder": first.lazy_decoder, "layer_idx": [tc.layer_idx for tc in transcoders]}
        if task.get("resave"):  # its own writer, plus the config.yaml its cache writer adds
            transcoders.to_safetensors(task["resave"])
            config = yaml.safe_load(open(folder / "config.yaml"))
            keep = ("model_kind", "model_name", "feature_input_hook", "feature_output_hook", "scan")
            with open(Path(task["resave"]) / "config.yaml", "w") as f:
                yaml.dump({k: config[k] for k in keep}, f)
    elif op == "ct_replacement_model":  # circuit-tracer's replacement model of a real model with our set
        import os
        from pathlib import Path

        from circuit_tracer.replacement_model import ReplacementModel
        from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

        folder = Path(task["dir"])
        os.environ["CIRCUIT_TRACER_CACHE_DIR"] = str(folder.parent)
        transcoders, _ = load_transcoder_from_hub(folder.name, device=torch.device("cpu"))
        model = ReplacementModel.from_pretrained_and_transcoders(task["model"], transcoders, backend=task["backend"],
                                                                 device=torch.device("cpu"), dtype=torch.float32)
        tokens = load_file(task["tokens"])["tokens"]
        logits, acts = model.get_activations(tokens)  # it zeroes position 0 (BOS), as its attribution does
        out = {"acts": (acts.to_dense() if acts.is_sparse else acts).float(), "logits": logits.float()}
        info = {"class": type(model).__name__, "feature_input_hook": transcoders.feature_input_hook}
    elif op == "sparsify_make":  # an SAE made and saved by sparsify
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(task.get("seed", 0))
        sae = SparseCoder(task["d_in"], SparseCoderConfig(num_latents=task["d_sae"], k=task["k"]))
        perturb(sae, ("encoder.bias", "b_dec"), task.get("seed", 0))
        sae.save_to_disk(task["dir"])
        out = sparsify_outputs(sae, x)
    else:
        raise ValueError(f"unknown op {op!r}")
    save_file({k: v.contiguous() for k, v in out.items()}, task["out"])
    return info


def main() -> None:
    job = json.load(open(sys.argv[1]))
    x = load_file(job["x"])["x"]
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for package in ("sae-lens", "eai-sparsify", "circuit-tracer", "transformer-lens", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    report = {"versions": versions, "tasks": []}
    for task in job["tasks"]:
        report["tasks"].append(run(task, x))
    json.dump(report, open(job["report"], "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
