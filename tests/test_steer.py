"""Exactness of steering edits: the hook alone on random activations (fast), then inside the real default
model (integration, tiny sizes): residual changes, KV-cache and full-sequence generation, composition,
and bit-for-bit restoration on leaving the context."""

from __future__ import annotations

import pytest
import torch

from saekit import steer as S
from saekit.config import SaeConfig
from saekit.errors import SaekitError
from saekit.sae import SparseAutoencoder

HOOK = "blocks.15.hook_resid_pre"
D_IN, D_SAE, K = 576, 512, 8


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    s = SparseAutoencoder.initialized(SaeConfig(d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    s.info["hook"] = HOOK
    return s


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 6, D_IN, generator=torch.Generator().manual_seed(1)) * 4


def expected_change(sae, x, edits_by_feature, skip_pos0=True):
    """decode(z′) − decode(z) built independently: dense codes, edit, decode both."""
    B, T, d = x.shape
    flat = x.reshape(-1, d)
    z = sae.dense_codes(flat).view(B, T, -1)
    z2 = z.clone()
    for f, fn in edits_by_feature.items():
        z2[..., f] = fn(z[..., f])
    if skip_pos0:
        z2[:, 0] = z[:, 0]
    dec = lambda zz: sae.decode(zz.reshape(B * T, -1), torch.arange(zz.shape[-1]).expand(B * T, -1))  # noqa: E731
    return (dec(z2) - dec(z)).view(B, T, d)


def active_feature(sae, x) -> int:
    """A latent that fires at some but not all positions (so edits have something to move)."""
    z = sae.dense_codes(x.reshape(-1, D_IN))
    return int((z > 0).sum(0).argmax())


def silent_feature(sae, x) -> int:
    z = sae.dense_codes(x.reshape(-1, D_IN))
    return int(((z > 0).sum(0) == 0).nonzero()[0])


@pytest.mark.parametrize("mode", ["clamp", "scale", "ablate"])
def test_latent_edit_changes_residual_by_decode_difference(sae, x, mode):
    f = active_feature(sae, x)
    edit = {"clamp": S.clamp(f, 7.5), "scale": S.scale(f, 3.0), "ablate": S.ablate(f)}[mode]
    fn = {"clamp": lambda z: torch.full_like(z, 7.5), "scale": lambda z: 3.0 * z, "ablate": torch.zeros_like}[mode]
    y = S.Steering(sae, [edit])(x.clone())
    want = expected_change(sae, x, {f: fn})
    assert want.abs().max() > 0.1
    torch.testing.assert_close(y - x, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[:, 0], x[:, 0])  # BOS position untouched


def test_edit_of_silent_latent_changes_nothing_bit_for_bit(sae, x):
    f = silent_feature(sae, x)
    for edit in (S.scale(f, 10.0), S.ablate(f), S.clamp(f, 0.0)):
        st = S.Steering(sae, [edit])
        y = st(x)
        assert y is x or torch.equal(y, x)


def test_add_moves_along_decoder_row_in_scaled_units(sae, x):
    f = 5
    typical = torch.zeros(D_SAE)
    typical[f] = 2.5
    y = S.Steering(sae, [S.add(f, 4.0)], scale=typical)(x.clone())
    want = torch.zeros_like(x)
    want[:, 1:] = 4.0 * 2.5 * sae.W_dec[f].detach()
    torch.testing.assert_close(y - x, want, atol=1e-5, rtol=0)
    # raw units without a scale; a callable scale works too
    y_raw = S.Steering(sae, [S.add(f, 4.0)])(x.clone())
    torch.testing.assert_close(y_raw - x, want / 2.5, atol=1e-5, rtol=0)
    y_fn = S.Steering(sae, [S.add(f, 4.0)], scale=lambda i: 2.5)(x.clone())
    torch.testing.assert_close(y_fn, y)


def test_edits_compose(sae, x):
    f1 = active_feature(sae, x)
    f2 = (f1 + 1) % D_SAE
    e1, e2, e3 = S.scale(f1, 0.25), S.add(f2, 3.0), S.clamp(f2, 4.0)
    single = [S.Steering(sae, [e])(x.clone()) - x for e in (e1, e2, e3)]
    both = S.Steering(sae, [e1, e2, e3])(x.clone()) - x
    torch.testing.assert_close(both, sum(single), atol=1e-4, rtol=1e-5)


def test_same_feature_edits_apply_in_order(sae, x):
    f = active_feature(sae, x)
    y = S.Steering(sae, [S.clamp(f, 2.0), S.scale(f, 3.0)])(x.clone())
    torch.testing.assert_close(y - x, expected_change(sae, x, {f: lambda z: torch.full_like(z, 6.0)}),
                               atol=1e-4, rtol=1e-5)


def test_positions_and_kv_cache_offsets(sae, x):
    f, w = 3, sae.W_dec[3].detach()
    gen = S.Steering(sae, [S.add(f, 1.0, positions="generated")], prompt_len=4)
    prm = S.Steering(sae, [S.add(f, 1.0, positions="prompt")], prompt_len=4)
    d_gen, d_prm = gen(x.clone()) - x, prm(x.clone()) - x  # a full 6-token forward: positions 0..5
    assert torch.equal(d_gen[:, :4], torch.zeros_like(d_gen[:, :4]))
    torch.testing.assert_close(d_gen[:, 4:], w.expand(3, 2, -1))
    assert torch.equal(d_prm[:, 4:], torch.zeros_like(d_prm[:, 4:])) and torch.equal(d_prm[:, 0], 0 * d_prm[:, 0])
    torch.testing.assert_close(d_prm[:, 1:4], w.expand(3, 3, -1))
    # KV-cache pattern, no offsets given: a 4-token prefill is the prompt; then 1-token steps are generated
    auto = S.Steering(sae, [S.add(f, 1.0, positions="generated")])
    assert torch.equal(auto(x[:, :4].clone()), x[:, :4])
    for t in (4, 5):
        torch.testing.assert_close(auto(x[:, t: t + 1].clone()) - x[:, t: t + 1], w.expand(3, 1, -1))


def test_per_row_values_and_nan_rows(sae, x):
    f = active_feature(sae, x)
    st = S.Steering(sae, [S.clamp(f, torch.tensor([float("nan"), 1.0, 5.0]))])
    y = st(x.clone())
    assert torch.equal(y[0], x[0])
    for r, v in ((1, 1.0), (2, 5.0)):
        torch.testing.assert_close(y[r] - x[r], expected_change(sae, x[r: r + 1], {f: lambda z, v=v: torch.full_like(z, v)})[0],
                                   atol=1e-4, rtol=1e-5)
    rows = S.Steering(sae, [S.add(1, 2.0)], rows=torch.tensor([True, False, True]))(x.clone())
    assert torch.equal(rows[1], x[1]) and not torch.equal(rows[0], x[0])


def test_feature_scale_sources_and_errors(sae):
    class Store:
        stats = {"mean": torch.tensor([0.0, 3.0]).numpy(), "act_max": torch.tensor([0.0, 9.0]).numpy()}

    assert S.feature_scale(Store())(1) == 3.0
    with pytest.raises(SaekitError, match="never fired"):
        S.feature_scale(Store())(0)
    with pytest.raises(SaekitError, match="out of range"):
        S.Steering(sae, [S.add(D_SAE, 1.0)])
    with pytest.raises(SaekitError, match="unknown steering mode"):
        S.make_edit("boost", 1, 1.0)
    with pytest.raises(SaekitError, match="batch has 3 rows"):
        S.Steering(sae, [S.add(1, torch.ones(2))])(torch.zeros(3, 2, D_IN))


# ----------------------------------------------------------------------------- the real model, tiny sizes

@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU is oversubscribed: one thread is ~5× faster here
    from saekit.lm import load_model

    yield load_model("default")
    torch.set_num_threads(threads)


def tokens(model, text="The market rose sharply after the"):
    return torch.tensor([S.prompt_tokens(model.tokenizer, text)])


def capture(model, toks, steering=None):
    """The hook's activation as the rest of the model sees it (after the steering hook), and the logits."""
    seen = {}

    def grab(act, hook):
        seen["x"] = act.detach().clone()

    if steering is None:
        with model.hooks(fwd_hooks=[(HOOK, grab)]):
            logits = model(toks)
    else:
        with S.steer(model, steering.sae, steering), model.hooks(fwd_hooks=[(HOOK, grab)]):
            logits = model(toks)
    return seen["x"], logits


@pytest.mark.integration
def test_in_model_residual_change_and_restore(model, sae):
    toks = tokens(model)
    x0, logits0 = capture(model, toks)
    f = active_feature(sae, x0)
    x1, logits1 = capture(model, toks, S.Steering(sae, [S.scale(f, 4.0), S.add(7, 20.0)]))
    want = expected_change(sae, x0, {f: lambda z: 4.0 * z})
    want[:, 1:] += 20.0 * sae.W_dec[7].detach()
    torch.testing.assert_close(x1 - x0, want, atol=1e-3, rtol=1e-5)
    assert not torch.equal(logits1, logits0)
    n_hooks = sum(len(hp._forward_hooks) for hp in model.hook_dict.values())
    with S.steer(model, sae, [S.add(7, 50.0)]):
        assert not torch.equal(model(toks), logits0)
    assert torch.equal(model(toks), logits0)  # restored bit for bit
    assert sum(len(hp._forward_hooks) for hp in model.hook_dict.values()) == n_hooks
    with pytest.raises(RuntimeError), S.steer(model, sae, [S.add(7, 50.0)]):
        raise RuntimeError("boom")
    assert torch.equal(model(toks), logits0)  # also after an exception inside the context


@pytest.mark.integration
@pytest.mark.parametrize("use_cache", [True, False])
def test_add_reaches_generated_tokens(model, sae, use_cache):
    prompt = S.prompt_tokens(model.tokenizer, "The market rose")
    track = torch.arange(1000, 1100)
    st = S.Steering(sae, [S.add(7, 40.0, positions="generated")], rows=torch.tensor([False, True]))
    out = S.sample(model, prompt, 2, 3, seed=0, temperature=0.0, steering=st, use_cache=use_cache, track=track,
                   stop_early=False)
    # the first token is predicted from prompt positions only: identical; later ones see steered positions
    torch.testing.assert_close(out.tracked[0, 0], out.tracked[1, 0], atol=1e-6, rtol=1e-5)
    assert out.tokens[0, 0] == out.tokens[1, 0]
    assert (out.tracked[0, 1:] - out.tracked[1, 1:]).abs().max() > 1e-4
    assert st.calls == 3  # prefill + 2 one-token steps, or 3 full forwards


@pytest.mark.integration
def test_generate_kv_and_full_agree_and_log_probs(model, sae):
    kw = dict(prompt="Stocks fell", edits=[S.add(7, 30.0)], seed=3, max_new_tokens=3, temperature=1.0)
    a = S.generate(model, sae, use_cache=True, **kw)
    b = S.generate(model, sae, use_cache=False, **kw)
    assert a.steered_tokens == b.steered_tokens and a.baseline_tokens == b.baseline_tokens
    torch.testing.assert_close(torch.tensor(a.steered_logprobs), torch.tensor(b.steered_logprobs), atol=1e-3, rtol=0)
    assert len(a.steered_logprobs) == len(a.steered_tokens) and all(lp <= 0 for lp in a.steered_logprobs)
    # same seed, no edit: the steered row is the baseline
    c = S.generate(model, sae, "Stocks fell", [S.scale(7, 1.0)], seed=3, max_new_tokens=3)
    assert c.steered_tokens == c.baseline_tokens == a.baseline_tokens
    assert "baseline" in a.side_by_side() and "add feature 7 30" in a.side_by_side()


# Tokens the generation loop before issue 13.5 (every step through the bridge) sampled on one thread, with this
# module's random SAE: (generate kwargs, baseline tokens, steered tokens). Regenerate with the old loop
# (benchmarks/steer_speed.py keeps it as old_generate) if the default model or the SAE init changes.
BEFORE = [
    (dict(prompt="Stocks fell", edits=[S.add(7, 30.0)], seed=3, temperature=1.0, use_cache=True),
     [288, 40205, 1187, 216, 33, 28, 36, 32, 32, 2876, 335, 11655],
     [288, 260, 476, 1374, 396, 6351, 429, 551, 1180, 2164, 366, 288]),
    (dict(prompt="The market rose sharply after the", edits=[S.clamp(5, 8.0), S.scale(9, 3.0)], seed=11,
          temperature=1.0, use_cache=False),
     [216, 34, 32, 33, 35, 29, 33, 36, 12430, 2318, 6405, 338],
     [216, 34, 32, 34, 33, 29, 34, 32, 34, 34, 16554, 5288]),
    (dict(prompt="Once upon a time", edits=[S.add(3, 60.0, "generated")], seed=1, temperature=0.7, use_cache=True,
          hook="blocks.10.hook_resid_post"),
     [198, 788, 253, 905, 282, 11746, 1420, 28, 198, 504, 9615, 282],
     [198, 34385, 11414, 28, 957, 14119, 198, 198, 57, 761, 719, 578]),
]


@pytest.mark.integration
@pytest.mark.parametrize("case", range(len(BEFORE)))
def test_generation_is_what_it_was_and_the_same_on_both_engines(model, sae, case):
    """The plain HF loop (what generate runs by default) and the bridge loop give the same tokens and log-probs
    (to 1e-4; for the default model they are identical bit for bit), and the tokens the loop gave before the
    plain path existed."""
    kw, base, steered = BEFORE[case]
    assert S.plain_hf(model, kw.get("hook", HOOK)) is not None  # generate takes the plain path here
    fast = S.generate(model, sae, max_new_tokens=12, **kw)
    ref = S.generate(model, sae, max_new_tokens=12, engine="bridge", **kw)
    assert (fast.baseline_tokens, fast.steered_tokens) == (base, steered)
    assert (ref.baseline_tokens, ref.steered_tokens) == (base, steered)
    assert (fast.baseline, fast.steered, fast.steered_pieces) == (ref.baseline, ref.steered, ref.steered_pieces)
    for got, want in ((fast.baseline_logprobs, ref.baseline_logprobs), (fast.steered_logprobs, ref.steered_logprobs)):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("hook", [HOOK, "blocks.10.hook_resid_post"])
def test_plain_hf_logits_match_the_bridge_step_by_step(model, sae, hook):
    """Prefill and KV-cache steps, steered at the SAE's hook (latent and add edits, one row steered): the plain HF
    model's logits agree with the bridge's to 1e-4 (they are in fact identical) and its weights are the bridge's."""
    plain = S.plain_hf(model, hook, "hf")
    assert plain.model.lm_head.weight.data_ptr() == model.original_model.lm_head.weight.data_ptr()
    toks = tokens(model).expand(2, -1)
    f = active_feature(sae, capture(model, toks[:1])[0])
    logits = {}
    for engine in ("bridge", "hf"):
        st = S.Steering(sae, [S.scale(f, 4.0), S.add(7, 20.0, "generated")], hook, rows=torch.tensor([False, True]))
        if engine == "bridge":
            forward, ctx = S.KVCache(model).forward, S.steer(model, sae, st)
        else:
            forward, ctx = plain.forward(use_cache=True), plain.hooked(hook, st)
        with ctx, torch.no_grad():
            st.prompt_len = toks.shape[1]
            steps = [forward(toks)]
            for t in (300, 301, 302):
                steps.append(forward(torch.tensor([[t], [t]])))
        logits[engine] = steps
    for a, b in zip(logits["bridge"], logits["hf"]):
        torch.testing.assert_close(b.clone(), a, atol=1e-4, rtol=0)
    assert not torch.equal(logits["hf"][-1][0], logits["hf"][-1][1])  # the steered row did move


@pytest.mark.integration
def test_bridge_fallbacks_and_threads(model, sae):
    """Hooks the plain model cannot place, or hooks already on the bridge, keep generation on the bridge (the
    user's hook still fires); engine="hf" says why instead. The thread count is put back after generating."""
    kw = dict(prompt="Stocks fell", max_new_tokens=3, seed=0)
    attn = S.Steering(sae, [S.add(7, 30.0)], "blocks.3.hook_attn_out")  # (MLP input/output are placed: transcoders)
    assert S.plain_hf(model, attn.hook) is None
    with pytest.raises(SaekitError, match="does not compute what the bridge computes at blocks.3.hook_attn_out"):
        S.plain_hf(model, attn.hook, "hf")
    assert S.generate(model, sae, edits=[S.add(7, 30.0)], hook=attn.hook, **kw).steered_tokens  # ran on the bridge
    fired = []
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", lambda act, hook: fired.append(act.shape) or act)]):
        assert S.plain_hf(model, HOOK) is None
        with pytest.raises(SaekitError, match="hooks attached"):
            S.plain_hf(model, HOOK, "hf")
        S.generate(model, sae, edits=[S.add(7, 30.0)], **kw)
    assert len(fired) == 3  # prefill + 2 KV steps through the bridge
    assert S.plain_hf(model, HOOK) is not None  # hooks gone: the fast path again
    handle = model.blocks[2].register_forward_hook(lambda module, args, output: fired.append(0))  # a torch hook
    try:
        assert S.plain_hf(model, HOOK) is None
    finally:
        handle.remove()
    assert S.plain_hf(model, HOOK) is not None
    threads = torch.get_num_threads()
    with S.cpu_threads(threads + 1, "cpu"):
        assert torch.get_num_threads() == threads + 1
        S.generate(model, sae, edits=[S.add(7, 30.0)], **kw)  # threads=1 inside
        assert torch.get_num_threads() == threads + 1
    assert torch.get_num_threads() == threads


def test_stop_ids_without_the_vocabulary_dict():
    class Tok:  # a vocabulary with <|im_end|> but no <|endoftext|>; unknown tokens map to <unk>
        eos_token_id = 2
        vocab = {"<unk>": 0, "<|im_end|>": 2, "hi": 5}

        def convert_tokens_to_ids(self, t):
            return self.vocab.get(t, 0)

        def convert_ids_to_tokens(self, i):
            return {v: k for k, v in self.vocab.items()}[i]

        def get_vocab(self):
            return dict(self.vocab)

    assert S.stop_ids(Tok()) == {2}
    Tok.vocab = {**Tok.vocab, "<|endoftext|>": 7}
    assert S.stop_ids(Tok()) == {2, 7}


def test_find_store_only_for_the_same_weights(sae, tmp_path):
    import json

    sae_dir = tmp_path / "k8-d512"
    sae.save(sae_dir)
    assert S.find_store(sae_dir, sae) is None
    (tmp_path / "store").mkdir()
    man = {"kind": "saekit-feature-store", "sae_dir": str(sae_dir), "sae_weights_sha256": sae.weights_hash()}
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(man))
    assert S.find_store(sae_dir, sae) == (tmp_path / "store").resolve()
    man["sae_weights_sha256"] = "0" * 16  # rebuilt SAE, stale store: not used
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(man))
    assert S.find_store(sae_dir, sae) is None
    assert S.add(3, 2.0).describe(9.87) == "add feature 3 2 × 9.87"
    assert S.clamp(3, 2.0, "generated").describe(9.87) == "clamp feature 3 2 (generated tokens)"


