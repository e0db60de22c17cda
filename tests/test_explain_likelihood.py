"""The likelihood scorer on constructed cases: a copying LM (a token is likely when the text before it holds it)
in the in-process path, where an explanation naming the excerpts' words must raise their likelihood gain over a
wrong one; the gain / AUROC / count arithmetic on scripted log-probabilities; the HTTP path against a small
/v1/completions server that, like llama-cpp-python, shifts its echoed log-probabilities unless the prompt starts
with the BOS text; the resumable batch; and (when .venv-llama exists) llama.cpp's real server."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import JsonHandler

from saekit.config import ExplainConfig
from saekit.errors import SaekitError
from saekit.explain import HttpClient, LocalClient, Results, dry_run, format_report, run
from saekit.explain.examples import FeatureExamples, Window
from saekit.explain.likelihood import _tail, likelihood_score
from saekit.explain.scorers import derangement, score, shuffle_auc
from saekit.features.store import FeatureStore


def win(text: str, hot: str | None = None) -> Window:
    pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split())]
    return Window(pieces, [1.0 if hot is not None and p.strip() == hot else 0.0 for p in pieces], hot is not None, "t")


def topic_examples(word: str, others=("market", "film", "phone", "minister", "album"), feature: int = 0):
    act = [win(f"{a} {word} {b}", hot=word) for a, b in [("the", "today"), ("a", "report"), ("our", "news")]]
    return FeatureExamples(feature, [], act, [win(f"the {o} today") for o in others if o != word][:3], True, 0.0)


class CopyLM(torch.nn.Module):
    """Logits that favour every token already seen in the sequence (an induction head, nothing else)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        seen = torch.cumsum(torch.nn.functional.one_hot(input_ids, self.vocab), dim=1).clamp(max=1)
        return type("Out", (), {"logits": 4.0 * seen.float()})()


@pytest.fixture(scope="module")
def copy_client():
    """The real in-process path around CopyLM and a word-level tokenizer (no sub-word overlap between words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <bos> Topic: Text: the a our today report news football election market film phone minister album"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.split())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")
    client = LocalClient.__new__(LocalClient)
    client.model, client.tokenizer, client.device = CopyLM(len(fast)), fast, "cpu"
    client._lock, client.name, client.parallel = threading.Lock(), "copy-lm", False
    return client


def test_naming_the_excerpts_words_raises_the_gain(copy_client):
    ex = topic_examples("football")
    good = likelihood_score(copy_client, "football", ex)
    bad = likelihood_score(copy_client, "election", ex)
    gains = lambda s: [a["gain"] for a in s.answers]  # noqa: E731
    assert good.auroc == 1.0 and (good.tp, good.fn, good.fp, good.tn) == (3, 0, 0, 3)
    assert all(g > 0 for g, (y, _) in zip(gains(good), good.probs) if y)  # the named word got likelier
    assert bad.auroc == 0.5 and max(gains(bad)) < min(g for g, (y, _) in zip(gains(good), good.probs) if y)
    assert good.calls == 12 and bad.calls == 6  # 6 told + 6 neutral, then the neutral ones are reused
    assert score("likelihood", copy_client, "football", ex).auroc == 1.0  # selectable by name
    with pytest.raises(ValueError, match="needs an LLM"):
        score("likelihood", None, "football", ex)
    # over features: own explanations beat shuffled ones
    words = ["football", "election", "market", "film", "phone"]
    feats = [topic_examples(w, feature=i) for i, w in enumerate(words)]
    perm = derangement(len(words), seed=0)
    own = [likelihood_score(copy_client, w, f).auroc for w, f in zip(words, feats)]
    shuf = [likelihood_score(copy_client, words[perm[i]], f).auroc for i, f in enumerate(feats)]
    assert shuffle_auc(own, shuf)["auc"] == 1.0


class Scripted:
    """Log-probabilities by rule: −1 per excerpt token when the context holds the excerpt's first word, else −2
    (neutral context: −2); the excerpt's token count is its word count. Counts the sequences asked."""

    name, parallel = "scripted", True

    def __init__(self):
        self.asked = 0

    def excerpt_logprobs(self, pairs):
        out = []
        for context, excerpt in pairs:
            n = len(excerpt.split())
            out.append([-1.0 if excerpt.split()[0] in context else -2.0] * n)
        self.asked += len(pairs)
        return out, sum(len((c + e).split()) for c, e in pairs)


