"""The SAE module: shapes, TopK/BatchTopK semantics against dense references, scale folding, the
directory format (round trip, manifest, SAELens fields) and every way a directory can be broken."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HOOK, small_sae
from safetensors.torch import save_file

from saekit.config import SaeConfig
from saekit.errors import FileFormatError, OptionError, ShapeError
from saekit.sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder, geometric_median, load_sae


def dense_reference(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Textbook TopK codes [N, d_sae]: keep the k largest pre-activations, ReLU them, zero the rest."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())


def test_encode_decode_shapes():
    sae = small_sae(d_in=16, d_sae=48, k=4)
    x = torch.randn(10, 16)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (10, 4)
    assert indices.dtype == torch.long and (values >= 0).all()
    assert sae.decode(values, indices).shape == (10, 16)
    assert sae(x).shape == (10, 16)
    assert sae.dense_codes(x).shape == (10, 48)
    with pytest.raises(OptionError, match="k = 9: more active latents than the SAE has"):
        SaeConfig(d_in=16, d_sae=8, k=9)  # checked where the config is built


def test_topk_matches_dense_reference():
    torch.manual_seed(0)
    sae = small_sae(d_in=16, d_sae=48, k=5)
    x = torch.randn(64, 16) * 3
    ref = dense_reference(sae, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.dense_codes(x), ref)
        torch.testing.assert_close(sae(x), ref @ sae.W_dec + sae.b_dec)
    # exactly k candidates per token, ReLU'd: L0 ≤ k, and = k where the k-th pre-activation is positive
    assert ((sae.dense_codes(x) > 0).sum(1) <= 5).all()
    # the differentiable path selects the same latents and values
    values, indices, _, _ = sae.encode_train(x)
    dense_train = torch.zeros(64, 48).scatter_(1, indices, values.detach())
    torch.testing.assert_close(dense_train, ref)


def test_batchtopk_training_keeps_k_per_token_on_average_and_updates_threshold():
    torch.manual_seed(0)
    sae = small_sae(d_in=16, d_sae=64, k=4, architecture="batchtopk")
    with torch.no_grad():
        sae.b_enc.add_(2.0)  # all candidates positive, so exactly k·N survive the batch cutoff
    assert sae.k_candidates == 16
    sae.train()
    x = torch.randn(32, 16)
    before = sae.threshold.clone()
    values, indices, _, _ = sae.encode_train(x)
    kept = values.detach() > 0
    assert int(kept.sum()) == 4 * 32  # top k·batch over the whole batch
    per_token = kept.sum(1)
    assert per_token.min() < per_token.max()  # L0 varies per token
    min_kept = values.detach()[kept].min()
    # the first batch sets the threshold; later ones move it 1% of the way toward their smallest kept value
    assert before == 0 and torch.equal(sae.threshold, min_kept)
    before = sae.threshold.clone()
    values, _, _, _ = sae.encode_train(x * 2)
    min_kept = values.detach()[values.detach() > 0].min()
    torch.testing.assert_close(sae.threshold, before + 0.01 * (min_kept - before))
    # in eval mode the threshold is left alone
    sae.eval()
    t = sae.threshold.clone()
    sae.encode_train(x)
    assert torch.equal(sae.threshold, t)


def test_batchtopk_inference_applies_threshold():
    torch.manual_seed(1)
    sae = small_sae(d_in=16, d_sae=64, k=4, architecture="batchtopk")
    x = torch.randn(50, 16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = pre.topk(16, dim=1).values.relu().median()  # a threshold that cuts some candidates
    with torch.no_grad():
        sae.threshold.fill_(theta)
    codes = sae.dense_codes(x)
    top16 = pre.topk(16, dim=1)
    expect = torch.zeros_like(pre).scatter_(1, top16.indices, top16.values * (top16.values > theta))
    torch.testing.assert_close(codes, expect)
    assert (codes[codes > 0] > theta).all()
    l0 = (codes > 0).sum(1)
    assert l0.min() < l0.max()


def test_batchtopk_saves_as_jumprelu_with_threshold(tmp_path):
    sae = small_sae(architecture="batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.37)
    path = sae.save(tmp_path / "b")
    cfg = json.loads((path / CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu"
    back = load_sae(path)
    assert back.cfg.architecture == "batchtopk" and back.threshold.item() == pytest.approx(0.37)
    x = torch.randn(20, 16)
    torch.testing.assert_close(back(x), sae(x))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_folded_on_raw_x_equals_original_on_scaled_x(architecture):
    """An SAE trained on x·s, folded with s, on raw x gives the original's latents and output divided by s."""
    torch.manual_seed(2)
    sae = small_sae(d_in=16, d_sae=48, k=4, architecture=architecture)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    s = 7.5
    x = torch.randn(40, 16) * 0.3
    folded = sae.folded(s)
    v_raw, i_raw = folded.encode(x)
    v_scaled, i_scaled = sae.encode(x * s)
    assert torch.equal(i_raw, i_scaled)  # the same latents are selected
    torch.testing.assert_close(v_raw, v_scaled / s)
    torch.testing.assert_close(folded(x), sae(x * s) / s)
    assert folded.info["input_scale_folded"] == s
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(48))


