"""benchmarks/attribution_ct.py on the tiny random Llama: saekit's attribution graph against the real circuit-tracer's
(0.5, in .venv-ct) on the same model, prompt, transcoders and settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "attribution_ct.py"
CT_PY = Path(os.environ.get("SAEKIT_CT_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not CT_PY.is_file(), reason=f"no circuit-tracer venv at {CT_PY}: run `make peers-ct` (installs circuit-tracer 0.5.0)")


def test_tiny_comparison_with_circuit_tracer(tmp_path):
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--tiny-skip", "--threads", "1", "--batch-size", "64",
                           "--ct-batch-size", "64", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    tiny = res["tiny"]
    assert tiny["same_tokens"] and tiny["logits_max_abs_diff"] < 1e-4, tiny.get("circuit_tracer")
    c = tiny["comparison"]
    n = c["nodes"]
    assert n["matched"] == n["saekit"] == n["circuit_tracer"] and n["activation_max_abs_diff"] < 1e-4
    assert c["edges"]["pearson"] >= 0.99 and c["edges"]["relative_max_diff"] < 1e-3
    assert c["top50_overlap"]["all_nodes"] >= 0.9 and c["top50_overlap"]["feature_nodes"] >= 0.9
    for k in ("replacement", "completeness"):
        assert c["scores"]["saekit"][k] == pytest.approx(c["scores"]["circuit_tracer"][k], abs=1e-3)
    assert tiny["frontend_json"]["same_keys"] and tiny["frontend_json"]["pruned_nodes"]["jaccard"] > 0.9
    assert tiny["times"]["saekit_s"] > 0 and tiny["times"]["circuit_tracer_s"] > 0
    # a skip path: circuit-tracer's edges agree with saekit's with or without the gradient through it, and the
    # benchmark says which (circuit-tracer 0.5's nnsight backend: without)
    skip = res["tiny_skip"]["skip_gradient_check"]
    assert max(skip.values()) >= 0.999, skip
    # feature rows never pass through the last layer's skip path: they agree either way
    assert res["tiny_skip"]["comparison"]["edges"]["by_target"]["feature"]["pearson"] >= 0.999