# ----------------------------------------------------------------------------- streaming, several edits (issue 14)

STREAM_CASES = [
    dict(prompt="Stocks fell", edits=[S.add(7, 30.0)], seed=3, temperature=1.0),
    dict(prompt="The market rose sharply after the", edits=[S.clamp(5, 8.0), S.scale(9, 3.0), S.add(11, -20.0)],
         seed=11, temperature=0.7),
    dict(prompt="Once upon a time", edits=[S.add(3, 60.0, "generated")], seed=1, temperature=0.0),
]


@pytest.mark.integration
@pytest.mark.parametrize("case", range(len(STREAM_CASES)))
def test_stream_yields_exactly_the_tokens_of_generate(model, sae, case):
    """Baseline then steered token per step, each row until it ends; the same tokens, log-probs, text and pieces as
    the non-streamed generate for the same seed; the pieces join to the text."""
    kw = STREAM_CASES[case]
    want = S.generate(model, sae, max_new_tokens=12, **kw)
    steps = S.stream(model, sae, max_new_tokens=12, **kw)
    got = list(steps)
    g = steps.generation
    rows = [[t for t in got if t.row == r] for r in (0, 1)]
    assert [t.id for t in rows[0]] == want.baseline_tokens and [t.id for t in rows[1]] == want.steered_tokens
    assert want.steered_tokens != want.baseline_tokens  # the edits moved something
    for r, lps in ((0, want.baseline_logprobs), (1, want.steered_logprobs)):
        torch.testing.assert_close(torch.tensor([t.logprob for t in rows[r]]), torch.tensor(lps), atol=1e-6, rtol=0)
        assert [t.step for t in rows[r]] == list(range(len(rows[r])))
        assert [t.last for t in rows[r]] == [False] * (len(rows[r]) - 1) + [True]
    assert [(t.step, t.row) for t in got] == sorted((t.step, t.row) for t in got)  # per step: baseline, steered
    assert (g.baseline, g.steered, g.baseline_pieces, g.steered_pieces, g.edits) == \
        (want.baseline, want.steered, want.baseline_pieces, want.steered_pieces, want.edits)
    assert "".join(t.piece for t in rows[1]) == g.steered == "".join(g.steered_pieces)
    assert g.path == "plain HF model, KV cache, 1 CPU thread" and g.seconds > 0 and g.tokens_per_second > 0