def test_save_load_round_trip_is_exact(sae_dir):
    sae = small_sae()
    back = load_sae(sae_dir)
    for name, t in sae.weights().items():
        assert torch.equal(back.weights()[name], t), name
    assert back.weights_hash() == sae.weights_hash()
    assert back.cfg == sae.cfg
    assert back.hook == HOOK and back.info["model"] == "test/model" and back.info["context_size"] == 128
    x = torch.randn(30, 16)
    assert torch.equal(back(x), sae(x))
    # saving a loaded SAE writes the same weights again
    again = back.save(sae_dir.parent / "again")
    assert json.loads((again / CFG_FILE).read_text())["saekit"]["weights_sha256"] == sae.weights_hash()


def test_manifest_fields(tmp_path):
    sae = small_sae()
    path = sae.save(tmp_path / "m", manifest={"training": {"steps": 3}})
    cfg = json.loads((path / CFG_FILE).read_text())
    # the fields SAELens needs to load it as the right kind of SAE (missing ones load silently wrong)
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (16, 48, 4)
    assert cfg["dtype"] == "float32"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == HOOK
    assert cfg["metadata"]["model_name"] == "test/model"
    own = cfg["saekit"]
    assert own["sae"] == {"d_in": 16, "d_sae": 48, "k": 4, "architecture": "topk", "prefixes": [], "transcoder": False,
                          "skip": False, "d_out": None}
    assert own["weights_sha256"] == sae.weights_hash()
    assert own["hook"] == HOOK and own["training"] == {"steps": 3}
    assert set(own) >= {"format_version", "saved_at", "model", "dataset", "seed"}
    # weights file holds exactly the SAELens tensors
    from safetensors.torch import load_file

    w = load_file(str(path / WEIGHTS_FILE))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (16, 48), "b_enc": (48,), "W_dec": (48, 16),
                                                         "b_dec": (16,)}


def test_loads_a_saelens_style_cfg_without_saekit_block(sae_dir):
    cfg = json.loads((sae_dir / CFG_FILE).read_text())
    del cfg["saekit"]
    (sae_dir / CFG_FILE).write_text(json.dumps(cfg))
    back = load_sae(sae_dir)
    assert (back.cfg.d_in, back.cfg.d_sae, back.cfg.k) == (16, 48, 4)


# ----------------------------------------------------------------------------- broken directories

def test_missing_directory(tmp_path):
    with pytest.raises(FileFormatError, match="not an SAE directory"):
        load_sae(tmp_path / "nowhere")


