"""Scorers, as delphi defines them (Paulo et al. 2024), with our own prompts:
  detection  the LLM reads the explanation and plain excerpts and says which ones the feature is active in:
             held-out activating windows (label 1) and non-activating ones (label 0)
  fuzzing    the LLM reads the explanation and excerpts with some tokens marked and says whether the marks are
             where the feature is active: activating windows marked at their firing tokens (1), non-activating
             windows marked at the spans of a random activating window (0) — delphi's default fuzzing
Each answers in batches of `batch_size` excerpts (one call per batch); the score is the balanced accuracy, with F1,
accuracy and the counts. With one excerpt per call the backend is asked for logprobs, and `auroc` ranks the excerpts
by P(yes) (delphi's log-prob AUC). Votes that cannot be parsed are counted as `unparsed` and left out of the metrics.

  lexical    no LLM: each detection excerpt scores by the share of its words that are content words of the
             explanation (quoted words count as written, stopwords included; unquoted ones without English
             stopwords), and the score is the AUROC of that share between activating and non-activating excerpts
             (vote 1: any word shared). A judge that reads literally and never answers constant votes: on it the
             shuffle check tests the pipeline's plumbing (each feature's excerpts paired with its own explanation)
             and how lexical an explanation is, not whether a paraphrase ("sports news") is right.
  likelihood the LLM's log-probability of each detection excerpt after a context stating the explanation, minus
             after the same context without it; the AUROC of that gain (likelihood.py). Needs no answer format,
             so a small model can judge.

No embedding scorer: it needs a sentence-embedding model, and none is installed or cached on this machine
(sentence-transformers is absent; no embedding weights in any package here), so it is left out rather than faked.

`shuffle_auc` checks a batch: each feature scored with its own explanation against an explanation of another
feature (shuffled); the AUC over features says how often the right explanation scores higher."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import numpy as np

from .client import LLMClient
from .examples import FeatureExamples
from .prompts import classify_prompt, parse_votes

SCORERS = ("detection", "fuzzing", "lexical", "likelihood")
LLM_SCORERS = ("detection", "fuzzing", "likelihood")  # likelihood: the judge's log-probabilities (likelihood.py)


def score_max_tokens(n: int) -> int:
    """Completion budget of a scoring call: a list of n votes and a little slack (decoding dominates CPU time)."""
    return 4 * n + 6


@dataclass
class Score:
    scorer: str
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unparsed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    answers: list[dict] = field(default_factory=list)  # per call: the raw answer and the labels asked
    probs: list[tuple[int, float]] = field(default_factory=list)  # (label, P(yes)) where the backend gave logprobs

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float | None:
        return (self.tp + self.tn) / self.n if self.n else None

    @property
    def balanced_accuracy(self) -> float | None:
        pos, neg = self.tp + self.fn, self.tn + self.fp
        if not pos or not neg:
            return None
        return 0.5 * (self.tp / pos + self.tn / neg)

    @property
    def f1(self) -> float | None:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else None

    @property
    def auroc(self) -> float | None:
        """AUC of P(yes) between activating and non-activating excerpts (delphi's log-prob AUC): graded where
        the votes are not — a small model that always answers 1 can still rank the excerpts."""
        pos = np.array([p for y, p in self.probs if y])
        neg = np.array([p for y, p in self.probs if not y])
        return auc(pos, neg) if len(pos) and len(neg) else None

    def add(self, labels: list[int], votes: list[int] | None) -> None:
        if votes is None:
            self.unparsed += len(labels)
            return
        for y, v in zip(labels, votes):
            self.tp += y and v
            self.fn += y and not v
            self.fp += (not y) and v
            self.tn += (not y) and (not v)


def samples(kind: str, ex: FeatureExamples, rng: random.Random) -> list[tuple[str, int]]:
    """(text shown, label) for each excerpt of a scorer, shuffled."""
    if kind == "detection":
        out = [(w.text(), 1) for w in ex.activating] + [(w.text(), 0) for w in ex.non_activating]
    elif kind == "fuzzing":
        spans = [w.spans() for w in ex.activating]
        out = [(w.marked(), 1) for w in ex.activating]
        for w in ex.non_activating:
            s = [(a, b) for a, b in rng.choice(spans) if b <= len(w.pieces)] or [(len(w.pieces) // 2, len(w.pieces) // 2 + 1)]
            out.append((w.marked(s), 0))
    else:
        raise ValueError(f"unknown scorer {kind!r}; known: {', '.join(SCORERS)}")
    rng.shuffle(out)
    return out


_WORD = re.compile(r"\w+")
_QUOTED = re.compile(r"(?<!\w)['\"`‘“]([^'\"`’”]+)['\"`’”](?!\w)")  # not an apostrophe: "today's"


def _norm(word: str) -> str:
    """Lower case, English plural endings off (matches → match, stories → story), so plurals match singulars."""
    w = word.lower()
    if len(w) <= 3 or not w.endswith("s") or w.endswith("ss"):
        return w
    if w.endswith(("ches", "shes", "xes", "sses")):
        return w[:-2]
    return w[:-3] + "y" if w.endswith("ies") else w[:-1]


def explanation_words(explanation: str) -> set[str]:
    """The words an excerpt is matched against: quoted words as written, other words without English stopwords."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    quoted = {_norm(w) for q in _QUOTED.findall(explanation) for w in _WORD.findall(q)}
    rest = _QUOTED.sub(" ", explanation)
    return quoted | {_norm(w) for w in _WORD.findall(rest) if len(w) > 1 and w.lower() not in ENGLISH_STOP_WORDS}


def lexical_score(explanation: str, ex: FeatureExamples, seed: int = 0) -> Score:
    """The lexical detection scorer (module docstring): graded by word overlap, so `auroc` is its score."""
    rng = random.Random(f"lexical:{ex.feature}:{seed}")
    words = explanation_words(explanation)
    s = Score("lexical")
    for text, label in samples("detection", ex, rng):
        toks = [_norm(w) for w in _WORD.findall(text)]
        hits = sorted({t for t in toks if t in words})
        share = sum(t in words for t in toks) / max(len(toks), 1)
        s.add([label], [int(bool(hits))])
        s.probs.append((label, share))
        s.answers.append({"labels": [label], "answer": " ".join(hits), "votes": [int(bool(hits))], "p_yes": share})
    return s


def score(kind: str, client: LLMClient | None, explanation: str, ex: FeatureExamples, batch_size: int = 5,
          seed: int = 0, prefix: str = "") -> Score:
    if kind == "lexical":
        return lexical_score(explanation, ex, seed)
    if client is None:
        raise ValueError(f"the {kind} scorer needs an LLM client")
    if kind == "likelihood":
        from .likelihood import likelihood_score

        return likelihood_score(client, explanation, ex, seed, prefix)
    rng = random.Random(f"{kind}:{ex.feature}:{seed}")  # the same excerpts and order for every explanation
    items = samples(kind, ex, rng)
    s = Score(kind)
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        labels = [y for _, y in batch]
        one = len(batch) == 1  # one excerpt: ask for logprobs (P(yes) of the first answer token)
        reply = client.chat(classify_prompt(kind, explanation, [t for t, _ in batch]), score_max_tokens(len(batch)),
                            logprobs=one)
        votes = parse_votes(reply.text, len(batch))
        if one and reply.p_yes is not None:
            s.probs.append((labels[0], reply.p_yes))
        s.add(labels, votes)
        s.calls += 1
        s.prompt_tokens += reply.prompt_tokens
        s.completion_tokens += reply.completion_tokens
        s.answers.append({"labels": labels, "answer": reply.text, "votes": votes, "p_yes": reply.p_yes})
    return s


def score_record(s: Score) -> dict:
    return {"n": s.n, "tp": s.tp, "fp": s.fp, "tn": s.tn, "fn": s.fn, "unparsed": s.unparsed,
            "accuracy": s.accuracy, "balanced_accuracy": s.balanced_accuracy, "f1": s.f1, "auroc": s.auroc,
            "calls": s.calls,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "answers": json.dumps(s.answers)}


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation with no fixed point (n ≥ 2): feature i is scored with the explanation of feature perm[i]."""
    if n < 2:
        raise ValueError("shuffling explanations needs at least 2 features")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    nxt = [0] * n
    for j, i in enumerate(order):  # each takes the next one's in a random cycle
        nxt[i] = order[(j + 1) % n]
    return nxt


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann–Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def shuffle_auc(own: list[float], shuffled: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC of the scores with features' own explanations against the scores with shuffled ones, with a 95%
    bootstrap interval over features (pairs resampled together)."""
    a, b = np.asarray(own, float), np.asarray(shuffled, float)
    rng = np.random.default_rng(seed)
    boots = [auc(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n_boot))] if len(a) > 1 else []
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan")))
    return {"auc": auc(a, b), "lo": float(lo), "hi": float(hi), "features": len(a)}