@pytest.mark.integration
def test_stream_closed_early_removes_the_hook_and_restores_threads(model, sae):
    plain = S.plain_hf(model, HOOK, "hf")
    layer = plain.location(HOOK)[0]
    threads = torch.get_num_threads()
    with S.cpu_threads(threads + 1, "cpu"):
        with S.stream(model, sae, "Stocks fell", [S.add(7, 30.0)], max_new_tokens=20) as steps:
            first = [next(steps) for _ in range(3)]
            assert len(layer._forward_pre_hooks) == 1 and torch.get_num_threads() == 1  # held while it streams
        assert [t.row for t in first] == [0, 1, 0] and steps.generation is None
        assert len(layer._forward_pre_hooks) == 0 and torch.get_num_threads() == threads + 1


@pytest.mark.integration
def test_several_edits_at_once_are_their_summed_direction(model, sae):
    """Two features added at once, each in units of its own typical activation, steer exactly as one vector
    along the sum of their scaled decoder rows; each edit is described with its own unit."""
    typical = torch.zeros(D_SAE)
    typical[7], typical[40] = 2.5, 0.8
    kw = dict(prompt="Stocks fell", seed=5, max_new_tokens=10)
    both = S.generate(model, sae, edits=[S.add(7, 6.0), S.add(40, -12.0)], scale=typical, **kw)
    direction = 6.0 * 2.5 * sae.W_dec[7].detach() - 12.0 * 0.8 * sae.W_dec[40].detach()
    one = S.generate(model, sae, edits=[S.add_vector(direction, 1.0)], **kw)
    single = S.generate(model, sae, edits=[S.add(7, 6.0)], scale=typical, **kw)
    assert both.steered_tokens == one.steered_tokens != single.steered_tokens
    assert both.baseline_tokens == one.baseline_tokens == single.baseline_tokens
    torch.testing.assert_close(torch.tensor(both.steered_logprobs), torch.tensor(one.steered_logprobs), atol=1e-4,
                               rtol=0)
    assert both.edits == ["add feature 7 6 × 2.5", "add feature 40 -12 × 0.8"]


