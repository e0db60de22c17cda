"""Interop with SAELens and sparsify (saekit/interop.py, `saekit convert`).

The peer tests run the real packages in their own virtual environment (.venv-peers, made by
`make bench-peers`: sae-lens pins transformer-lens < 4, so it cannot share ours) through
tests/peers_side.py in one subprocess, and compare what the peers compute with what saekit computes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.cli import main as cli_main
from saekit.config import SaeConfig
from saekit.errors import FileFormatError, SaekitError
from saekit.interop import (
    convert,
    detect_format,
    export_sparsify,
    hook_for,
    hookpoint_for,
    import_saelens,
    import_sparsify,
    load_any,
)
from saekit.sae import SparseAutoencoder, load_sae

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = Path(os.environ.get("SAEKIT_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
needs_peers = pytest.mark.skipif(
    not PEERS_PY.is_file(),
    reason=f"no peers venv at {PEERS_PY}: run `make bench-peers` (installs sae-lens and eai-sparsify there)")

D_IN, D_SAE, K, N = 64, 256, 8, 512


def inputs(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=gen) * 2 + torch.randn(D_IN, generator=gen)


def make_sae(arch: str = "topk", seed: int = 0, hook: str = "blocks.15.hook_resid_pre") -> SparseAutoencoder:
    x = inputs()
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=D_IN, d_sae=D_SAE, k=K, architecture=arch), x, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen))
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        if arch == "batchtopk":  # at most 2k latents pass on every token (inference looks at the top 4k)
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            sae.threshold.fill_(pre.topk(2 * K, dim=-1).values[:, -1].max().item())
    sae.info = {"hook": hook, "model": "test-model", "model_arg": "default", "dataset": "default", "context_size": 128}
    return sae


def outputs(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"acts": sae.dense_codes(x), "forward": sae(x)}


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    for key in ("acts", "forward"):
        a, b = ours[key], theirs[key]
        assert a.shape == b.shape, f"{what} {key}: shapes {a.shape} vs {b.shape}"
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what} {key}: max abs difference {err:.3g}"


# ----------------------------------------------------------------------------- hook names

@pytest.mark.parametrize("hook,point", [
    ("blocks.15.hook_resid_pre", "layers.14"),
    ("blocks.1.hook_resid_pre", "layers.0"),
    ("blocks.0.hook_resid_pre", "embed_tokens"),
    ("blocks.15.hook_resid_post", "layers.15"),
    ("blocks.3.hook_mlp_out", "layers.3.mlp"),
    ("blocks.3.hook_attn_out", "layers.3.self_attn"),
])
def test_hookpoint_mapping(hook, point):
    assert hookpoint_for(hook) == point


def test_sparsify_layers_L_is_the_output_of_layer_L():
    # sparsify's layers.15 hooks the output of decoder layer 15 = the residual stream entering block 16
    assert hook_for("layers.15") == "blocks.16.hook_resid_pre"
    assert hook_for("layers.15", n_layers=30) == "blocks.16.hook_resid_pre"
    assert hook_for("layers.29", n_layers=30) == "blocks.29.hook_resid_post"  # no block 30
    assert hook_for("model.layers.3.mlp") == "blocks.3.hook_mlp_out"
    assert hook_for("h.2") == "blocks.3.hook_resid_pre"  # GPT-2 module names
    assert hook_for("embed_tokens") == "blocks.0.hook_resid_pre"
    for hook in ("blocks.15.hook_resid_pre", "blocks.0.hook_resid_pre", "blocks.4.hook_mlp_out"):
        assert hook_for(hookpoint_for(hook)) == hook
    with pytest.raises(SaekitError, match="--hookpoint"):
        hookpoint_for("blocks.3.ln1.hook_normalized")
    with pytest.raises(SaekitError, match="--hook"):
        hook_for("lm_head")


@pytest.mark.integration
def test_hook_mapping_matches_the_model():
    """Each mapped sparsify hookpoint, resolved the way sparsify does (base_model.get_submodule, first
    element of a tuple output), yields exactly the transformer-lens hook's activation."""
    from saekit.lm import load_model

    model = load_model("default")
    hf = model.original_model
    tokens = model.tokenizer("The cat sat on the mat. It was happy, and then it left.", return_tensors="pt").input_ids
    last = model.cfg.n_layers - 1
    hooks = ["blocks.0.hook_resid_pre", "blocks.15.hook_resid_pre", "blocks.7.hook_mlp_out", "blocks.7.hook_attn_out",
             f"blocks.{last}.hook_resid_post"]
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        return lambda mod, inp, out: got.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    handles = [hf.base_model.get_submodule(hookpoint_for(h)).register_forward_hook(grab(h)) for h in hooks]
    try:
        with torch.no_grad():
            hf(tokens)
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    finally:
        for h in handles:
            h.remove()
    for h in hooks:
        assert torch.allclose(cache[h], got[h].reshape(cache[h].shape), atol=1e-4), h
        assert hook_for(hookpoint_for(h), n_layers=model.cfg.n_layers) == h


