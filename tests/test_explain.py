"""Auto-interpretation without a real LLM: prompts and parsing on fixed examples, the scorers on a perfect and a
wrong explanation (a scripted client that reads the explanation like a keyword matcher), windows from the tiny
store, the resumable batch (a killed run resumes without re-querying finished features), the dry run's counts, and
the HTTP client against a small OpenAI-compatible test server."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from helpers import JsonHandler

from saekit.config import ExplainConfig
from saekit.errors import SaekitError
from saekit.explain import HttpClient, Reply, Results, dry_run, format_report, run
from saekit.explain.examples import FeatureExamples, Window, feature_examples
from saekit.explain.prompts import classify_prompt, explain_prompt, parse_explanation, parse_votes
from saekit.explain.scorers import derangement, samples, score, shuffle_auc
from saekit.features.store import FeatureStore


def win(text: str, hot: str | None = None) -> Window:
    """A window of space-split pieces; the pieces equal to `hot` activate."""
    pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split())]
    acts = [1.0 if hot is not None and p.strip() == hot else 0.0 for p in pieces]
    return Window(pieces, acts, hot is not None, "test")


class KeywordClient:
    """A scripted LLM: explains with the marked words; as a scorer it says 1 when the explanation's quoted word is
    in the excerpt (detection) or is what the excerpt marks (fuzzing). Counts its calls."""

    name, parallel = "keyword", True

    def __init__(self, fail_after: int | None = None, garble: bool = False):
        self.calls, self.fail_after, self.garble = 0, fail_after, garble
        self.lock = threading.Lock()

    def chat(self, messages, max_tokens, logprobs=False) -> Reply:
        with self.lock:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise KeyboardInterrupt  # a kill in the middle of a batch
        system, user = messages[0]["content"], messages[1]["content"]
        if self.garble:
            return Reply("??", 10, 5, 0.0)
        if system.startswith("You study"):
            marked = re.findall(r"<<(.*?)>>", user)
            return Reply(f"Explanation: the word '{marked[0].strip() if marked else 'x'}'", 50, 6, 0.0)
        word = re.search(r"'([^']+)'", user.split("\n")[0])
        word = word.group(1) if word else "\0"
        votes = []
        for line in user.splitlines():
            if not line.startswith("Excerpt"):
                continue
            if "wrapped" in system:
                votes.append(int(any(m.strip() == word for m in re.findall(r"<<(.*?)>>", line))))
            else:
                votes.append(int(re.search(rf"\b{re.escape(word)}\b", line) is not None))
        p = (0.2 + 0.6 * votes[0]) if logprobs and len(votes) == 1 else None  # graded, as a real model's P(yes)
        return Reply(json.dumps(votes), 100, 8, 0.0, p)


# ----------------------------------------------------------------------------- prompts and parsing

def test_marked_windows_and_explain_prompt():
    w = win("the goal was football football today", hot="football")
    assert w.spans() == [(3, 5)]
    assert w.marked() == "the goal was<< football football>> today"
    assert win("a b c", hot="c").marked() == "a b<< c>>"  # a span at the end closes
    assert w.marked([(0, 1)]) == "<<the>> goal was football football today"
    msgs = explain_prompt([w, win("x football y", hot="football")])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Excerpt 1: the goal was<< football football>> today\nExcerpt 2: x<< football>> y" in msgs[1]["content"]
    c = classify_prompt("detection", "sports words", ["one\ntwo", "three"])[1]["content"]
    assert c.startswith("Explanation: sports words") and "Excerpt 1: one two\nExcerpt 2: three" in c
    one = classify_prompt("fuzzing", "sports words", ["a<< b>>"])
    assert "single number" in one[0]["content"] and one[1]["content"].endswith("Answer (1 or 0):")


@pytest.mark.parametrize("answer, expected", [
    ("Explanation: the word 'football'", "the word 'football'"),
    ("  Sure! Here it is.\nExplanation: sports teams.\n", "sports teams"),
    ('"mentions of <<money>>"', "mentions of money"),
    ("explanation - verbs of saying", "verbs of saying"),
    ('The feature in one short phrase is: "Systems."', "Systems"),
    ("Excerpt 3: cities and companies", "cities and companies"),
    ("", None), ("Explanation: ...", None), ("Explanation:\n\n", None),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer, n, expected", [
    ("[1, 0, 1]", 3, [1, 0, 1]),
    ("Sure: [true, false, True]", 3, [1, 0, 1]),
    ("Answer: [1, 0] oops [0, 1, 1]", 3, [0, 1, 1]),  # the first list of the right length
    ("1, 0, 0, 1", 4, [1, 0, 0, 1]),  # no brackets: exactly n votes in the text
    ("yes no yes", 3, [1, 0, 1]),
    ("[1, 0]", 3, None), ("I think 1 or 0 or 1 or 1", 3, None), ("no idea", 3, None),
    ("1. Because it mentions 2 teams", 1, [1]), ("Yes", 1, [1]), ("It is 0 or 1", 1, None),
])
def test_parse_votes(answer, n, expected):
    assert parse_votes(answer, n) == expected


# ----------------------------------------------------------------------------- scorers

def football_examples() -> FeatureExamples:
    act = [win(f"{a} football {b}", hot="football") for a, b in
           [("the", "match"), ("a", "club"), ("watching", "tonight"), ("love", "games"), ("play", "now")]]
    non = [win(t) for t in ["the market fell", "a new phone", "ministers said", "the film won", "shares rose"]]
    return FeatureExamples(0, act[:2], act, non, True, 0.0)


@pytest.mark.parametrize("kind", ["detection", "fuzzing"])
def test_scorers_perfect_vs_wrong_explanation(kind):
    ex, client = football_examples(), KeywordClient()
    good = score(kind, client, "the word 'football'", ex, batch_size=5)
    bad = score(kind, client, "the word 'banana'", ex, batch_size=5)
    assert (good.tp, good.fn, good.tn, good.fp) == (5, 0, 5, 0) and good.unparsed == 0
    assert good.balanced_accuracy == 1.0 and good.f1 == 1.0 and good.accuracy == 1.0
    assert (bad.tp, bad.fn, bad.tn, bad.fp) == (0, 5, 5, 0)
    assert bad.balanced_accuracy == 0.5 and bad.f1 == 0.0
    assert good.calls == bad.calls == 2 and len(good.answers) == 2
    one = score(kind, client, "the word 'football'", ex, batch_size=1)  # one excerpt per call
    assert one.calls == 10 and one.balanced_accuracy == 1.0 and one.auroc == 1.0 and len(one.probs) == 10
    assert good.auroc is None  # several excerpts per call: no logprobs asked


def test_fuzzing_marks_negatives_where_positives_fire():
    import random

    ex = football_examples()
    items = samples("fuzzing", ex, random.Random(0))
    assert sum(y for _, y in items) == 5 and len(items) == 10
    for text, y in items:  # every excerpt has marks: the answer cannot come from their presence alone
        assert "<<" in text and ">>" in text
        assert ("<< football>>" in text) == bool(y)


def test_unparseable_votes_are_counted_not_dropped():
    s = score("detection", KeywordClient(garble=True), "the word 'football'", football_examples(), batch_size=5)
    assert s.unparsed == 10 and s.n == 0 and s.balanced_accuracy is None and s.calls == 2
    assert all(a["votes"] is None and a["answer"] for a in s.answers)


def test_shuffle_auc_and_derangement():
    perm = derangement(7, seed=3)
    assert sorted(perm) == list(range(7)) and all(p != i for i, p in enumerate(perm))
    r = shuffle_auc([0.9, 0.8, 1.0, 0.7], [0.5, 0.6, 0.5, 0.4])
    assert r["auc"] == 1.0 and r["lo"] == 1.0 and r["features"] == 4
    r = shuffle_auc([0.5] * 5, [0.5] * 5)
    assert r["auc"] == 0.5


# ----------------------------------------------------------------------------- windows from a store

def test_feature_examples_from_store(tiny_store):
    store = FeatureStore(tiny_store["store"])
    count = store.stats["count"]
    f = int(np.argmax(count))
    ex = feature_examples(store, f, n_explain=3, n_activating=2, n_random=2, n_hard=1)
    assert len(ex.explain) == 3 and len(ex.activating) == 2 and len(ex.non_activating) == 3
    assert all(any(a > 0 for a in w.acts) and w.activating for w in ex.explain + ex.activating)
    assert all(not any(w.acts) and not w.activating for w in ex.non_activating)
    top_ctx, sample_ctx = (store._row(k, f).numpy() for k in ("top_ctx", "sample_ctx"))
    known = {int(c) for c in np.concatenate([top_ctx, sample_ctx]) if c >= 0}
    assert not {w.context for w in ex.non_activating} & known  # never a context it is known to fire in
    assert not {w.context for w in ex.activating} & {w.context for w in ex.explain}  # held out
    assert 0 <= ex.contamination < 1 and (ex.contamination == 0) == ex.negatives_exact
    assert ex == feature_examples(store, f, n_explain=3, n_activating=2, n_random=2, n_hard=1)  # seeded
    with pytest.raises(SaekitError, match="held-out activating windows"):
        feature_examples(store, f, n_explain=3, n_activating=100)
    with pytest.raises(SaekitError, match="not known to fire.*--tokens"):
        feature_examples(store, f, n_explain=3, n_activating=2, n_random=10_000)


# ----------------------------------------------------------------------------- the batch

CFG = dict(n_explain=3, n_activating=2, n_random=2, n_hard=1, batch_size=3, features="0-9", concurrency=3)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store["store"], dst)
    return FeatureStore(dst)


def test_batch_resume_does_not_requery(store_copy):
    cfg = ExplainConfig(**CFG)
    planned = dry_run(store_copy, cfg, list(range(10)))
    first = KeywordClient(fail_after=20)
    with pytest.raises(KeyboardInterrupt):
        run(store_copy, first, cfg, progress=False)
    res = Results(store_copy.path)
    done_before = res.done_scores()
    assert done_before and len(done_before) < 10 * 2 * 2 * 2  # partial, written as it went
    with pytest.raises(SaekitError, match="--resume"):
        run(store_copy, KeywordClient(), cfg, progress=False)
    second = KeywordClient()
    rep = run(store_copy, second, cfg, resume=True, progress=False)
    assert first.calls - 1 + second.calls - planned["calls"] <= 3 * 4  # only calls in flight at the kill repeat
    third = KeywordClient()
    run(store_copy, third, cfg, resume=True, progress=False)
    assert third.calls == 0  # everything done: nothing re-queried
    rows = res.query("SELECT COUNT(*) FROM scores")[0][0]
    assert rows == planned["features"] * 2 * 2 * 2  # explainers × scorers × (own, shuffled)
    llm = {t["scorer"]: t for t in rep["table"] if t["explainer"] == "llm"}
    assert set(llm) == {"detection", "fuzzing"} and llm["detection"]["shuffle_auc"]["features"] == planned["features"]
    assert "shuffle-AUC" in format_report(rep)
    table = res.table()
    assert {"llm", "baseline", "llm_detection", "baseline_fuzzing"} <= set(table.columns)
    page = res.feature(int(table.index[0]))
    assert page["explanations"]["llm"]["text"].startswith("the word")
    assert {s["variant"] for s in page["scores"]} == {"own", "shuffled"}


def test_dry_run_counts_match_a_real_run(store_copy):
    cfg = ExplainConfig(**CFG | {"features": "0-4"})
    planned = dry_run(store_copy, cfg, list(range(5)))
    client = KeywordClient()
    rep = run(store_copy, client, cfg, progress=False)
    assert client.calls == planned["calls"] == rep["run"]["calls"]
    assert planned["prompt_tokens_est"] > 0 and planned["build_ms_per_feature"] > 0


def test_unparseable_explanations_are_recorded(store_copy):
    cfg = ExplainConfig(**CFG | {"features": "0-2", "explainers": ["llm"]})
    run(store_copy, KeywordClient(garble=True), cfg, progress=False)
    rows = Results(store_copy.path).query("SELECT text, raw FROM explanations")
    assert len(rows) == 3 and all(r["text"] is None and r["raw"] == "??" for r in rows)
    assert Results(store_copy.path).query("SELECT COUNT(*) FROM scores")[0][0] == 0


def test_cli_dry_run(tiny_store, capsys):
    from saekit.cli import main

    assert main(["explain", str(tiny_store["store"]), "--dry-run", "--features", "0-3", "--n-explain", "3",
                 "--n-activating", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] + out["skipped"] == 4 and out["calls"] > 0
    assert main(["explain", str(tiny_store["store"]), "--features", "0-999999", "--dry-run"]) == 2


# ----------------------------------------------------------------------------- the HTTP client

class _Server(JsonHandler, BaseHTTPRequestHandler):
    fail_next = 0
    seen_auth: list[str] = []

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"data": [{"id": "tiny-chat"}]})
        self._send(404, {"error": "no such path"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Server.seen_auth.append(self.headers.get("Authorization", ""))
        if _Server.fail_next:
            _Server.fail_next -= 1
            return self._send(503, {"error": "busy"})
        if body["model"] != "tiny-chat":
            return self._send(404, {"error": f"model {body['model']} not found"})
        self._send(200, {"choices": [{"message": {"content": "Explanation: echo " + body["messages"][-1]["content"][:10]}}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": 3}})


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_http_client(server, monkeypatch):
    monkeypatch.setenv("SAEKIT_TEST_KEY", "sk-secret")
    c = HttpClient(server, api_key_env="SAEKIT_TEST_KEY", retries=2)
    assert c.model == "tiny-chat" and "sk-secret" not in repr(vars(c))  # the one model served; the key not kept
    r = c.chat([{"role": "user", "content": "hello there"}], 5)
    assert r.text == "Explanation: echo hello ther" and (r.prompt_tokens, r.completion_tokens) == (12, 3)
    assert _Server.seen_auth[-1] == "Bearer sk-secret"
    _Server.fail_next = 2  # two 503s, then it answers: retried with backoff
    assert c.chat([{"role": "user", "content": "again"}], 5).text.startswith("Explanation")
    _Server.fail_next = 5
    with pytest.raises(SaekitError, match="failed 3 times; last: HTTP 503"):
        c.chat([{"role": "user", "content": "x"}], 5)
    _Server.fail_next = 0
    with pytest.raises(SaekitError, match="does not serve the model 'gpt-9'; it serves: tiny-chat"):
        HttpClient(server, model="gpt-9")
    with pytest.raises(SaekitError, match=r"http://127.0.0.1:9/v1 is unreachable"):
        HttpClient("http://127.0.0.1:9/v1", retries=0)


def test_local_backend_needs_a_chat_model(tiny_store):
    from saekit.explain import make_client

    with pytest.raises(SaekitError, match="no chat template; use an instruction-tuned model"):
        make_client(f"local:{tiny_store['model']}")
    with pytest.raises(SaekitError, match="give an OpenAI-compatible base URL"):
        make_client("127.0.0.1:8080")


# ----------------------------------------------------------------------------- the lexical scorer (no LLM)

def test_lexical_scorer_matching_beats_wrong_explanation():
    from saekit.explain.scorers import explanation_words, lexical_score

    assert explanation_words("fires on 'of', 'Matches'") == {"fire", "of", "match"}  # quoted: stopwords kept
    assert explanation_words("the stories of today's football matches") == {"story", "today", "football", "match"}
    ex = football_examples()
    good = lexical_score("football games", ex)
    bad = lexical_score("stock markets", ex)
    assert good.auroc == 1.0 and (good.tp, good.fn, good.tn, good.fp) == (5, 0, 5, 0) and good.calls == 0
    assert bad.auroc < 0.5 and bad.fp == 1  # 'market' is in a negative excerpt only
    assert score("lexical", None, "football games", ex).auroc == 1.0  # selectable like the LLM scorers
    with pytest.raises(ValueError, match="needs an LLM"):
        score("detection", None, "football", ex)
    # matching explanations beat shuffled ones over features: each feature fires on its own word
    words = ["football", "election", "market", "film", "phone"]
    feats = [FeatureExamples(i, [], [win(f"the {w} today", hot=w) for _ in range(3)],
                             [win(f"the {o} today") for o in words if o != w], True, 0.0)
             for i, w in enumerate(words)]
    perm = derangement(len(words), seed=1)
    own = [lexical_score(f"about {w}", f).auroc for w, f in zip(words, feats)]
    shuf = [lexical_score(f"about {words[perm[i]]}", f).auroc for i, f in enumerate(feats)]
    assert shuffle_auc(own, shuf)["auc"] == 1.0


def test_lexical_batch_reruns_stored_explanations_without_an_llm(store_copy, capsys):
    from saekit.cli import main

    cfg = ExplainConfig(**CFG | {"features": "0-5", "scorers": ["detection"]})
    client = KeywordClient()
    run(store_copy, client, cfg, progress=False)
    lex = ExplainConfig(**CFG | {"features": "0-5", "scorers": ["lexical"]})
    rep = run(store_copy, None, lex, resume=True, progress=False)  # explanations stored: no LLM asked
    rows = {(t["explainer"], t["scorer"]): t for t in rep["table"]}
    assert rows[("baseline", "lexical")]["metric"] == "auroc" and "shuffle_auc" in rows[("llm", "lexical")]
    assert dry_run(store_copy, ExplainConfig(**CFG | {"scorers": ["lexical"], "explainers": ["baseline"]}), list(range(6)))["calls"] == 0
    args = ["explain", str(store_copy.path), "--features", "0-5", "--scorers", "lexical", "--n-explain", "3",
            "--n-activating", "2", "--n-random", "2", "--n-hard", "1", "--batch-size", "3", "--resume"]
    assert main(args) == 0 and "none needed" in capsys.readouterr().out  # the CLI loads no model
    with pytest.raises(SaekitError, match="needs an LLM"):
        run(store_copy, None, ExplainConfig(**CFG | {"features": "6-7", "scorers": ["lexical"]}), progress=False)
