"""The real-server test: llama.cpp's OpenAI-compatible server (built into .venv-llama by `make llama`, which
`make test` runs) serves the default model's GGUF on 127.0.0.1; a handful of the tiny store's features are
explained and scored through HTTP, resumed, and the server is stopped. Skipped, saying why, without .venv-llama."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from browser_server import free_port, serving

from saekit.config import ExplainConfig
from saekit.explain import HttpClient, Results, format_report, run
from saekit.features import FeatureStore

LLAMA_PY = Path(__file__).resolve().parents[1] / ".venv-llama" / "bin" / "python"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if not LLAMA_PY.is_file():
        pytest.skip(f"{LLAMA_PY} is missing: build llama.cpp's server with `make llama` (make test does)")
    from saekit.lm import default_gguf_path

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with serving([str(LLAMA_PY), "-m", "llama_cpp.server", "--model", str(default_gguf_path()),
                  "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"],
                 f"{url}/models", "llama.cpp's server", timeout_s=180):
        yield url


def test_explain_and_score_over_http(llama_server, tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store["store"], dst)
    store = FeatureStore(dst)
    client = HttpClient(llama_server, timeout=120)
    assert client.model == "smollm2"
    # 2 features (the shuffle needs two) × (1 explanation + 2 scorers × 2 excerpts × own/shuffled) = 18 calls
    cfg = ExplainConfig(features="0-1", explainers=["llm"], n_explain=3, n_activating=1, n_random=1, n_hard=0,
                        batch_size=1, concurrency=2)
    rep = run(store, client, cfg, progress=False)
    print(format_report(rep), file=sys.stderr)
    res = Results(dst)
    exps = res.query("SELECT feature, explainer, raw, prompt_tokens FROM explanations WHERE explainer = 'llm'")
    assert len(exps) + len(rep["skipped"]) == 2 and exps
    assert all(e["raw"] and e["prompt_tokens"] > 0 for e in exps)  # real answers, token counts from the server
    scores = res.query("SELECT scorer, n, unparsed, calls, auroc FROM scores")
    assert {s["scorer"] for s in scores} == {"detection", "fuzzing"}
    assert all(s["calls"] == s["n"] + s["unparsed"] == 2 for s in scores)
    assert any(s["auroc"] is not None for s in scores)  # the server's logprobs came through
    assert rep["run"]["calls"] > 0 and rep["run"]["prompt_tokens"] > 0
    again = run(store, client, cfg, resume=True, progress=False)
    assert again["run"]["calls"] == 0  # resumed: nothing re-queried


def test_wrong_model_name_fails_fast(llama_server):
    from saekit.errors import SaekitError

    with pytest.raises(SaekitError, match=r"does not serve the model 'gpt-9'; it serves: smollm2"):
        HttpClient(llama_server, model="gpt-9")