def test_corrupt_cfg_json(sae_dir):
    (sae_dir / CFG_FILE).write_text('{"d_in": 16, "d_sae": ')
    with pytest.raises(FileFormatError, match=r"cfg\.json is not valid JSON"):
        load_sae(sae_dir)
    (sae_dir / CFG_FILE).write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="JSON object"):
        load_sae(sae_dir)
    (sae_dir / CFG_FILE).write_text('{"architecture": "topk", "d_sae": 48}')
    with pytest.raises(FileFormatError, match="needs d_in, d_sae and k"):
        load_sae(sae_dir)
    (sae_dir / CFG_FILE).write_text('{"architecture": "standard", "d_in": 16, "d_sae": 48, "k": 4}')
    with pytest.raises(FileFormatError, match="'standard' dictionary"):
        load_sae(sae_dir)
    (sae_dir / CFG_FILE).unlink()
    with pytest.raises(FileFormatError, match="does not exist"):
        load_sae(sae_dir)


def test_truncated_safetensors(sae_dir):
    data = (sae_dir / WEIGHTS_FILE).read_bytes()
    (sae_dir / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load_sae(sae_dir)
    (sae_dir / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load_sae(sae_dir)


def test_foreign_safetensors(sae_dir):
    save_file({"encoder.weight": torch.zeros(48, 16), "W_dec": torch.zeros(48, 16)}, str(sae_dir / WEIGHTS_FILE))
    with pytest.raises(FileFormatError, match=r"lacks tensors \['W_enc', 'b_enc', 'b_dec'\].*Is it a saekit file"):
        load_sae(sae_dir)


def test_shape_mismatch_names_both_shapes(sae_dir):
    cfg = json.loads((sae_dir / CFG_FILE).read_text())
    cfg["saekit"]["sae"]["d_in"] = 32
    (sae_dir / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ShapeError, match=r"W_enc has shape \(16, 48\) but cfg.json says \(32, 48\)"):
        load_sae(sae_dir)


def test_non_finite_weights(sae_dir):
    w = {k: v.clone() for k, v in small_sae().weights().items()}
    w["b_dec"][3] = float("nan")
    save_file(w, str(sae_dir / WEIGHTS_FILE))
    with pytest.raises(FileFormatError, match="b_dec holds NaN or inf"):
        load_sae(sae_dir)


# ----------------------------------------------------------------------------- init

def test_geometric_median_known_cases():
    # 1-D: the geometric median is the median, unmoved by an outlier (the mean would be 12.6)
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]])
    assert geometric_median(pts, iters=500).item() == pytest.approx(2.0, abs=1e-3)
    # symmetric set: the centre
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    torch.testing.assert_close(geometric_median(square), torch.tensor([3.0, -2.0]))
    # a right triangle: the Fermat point sees every side under 120°, and no nearby point does better
    tri = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    m = geometric_median(tri, iters=500)
    u = (tri - m) / (tri - m).norm(dim=1, keepdim=True)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert (u[i] @ u[j]).item() == pytest.approx(-0.5, abs=1e-3)

    def cost(y):
        return (tri - y).norm(dim=1).sum()

    for step in torch.randn(20, 2) * 0.01:
        assert cost(m) <= cost(m + step) + 1e-6


def test_init_is_tied_and_unit_norm():
    sample = torch.randn(500, 16) + 5
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=16, d_sae=48, k=4), sample, seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert torch.equal(sae.b_enc, torch.zeros(48))
    torch.testing.assert_close(sae.b_dec, geometric_median(sample))
    small = SparseAutoencoder.initialized(SaeConfig(d_in=16, d_sae=48, k=4), sample, seed=3, enc_scale=0.5)
    assert torch.equal(small.W_dec, sae.W_dec) and torch.equal(small.W_enc, 0.5 * sae.W_dec.t())
    with pytest.raises(ShapeError, match="width 8 but the SAE's d_in is 16"):
        SparseAutoencoder.initialized(SaeConfig(d_in=16, d_sae=48, k=4), torch.randn(10, 8))
