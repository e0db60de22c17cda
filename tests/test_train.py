"""The Trainer on synthetic sparse data: learning, decoder geometry, AuxK, dead latents, several SAEs on
one stream, the lr schedule, non-finite input and loss, and exact stop + resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import small_sae

from saekit import ops
from saekit.config import SaeConfig, TrainConfig
from saekit.errors import NonFiniteError, SaekitError, ShapeError
from saekit.evaluate import fvu
from saekit.sae import load_sae, lr_rule
from saekit.train import CHECKPOINT, InMemoryBatches, Trainer, sae_name

D = 32


def config(**kw) -> TrainConfig:
    base = dict(saes=[SaeConfig(d_in=D, d_sae=128, k=4)], batch_size=256, epochs=1.0, warmup_steps=5,
                log_every=1, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def weights_of(trainer: Trainer, i: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.saes[i].state_dict().items()}


def test_loss_and_fvu_go_down(synthetic, tmp_path):
    train, test = synthetic.acts[:7168], synthetic.acts[7168:]
    trainer = Trainer(config(epochs=4.0), train, tmp_path, info={"hook": "synthetic"})
    init_fvu = fvu(test, trainer.trained_sae(0)(test))
    paths = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == trainer.total_steps == 4 * 7168 // 256
    curve = [r["k4-d128/fvu"] for r in rows]
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    assert all(r["k4-d128/l0"] <= 4 for r in rows)
    sae = load_sae(paths[0])  # folded: works on raw activations
    held = fvu(test, sae(test))
    assert held < 0.35 and held < 0.6 * init_fvu, (init_fvu, held)
    assert (tmp_path / "training.html").is_file() and (tmp_path / CHECKPOINT).is_file()
    manifest = json.loads((paths[0] / "cfg.json").read_text())["saekit"]
    assert manifest["training"]["steps"] == trainer.total_steps
    assert manifest["training"]["input_scale"] == pytest.approx(trainer.scale)
    assert manifest["hook"] == "synthetic"


def test_decoder_unit_norm_and_parallel_grad_removed(synthetic, tmp_path):
    trainer = Trainer(config(epochs=0.25), synthetic.acts, tmp_path)
    sae, opt = trainer.saes[0], trainer.optimizers[0]
    seen = []

    def check(optimizer, args, kwargs):  # what the optimizer sees: no component along any decoder row
        g, W = sae.W_dec.grad, sae.W_dec
        seen.append((g * W).sum(1).abs().max().item() / g.norm(dim=1).max().item())

    opt.register_step_pre_hook(check)
    trainer.fit(progress=False)
    assert len(seen) == trainer.total_steps and max(seen) < 1e-5
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    # the unit operation on its own
    s = small_sae()
    s.W_dec.grad = torch.randn_like(s.W_dec)
    s.remove_parallel_grad()
    torch.testing.assert_close((s.W_dec.grad * s.W_dec).sum(1), torch.zeros(48), atol=1e-6, rtol=0)


def test_auxk_gradient_reaches_the_encoder_and_matches_dense_autograd():
    """sparsify's encoder backward drops the AuxK gradient (W_enc never learns from it); ours must not."""
    torch.manual_seed(0)
    sae = small_sae(d_in=16, d_sae=48, k=4)
    x = torch.randn(64, 16)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[24:] = True
    values, indices, aux_v, aux_i = sae.encode_train(x, dead, 6)
    x_hat = sae.decode(values, indices)
    e = (x - x_hat).detach()
    aux = (e - ops.sparse_decode(aux_v, aux_i, sae.W_dec)).pow(2).sum()
    aux.backward()
    g_enc = sae.W_enc.grad.clone()
    assert g_enc[:, 24:].abs().sum() > 0  # AuxK trains the dead latents' encoder columns
    assert torch.equal(g_enc[:, :24], torch.zeros(16, 24))  # and nothing else
    # dense reference: plain autograd through torch.topk on the full pre-activation matrix
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.masked_fill(~dead, float("-inf")).topk(6, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    (e - codes @ W_dec).pow(2).sum().backward()
    torch.testing.assert_close(g_enc, W_enc.grad)
    torch.testing.assert_close(sae.b_enc.grad, b_enc.grad)
    torch.testing.assert_close(sae.b_dec.grad, b_dec.grad)
    torch.testing.assert_close(sae.W_dec.grad, W_dec.grad)


def test_main_plus_auxk_loss_gradients_match_dense_autograd():
    torch.manual_seed(1)
    sae = small_sae(d_in=16, d_sae=48, k=4)
    x = torch.randn(64, 16)
    dead = torch.rand(48) < 0.5
    values, indices, aux_v, aux_i = sae.encode_train(x, dead, 5)
    err = x - sae.decode(values, indices)
    loss = err.pow(2).sum() + (err.detach() - ops.sparse_decode(aux_v, aux_i, sae.W_dec)).pow(2).sum() / 32
    loss.backward()
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(4, dim=1)
    err_ref = x - (torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ W_dec + b_dec)
    atop = pre.masked_fill(~dead, float("-inf")).topk(5, dim=1)
    aux_codes = torch.zeros_like(pre).scatter(1, atop.indices, atop.values.relu())
    (err_ref.pow(2).sum() + (err_ref.detach() - aux_codes @ W_dec).pow(2).sum() / 32).backward()
    for ours, ref in [(sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)]:
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_dead_latent_counting(synthetic, tmp_path):
    trainer = Trainer(config(dead_tokens=512, auxk_coef=0.0), synthetic.acts, tmp_path)
    sae = trainer.saes[0]
    with torch.no_grad():
        sae.b_enc[:10] = -1e4  # these ten can never fire
    since = trainer.since_fired[0]
    fired_any = torch.zeros(128, dtype=torch.bool)
    for step in range(4):
        before = since.clone()
        batch = trainer.data.batch(step)
        with torch.no_grad():  # the latents this step will fire (same weights, same input)
            v, i = sae.encode(batch * trainer.scale)
        fired_now = torch.zeros(128, dtype=torch.bool)
        fired_now[i[v > 0]] = True
        fired_any |= fired_now
        stats = trainer.train_step(batch)[0]
        # the logged dead fraction is the share not fired in the last dead_tokens tokens, before this step
        assert stats["dead_fraction"] == pytest.approx((before >= 512).float().mean().item())
        assert (since[fired_now] == 0).all()
        assert torch.equal(since[~fired_now], before[~fired_now] + 256)
        trainer.step += 1
    assert torch.equal(since[:10], torch.full((10,), 4 * 256))
    assert (since[10:][fired_any[10:]] < 4 * 256).all()
    assert stats["dead_fraction"] >= 10 / 128


def test_auxk_trains_the_encoder_only_when_asked(synthetic, tmp_path):
    """auxk_trains=decoder moves only the dead latents' decoder rows (as sparsify); both lets its gradient into
    their encoder columns too, and auto is both for an SAE. One first step from the same state with AuxK off and
    each setting."""
    after = {}
    settings = {"off": dict(auxk_coef=0.0), "decoder": dict(auxk_trains="decoder"), "both": dict(auxk_trains="both"),
                "auto": {}}
    for name, kw in settings.items():
        trainer = Trainer(config(dead_tokens=256, grad_clip=0.0, **kw), synthetic.acts, tmp_path / name)
        trainer.since_fired[0][64:] = 256  # latents 64+ are dead: AuxK picks among them
        stats = trainer.train_step(trainer.data.batch(0))[0]
        assert stats["dead_fraction"] == 0.5
        after[name] = weights_of(trainer)
    off, dec, both = after["off"], after["decoder"], after["both"]
    assert not torch.allclose(dec["W_dec"][64:], off["W_dec"][64:])  # AuxK fits the dead rows either way
    torch.testing.assert_close(dec["W_dec"], both["W_dec"])
    torch.testing.assert_close(dec["W_enc"], off["W_enc"])  # decoder-only leaves the encoder to the main loss
    torch.testing.assert_close(dec["b_enc"], off["b_enc"])
    assert not torch.allclose(both["W_enc"][:, 64:], dec["W_enc"][:, 64:])
    torch.testing.assert_close(both["W_enc"][:, :64], dec["W_enc"][:, :64])
    for key in both:  # an SAE's auto is both
        torch.testing.assert_close(after["auto"][key], both[key])


def test_default_dead_window_scales_with_short_runs(synthetic, tmp_path):
    trainer = Trainer(config(epochs=2.0), synthetic.acts, tmp_path)
    assert trainer.dead_tokens == max(256, 2 * 8192 // 256 * 256 // 50)
    big = Trainer(config(epochs=2.0, dead_tokens=10_000_000), synthetic.acts, tmp_path / "b")
    assert big.dead_tokens == 10_000_000


def test_several_saes_from_one_stream(synthetic, tmp_path):
    """Training A beside B gives A exactly the weights it gets alone: both see the same batches."""
    a, b = SaeConfig(d_in=D, d_sae=64, k=4), SaeConfig(d_in=D, d_sae=128, k=8)
    both = Trainer(config(saes=[a, b], epochs=0.5), synthetic.acts, tmp_path / "both")
    paths = both.fit(progress=False)
    assert [p.name for p in paths] == ["k4-d64", "k8-d128"] == both.names
    assert load_sae(paths[1]).cfg == b
    alone = Trainer(config(saes=[a], epochs=0.5), synthetic.acts, tmp_path / "alone")
    alone.fit(progress=False)
    for name, t in weights_of(alone).items():
        assert torch.equal(t, weights_of(both, 0)[name]), name
    row = json.loads((tmp_path / "both" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"k4-d64/fvu", "k8-d128/fvu", "k8-d128/l0", "k8-d128/dead_fraction"} <= set(row)
    assert row["k8-d128/l0"] > row["k4-d64/l0"]
    with pytest.raises(SaekitError, match="share a shape"):
        Trainer(config(saes=[a, a]), synthetic.acts, tmp_path / "dup")


def test_lr_schedule(synthetic, tmp_path):
    cfg = config(warmup_steps=4, decay_fraction=0.25)
    trainer = Trainer(cfg, synthetic.acts, tmp_path)
    assert trainer.total_steps == 32
    base = cfg.lr_scale * 2e-4 * math.sqrt(2**14 / 128)
    assert trainer.lr(trainer.saes[0]) == pytest.approx(base) == pytest.approx(cfg.lr_scale * lr_rule(128))
    f = trainer._lr_factor
    assert [f(s) for s in (0, 1, 3, 10, 24)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])
    assert [f(s) for s in (28, 31, 32)] == pytest.approx([0.5, 0.125, 0.0])
    lrs = []
    opt = trainer.optimizers[0]
    opt.register_step_pre_hook(lambda o, args, kwargs: lrs.append(o.param_groups[0]["lr"]))
    trainer.fit(progress=False)
    assert lrs == pytest.approx([base * f(s) for s in range(32)])
    assert Trainer(config(lr=1e-3), synthetic.acts, tmp_path / "fixed").lr(trainer.saes[0]) == 1e-3


def test_nan_activations_refused(synthetic, tmp_path):
    acts = synthetic.acts.clone()
    acts[100, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        Trainer(config(), acts, tmp_path)
    acts[100, 3] = float("inf")
    with pytest.raises(NonFiniteError):
        Trainer(config(), acts, tmp_path)


def test_nan_loss_mid_training_keeps_the_last_checkpoint(synthetic, tmp_path):
    trainer = Trainer(config(checkpoint_every=2 * 256), synthetic.acts, tmp_path)
    batch = trainer.data.batch

    def poisoned(step):
        b = batch(step)
        return b * float("nan") if step == 5 else b

    trainer.data.batch = poisoned
    with pytest.raises(NonFiniteError, match="at step 5; the last checkpoint is intact"):
        trainer.fit(progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 4
    # the checkpoint resumes, and the resumed run ends where an uninterrupted one does
    resumed = Trainer(config(checkpoint_every=2 * 256), synthetic.acts, tmp_path, resume=True)
    assert resumed.step == 4
    resumed.fit(progress=False)
    clean = Trainer(config(checkpoint_every=2 * 256), synthetic.acts, tmp_path / "clean")
    clean.fit(progress=False)
    for name, t in weights_of(clean).items():
        assert torch.equal(t, weights_of(resumed)[name]), name


@pytest.mark.parametrize("optimizer,architecture", [("adam", "topk"), ("signum", "topk"), ("adam", "batchtopk")])
def test_stop_and_resume_is_bit_identical(synthetic, tmp_path, optimizer, architecture):
    """Two epochs, AuxK active (short dead window), stopped mid-epoch and resumed by a new Trainer."""
    cfg = config(saes=[SaeConfig(d_in=D, d_sae=512, k=2, architecture=architecture)], epochs=1.5,
                 optimizer=optimizer, dead_tokens=512, checkpoint_every=5 * 256)
    acts = synthetic.acts[:4096]
    whole = Trainer(cfg, acts, tmp_path / "whole")
    whole_paths = whole.fit(progress=False)
    part = Trainer(cfg, acts, tmp_path / "part")
    assert part.fit(progress=False, stop_after=11) == []  # stopped runs save no SAE
    assert part.step == 11 and not (tmp_path / "part" / sae_name(cfg.saes[0])).exists()
    del part
    resumed = Trainer(cfg, acts, tmp_path / "part", resume=True)
    assert resumed.step == 11
    part_paths = resumed.fit(progress=False)
    # dead latents (and so AuxK) around the stop: the dead counters must resume exactly too
    assert all(row[f"{whole.names[0]}/dead_fraction"] > 0 for row in whole.history[11:14])
    for name, t in weights_of(whole).items():
        assert torch.equal(t, weights_of(resumed)[name]), name
    a, b = load_sae(whole_paths[0]), load_sae(part_paths[0])
    assert a.weights_hash() == b.weights_hash()

    def strip(path):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in path.read_text().splitlines()]

    assert strip(tmp_path / "whole" / "metrics.jsonl") == strip(tmp_path / "part" / "metrics.jsonl")


def test_resume_with_a_different_width_is_a_shape_error(synthetic, tmp_path):
    Trainer(config(), synthetic.acts, tmp_path).fit(progress=False, stop_after=2)
    narrow = config(saes=[SaeConfig(d_in=16, d_sae=128, k=4)])
    with pytest.raises(ShapeError, match=r"--resume: this run differs from the checkpoint .*SAE 0 d_in: 32 → 16"):
        Trainer(narrow, synthetic.acts[:, :16], tmp_path, resume=True)
    with pytest.raises(ShapeError, match="has d_in 32 but the activations have width 16"):
        Trainer(config(), synthetic.acts[:, :16], tmp_path / "x")
    with pytest.raises(SaekitError, match="no checkpoint"):
        Trainer(config(), synthetic.acts, tmp_path / "fresh", resume=True)


def test_resume_names_every_setting_that_differs_and_keeps_the_checkpoint(synthetic, tmp_path):
    info = {"hook": "blocks.0.hook_resid_pre", "model": "m", "dataset": "d", "harvest_tokens": len(synthetic.acts)}
    Trainer(config(), synthetic.acts, tmp_path, info=info).fit(progress=False, stop_after=2)
    before = (tmp_path / CHECKPOINT).read_bytes()
    other = config(saes=[SaeConfig(d_in=32, d_sae=64, k=8)], optimizer="signum")
    with pytest.raises(ShapeError) as e:
        Trainer(other, synthetic.acts, tmp_path, info={**info, "hook": "blocks.1.hook_resid_pre"}, resume=True)
    for part in ("hook: 'blocks.0.hook_resid_pre' → 'blocks.1.hook_resid_pre'", "optimizer: 'adam' → 'signum'",
                 "SAE 0 d_sae: 128 → 64", "SAE 0 k: 4 → 8"):
        assert part in str(e.value)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_pickle_that_is_not_a_checkpoint_is_named_without_torch_advice(synthetic, tmp_path):
    import pickle

    from saekit.errors import FileFormatError

    Trainer(config(), synthetic.acts, tmp_path).fit(progress=False, stop_after=1)
    torch.save({"step": 3}, tmp_path / CHECKPOINT)  # loads safely, but holds no training state
    with pytest.raises(FileFormatError, match="lacks scale, config") as e:
        Trainer(config(), synthetic.acts, tmp_path, resume=True)
    (tmp_path / CHECKPOINT).write_bytes(pickle.dumps({"step": 3}))  # a plain pickle: never unpickled
    with pytest.raises(FileFormatError, match="never unpickles") as e:
        Trainer(config(), synthetic.acts, tmp_path, resume=True)
    assert "weights_only" not in str(e.value)


def test_corrupt_checkpoint(synthetic, tmp_path):
    Trainer(config(), synthetic.acts, tmp_path).fit(progress=False, stop_after=1)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    from saekit.errors import FileFormatError

    with pytest.raises(FileFormatError, match="is not a saekit checkpoint"):
        Trainer(config(), synthetic.acts, tmp_path, resume=True)


def test_signum_optimizer_trains(synthetic, tmp_path):
    train, test = synthetic.acts[:7168], synthetic.acts[7168:]
    trainer = Trainer(config(optimizer="signum", epochs=2.0), train, tmp_path)
    assert trainer.lr(trainer.saes[0]) == pytest.approx(5e-3 * math.sqrt(2**14 / 128) / 4)
    init = fvu(test, trainer.trained_sae(0)(test))
    sae = load_sae(trainer.fit(progress=False)[0])
    curve = [r["k4-d128/fvu"] for r in trainer.history]
    assert curve[-1] < curve[0]
    assert fvu(test, sae(test)) < 0.6 * init
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    assert all(torch.isfinite(t).all() for t in sae.weights().values())


def test_batches_are_a_pure_function_of_step():
    acts = torch.arange(1000.0)[:, None]
    src = InMemoryBatches(acts, 100, seed=3)
    epoch0 = torch.cat([src.batch(s) for s in range(10)])
    assert sorted(epoch0.flatten().tolist()) == list(range(1000))  # an epoch sees every row once
    epoch1 = torch.cat([src.batch(s) for s in range(10, 20)])
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch
    assert torch.equal(InMemoryBatches(acts, 100, seed=3).batch(13), src.batch(13))
    with pytest.raises(SaekitError, match="only 1000 activations for a batch of 2000"):
        InMemoryBatches(acts, 2000, seed=0)



def test_streamed_training_resumes_exactly(synthetic, tmp_path):
    """StreamBatches (a live harvest through the shuffle buffer) replays and skips on resume: exact too."""
    from saekit.train import StreamBatches

    acts = synthetic.acts[:4096]

    def stream():
        return StreamBatches(lambda: iter(acts.split(100)), tokens=4096, batch_size=256, buffer_tokens=1024, seed=0)

    assert torch.equal(stream().head(300), acts[:300])
    cfg = config(dead_tokens=512, checkpoint_every=4 * 256)
    whole = Trainer(cfg, stream(), tmp_path / "whole")
    whole.fit(progress=False)
    part = Trainer(cfg, stream(), tmp_path / "part")
    part.fit(progress=False, stop_after=7)
    resumed = Trainer(cfg, stream(), tmp_path / "part", resume=True)
    resumed.fit(progress=False)
    for name, t in weights_of(whole).items():
        assert torch.equal(t, weights_of(resumed)[name]), name
    with pytest.raises(SaekitError, match="epochs=1"):
        Trainer(config(epochs=2.0), stream(), tmp_path / "two")


def test_cpu_training_keeps_freed_heap_blocks(synthetic, tmp_path, monkeypatch):
    """A CPU trainer sets glibc's thresholds so each step's freed buffers are reused (saekit.heap), and on glibc
    the setting takes."""
    import platform

    from saekit import heap

    calls = []
    monkeypatch.setattr(heap, "keep_freed_blocks", lambda: calls.append(True) or True)
    Trainer(config(epochs=0.25), synthetic.acts, tmp_path)
    assert calls == [True]
    monkeypatch.undo()
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's thresholds are glibc's")
    assert heap.keep_freed_blocks() is True
