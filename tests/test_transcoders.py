"""Transcoders, skip-transcoders and Matryoshka BatchTopK: training on synthetic MLP-like data, gradients against
dense autograd, Matryoshka prefixes, exact resume, save/load and folding, the MLP hook pair on real models, the
streamed many-hook cache, and the replacement model on the tiny world."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_store

from saekit.cache import ActivationCache, CacheWriter
from saekit.config import EvalConfig, SaeConfig, TrainConfig
from saekit.errors import HookError, OptionError, SaekitError, ShapeError
from saekit.evaluate import fvu
from saekit.sae import SparseAutoencoder, load_sae
from saekit.train import Trainer

D, N = 16, 6144


def mlp_data(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y = a sparse nonlinear map of x (an MLP with a few strong units) plus an offset and a linear part."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    A, B = torch.randn(D, 48, generator=g), torch.randn(48, D, generator=g) / 6
    L = torch.randn(D, D, generator=g) / 4
    return x, torch.relu(x @ A - 2.0) @ B + x @ L + 0.5


def tc_config(**kw) -> TrainConfig:
    sae = dict(d_in=D, d_sae=96, k=6, transcoder=True, d_out=D)
    base = dict(batch_size=512, epochs=4.0, warmup_steps=5, lr=3e-3, log_every=1, device="cpu", seed=0)
    return TrainConfig(saes=[SaeConfig(**{**sae, **kw.pop("sae", {})})], **{**base, **kw})


@pytest.mark.parametrize("sae", [dict(), dict(skip=True), dict(architecture="batchtopk"),
                                 dict(architecture="matryoshka", prefixes=[12, 48, 96])])
def test_transcoders_learn_the_mlp_output(tmp_path, sae):
    x, y = mlp_data()
    trainer = Trainer(tc_config(sae=sae), torch.cat([x, y], 1)[:5120], tmp_path, info={"hook": "in", "hook_out": "out"})
    assert not trainer.unit_decoder and not trainer.auxk_encoder  # a transcoder's auto: free rows, decoder-only AuxK
    init = fvu(y[5120:], trainer.trained_sae(0)(x[5120:]))
    (path,) = trainer.fit(progress=False)
    curve = [r[f"{trainer.names[0]}/fvu"] for r in trainer.history]
    assert sum(curve[-5:]) < 0.6 * sum(curve[:5])
    tc = load_sae(path)  # folded: raw x in, raw y out
    assert tc.is_transcoder and tc.hook == "in" and tc.hook_out == "out" and tc.cfg.skip == sae.get("skip", False)
    held = fvu(y[5120:], tc(x[5120:]))
    assert held < 0.7 and held < 0.65 * init, (init, held)
    if sae.get("skip"):
        assert tc.W_skip.abs().max() > 0  # the dense path learned the linear part
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["d_out"] == D and cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["hook_name_out"] == "out"


def test_skip_transcoder_beats_plain_on_a_linear_part(tmp_path):
    x, y = mlp_data(1)
    rows = torch.cat([x, y], 1)
    held = {}
    for skip in (False, True):
        trainer = Trainer(tc_config(sae=dict(skip=skip, k=3)), rows[:5120], tmp_path / str(skip))
        held[skip] = fvu(y[5120:], load_sae(trainer.fit(progress=False)[0])(x[5120:]))
    assert held[True] < held[False], held


def dense_loss(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor,
               aux_indices: torch.Tensor | None, auxk_coef: float) -> torch.Tensor:
    """The training loss from dense tensors, given the latents the sparse path picked and kept (BatchTopK's batch
    cutoff drops some candidates; neither the pick nor the cutoff has a gradient)."""
    pre = (x - sae.input_shift) @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices).relu() * kept)
    var = (y - y.mean(0)).pow(2).sum()
    base = sae.b_dec + (x @ sae.W_skip.t() if sae.W_skip is not None else 0)
    loss, lo = 0.0, 0
    for hi in sae.cfg.nested:
        band = torch.zeros_like(z)
        band[:, lo:hi] = z[:, lo:hi]
        base = base + band @ sae.W_dec
        loss = loss + (y - base).pow(2).sum() / var
        lo = hi
    if aux_indices is not None:
        e = (y - base).detach()
        za = torch.zeros_like(pre).scatter(1, aux_indices, pre.gather(1, aux_indices).relu())
        loss = loss + auxk_coef * (e - za @ sae.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss


@pytest.mark.parametrize("sae", [dict(skip=True), dict(architecture="matryoshka", prefixes=[8, 32, 96]),
                                 dict(transcoder=False, d_out=None)])
def test_each_loss_term_has_the_dense_gradient(sae):
    """Reconstruction (every Matryoshka prefix), skip path and AuxK: the sparse path's gradients of every weight
    equal dense autograd's on the same picks."""
    cfg = SaeConfig(**{**dict(d_in=D, d_sae=96, k=6, transcoder=True, d_out=D), **sae})
    x, y = mlp_data(2, 256)
    y = y if cfg.transcoder else x
    tc = SparseAutoencoder.initialized(cfg, x, seed=0, target=y, init="independent" if cfg.transcoder else "tied")
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3)
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.1)
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    values, indices, aux_v, aux_i = tc.encode_train(x, dead, 8)
    preds = tc.prefix_decodes(values, indices, x)
    var = (y - y.mean(0)).pow(2).sum()
    loss = sum((y - p).pow(2).sum() / var for p in preds)
    e = (y - preds[-1]).detach()
    from saekit import ops

    loss = loss + 0.5 * (e - ops.sparse_decode(aux_v, aux_i, tc.W_dec)).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()
    dense_loss(tc, x, y, indices, values.detach() > 0, aux_i, 0.5).backward()
    for name, p in tc.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_matryoshka_prefixes_each_reconstruct(tmp_path):
    x, y = mlp_data(3)
    trainer = Trainer(tc_config(sae=dict(architecture="matryoshka", prefixes=[12, 48, 96], transcoder=False,
                                         d_out=None)), x[:5120], tmp_path)
    sae = load_sae(trainer.fit(progress=False)[0])
    values, indices = sae.encode(x[5120:])
    held = [fvu(x[5120:], p) for p in sae.prefix_decodes(values, indices)]
    assert held[0] < 0.9 and all(a > b for a, b in zip(held, held[1:])), held  # each prefix alone does the job, better with more
    l0 = (values > 0).sum(1).float().mean().item()
    assert 0.7 * 6 < l0 < 1.5 * 6, l0  # the inference threshold is calibrated to the batch cutoffs: L0 ≈ k
    assert json.loads((trainer.out / trainer.names[0] / "cfg.json").read_text())["architecture"] == "jumprelu"


