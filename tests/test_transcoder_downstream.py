"""Everything downstream of training on a transcoder (issue 15, part 5), in the tiny world (a 2-layer random Llama):
the feature store reads the encoder on the MLP input and takes logit effects, neighbours and the map from W_dec;
steering edits the MLP output (exact, identity at no edit, the plain HF path equal to the bridge); steer-eval's
baseline lives in the output space; the browser's pages say what the latents are and run the transcoder; misuse is
refused with a message that says what to do."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BROWSER_SCRIPT, manifest, ok

from saekit import steer as S
from saekit import steer_eval as E
from saekit.config import SaeConfig
from saekit.errors import DataError, HookError, SaekitError
from saekit.features import FeatureConfig, FeatureStore, analyze, decoder_neighbours, logit_effects
from saekit.sae import SparseAutoencoder, load_sae

IN, OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
CFG = FeatureConfig(tokens=1500, top_n=6, sample_size=12, quantile_groups=3, batch_contexts=4, device="cpu")


def save_transcoder(world: dict[str, Path], out: Path, hook_out: str = OUT, skip: bool = False) -> Path:
    """A random transcoder on the tiny model's layer-1 MLP (most latents fire sometimes)."""
    tc = SparseAutoencoder.initialized(SaeConfig(d_in=32, d_sae=64, k=4, transcoder=True, skip=skip, d_out=32), seed=0)
    with torch.no_grad():
        tc.b_enc.fill_(0.5)
        if skip:
            tc.W_skip.copy_(0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    tc.info = {"hook": IN, "hook_out": hook_out, "kind": "transcoder", "model": "tiny-llama",
               "model_arg": str(world["model"]), "dataset": str(world["data"]), "text_column": "text",
               "context_size": 32, "heldout_fraction": 0.1, "seed": 0}
    return tc.save(out)


@pytest.fixture(scope="module")
def world(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """The tiny world's model and data, a transcoder on them, and its feature store (the model pass)."""
    root = tmp_path_factory.mktemp("tc_world")
    tc = save_transcoder(tiny_store, root / "tc")
    analyze(tc, root / "store", CFG, progress=False)
    return {**tiny_store, "tc": tc, "store": root / "store", "root": root}


@pytest.fixture(scope="module")
def model(world):
    from saekit.lm import load_model

    return load_model(str(world["model"]))


@pytest.fixture(scope="module")
def tc(world) -> SparseAutoencoder:
    return load_sae(world["tc"])


@pytest.fixture(scope="module")
def cache(world, model) -> Path:
    """Both hooks of the transcoder harvested over the store's contexts, as `saekit train --transcoder` caches them."""
    from saekit.cache import ActivationCache
    from saekit.data import load_contexts
    from saekit.harvest import Harvester

    train, _ = load_contexts(model.tokenizer, str(world["data"]), 32, 0.1, 0)
    h = Harvester(model, [IN, OUT]).harvest(train.tokens, 1500, batch_contexts=7, progress=False)
    meta = {"model_arg": str(world["model"]), "dataset": str(world["data"]), "context_size": 32,
            "heldout_fraction": 0.1, "seed": 0}
    ActivationCache.write(world["root"] / "acts", h, meta)
    h.acts.pop(OUT)
    ActivationCache.write(world["root"] / "acts-in-only", h, meta)
    return world["root"] / "acts"


def hooked(model, toks, steering=None):
    """(MLP input, MLP output as the rest of the model sees it, logits) of one forward, steered or not."""
    seen = {}

    def grab(name):
        def fn(act, hook):
            seen[name] = act.detach().clone()
        return fn

    with ExitStack() as stack:
        if steering is not None:
            stack.enter_context(S.steer(model, steering.sae, steering))
        stack.enter_context(model.hooks(fwd_hooks=[(IN, grab("in")), (OUT, grab("out"))]))  # after the edit
        logits = model(toks)
    return seen["in"], seen["out"], logits


def prompt(model, text="The central bank raised rates"):
    return torch.tensor([S.prompt_tokens(model.tokenizer, text)])


def firing(tc, x: torch.Tensor) -> int:
    """A latent that fires at some positions of x [1, T, d] but not all."""
    on = tc.dense_codes(x[0]) > 0
    return int(((on.sum(0) > 0) & (on.sum(0) < len(on))).nonzero()[0])


# ----------------------------------------------------------------------------- the feature store

def test_store_is_the_encoder_on_the_mlp_input_and_W_dec_written_into_the_residual(world, model, tc):
    from safetensors.torch import load_file

    from saekit.harvest import Harvester
    from saekit.lm import unembedding

    man = manifest(world["store"])
    assert (man["dictionary"], man["hook"], man["hook_out"]) == ("transcoder", IN, OUT)
    assert man["sae"]["transcoder"] and set(man["massive_thresholds"]) == {IN, OUT}  # judged at both hooks
    store = FeatureStore(world["store"])
    assert store.is_transcoder and store.hooks_text == f"{IN} → {OUT}"
    # every top example's value is the encoder's activation on the MLP input at that token
    contexts = load_file(world["store"] / "contexts.safetensors")["tokens"].long()
    harvester = Harvester(model, [IN])
    alive = np.nonzero(store.stats["count"])[0]
    assert len(alive) > 20
    checked = 0
    for f in alive[:: max(len(alive) // 8, 1)]:
        for ex in store.feature(int(f)).top[:3]:
            x = harvester.forward(contexts[ex.context: ex.context + 1])[IN][0, ex.position]
            z = tc.dense_codes(x[None])[0, int(f)]
            assert ex.value == pytest.approx(float(z), rel=1e-5, abs=1e-6)
            checked += 1
    assert checked >= 10
    # logit effects and neighbours from W_dec, the direction each latent writes (as for an SAE's features)
    feats = load_file(world["store"] / "features.safetensors")
    want = logit_effects(tc.W_dec.detach(), *unembedding(model), CFG.logit_tokens)
    assert torch.equal(feats["logit_top_token"], want["logit_top_token"])
    torch.testing.assert_close(feats["logit_top_value"], want["logit_top_value"])
    assert torch.equal(feats["neighbour_id"], decoder_neighbours(tc.W_dec.detach(), CFG.neighbours)["neighbour_id"])


def test_cached_pairs_build_the_same_store_and_a_cache_without_the_output_is_refused(world, model, cache, tmp_path):
    from safetensors.torch import load_file

    analyze(world["tc"], tmp_path / "store", CFG, activations=cache, model=model, progress=False)
    got = manifest(tmp_path / "store")
    assert got["source"] == "activations" and got["dictionary"] == "transcoder"
    assert all("activation cache" in t["from"] for t in got["massive_thresholds"].values())
    for name in ("stats.safetensors", "features.safetensors", "contexts.safetensors"):
        a, b = load_file(world["store"] / name), load_file(tmp_path / "store" / name)
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-4), (name, k)
    with pytest.raises(DataError, match=f"not \\['{OUT}'\\].*its input {IN} and its output {OUT}"):
        analyze(world["tc"], tmp_path / "store2", CFG, activations=cache.parent / "acts-in-only", model=model,
                progress=False)


def test_massive_tokens_are_judged_at_the_output_too(world, model, cache, tmp_path):
    """A threshold recorded for the MLP output leaves out the tokens whose output is massive, as training does."""
    from saekit.cache import ActivationCache

    acts = ActivationCache(cache).read([IN, OUT])
    norms = acts.acts[OUT].norm(dim=1)
    low = float(norms.quantile(0.9))
    ActivationCache.write(tmp_path / "acts-low", acts, {"model_arg": str(world["model"])},
                          massive={IN: {"multiple": 10.0, "median_norm": 1.0, "threshold": 1e9},
                                   OUT: {"multiple": 1.0, "median_norm": low, "threshold": low}})
    analyze(world["tc"], tmp_path / "store", CFG, activations=tmp_path / "acts-low", model=model, progress=False)
    got = manifest(tmp_path / "store")
    assert got["massive_thresholds"][OUT]["threshold"] == low and got["massive_threshold"] == 1e9  # the input's
    assert got["massive_excluded"] == int((norms[: got["tokens_seen"]] > low).sum()) > 0


def test_quality_of_the_mlp_output_from_eval_json(world, tc, tmp_path):
    """The store shows `saekit eval`'s numbers when eval.json is of these weights (a transcoder's FVU is of its
    output), and none when it is of other weights."""
    import shutil

    from saekit.files import write_json

    d = Path(shutil.copytree(world["tc"], tmp_path / "tc"))
    write_json(d / "eval.json", {"fvu": 0.25, "l0": 4.0, "ce_recovered_zero": 0.5, "tokens": 2048, "hook": OUT,
                                 "weights_sha256": tc.weights_hash()})
    cfg = FeatureConfig(**{**CFG.__dict__, "tokens": 300})
    analyze(d, tmp_path / "store", cfg, progress=False)
    q = manifest(tmp_path / "store")["quality"]
    assert q["fvu"] == 0.25 and q["of"] == OUT and q["tokens"] == 2048
    write_json(d / "eval.json", {"fvu": 0.25, "weights_sha256": "other"})
    analyze(d, tmp_path / "store", cfg, progress=False)
    assert manifest(tmp_path / "store")["quality"] is None


# ----------------------------------------------------------------------------- steering

@pytest.mark.parametrize("mode", ["clamp", "scale", "ablate", "add"])
def test_edit_changes_the_mlp_output_by_delta_z_W_dec(model, tc, mode):
    toks = prompt(model)
    x0, y0, logits0 = hooked(model, toks)
    f = firing(tc, x0)
    edit = {"clamp": S.clamp(f, 1.5), "scale": S.scale(f, 3.0), "ablate": S.ablate(f), "add": S.add(f, 0.7)}[mode]
    x1, y1, logits1 = hooked(model, toks, S.Steering(tc, [edit]))
    z = tc.dense_codes(x0[0])[:, f]
    dz = {"clamp": 1.5 - z, "scale": 2.0 * z, "ablate": -z, "add": torch.full_like(z, 0.7)}[mode]
    dz[0] = 0.0  # BOS is left alone
    torch.testing.assert_close(y1[0] - y0[0], dz[:, None] * tc.W_dec[f].detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(x1, x0)  # the latents are read from the clean MLP input, which the edit does not touch
    assert not torch.equal(logits1, logits0)


def test_no_edit_is_the_identity_and_the_model_is_restored(model, tc):
    toks = prompt(model)
    _, y0, logits0 = hooked(model, toks)
    for edits in ([S.scale(3, 1.0)], [S.add(3, 0.0)], [S.clamp(firing(tc, hooked(model, toks)[0]), float("nan"))]):
        _, y1, logits1 = hooked(model, toks, S.Steering(tc, edits))
        assert torch.equal(y1, y0) and torch.equal(logits1, logits0)  # the MLP's own output kept, bit for bit
    n_hooks = sum(len(hp._forward_hooks) for hp in model.hook_dict.values())
    with S.steer(model, tc, [S.add(3, 5.0)]) as st:
        assert not torch.equal(model(toks), logits0) and st.calls == 1
    assert torch.equal(model(toks), logits0)
    assert sum(len(hp._forward_hooks) for hp in model.hook_dict.values()) == n_hooks


def test_skip_transcoder_edit_is_delta_z_W_dec_too(world, model, tmp_path):
    """The skip path depends on the input alone, so it cancels: the change is still Δz·W_dec."""
    sk = load_sae(save_transcoder(world, tmp_path / "skip", skip=True))
    assert sk.kind == "skip-transcoder"
    toks = prompt(model)
    x0, y0, _ = hooked(model, toks)
    f = firing(sk, x0)
    _, y1, _ = hooked(model, toks, S.Steering(sk, [S.clamp(f, 2.0)]))
    dz = 2.0 - sk.dense_codes(x0[0])[:, f]
    dz[0] = 0.0
    torch.testing.assert_close(y1[0] - y0[0], dz[:, None] * sk.W_dec[f].detach(), atol=1e-6, rtol=1e-5)


def test_plain_hf_path_equals_the_bridge_step_by_step_and_in_generation(model, tc):
    """The fast path places the transcoder's two hooks on the HF MLP (its input and output): prefill and KV-cache
    steps give the bridge's logits, and generate gives the same tokens on both engines."""
    plain = S.plain_hf(model, [IN, OUT], "hf")
    toks = prompt(model).expand(2, -1)
    f = firing(tc, hooked(model, toks[:1])[0])
    logits = {}
    for engine in ("bridge", "hf"):
        st = S.Steering(tc, [S.scale(f, 4.0), S.add(7, 0.5, "generated")], rows=torch.tensor([False, True]))
        assert [h for h, _ in st.hooks()] == [IN, OUT]
        with ExitStack() as stack, torch.no_grad():
            if engine == "bridge":
                forward = S.KVCache(model).forward
                stack.enter_context(S.steer(model, tc, st))
            else:
                forward = plain.forward(use_cache=True)
                for h, fn in st.hooks():
                    stack.enter_context(plain.hooked(h, fn))
            st.prompt_len = toks.shape[1]
            steps = [forward(toks)] + [forward(torch.tensor([[t], [t]])) for t in (30, 31, 32)]
        logits[engine] = steps
        assert st.calls == 4
    for a, b in zip(logits["bridge"], logits["hf"]):
        torch.testing.assert_close(b.clone(), a, atol=1e-4, rtol=0)
    assert not torch.equal(logits["hf"][-1][0], logits["hf"][-1][1])  # the steered row moved
    kw = dict(prompt="The bank", edits=[S.clamp(f, 20.0), S.add(9, 10.0)], seed=2, max_new_tokens=8)
    fast, ref = S.generate(model, tc, **kw), S.generate(model, tc, engine="bridge", **kw)
    full = S.generate(model, tc, use_cache=False, **kw)
    assert fast.path.startswith("plain HF model") and ref.path.startswith("TransformerBridge")
    assert (fast.baseline_tokens, fast.steered_tokens) == (ref.baseline_tokens, ref.steered_tokens) \
        == (full.baseline_tokens, full.steered_tokens)
    assert fast.steered_logprobs != fast.baseline_logprobs  # (the random model's near-uniform logits rarely flip a token)
    torch.testing.assert_close(torch.tensor(fast.steered_logprobs), torch.tensor(ref.steered_logprobs), atol=1e-4,
                               rtol=0)
    assert S.where(tc) == f"{OUT} (the MLP output; latents read from {IN})"


def test_misuse_is_refused_saying_what_to_do(world, model, tc, tmp_path):
    with pytest.raises(HookError, match=f"steered where it writes, the MLP output {OUT}.*cannot steer blocks.1.hook_resid_pre"):
        S.Steering(tc, [S.add(1, 1.0)], hook="blocks.1.hook_resid_pre")
    assert S.Steering(tc, [S.add(1, 1.0)], hook=OUT).hook == OUT  # its own output hook is fine
    with pytest.raises(SaekitError, match=f"need the MLP input of the same forward from {IN}"):
        S.Steering(tc, [S.add(1, 1.0)])(torch.zeros(1, 3, 32))  # the edit hook alone
    with pytest.raises(SaekitError, match=f"width of {OUT}, where it is added, is 32"):
        S.Steering(tc, [S.add_vector(torch.ones(5), 1.0)])
    wrong = load_sae(save_transcoder(world, tmp_path / "wrong", hook_out="blocks.0.hook_mlp_out"))
    with pytest.raises(HookError, match="is not an MLP's input/output pair"), S.steer(model, wrong, [S.add(1, 1.0)]):
        pass
    with pytest.raises(SaekitError, match="a transcoder's difference-of-means baseline is a direction in its output"):
        E.feature_refs(model, tc, torch.randn(50, 32), [1], dom_examples=4)


def test_steer_eval_reads_both_hooks_and_its_baseline_is_in_the_output_space(model, tc, cache):
    x, y = E.reference_activations(model, tc, str(cache), 1000)
    assert x.shape == y.shape == (1000, 32)
    f = int(torch.bincount(E.feature_codes(tc, x)[1].flatten(), minlength=64).argmax())
    (ref,) = E.feature_refs(model, tc, x, [f], dom_examples=8, y=y)
    acts = tc.dense_codes(x)[:, f]
    rand = y[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1024]]
    v = y[acts.topk(8).indices].mean(0) - rand.mean(0)
    torch.testing.assert_close(ref.dom, v / v.norm())
    cfg = E.SteerEvalConfig(features=[f], strengths=[0, 4], n_prompts=1, n_neutral=1, max_new_tokens=3,
                            dom_examples=4, activations=str(cache), reference_tokens=1000)
    res = E.run(model, tc, cfg, progress=False)
    rows = res["rows"]
    assert [(r["method"], r["strength"]) for r in rows] == [("none", 0.0), ("sae", 4.0), ("dom", 4.0)]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and rows[2]["kl"] > 0


def test_cli_analyze_steer_and_steer_eval_on_a_transcoder(world, cache, tmp_path, capsys):
    from saekit.cli import main

    store = tmp_path / "store"
    assert main(["analyze", str(world["tc"]), "--out", str(store), "--activations", str(cache), "--tokens", "600",
                 "--batch-contexts", "4"]) == 0
    assert manifest(store)["dictionary"] == "transcoder"
    capsys.readouterr()
    assert main(["steer", "--sae", str(world["tc"]), "--feature", "3", "--strength", "2", "--prompt", "The bank",
                 "--max-new-tokens", "4", "--store", str(store)]) == 0
    assert "steered: add feature 3 2" in capsys.readouterr().out
    out = tmp_path / "se"
    assert main(["steer-eval", "--sae", str(world["tc"]), "--out", str(out), "--features", "3", "--strengths", "2",
                 "--n-prompts", "1", "--n-neutral", "1", "--max-new-tokens", "2", "--dom-examples", "4",
                 "--activations", str(cache), "--reference-tokens", "500"]) == 0
    res = json.loads((out / "steer_eval.json").read_text())
    assert (res["dictionary"], res["hook"], res["steered_at"]) == ("transcoder", IN, OUT) and len(res["rows"]) == 3


def test_neuronpedia_export_names_the_transcoder(world, tmp_path):
    from saekit.config import NeuronpediaConfig
    from saekit.neuronpedia import export_neuronpedia

    export_neuronpedia(world["store"], tmp_path / "np", NeuronpediaConfig(weights=False))
    man = json.loads((tmp_path / "np" / "manifest.json").read_text())
    assert (man["dictionary"], man["hook"], man["hook_out"], man["layer"]) == ("transcoder", IN, OUT, 1)


# ----------------------------------------------------------------------------- the browser

@pytest.fixture
def app(world, monkeypatch, app_test_guard):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_STORE", str(world["store"]))
    return AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)


def test_browser_pages_on_a_transcoder_store(app, world, model, tc):
    at = ok(app.run())
    caption = at.caption[0].value
    assert caption.startswith("transcoder") and f"`{IN} → {OUT}`" in caption and "reads the MLP input" in caption
    fid = int(np.argsort(-FeatureStore(world["store"]).stats["count"])[0])
    at.number_input(key="overview_open").set_value(fid).run()
    at.button(key="overview_open_btn").click().run()
    ok(at)
    assert at.title[0].value == f"Feature {fid}"
    captions = " ".join(c.value for c in at.caption)
    assert f"A transcoder latent (`{IN} → {OUT}`)" in captions and "adds to the MLP output" in captions
    panel = "".join(m.value for m in at.markdown)
    assert f"added along `W_dec[{fid}]` to the MLP output" in panel  # the steering panel's default edit, spelled out
    # the live test runs the transcoder: the activations shown are its latents on the MLP input
    text = "The central bank raised interest rates."
    at.text_input(key="feature_test_text").set_value(text)
    next(b for b in at.button if b.label == "Test").click().run()
    res = ok(at).session_state["feature_test"]
    x = hooked(model, torch.tensor([res.tokens]))[0][0]
    want = tc.dense_codes(x)[:, fid].numpy() * res.kept
    np.testing.assert_allclose(res.dense(np.array([fid]))[0], want, rtol=1e-5, atol=1e-6)
    # the steering panel generates what steer.generate gives with the transcoder
    at.number_input(key=f"steer_tokens_{fid}").set_value(6)
    at.button(key=f"steer_run_{fid}").click().run()
    g = ok(at).session_state[f"steer_result_{fid}"]["generation"]
    typical = float(FeatureStore(world["store"]).stats["mean"][fid])
    want_g = S.generate(model, tc, "I think that", [S.add(fid, 4.0)], seed=0, max_new_tokens=6, scale=lambda f: typical)
    assert (g.baseline_tokens, g.steered_tokens) == (want_g.baseline_tokens, want_g.steered_tokens)
    assert g.path.startswith("plain HF model")
