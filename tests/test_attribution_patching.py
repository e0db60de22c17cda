"""Attribution patching over residual SAEs: AtP is the first-order effect, IG is complete, validation ablates in
the real model, the prompt set and the SAE set refuse bad input (tiny random Llama with random SAEs)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_world

from saekit.attribution.patching import (
    MetricPrompt,
    NodeEffects,
    ablate_nodes,
    node_effects,
    patch_to_dir,
    ranked_nodes,
    read_prompts,
    residual_sae_set,
    validate_patching,
)
from saekit.config import SaeConfig
from saekit.errors import SaekitError
from saekit.sae import SparseAutoencoder

PROMPTS = [MetricPrompt("The cat sat on the mat and the", " the", " on"),
           MetricPrompt("A dog ran in the park and the", " in")]


def random_saes(world, hooks=("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"), d_sae=48, k=5):
    saes = {}
    for i, hook in enumerate(hooks):
        s = SparseAutoencoder.initialized(SaeConfig(d_in=32, d_sae=d_sae, k=k), seed=10 + i)
        with torch.no_grad():
            s.b_enc.fill_(0.2)
            s.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        s.info = {"hook": hook, "model": "tiny-llama", "model_arg": str(world["model"]), "dataset": str(world["data"]),
                  "text_column": "text", "context_size": 32, "heldout_fraction": 0.1, "seed": 0}
        saes[hook] = s
    return saes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from saekit.lm import load_model

    world = build_world(tmp_path_factory.getbasetemp() / "feature_world")
    return world, load_model(str(world["model"])), random_saes(world)


@pytest.fixture(scope="module")
def effects(tiny) -> NodeEffects:
    _, model, saes = tiny
    return node_effects(model, saes, PROMPTS, ig_steps=10, progress=False)


def test_atp_is_the_first_order_change_of_removing_a_node(tiny, effects):
    """Removing h × a node's write changes the metric by h × its AtP effect to first order (h small)."""
    _, model, saes = tiny
    h = 1e-3
    for hook in saes:
        j = saes and list(saes).index(hook)
        d_sae = saes[hook].cfg.d_sae
        live = (effects.activations[j] > 0).nonzero().flatten()[:3].tolist()
        for f in live + [d_sae]:
            small = _scaled_ablation(model, saes, hook, f, h)
            assert small / h == pytest.approx(float(effects.atp[j][f]), rel=0.05, abs=2e-3), (hook, f)


def _scaled_ablation(model, saes, hook, f, h):
    """Δm (mean over PROMPTS) when h × node f's write is removed at `hook` (float64 difference)."""
    import saekit.attribution.patching as P
    from saekit.steer import prompt_tokens

    sae = saes[hook]
    total = 0.0
    for item in PROMPTS:
        tokens = torch.tensor(prompt_tokens(model.tokenizer, item.prompt))[None]
        tgt, con = P._ids(model.tokenizer, item, model.cfg.d_vocab)

        def remove(a, hook):
            z, err = P._codes(sae, a[0].float())
            w = err if f == sae.cfg.d_sae else z[:, f, None] * sae.W_dec[f].float()
            return a - h * w[None].to(a.dtype)

        with torch.no_grad():
            clean = P._metric(model(tokens), tgt, con).double()
            off = P._metric(model.run_with_hooks(tokens, fwd_hooks=[(hook, remove)]), tgt, con).double()
        total += float(off - clean) / len(PROMPTS)
    return total


def test_ig_is_complete_and_atp_is_its_first_step(effects):
    """Σ of one SAE's IG effects ≈ the measured change with all of its nodes off (the path integral's rule,
    10 midpoint steps), and both estimates rank the same nodes highly."""
    for c in effects.ig_sum_check:
        assert c["ig_sum"] == pytest.approx(c["measured"], rel=0.1, abs=0.05)
    for a, g in zip(effects.atp, effects.ig):
        assert torch.corrcoef(torch.stack([a, g]))[0, 1] > 0.5