# ----------------------------------------------------------------------------- saekit-side formats

def test_saved_cfg_carries_saelens_v6_metadata(tmp_path):
    cfg = json.loads((make_sae().save(tmp_path / "s") / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_pre"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")  # else SAELens drops the metadata


def test_sparsify_export_layout_and_exact_round_trip(tmp_path):
    sae, x = make_sae(), inputs(1)
    folder = export_sparsify(sae, tmp_path / "sp")
    assert folder == tmp_path / "sp" / "layers.14"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("activation", "num_latents", "k", "d_in", "transcode", "skip_connection")} == \
        {"activation": "topk", "num_latents": D_SAE, "k": K, "d_in": D_IN, "transcode": False, "skip_connection": False}
    w = load_file(folder / "sae.safetensors")
    assert sorted(w) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    assert torch.equal(w["encoder.weight"], sae.W_enc.detach().t())
    assert detect_format(tmp_path / "sp") == detect_format(folder) == "sparsify"
    back = import_sparsify(tmp_path / "sp")
    assert back.hook == sae.hook and back.info["model"] == "test-model"
    assert all(torch.equal(a, b) for a, b in zip(back.weights().values(), sae.weights().values(), strict=True))
    assert_same(outputs(back, x), outputs(sae, x), "sparsify round trip")


def test_import_sparsify_without_saekit_block_maps_the_hookpoint(tmp_path):
    folder = export_sparsify(make_sae(), tmp_path / "sp", hookpoint="layers.20")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saekit"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = import_sparsify(folder)
    assert sae.hook == "blocks.21.hook_resid_pre"
    assert import_sparsify(tmp_path / "sp", hook="blocks.20.hook_resid_post").hook == "blocks.20.hook_resid_post"
    cfg["transcode"] = True
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="transcoder"):
        import_sparsify(folder)


def test_batchtopk_to_sparsify_is_refused_unless_approximate(tmp_path):
    sae = make_sae("batchtopk")
    with pytest.raises(FileFormatError, match="approximate-batchtopk"):
        export_sparsify(sae, tmp_path / "sp")
    export_sparsify(sae, tmp_path / "sp", approximate_batchtopk=True)
    back = import_sparsify(tmp_path / "sp")
    assert back.cfg.architecture == "batchtopk" and float(back.threshold) == pytest.approx(float(sae.threshold))
    assert_same(outputs(back, inputs(1)), outputs(sae, inputs(1)), "batchtopk via sparsify")