@pytest.mark.parametrize("sae", [dict(), dict(skip=True, architecture="batchtopk"),
                                 dict(architecture="matryoshka", prefixes=[24, 96])])
def test_stop_and_resume_is_bit_identical(tmp_path, sae):
    x, y = mlp_data(4, 4096)
    cfg = tc_config(sae=sae, epochs=1.5, dead_tokens=512, checkpoint_every=5 * 512)
    rows = torch.cat([x, y], 1)
    whole = Trainer(cfg, rows, tmp_path / "whole")
    a = load_sae(whole.fit(progress=False)[0])
    part = Trainer(cfg, rows, tmp_path / "part")
    part.fit(progress=False, stop_after=7)
    del part
    resumed = Trainer(cfg, rows, tmp_path / "part", resume=True)
    assert resumed.step == 7
    b = load_sae(resumed.fit(progress=False)[0])
    assert a.weights_hash() == b.weights_hash()


def test_save_load_round_trip_and_shape_checks(tmp_path):
    cfg = SaeConfig(d_in=D, d_sae=32, k=4, transcoder=True, skip=True, d_out=8, architecture="batchtopk")
    tc = SparseAutoencoder(cfg)
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
        tc.threshold.fill_(0.3)
    tc.info = {"hook": "blocks.1.mlp.hook_in", "hook_out": "blocks.1.hook_mlp_out"}
    tc.save(tmp_path / "tc")
    back = load_sae(tmp_path / "tc")
    x = torch.randn(20, D)
    torch.testing.assert_close(back(x), tc(x))
    assert back.kind == "skip-transcoder" and back.cfg.out_dim == 8
    assert json.loads((tmp_path / "tc" / "cfg.json").read_text())["architecture"] == "jumprelu_skip_transcoder"
    cfg_file = tmp_path / "tc" / "cfg.json"
    bad = json.loads(cfg_file.read_text())
    bad["saekit"]["sae"]["d_out"] = 9
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ShapeError, match="W_dec"):
        load_sae(tmp_path / "tc")


