"""Transcoder formats (saekit/interop.py): SAELens's transcoder directories and circuit-tracer's transcoder sets.

The peer tests run the real packages in their own virtual environments through tests/peers_side.py, one
subprocess per venv: SAELens in .venv-peers (`make peers`), circuit-tracer 0.5 in .venv-ct (`make peers-ct`;
it pins transformers <= 4.57.3, which clashes with both of ours).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saekit.config import SaeConfig
from saekit.errors import FileFormatError, SaekitError, ShapeError
from saekit.interop import (
    convert,
    describe_converted,
    detect_format,
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
    load_any,
    load_transcoders,
)
from saekit.sae import SparseAutoencoder, load_sae

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = Path(os.environ.get("SAEKIT_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
CT_PY = Path(os.environ.get("SAEKIT_CT_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
needs_peers = pytest.mark.skipif(
    not PEERS_PY.is_file(), reason=f"no peers venv at {PEERS_PY}: run `make peers` (installs sae-lens there)")
needs_ct = pytest.mark.skipif(
    not CT_PY.is_file(), reason=f"no circuit-tracer venv at {CT_PY}: run `make peers-ct` (installs circuit-tracer 0.5.0)")

D, D_SAE, K, N, LAYERS = 16, 64, 4, 256, 3


def inputs(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=gen) * 2 + torch.randn(D, generator=gen)


def make_tc(layer: int = 0, arch: str = "batchtopk", skip: bool = True, seed: int = 0, d_sae: int = D_SAE,
            d_out: int = D) -> SparseAutoencoder:
    """A random transcoder whose every parameter matters: non-zero biases and skip path, and a threshold
    above each test token's 3k-th pre-activation (saekit's inference looks at the top 4k candidates, JumpReLU at
    all latents: they agree while at most 4k pass)."""
    prefixes = [d_sae // 4, d_sae] if arch == "matryoshka" else []
    cfg = SaeConfig(d_in=D, d_sae=d_sae, k=K, d_out=d_out, transcoder=True, skip=skip, architecture=arch,
                    prefixes=prefixes)
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(100 * seed + layer)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, d_sae, generator=gen) / D**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        W = torch.randn(d_sae, d_out, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.b_dec.copy_(0.1 * torch.randn(d_out, generator=gen))
        if skip:
            sae.W_skip.copy_(0.1 * torch.randn(d_out, D, generator=gen))
        if sae.batch_level:
            pre = torch.cat([inputs(s) for s in range(6)]) @ sae.W_enc + sae.b_enc
            sae.threshold.fill_(pre.topk(3 * K, dim=-1).values[:, -1].max().item())
    sae.info = {"hook": f"blocks.{layer}.mlp.hook_in", "hook_out": f"blocks.{layer}.hook_mlp_out", "kind": "transcoder",
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_arg": "default", "context_size": 128}
    return sae


def make_run(root: Path, layers=range(LAYERS), **kw) -> Path:
    """A run directory laid out as `saekit train --transcoder --layers …` writes it: <unit>/<name>/."""
    for layer in layers:
        make_tc(layer, **kw).save(root / f"blocks.{layer}.mlp" / "stc-btk4-d64")
    (root / "activations").mkdir(parents=True, exist_ok=True)  # a run's cache: not a dictionary
    (root / "activations" / "manifest.json").write_text("{}")
    return root


def outputs(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"acts": sae.dense_codes(x), "forward": sae(x)}


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: max abs difference {err:.3g}"


def same_transcoder(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    assert a.cfg == b.cfg
    assert a.hook == b.hook and a.hook_out == b.hook_out
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), "weights differ"


def test_the_test_transcoders_use_every_part():
    """Guards the fixtures: latents vary per token, the skip path and both biases change the output."""
    sae, x = make_tc(), inputs(1)
    values, _ = sae.encode(x)
    l0 = (values > 0).sum(1).float()
    assert l0.mean() >= 1 and l0.max() <= 3 * K and l0.std() > 0
    y = sae(x)
    no_skip = SparseAutoencoder(SaeConfig(d_in=D, d_sae=D_SAE, k=K, d_out=D, transcoder=True, architecture="batchtopk"))
    no_skip.load_state_dict({n: t for n, t in sae.state_dict().items() if n != "W_skip"}, strict=False)
    assert (y - no_skip(x)).abs().max() > 0.1


# ----------------------------------------------------------------------------- circuit-tracer layout

def test_circuit_tracer_export_layout_and_exact_round_trip(tmp_path):
    run, x = make_run(tmp_path / "run"), inputs(1)
    out = export_circuit_tracer(run, tmp_path / "ct")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: config[k] for k in ("model_kind", "model_name", "feature_input_hook", "feature_output_hook")} == {
        "model_kind": "transcoder_set", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
    assert "transcoders" not in config  # a local list would be read relative to the caller's working directory
    ours = load_transcoders(run)
    w = load_file(out / "layer_1.safetensors")
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "W_enc": (D_SAE, D), "W_dec": (D_SAE, D), "b_enc": (D_SAE,), "b_dec": (D,),
        "activation_function.threshold": (D_SAE,), "W_skip": (D, D)}
    assert torch.equal(w["W_enc"], ours[1].W_enc.detach().t())
    assert torch.equal(w["activation_function.threshold"], ours[1].threshold.expand(D_SAE))
    assert detect_format(out) == "circuit-tracer" and detect_format(run) == "set"
    back = import_circuit_tracer(out)
    assert [b.hook for b in back] == [f"blocks.{layer}.mlp.hook_in" for layer in range(LAYERS)]
    for a, b in zip(ours, back, strict=True):
        same_transcoder(a, b)
        assert b.info["model_arg"] == "default" and b.info["imported_from"]["format"] == "circuit-tracer"
        for key, t in outputs(b, x).items():
            assert torch.equal(t, outputs(a, x)[key]), key


def test_circuit_tracer_set_without_saekit_block_imports_with_k(tmp_path):
    out = export_circuit_tracer([make_tc(layer, skip=False) for layer in range(2)], tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["saekit"]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileFormatError, match="--k"):
        import_circuit_tracer(out)
    back = import_circuit_tracer(out, k=K)
    assert back[1].hook == "blocks.1.mlp.hook_in" and back[1].hook_out == "blocks.1.hook_mlp_out"
    assert back[1].cfg.architecture == "batchtopk" and not back[1].cfg.skip
    assert torch.equal(outputs(back[1], inputs(2))["forward"], outputs(make_tc(1, skip=False), inputs(2))["forward"])


def test_matryoshka_exports_as_its_inference_function(tmp_path):
    saes = [make_tc(layer, arch="matryoshka") for layer in range(2)]
    back = import_circuit_tracer(export_circuit_tracer(saes, tmp_path / "ct"))
    assert back[0].cfg.architecture == "matryoshka" and back[0].cfg.prefixes == [D_SAE // 4, D_SAE]
    close(outputs(back[0], inputs(1))["forward"], outputs(saes[0], inputs(1))["forward"], "matryoshka")


def test_circuit_tracer_export_refuses_what_it_cannot_write(tmp_path):
    run = make_run(tmp_path / "run", layers=[0, 2])
    with pytest.raises(SaekitError, match=r"layer 1 \(blocks\.1\.mlp\.hook_in\)"):
        export_circuit_tracer(run, tmp_path / "ct")
    with pytest.raises(SaekitError, match="layer 3"):  # the model is deeper than the set
        export_circuit_tracer([make_tc(layer) for layer in range(3)], tmp_path / "ct", n_layers=4)
    with pytest.raises(FileFormatError, match="--architecture batchtopk"):
        export_circuit_tracer([make_tc(0, arch="topk")], tmp_path / "ct")
    with pytest.raises(ShapeError, match="d_model"):
        export_circuit_tracer([make_tc(0, d_out=8)], tmp_path / "ct")
    with pytest.raises(ShapeError, match="one d_sae"):
        export_circuit_tracer([make_tc(0), make_tc(1, d_sae=32)], tmp_path / "ct")
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=D, d_sae=D_SAE, k=K), inputs())
    sae.info = {"hook": "blocks.0.hook_resid_pre"}
    sae.save(tmp_path / "sae")
    with pytest.raises(SaekitError, match="not a transcoder"):
        export_circuit_tracer(tmp_path / "sae", tmp_path / "ct")
    with pytest.raises(SaekitError, match="not a transcoder"):
        load_transcoders([make_tc(0), sae])
    assert not (tmp_path / "ct").exists()


def test_a_run_with_several_dictionaries_per_layer_needs_a_name(tmp_path):
    run = make_run(tmp_path / "run")
    for layer in range(LAYERS):
        make_tc(layer, seed=1).save(run / f"blocks.{layer}.mlp" / "stc-btk4-d64-b")
    with pytest.raises(SaekitError, match="--name"):
        export_circuit_tracer(run, tmp_path / "ct")
    with pytest.raises(SaekitError, match="no dictionary folder named 'nope'"):
        load_transcoders(run, name="nope")
    back = import_circuit_tracer(export_circuit_tracer(run, tmp_path / "ct", name="stc-btk4-d64-b"))
    same_transcoder(back[2], load_sae(run / "blocks.2.mlp" / "stc-btk4-d64-b"))


def test_circuit_tracer_import_refuses_what_saekit_lacks(tmp_path):
    out = export_circuit_tracer([make_tc(layer) for layer in range(3)], tmp_path / "ct")
    (out / "layer_1.safetensors").unlink()
    with pytest.raises(SaekitError, match=r"layer 1 \(layer_1\.safetensors\)"):
        import_circuit_tracer(out)
    out = export_circuit_tracer([make_tc(0)], tmp_path / "ct2")
    w = load_file(out / "layer_0.safetensors")
    w["activation_function.threshold"] = torch.rand(D_SAE)
    save_file(w, out / "layer_0.safetensors")
    with pytest.raises(FileFormatError, match="per-latent thresholds"):
        import_circuit_tracer(out)
    del w["activation_function.threshold"]
    save_file(w, out / "layer_0.safetensors")
    with pytest.raises(FileFormatError, match="ReLU transcoder"):
        import_circuit_tracer(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder", "feature_input_hook": "a",
                                                     "feature_output_hook": "b"}))
    with pytest.raises(FileFormatError, match="cross-layer"):
        import_circuit_tracer(out)


# ----------------------------------------------------------------------------- SAELens layout, convert

def test_saelens_transcoder_layout_and_refusals(tmp_path):
    sae = make_tc(6)
    cfg = json.loads((export_saelens(sae, tmp_path / "stc") / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == D
    assert cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["hook_name_out"] == "blocks.6.hook_mlp_out"
    assert json.loads((export_saelens(make_tc(6, skip=False), tmp_path / "tc") / "cfg.json").read_text())[
        "architecture"] == "jumprelu_transcoder"
    with pytest.raises(FileFormatError, match="SAELens has no TopK transcoder"):
        export_saelens(make_tc(6, arch="topk"), tmp_path / "topk")
    # a SAELens-written directory (no saekit block, and SAELens records no k)
    del cfg["saekit"], cfg["k"]
    (tmp_path / "stc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="--k"):
        import_saelens(tmp_path / "stc")
    back = import_saelens(tmp_path / "stc", k=K)
    assert back.is_transcoder and back.cfg.skip and back.hook_out == "blocks.6.hook_mlp_out"
    close(outputs(back, inputs(1))["forward"], outputs(sae, inputs(1))["forward"], "SAELens-layout import")
    for relu in ("transcoder", "skip_transcoder"):
        cfg["architecture"] = relu
        (tmp_path / "stc" / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(FileFormatError, match="no saekit equivalent"):
            import_saelens(tmp_path / "stc", k=K)


def test_convert_sets_between_formats(tmp_path):
    run, x = make_run(tmp_path / "run"), inputs(3)
    ct = convert(run, tmp_path / "ct", to="circuit-tracer")
    assert describe_converted(ct).count("skip-transcoder batchtopk") == LAYERS
    back = convert(ct, tmp_path / "back", to="saelens")
    assert sorted(p.name for p in back.iterdir()) == [f"blocks.{layer}.mlp.hook_in" for layer in range(LAYERS)]
    for a, b in zip(load_transcoders(run), load_transcoders(back), strict=True):
        same_transcoder(a, b)
    assert load_any(ct, hook="blocks.2.mlp.hook_in").hook == "blocks.2.mlp.hook_in"
    with pytest.raises(SaekitError, match="--hook"):
        load_any(ct)
    # the same weights again are fine; others need --overwrite
    convert(run, tmp_path / "ct", to="circuit-tracer")
    other = make_run(tmp_path / "other", seed=5)
    with pytest.raises(SaekitError, match="overwrite"):
        convert(other, tmp_path / "ct", to="circuit-tracer")
    convert(other, tmp_path / "ct", to="circuit-tracer", overwrite=True)
    close(outputs(import_circuit_tracer(tmp_path / "ct")[0], x)["forward"], outputs(make_tc(0, seed=5), x)["forward"],
          "overwritten")
    with pytest.raises(SaekitError, match="sparsify"):
        convert(run, tmp_path / "sp", to="sparsify")
    single = convert(run / "blocks.1.mlp" / "stc-btk4-d64", tmp_path / "one", to="saelens")
    assert load_sae(single).hook_out == "blocks.1.hook_mlp_out"


# ----------------------------------------------------------------------------- the real peers

def run_peer(python: Path, d: Path, tasks: list[dict], x: torch.Tensor) -> dict:
    save_file({"x": x}, d / "x.safetensors")
    for i, t in enumerate(tasks):
        t.setdefault("out", str(d / f"out{i}.safetensors"))
        t.update(d_in=D, d_sae=D_SAE, k=K)
    job = {"x": str(d / "x.safetensors"), "tasks": tasks, "report": str(d / "report.json")}
    (d / "job.json").write_text(json.dumps(job))
    run = subprocess.run([str(python), str(ROOT / "tests" / "peers_side.py"), str(d / "job.json")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((d / "report.json").read_text())


SAELENS_MADE = ("jumprelu_transcoder", "jumprelu_skip_transcoder", "transcoder", "skip_transcoder")


@pytest.fixture(scope="module")
def saelens_peer(tmp_path_factory):
    d = tmp_path_factory.mktemp("saelens_tc")
    ours = {"jumprelu_transcoder": make_tc(6, skip=False), "jumprelu_skip_transcoder": make_tc(6),
            "matryoshka_skip": make_tc(6, arch="matryoshka")}
    for name, sae in ours.items():
        export_saelens(sae, d / f"ours_{name}")
    tasks = [{"op": "saelens_load", "dir": str(d / f"ours_{name}")} for name in ours]
    tasks += [{"op": "saelens_make_transcoder", "kind": kind, "dir": str(d / f"sl_{kind}"), "seed": i,
               "hook": "blocks.3.mlp.hook_in", "hook_out": "blocks.3.hook_mlp_out"} for i, kind in enumerate(SAELENS_MADE)]
    x = inputs(4)
    return d, run_peer(PEERS_PY, d, tasks, x), x, ours


@needs_peers
def test_saelens_loads_our_transcoders(saelens_peer):
    d, report, x, ours = saelens_peer
    classes = ["JumpReLUTranscoder", "JumpReLUSkipTranscoder", "JumpReLUSkipTranscoder"]
    for i, ((name, sae), cls) in enumerate(zip(ours.items(), classes, strict=True)):
        info = report["tasks"][i]
        assert info["class"] == cls, name
        assert (info["hook_name"], info["hook_name_out"], info["d_out"]) == (sae.hook, sae.hook_out, D)
        theirs, mine = load_file(d / f"out{i}.safetensors"), outputs(sae, x)
        close(mine["acts"], theirs["acts"], f"SAELens encode of our {name}")
        close(mine["forward"], theirs["forward"], f"SAELens forward of our {name}")
        values, indices = sae.encode(x)
        no_skip = sae.decode(values, indices, x) - (x @ sae.W_skip.t() if sae.cfg.skip else 0)
        close(no_skip, theirs["recon"], f"SAELens decode of our {name}")  # SAELens's decode leaves out the skip path


@needs_peers
def test_saelens_made_transcoders_import_exactly_or_are_refused(saelens_peer, tmp_path):
    d, report, x, _ = saelens_peer
    for i, kind in enumerate(SAELENS_MADE, start=3):
        if not kind.startswith("jumprelu"):
            with pytest.raises(FileFormatError, match="ReLU"):
                import_saelens(d / f"sl_{kind}", k=K)
            continue
        sae = import_saelens(d / f"sl_{kind}", k=K)  # SAELens's cfg.json records no k
        assert sae.is_transcoder and sae.cfg.skip == ("skip" in kind) and sae.hook_out == "blocks.3.hook_mlp_out"
        assert float(sae.threshold) == pytest.approx(report["tasks"][i]["threshold"], rel=1e-6)
        theirs = load_file(d / f"out{i}.safetensors")
        close(outputs(sae, x)["acts"], theirs["acts"], f"SAELens-made {kind}")
        close(outputs(sae, x)["forward"], theirs["forward"], f"SAELens-made {kind}")
        convert(d / f"sl_{kind}", tmp_path / kind, k=K)  # and a saekit directory of it loads the same
        close(outputs(load_sae(tmp_path / kind), x)["forward"], theirs["forward"], f"converted {kind}")


@pytest.fixture(scope="module")
def ct_peer(tmp_path_factory):
    d = tmp_path_factory.mktemp("circuit_tracer")
    run = make_run(d / "run")
    export_circuit_tracer(run, d / "sets" / "ours")
    export_circuit_tracer([make_tc(layer, skip=False) for layer in range(2)], d / "sets" / "noskip")
    tasks = [{"op": "ct_load", "dir": str(d / "sets" / "ours"), "resave": str(d / "resaved")},
             {"op": "ct_load", "dir": str(d / "sets" / "noskip")}]
    x = inputs(5)
    return d, run_peer(CT_PY, d, tasks, x), x


@needs_ct
def test_circuit_tracer_loads_our_set_with_its_own_loader(ct_peer):
    d, report, x = ct_peer
    assert report["versions"]["circuit-tracer"].startswith("0.5")
    info = report["tasks"][0]
    assert info == {"n_layers": LAYERS, "d_transcoder": D_SAE, "d_model": D, "feature_input_hook": "mlp.hook_in",
                    "feature_output_hook": "hook_mlp_out", "scan": "saekit/ours", "skip_connection": True,
                    "activation": "JumpReLU", "lazy_decoder": True, "layer_idx": list(range(LAYERS))}
    assert report["tasks"][1]["skip_connection"] is False
    theirs = load_file(d / "out0.safetensors")
    for layer, sae in enumerate(load_transcoders(d / "run")):
        mine = outputs(sae, x)
        values, indices = sae.encode(x)
        close(mine["acts"], theirs[f"acts.{layer}"], f"circuit-tracer encode, layer {layer}")
        close(sae.decode(values, indices, x), theirs[f"recon.{layer}"], f"circuit-tracer decode, layer {layer}")
        close(mine["forward"], theirs[f"forward.{layer}"], f"circuit-tracer forward, layer {layer}")
    theirs = load_file(d / "out1.safetensors")
    close(outputs(make_tc(1, skip=False), x)["forward"], theirs["forward.1"], "circuit-tracer, no skip")


@needs_ct
def test_what_circuit_tracer_writes_imports_exactly(ct_peer, tmp_path):
    d, report, x = ct_peer
    resaved = d / "resaved"  # circuit-tracer's TranscoderSet.to_safetensors + its cache's config.yaml: no k, no saekit block
    assert detect_format(resaved) == "circuit-tracer"
    with pytest.raises(FileFormatError, match="--k"):
        import_circuit_tracer(resaved)
    theirs = load_file(d / "out0.safetensors")
    back = import_circuit_tracer(resaved, k=K)
    assert [b.hook for b in back] == [f"blocks.{layer}.mlp.hook_in" for layer in range(LAYERS)]
    for layer, sae in enumerate(back):
        close(outputs(sae, x)["forward"], theirs[f"forward.{layer}"], f"re-saved layer {layer}")
    shutil.copytree(resaved, tmp_path / "copy")
    convert(tmp_path / "copy", tmp_path / "as_saelens", to="saelens", k=K)
    assert len(load_transcoders(tmp_path / "as_saelens")) == LAYERS


def transformers_457_copy(src: Path, dst: Path) -> Path:
    """saekit's dequantized default model (written by transformers 5) as transformers 4.57 reads it: the tokenizer
    class named, rope_theta and architectures in config.json, no GGUF note, "pt" safetensors metadata and the
    tied embedding stored under model.embed_tokens."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["rope_theta"] = (config.pop("rope_parameters", None) or {}).get("rope_theta", config.get("rope_theta"))
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    tok = json.loads((src / "tokenizer_config.json").read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    w = load_file(src / "model.safetensors")
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" not in w:
        w["model.embed_tokens.weight"] = w.pop("lm_head.weight")
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@needs_ct
def test_circuit_tracer_reads_our_hook_pair_on_the_real_model(model, tmp_path):
    """circuit-tracer's replacement model of the default model (its nnsight backend; its TransformerLens backend has
    no SmolLM2), with a set exported from saekit, computes the same latents at every layer as saekit does on the
    activations it harvests at blocks.L.mlp.hook_in: `mlp.hook_in` is the same tensor there."""
    from saekit.lm import resolve

    n, d = model.cfg.n_layers, model.cfg.d_model
    tokens = model.tokenizer("The cat sat on the mat. It was happy, and then it left the room.", return_tensors="pt").input_ids
    tokens = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), tokens], 1)
    hooks = [f"blocks.{layer}.mlp.hook_in" for layer in range(n)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda h: h in hooks)
    saes = []
    for layer in range(n):
        gen = torch.Generator().manual_seed(layer)
        sae = SparseAutoencoder(SaeConfig(d_in=d, d_sae=256, k=8, d_out=d, transcoder=True, skip=True,
                                          architecture="batchtopk"))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d, 256, generator=gen) / d**0.5)
            sae.b_enc.copy_(0.1 * torch.randn(256, generator=gen))
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(256, d, generator=gen), dim=1))
            pre = cache[hooks[layer]][0] @ sae.W_enc + sae.b_enc
            sae.threshold.fill_(pre.topk(16, dim=-1).values[:, -1].max().item())
        sae.info = {"hook": hooks[layer], "hook_out": f"blocks.{layer}.hook_mlp_out", "model": "test"}
        saes.append(sae)
    export_circuit_tracer(saes, tmp_path / "sets" / "smol", n_layers=n)
    save_file({"tokens": tokens}, tmp_path / "tokens.safetensors")
    hf = transformers_457_copy(Path(resolve("default")[0]), tmp_path / "model")
    report = run_peer(CT_PY, tmp_path, [{"op": "ct_replacement_model", "dir": str(tmp_path / "sets" / "smol"),
                                         "model": str(hf), "backend": "nnsight",
                                         "tokens": str(tmp_path / "tokens.safetensors")}], torch.zeros(1, D))
    assert report["tasks"][0] == {"class": "NNSightReplacementModel", "feature_input_hook": "mlp.hook_in"}
    theirs = load_file(tmp_path / "out0.safetensors")
    ours = torch.stack([sae.dense_codes(cache[h][0]) for sae, h in zip(saes, hooks, strict=True)])
    assert (ours[:, 1:] > 0).sum() > 10 * n  # every layer has active latents to compare
    close(theirs["logits"], logits, "circuit-tracer's model logits")
    assert theirs["acts"][:, 0].abs().max() == 0  # it leaves BOS out
    close(theirs["acts"][:, 1:], ours[:, 1:], "circuit-tracer latents at mlp.hook_in, every layer")