@pytest.mark.integration
def test_after_a_live_forward_generation_takes_the_fast_path(model, sae):
    """The browser's LiveModel runs text through a Harvester (run_with_hooks) on the same bridge the steering panel
    then generates with: no hook is left behind, so the panel gets the plain HF path."""
    from saekit.harvest import Harvester

    Harvester(model, [HOOK], device="cpu").forward(tokens(model))
    assert S.foreign_hooks(model) == []
    plain, why = S.fast_path(model, HOOK)
    assert plain is not None and why == ""
    assert S.fast_path(model, HOOK, "bridge") == (None, "engine 'bridge' asked for")
    g = S.generate(model, sae, "Stocks fell", [S.add(7, 30.0)], max_new_tokens=2, engine="bridge")
    assert g.path == "TransformerBridge (engine 'bridge' asked for), KV cache, 1 CPU thread"


def test_pieces_hold_a_split_character_until_it_is_complete(tiny_store):
    """Byte-level tokens that split a character: the partial ones add nothing, the completing one adds the whole
    character, and the pieces join to the decoded text (also when the last token leaves a character unfinished)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_store["model"])
    ids = tok("café ☕ ok", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("café ☕ ok") - 4  # the tiny vocabulary splits the multi-byte characters
    pieces = S._Pieces(tok)
    got = [pieces.add(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(got) == "café ☕ ok" and "\ufffd" not in "".join(got)
    assert "☕" in got and "" in got  # the cup whole on one token, nothing on the tokens before it
    cut = S._Pieces(tok)
    partial = [cut.add(t, last=t == ids[got.index("☕") - 1]) for t in ids[: got.index("☕")]]
    assert "".join(partial) == tok.decode(ids[: got.index("☕")]) and partial[-1].endswith("\ufffd")