def test_folding_keeps_the_picks_and_gives_raw_outputs():
    cfg = SaeConfig(d_in=D, d_sae=32, k=4, transcoder=True, skip=True, d_out=D)
    tc = SparseAutoencoder.initialized(cfg, seed=1, init="independent")
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.2)
        tc.b_dec.normal_()
        tc.W_skip.normal_(0, 0.1)
    x = torch.randn(50, D)
    s, t = 0.7, 3.0
    raw = tc.folded(s, t)
    torch.testing.assert_close(raw(x), tc(x * s) / t, rtol=1e-5, atol=1e-5)
    assert torch.equal(raw.encode(x)[1].sort(1).values, tc.encode(x * s)[1].sort(1).values)


def test_config_refusals():
    with pytest.raises(OptionError, match="--transcoder"):
        SaeConfig(skip=True)
    with pytest.raises(OptionError, match="end at d_sae"):
        SaeConfig(architecture="matryoshka", d_sae=64, k=4, prefixes=[8, 32])
    with pytest.raises(OptionError, match="matryoshka"):
        SaeConfig(prefixes=[8, 4608])
    assert SaeConfig(architecture="matryoshka", d_sae=64, k=4).nested == [4, 8, 16, 32, 64]


def test_mixed_dictionaries_and_wrong_widths_are_refused(tmp_path):
    x, y = mlp_data()
    with pytest.raises(ShapeError, match="d_in 16 \\+ d_out 16"):
        Trainer(tc_config(), x, tmp_path)
    mixed = TrainConfig(saes=[SaeConfig(d_in=D, d_sae=32, k=4), SaeConfig(d_in=D, d_sae=32, k=4, transcoder=True)],
                        device="cpu")
    with pytest.raises(ShapeError, match="separate runs"):
        Trainer(mixed, torch.cat([x, y], 1), tmp_path)


def test_streamed_cache_writes_small_shards_in_the_storage_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    with CacheWriter(tmp_path / "c", {"model": "m"}, shard_tokens=300, dtype=torch.float16) as w:
        parts = []
        for i in range(7):
            acts = {"a": torch.randn(130, 8, generator=g), "b": torch.randn(130, 4, generator=g)}
            parts.append(acts)
            w.add(acts, torch.arange(130), torch.arange(130), torch.full((130,), i))
        cache = w.close({"tokens": 910, "seconds": 1.0}, {"a": {"threshold": 1.0}, "b": {"threshold": 2.0}})
    assert cache.tokens == 910 and [s["tokens"] for s in cache.manifest["shards"]] == [300, 300, 300, 10]
    assert cache.manifest["storage_dtype"] == "float16" and cache.d_in("b") == 4
    got = cache.slice(250, 700, ["a", "b"])
    want = torch.cat([p["a"] for p in parts])[250:700]
    torch.testing.assert_close(got["a"], want.half().float())
    assert got["a"].dtype == torch.float32 and not (tmp_path / ".c.partial").exists()


# ----------------------------------------------------------------------------- real models


def test_mlp_hook_pair_reproduces_the_mlp_exactly(model, default_contexts):
    from saekit.lm import mlp_pairs, pair_error

    assert len(mlp_pairs(model)) == model.cfg.n_layers
    errors = pair_error(model, [0, 7, 29], default_contexts[0].tokens[:2])
    assert max(errors.values()) == 0.0, errors