def _saelens_style_dir(path: Path, sae: SparseAutoencoder, norms: torch.Tensor) -> None:
    """A SAELens TopK training checkpoint by hand: decoder rows scaled by `norms`, rescaling on, b_dec not
    applied to the input (encoder bias absorbs it)."""
    path.mkdir(parents=True)
    W_enc, b_enc, W_dec, b_dec = (t.detach().clone() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    b_enc = b_enc - b_dec @ W_enc
    save_file({"W_enc": (W_enc / norms).contiguous(), "b_enc": b_enc / norms, "W_dec": W_dec * norms[:, None],
               "b_dec": b_dec}, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "rescale_acts_by_decoder_norm": True,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.6.hook_resid_pre", "model_name": "m"}}))


def test_import_saelens_folds_rescaling_and_b_dec(tmp_path):
    sae, x = make_sae(), inputs(1)
    _saelens_style_dir(tmp_path / "sl", sae, torch.rand(D_SAE) * 0.2 + 0.05)
    assert detect_format(tmp_path / "sl") == "saelens"
    got = import_saelens(tmp_path / "sl")
    assert got.hook == "blocks.6.hook_resid_pre" and got.info["imported_from"]["format"] == "saelens"
    assert torch.allclose(got.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    assert_same(outputs(got, x), outputs(sae, x), "SAELens rescaled TopK")


def test_import_saelens_refuses_what_it_cannot_represent(tmp_path):
    sae = make_sae("batchtopk")
    sae.save(tmp_path / "j")
    cfg = json.loads((tmp_path / "j" / "cfg.json").read_text())
    del cfg["saekit"], cfg["k"]
    (tmp_path / "j" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="--k"):
        import_saelens(tmp_path / "j")
    assert import_saelens(tmp_path / "j", k=K).cfg.architecture == "batchtopk"
    w = load_file(tmp_path / "j" / "sae_weights.safetensors")
    w["threshold"] = torch.rand(D_SAE)
    save_file(w, tmp_path / "j" / "sae_weights.safetensors")
    with pytest.raises(FileFormatError, match="per-latent thresholds"):
        import_saelens(tmp_path / "j", k=K)
    cfg["architecture"] = "gated"
    (tmp_path / "j" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="gated"):
        import_saelens(tmp_path / "j", k=K)


def test_cli_convert_both_ways(tmp_path, capsys):
    sae = make_sae()
    sae.save(tmp_path / "ours")
    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "sp"), "--to", "sparsify"]) == 0
    assert (tmp_path / "sp" / "layers.14" / "sae.safetensors").is_file()
    assert cli_main(["convert", str(tmp_path / "sp"), str(tmp_path / "back"), "--hook", "blocks.15.hook_resid_pre"]) == 0
    back = load_sae(tmp_path / "back")
    assert back.hook == "blocks.15.hook_resid_pre" and back.info["model_arg"] == "default"
    assert_same(outputs(back, inputs(2)), outputs(sae, inputs(2)), "CLI round trip")
    assert cli_main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real peers