def test_gain_auroc_and_counts():
    ex = FeatureExamples(0, [], [win("goal one"), win("goal two three"), win("match four")],
                         [win("goal five"), win("rain six")], True, 0.0)
    for w in ex.activating:
        w.activating = True
    s = likelihood_score(Scripted(), "goal", ex)
    by_text = {a["tokens"]: a for a in s.answers}
    assert by_text[3]["gain"] == pytest.approx(1.0) and by_text[3]["logprob"] == -3.0
    assert by_text[3]["neutral_logprob"] == -6.0 and by_text[3]["token_gains"] == [1.0, 1.0, 1.0]
    # gains: positives goal(+1) goal(+1) match(0); negatives goal(+1) rain(0) → AUROC (2·1.5 + 1·0.5)/6
    assert s.auroc == pytest.approx((1.5 + 1.5 + 0.5) / 6)
    assert (s.tp, s.fn, s.fp, s.tn) == (2, 1, 1, 1) and s.balanced_accuracy == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    assert s.calls == 10 and s.prompt_tokens > 0 and s.unparsed == 0


def test_tail_picks_the_excerpt_tokens():
    toks, vals = ["Topic", ":", "\n", "the", " goal", " today", " x"], [None, -1.0, -1.0, -2.0, -3.0, -4.0, -9.0]
    assert _tail(toks, vals, "the goal today") == [-2.0, -3.0, -4.0]  # not the completion token after it
    assert _tail(toks, vals, "nowhere") is None


# ----------------------------------------------------------------------------- HTTP: /v1/completions with echo

BOS = "<s>"