def test_hooks_that_are_no_mlp_pair_are_refused_with_the_pairs(model):
    from saekit.lm import check_pair

    assert check_pair(model, "blocks.3.ln2.hook_out", "blocks.3.mlp.hook_out") == ("blocks.3.mlp.hook_in",
                                                                                    "blocks.3.hook_mlp_out")
    with pytest.raises(HookError, match="before the norm's weight") as e:
        check_pair(model, "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert "blocks.0.mlp.hook_in → blocks.0.hook_mlp_out" in str(e.value)
    with pytest.raises(HookError, match="not an MLP"):
        check_pair(model, "blocks.3.mlp.hook_in", "blocks.4.hook_mlp_out")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Transcoders on both layers of the tiny world's two-layer Llama, one harvest pass, evaluated."""
    from saekit.cli import main

    world = build_store(tmp_path_factory.getbasetemp() / "feature_world")
    out = tmp_path_factory.mktemp("tc") / "run"
    assert main(["train", "--transcoder", "--layers", "all", "--model", str(world["model"]), "--dataset",
                 str(world["data"]), "--d-sae", "64", "--k", "4", "--tokens", "1800", "--epochs", "3",
                 "--batch-size", "256", "--context-size", "32", "--heldout-fraction", "0.2", "--eval-tokens", "256", "--storage-dtype", "float16",
                 "--out", str(out), "--device", "cpu"]) == 0
    return world, out


def test_a_transcoder_set_trains_evaluates_and_replaces_every_mlp(tiny_set):
    from saekit.cli import main

    world, out = tiny_set
    cache = ActivationCache(out / "activations")
    assert cache.hooks == ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in",
                           "blocks.1.hook_mlp_out"]
    assert cache.manifest["storage_dtype"] == "float16" and max(cache.manifest["mlp_pair_error"].values()) < 1e-6
    for layer in (0, 1):
        ev = json.loads((out / f"blocks.{layer}.mlp" / "tc-k4-d64" / "eval.json").read_text())
        assert ev["kind"] == "transcoder" and ev["hook"] == f"blocks.{layer}.hook_mlp_out"
        assert ev["fvu"] < 1.0 and ev["ce_sae"] > 0
    assert main(["eval", str(out), "--replace-all", "--eval-tokens", "256"]) == 0
    rep = json.loads((out / "replacement_eval.json").read_text())
    assert rep["layers"] == [0, 1] and rep["ce_zero_ablation"] > rep["ce_clean"] and rep["kl"] > 0
    assert rep["ce_sae"] >= rep["ce_clean"] - 0.05
    # each layer's transcoder started from its own random weights (seed + layer index), not one shared start
    a, b = (SparseAutoencoder.load(out / f"blocks.{L}.mlp" / "tc-k4-d64") for L in (0, 1))
    assert (a.info["training"]["config"]["seed"], b.info["training"]["config"]["seed"]) == (0, 1)
    assert torch.nn.functional.cosine_similarity(a.W_enc, b.W_enc, dim=0).mean() < 0.5


def test_replace_all_refuses_a_set_with_a_missing_layer(tiny_set, tmp_path):
    import shutil

    from saekit.runner import evaluate_replacement_set

    _, out = tiny_set
    shutil.copytree(out / "blocks.1.mlp", tmp_path / "set" / "blocks.1.mlp")
    with pytest.raises(SaekitError, match=r"no transcoder for layer\(s\) 0"):
        evaluate_replacement_set(tmp_path / "set", EvalConfig(tokens=64))


def test_distribute_modules_spreads_layers_over_processes(tiny_set, tmp_path):
    import subprocess
    import sys

    world, _ = tiny_set
    out = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "saekit", "train", "--distributed", "--nproc-per-node", "2",
                          "--distribute-modules", "--transcoder", "--layers", "all", "--model", str(world["model"]),
                          "--dataset", str(world["data"]), "--d-sae", "64", "--k", "4", "--tokens", "1800",
                          "--epochs", "1", "--batch-size", "256", "--context-size", "32", "--no-eval", "--device",
                          "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] trained 1 dictionary on blocks.{rank}.mlp" in run.stdout
        tc = load_sae(out / f"blocks.{rank}.mlp" / "tc-k4-d64")
        assert tc.hook_out == f"blocks.{rank}.hook_mlp_out" and tc.info["harvest_tokens"] == 1800