@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Run every peer-side task in one subprocess of the peers' python; return (dir, report, x)."""
    d = tmp_path_factory.mktemp("peers")
    x = inputs(3)
    save_file({"x": x}, d / "x.safetensors")
    for arch in ("topk", "batchtopk"):
        make_sae(arch).save(d / f"ours_{arch}")
    export_sparsify(make_sae("topk"), d / "ours_sparsify")
    tasks = [
        {"op": "saelens_load", "dir": str(d / "ours_topk"), "resave": str(d / "sl_resave_topk")},
        {"op": "saelens_load", "dir": str(d / "ours_batchtopk"), "resave": str(d / "sl_resave_batchtopk")},
        {"op": "sparsify_load", "dir": str(d / "ours_sparsify" / "layers.14"), "resave": str(d / "sp_resave" / "layers.14")},
        {"op": "saelens_make", "kind": "topk", "dir": str(d / "sl_topk")},
        {"op": "saelens_make", "kind": "topk", "dir": str(d / "sl_topk_training"), "training_format": True},
        {"op": "saelens_make", "kind": "topk", "dir": str(d / "sl_topk_nobdec"), "apply_b_dec_to_input": False},
        {"op": "saelens_make", "kind": "batchtopk", "dir": str(d / "sl_batchtopk")},
        {"op": "sparsify_make", "dir": str(d / "sp_made" / "layers.9")},
    ]
    for i, t in enumerate(tasks):
        t.update(out=str(d / f"out{i}.safetensors"), d_in=D_IN, d_sae=D_SAE, k=K, seed=i)
    job = {"x": str(d / "x.safetensors"), "tasks": tasks, "report": str(d / "report.json")}
    (d / "job.json").write_text(json.dumps(job))
    run = subprocess.run([str(PEERS_PY), str(ROOT / "tests" / "peers_side.py"), str(d / "job.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((d / "report.json").read_text())
    return d, report, x


def _theirs(d: Path, i: int) -> dict[str, torch.Tensor]:
    return load_file(d / f"out{i}.safetensors")


@needs_peers
@pytest.mark.parametrize("i,arch,cls", [(0, "topk", "TopKSAE"), (1, "batchtopk", "JumpReLUSAE")])
def test_our_directory_loads_unchanged_in_saelens(peers, i, arch, cls):
    d, report, x = peers
    info = report["tasks"][i]
    assert info["class"] == cls and info["hook_name"] == "blocks.15.hook_resid_pre"
    ours = outputs(load_sae(d / f"ours_{arch}"), x)
    theirs = _theirs(d, i)
    assert_same(ours, theirs, f"SAELens on our {arch}")
    assert torch.allclose(theirs["recon"], theirs["forward"], atol=1e-6)
    # and back: what SAELens writes imports into saekit with the same outputs (its JumpReLU config
    # keeps no k, so that one needs it given)
    back = import_saelens(d / f"sl_resave_{arch}", k=K if arch == "batchtopk" else None)
    assert_same(outputs(back, x), theirs, f"SAELens re-saved {arch}")


@needs_peers
def test_round_trip_through_sparsify(peers):
    d, report, x = peers
    assert report["tasks"][2] == {"k": K, "num_latents": D_SAE, "d_in": D_IN}
    theirs = _theirs(d, 2)
    ours = outputs(make_sae("topk"), x)
    assert_same(ours, theirs, "sparsify on our export")
    back = load_any(d / "sp_resave")  # written by sparsify's own save_to_disk
    assert back.hook == "blocks.15.hook_resid_pre"  # layers.14 → resid_pre of block 15
    assert_same(outputs(back, x), ours, "sparsify re-saved")


@needs_peers
@pytest.mark.parametrize("i,name,arch", [(3, "sl_topk", "topk"), (4, "sl_topk_training", "topk"),
                                         (5, "sl_topk_nobdec", "topk"), (6, "sl_batchtopk", "batchtopk")])
def test_saelens_saes_import_exactly(peers, i, name, arch, tmp_path):
    d, report, x = peers
    sae = import_saelens(d / name)
    assert sae.cfg.architecture == arch and sae.cfg.k == K
    if arch == "batchtopk":
        assert float(sae.threshold) == pytest.approx(report["tasks"][i]["threshold"], rel=1e-6)
    assert_same(outputs(sae, x), _theirs(d, i), f"SAELens {name}")
    convert(d / name, tmp_path / "conv")  # and `saekit convert` writes a loadable saekit directory
    assert_same(outputs(load_sae(tmp_path / "conv"), x), _theirs(d, i), f"converted {name}")


@needs_peers
def test_sparsify_sae_imports_exactly(peers, tmp_path):
    d, report, x = peers
    sae = import_sparsify(d / "sp_made")
    assert sae.hook == "blocks.10.hook_resid_pre" and sae.cfg.k == K and sae.cfg.d_sae == D_SAE
    assert_same(outputs(sae, x), _theirs(d, 7), "sparsify-made SAE")
    assert detect_format(convert(d / "sp_made", tmp_path / "conv")) == "saekit"


# ----------------------------------------------------------------------------- transformer-lens 3.9

TL39_SIDE = """
import sys
from importlib.metadata import version
import torch
from safetensors.torch import load_file, save_file
from saekit.harvest import Harvester
from saekit.lm import load_model
model = load_model(sys.argv[1])
h = Harvester(model, [sys.argv[2]]).harvest(load_file(sys.argv[3])["tokens"], 200, progress=False)
save_file({"acts": h.acts[sys.argv[2]], "token_ids": h.token_ids}, sys.argv[4])
print(version("transformer-lens"))
"""


@needs_peers
def test_saekit_on_transformer_lens_3_9_harvests_the_same_activations(model, default_contexts, tmp_path):
    """sae-lens pins transformer-lens < 4: saekit itself (installed in the peers' venv) loads the default model
    there and harvests what it harvests on 4.x."""
    from saekit.harvest import Harvester
    from saekit.lm import resolve

    hook = "blocks.5.hook_resid_pre"
    tokens = default_contexts[0].tokens[:3]
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    run = subprocess.run([str(PEERS_PY), "-c", TL39_SIDE, str(resolve("default")[0]), hook,
                          str(tmp_path / "tokens.safetensors"), str(tmp_path / "acts.safetensors")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1].startswith("3."), run.stdout  # the peers' transformer-lens really is 3.x
    theirs = load_file(str(tmp_path / "acts.safetensors"))
    ours = Harvester(model, [hook]).harvest(tokens, 200, progress=False)
    assert torch.equal(theirs["token_ids"], ours.token_ids)
    torch.testing.assert_close(theirs["acts"], ours.acts[hook], rtol=1e-4, atol=1e-4)