class _Completions(JsonHandler, BaseHTTPRequestHandler):
    """Echoed prompt log-probabilities as llama-cpp-python gives them: tokens are words; a word is likely (−0.05)
    when it is a number, a comma or seen before, else −6 — and shifted (every value −12) unless the prompt
    starts with BOS, which it drops from the echo, as llama.cpp does."""

    requests: list[dict] = []
    echo = True

    def do_GET(self):
        self._send(200, {"data": [{"id": "tiny"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Completions.requests.append(body)
        if not _Completions.echo:
            return self._send(200, {"choices": [{"text": "x"}], "usage": {}})
        prompt = body["prompt"]
        aligned = prompt.startswith(BOS)
        tokens = re.findall(r"\n| ?[^\s,]+|,", prompt.removeprefix(BOS)) + [" x"]
        vals = [None] + [(-0.05 if re.fullmatch(r" ?\d+|,", t) or t.strip() in {p.strip() for p in tokens[:i]}
                          else -6.0) if aligned else -12.0 for i, t in enumerate(tokens) if i]
        self._send(200, {"choices": [{"text": prompt + " x", "logprobs": {"tokens": tokens, "token_logprobs": vals}}],
                         "usage": {"prompt_tokens": len(tokens) - 1, "completion_tokens": 1}})


@pytest.fixture
def completions():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Completions.requests, _Completions.echo = [], True
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_http_likelihood_checks_alignment(completions):
    ex = topic_examples("football")
    client = HttpClient(completions, retries=0)
    with pytest.raises(SaekitError, match=r"shifted by one token.*--likelihood-prefix"):
        likelihood_score(client, "football", ex)
    good = likelihood_score(client, "football", ex, prefix=BOS)
    bad = likelihood_score(client, "election", ex, prefix=BOS)
    assert good.auroc == 1.0 and bad.auroc == 0.5 and good.prompt_tokens > 0
    asked = _Completions.requests
    assert all(r["echo"] and r["logprobs"] and r["max_tokens"] == 1 for r in asked)
    assert sum("1, 2, 3" in r["prompt"] for r in asked) == 2  # checked once per prefix, not per excerpt
    assert len(asked) == 2 + 12 + 6
    _Completions.echo = False
    with pytest.raises(SaekitError, match="gave no prompt-token log-probabilities"):
        likelihood_score(HttpClient(completions, retries=0), "football", ex, prefix=BOS)


def test_other_backends_are_refused():
    class ChatOnly:
        name, parallel = "chat-only", True

    with pytest.raises(SaekitError, match="prompt-token log-probabilities.*chat-only does not"):
        likelihood_score(ChatOnly(), "football", topic_examples("football"))


# ----------------------------------------------------------------------------- the batch

CFG = dict(n_explain=3, n_activating=2, n_random=2, n_hard=1, batch_size=1, features="0-5", explainers=["baseline"],
           scorers=["likelihood"])


def test_batch_likelihood_resumable(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store["store"], dst)
    store = FeatureStore(dst)
    cfg = ExplainConfig(**CFG)
    planned = dry_run(store, cfg, list(range(6)))
    client = Scripted()
    rep = run(store, client, cfg, progress=False)
    assert client.asked == planned["calls"] == rep["run"]["calls"]  # told (own + shuffled) + neutral once
    row = next(t for t in rep["table"] if t["scorer"] == "likelihood")
    assert row["metric"] == "auroc" and row["shuffle_auc"]["features"] == planned["features"]
    assert "likelihood" in format_report(rep)
    rows = Results(dst).query("SELECT variant, llm, answers FROM scores")
    assert len(rows) == 2 * planned["features"] and {r["llm"] for r in rows} == {"scripted"}
    assert all("gain" in json.loads(r["answers"])[0] for r in rows)
    again = Scripted()
    run(store, again, cfg, resume=True, progress=False)
    assert again.asked == 0
    with pytest.raises(SaekitError, match="needs an LLM"):
        run(store, None, ExplainConfig(**CFG | {"features": "0-1"}), resume=True, progress=False)


# ----------------------------------------------------------------------------- llama.cpp's real server

LLAMA_PY = Path(__file__).resolve().parents[1] / ".venv-llama" / "bin" / "python"


def test_llama_cpp_server_needs_the_bos_prefix():
    """llama-cpp-python 0.3.36's echoed log-probabilities are shifted without the BOS text and aligned with it;
    with it the 135M model's likelihood gain ranks football excerpts under 'football' above a wrong topic."""
    if not LLAMA_PY.is_file():
        pytest.skip(f"{LLAMA_PY} is missing: build llama.cpp's server with `make llama` (make test does)")
    from browser_server import free_port, serving

    from saekit.lm import default_gguf_path

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with serving([str(LLAMA_PY), "-m", "llama_cpp.server", "--model", str(default_gguf_path()), "--host",
                  "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--model_alias", "smollm2"],
                 f"{url}/models", "llama.cpp's server", timeout_s=180):
        client = HttpClient(url, timeout=120)
        ex = FeatureExamples(0, [], [win(t, "football") for t in [
            "The striker scored twice as the football club won the cup final",
            "Fans watched the football match on Saturday afternoon",
            "The football league fined the club for the late kick-off"]],
            [win(t) for t in ["Shares in the mobile phone firm rose after record profits",
                              "The film won three awards at a ceremony in London",
                              "Ministers said the new tax would raise billions"]], True, 0.0)
        with pytest.raises(SaekitError, match="shifted by one token"):
            likelihood_score(client, "football", ex)
        good = likelihood_score(client, "football", ex, prefix="<|im_start|>")
        bad = likelihood_score(client, "stock markets and company profits", ex, prefix="<|im_start|>")
        assert good.auroc > bad.auroc  # 3 + 3 excerpts: the ranking, not a threshold
