"""Peer-side half of tests/test_interop.py, run with the peers' python (.venv-peers: sae-lens, eai-sparsify).

It never imports saekit: it loads and writes SAEs with the peers' own code only, so what it reports is
what a SAELens or sparsify user would see. Usage: python tests/peers_side.py JOB.json, where the job is
{"x": inputs.safetensors, "tasks": [{"op": ..., ...}, ...]}; each task writes its outputs (dense
latents "acts" [N, d_sae] and reconstructions "recon" [N, d_in]) to task["out"].
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
                "hook_name": sae.cfg.metadata.hook_name, "k": getattr(sae.cfg, "k", None)}
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
    from importlib.metadata import version

    import sae_lens
    import sparsify  # noqa: F401

    report = {"versions": {"sae_lens": sae_lens.__version__, "sparsify": version("eai-sparsify"),
                           "torch": torch.__version__}, "tasks": []}
    for task in job["tasks"]:
        report["tasks"].append(run(task, x))
    json.dump(report, open(job["report"], "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
