"""The activation cache: round trip, slices and heads, corrupt files, and the massive-token threshold that
is computed once at harvest and reused by every reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saekit.cache import MANIFEST, ActivationCache
from saekit.errors import FileFormatError, NonFiniteError, ShapeError
from saekit.harvest import Harvest, massive_mask


def synthetic_harvest(n: int = 250) -> Harvest:
    g = torch.Generator().manual_seed(0)
    return Harvest(acts={"blocks.1.hook_resid_pre": torch.randn(n, 8, generator=g),
                         "blocks.2.hook_resid_pre": torch.randn(n, 8, generator=g)},
                   token_ids=torch.randint(3, 500, (n,), generator=g), positions=torch.randint(1, 128, (n,), generator=g),
                   context_ids=torch.arange(n) // 100, meta={"tokens": n, "tokens_per_s": 1.0})


def test_cache_round_trip(tmp_path):
    h = synthetic_harvest()
    ActivationCache.write(tmp_path, h, {"model": "m", "dataset": "d"}, shard_tokens=64)
    assert len(list(tmp_path.glob("shard_*.safetensors"))) == 4
    man = json.loads((tmp_path / MANIFEST).read_text())
    assert man["kind"] == "saekit-activations" and man["tokens"] == 250 and man["model"] == "m"
    assert man["d_in"] == {"blocks.1.hook_resid_pre": 8, "blocks.2.hook_resid_pre": 8}
    back = ActivationCache(tmp_path).read()
    for hook, a in h.acts.items():
        assert torch.equal(back.acts[hook], a)
    for name in ("token_ids", "positions", "context_ids"):
        assert torch.equal(getattr(back, name), getattr(h, name))
    one = ActivationCache(tmp_path).read(hooks=["blocks.2.hook_resid_pre"])
    assert list(one.acts) == ["blocks.2.hook_resid_pre"]
    with pytest.raises(ShapeError, match="not \\['blocks.9.hook_resid_pre'\\]"):
        ActivationCache(tmp_path).read(hooks=["blocks.9.hook_resid_pre"])


def test_slices_and_heads_read_only_what_they_need(tmp_path):
    h = synthetic_harvest()
    cache = ActivationCache.write(tmp_path, h, {}, shard_tokens=64)
    x = h.acts["blocks.1.hook_resid_pre"]
    for lo, hi in [(0, 250), (10, 70), (64, 128), (200, 250), (5, 5)]:
        assert torch.equal(cache.slice(lo, hi)["blocks.1.hook_resid_pre"], x[lo:hi])
    assert torch.equal(cache.head("blocks.1.hook_resid_pre", 100), x[:100])
    (tmp_path / "shard_00003.safetensors").unlink()  # the head never opens the last shard
    assert torch.equal(cache.head("blocks.1.hook_resid_pre", 100), x[:100])


def test_massive_threshold_is_recorded_at_harvest(tmp_path):
    h = synthetic_harvest()
    h.acts["blocks.1.hook_resid_pre"][[3, 77]] *= 100
    cache = ActivationCache.write(tmp_path, h, {})
    norms = h.acts["blocks.1.hook_resid_pre"].norm(dim=1)
    rec = cache.manifest["massive"]["blocks.1.hook_resid_pre"]
    assert rec["multiple"] == 10.0 and rec["median_norm"] == pytest.approx(float(norms.median()))
    assert cache.massive_threshold("blocks.1.hook_resid_pre") == pytest.approx(10 * float(norms.median()))
    assert torch.equal(norms > cache.massive_threshold("blocks.1.hook_resid_pre"), massive_mask(norms, 10.0))
    # a threshold over the whole stream (as several processes compute it) is written as given
    given = {hk: {"multiple": 5.0, "median_norm": 1.0, "threshold": 5.0} for hk in h.acts}
    assert ActivationCache.write(tmp_path / "b", h, {}, massive=given).massive_threshold("blocks.2.hook_resid_pre") == 5.0


def test_corrupt_cache(tmp_path):
    ActivationCache.write(tmp_path, synthetic_harvest(), {}, shard_tokens=100)
    shard = tmp_path / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(FileFormatError, match="shard_00001.safetensors is not a readable safetensors file"):
        ActivationCache(tmp_path).read()
    shard.write_bytes(data)
    # a foreign shard without the token bookkeeping
    save_file({"acts.blocks.1.hook_resid_pre": torch.zeros(100, 8), "acts.blocks.2.hook_resid_pre": torch.zeros(100, 8),
               "token_ids": torch.zeros(100, dtype=torch.long)}, str(shard))
    with pytest.raises(FileFormatError, match=r"lacks tensors \['positions', 'context_ids'\]"):
        ActivationCache(tmp_path).read()
    shard.write_bytes(data)
    man = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**man, "kind": "something-else"}))
    with pytest.raises(FileFormatError, match="not a saekit activation cache"):
        ActivationCache(tmp_path)
    (tmp_path / MANIFEST).write_text("{ nope")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        ActivationCache(tmp_path)
    with pytest.raises(FileFormatError, match="does not exist"):
        ActivationCache(tmp_path / "missing")
    # a shard with a NaN: refused on read
    h = synthetic_harvest()
    h.acts["blocks.1.hook_resid_pre"][5, 2] = float("nan")
    ActivationCache.write(tmp_path / "nan", h, {})
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        ActivationCache(tmp_path / "nan").read()
