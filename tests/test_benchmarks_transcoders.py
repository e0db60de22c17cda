"""benchmarks/transcoders.py end to end at a tiny size, on a synthetic MLP-pair cache (y = a small MLP of x)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saekit.cache import ActivationCache
from saekit.harvest import Harvest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "transcoders.py"
PEERS = ROOT / ".venv-peers" / "bin" / "python"
TINY = ["--layer", "2", "--d-sae", "64", "--k", "4", "--batch-size", "128", "--epochs", "4", "--warmup-steps", "2",
        "--repeats", "2", "--threads", "1", "--heldout-fraction", "0.25"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    n, d, contexts = 2048, 16, 64
    x = torch.randn(n, d, generator=g)
    x[5] *= 100  # one massive input token: left out of training
    y = torch.relu(x @ torch.randn(d, 48, generator=g)) @ torch.randn(48, d, generator=g) / 8
    path = tmp_path_factory.mktemp("tc") / "acts"
    ActivationCache.write(path, Harvest({"blocks.2.mlp.hook_in": x, "blocks.2.hook_mlp_out": y},
                                        torch.zeros(n, dtype=torch.long), torch.arange(n) % 32 + 1,
                                        torch.arange(n) // (n // contexts)), {"model": "synthetic"})
    return path


def run(cache: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--activations", str(cache), *TINY, *extra, "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_inits(cache, tmp_path):
    res = run(cache, tmp_path, "--inits", "--init-list", "tied,uncentred")  # one of saekit's inits, one variant
    data = res["data"]
    assert data["heldout_tokens"] == 512 and data["massive_excluded"] == 1  # the last quarter of contexts, whole
    assert data["train_tokens_available"] == 2048 - 512 - 1
    rows = res["inits"]["rows"]
    assert set(rows) == {"tied", "uncentred"} and res["inits"]["best"] in rows
    for r in rows.values():
        assert len(r["fvu_by_seed"]) == 2 and all(f < 0.9 for f in r["fvu_by_seed"])  # each learned the MLP
    assert {r["seed"] for r in res["runs"]} == {0, 1}


@pytest.mark.skipif(not PEERS.is_file(), reason="needs .venv-peers (make peers) for sparsify")
@pytest.mark.parametrize("skip", [False, True])
def test_against_sparsify(cache, tmp_path, skip):
    res = run(cache, tmp_path, "--repeats", "1", *(["--skip"] if skip else []))
    table = res["table"]
    assert set(table) == {"saekit", "sparsify"}
    for r in table.values():
        assert r["fvu_max"] < 0.9 and r["l0"] <= 4 and r["tokens_per_s"] > 0
    assert table["sparsify"]["saekit_speedup"] == pytest.approx(table["saekit"]["tokens_per_s"]
                                                                / table["sparsify"]["tokens_per_s"])