def test_validation_ablates_each_node_in_the_real_model(tiny, effects):
    _, model, saes = tiny
    v = validate_patching(model, saes, PROMPTS, effects, top=8)
    assert v["nodes"] == 8 and -1 <= v["ig"]["rho"] <= 1 and v["ig"]["low"] <= v["ig"]["rho"] <= v["ig"]["high"]
    # a node ablated alone measures what a full ablation (h = 1) of it by hand measures
    n = v["per_node"][0]
    assert n["measured"] == pytest.approx(_scaled_ablation(model, saes, n["hook"], n["latent"], 1.0), abs=1e-4)
    # several nodes in one batch are independent rows: the same as one at a time
    both = ablate_nodes(model, saes, PROMPTS, [(n["hook"], n["latent"]) for n in v["per_node"][:2]])
    one = ablate_nodes(model, saes, PROMPTS, [(v["per_node"][1]["hook"], v["per_node"][1]["latent"])])
    assert both[1] == pytest.approx(float(one[0]), abs=1e-5)


def test_ranked_nodes_carry_intervals_and_errors(effects):
    rows = ranked_nodes(effects)
    keys = [abs(r["ig"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    assert sum(r["error"] for r in rows) == 2  # one error node per SAE
    assert all(r["ig_interval"][0] <= r["ig"] <= r["ig_interval"][1] for r in rows)
    assert not any(r["error"] for r in ranked_nodes(effects, errors=False))


def test_patch_to_dir_writes_the_node_list(tiny, tmp_path):
    world, _, saes = tiny
    for hook, s in saes.items():
        s.save(tmp_path / "set" / hook)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p.prompt, "target": p.target, "contrast": p.contrast})
                                 for p in PROMPTS) + "\n")
    patch_to_dir(tmp_path / "set", read_prompts(prompts), tmp_path / "out", ig_steps=4, validate_top=5)
    data = json.loads((tmp_path / "out" / "nodes.json").read_text())
    assert data["kind"] == "attribution-patching" and data["validation"]["nodes"] == 5
    assert data["hooks"] == list(saes) and len(data["nodes"]) > 5
    assert "Validation in the real model" in (tmp_path / "out" / "report.md").read_text()


def test_bad_input_is_refused(tiny, tmp_path):
    world, model, saes = tiny
    bad = tmp_path / "p.tsv"
    bad.write_text("only a prompt\n")
    with pytest.raises(SaekitError, match="p.tsv:1"):
        read_prompts(bad)
    with pytest.raises(SaekitError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("# a comment\nThe cat\t the\t on\n\nA dog\t in\n")
    assert read_prompts(tsv) == [MetricPrompt("The cat", " the", " on"), MetricPrompt("A dog", " in")]
    with pytest.raises(SaekitError, match="not one"):
        node_effects(model, saes, [MetricPrompt("The cat", " dogcatcherization")], progress=False)
    with pytest.raises(SaekitError, match="limit is 4"):
        node_effects(model, saes, PROMPTS, max_tokens=4, progress=False)
    from helpers import random_transcoders

    t = random_transcoders(1, 32)[0]
    t.save(tmp_path / "tc" / "blocks.0.mlp")
    with pytest.raises(SaekitError, match="transcoders"):
        residual_sae_set(tmp_path / "tc")


def test_on_the_default_model(model):
    """The default model, a random SAE at layer 3: IG is complete within its discretisation, and validation
    ablates in the real model."""
    hook = "blocks.3.hook_resid_pre"
    _, cache = model.run_with_cache(model.to_tokens("The cat sat on the mat. Stocks fell in London on Monday."),
                                    names_filter=lambda n: n == hook)
    s = SparseAutoencoder.initialized(SaeConfig(d_in=576, d_sae=256, k=16), seed=0)
    with torch.no_grad():
        s.W_dec.mul_(20)  # writes of the residual stream's scale, so that switching nodes off moves the logits
        # b_dec at the activations' mean, as training puts it: "every node off" is then the mean activation, not
        # the zero vector, at which the norm that reads the stream is singular and a 10-step path integral fails
        s.b_dec.copy_(cache[hook][0, 1:].mean(0))
    saes = {hook: s}
    prompts = [MetricPrompt("The capital of France is", " Paris", " London")]
    e = node_effects(model, saes, prompts, ig_steps=10, progress=False)
    assert e.metric > 0  # the model prefers Paris
    c = e.ig_sum_check[0]
    assert c["ig_sum"] == pytest.approx(c["measured"], rel=0.15, abs=0.1)
    v = validate_patching(model, saes, prompts, e, top=5)
    assert v["nodes"] == 5 and all(n["measured"] == n["measured"] for n in v["per_node"])
