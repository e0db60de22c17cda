"""Explainers: the LLM one (top examples with the activating tokens marked → one phrase) and the token-profile
baseline, which needs no LLM ("fires on 'football', 'match', …") and runs through the same scorers, so every
report shows what the LLM adds over it."""

from __future__ import annotations

from dataclasses import dataclass

from .client import LLMClient
from .examples import FeatureExamples
from .prompts import explain_prompt, parse_explanation

EXPLAIN_MAX_TOKENS = 60


@dataclass
class Explanation:
    feature: int
    explainer: str  # "llm" or "baseline"
    text: str | None  # None: the answer could not be parsed (raw keeps it)
    raw: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def explain_llm(client: LLMClient, ex: FeatureExamples) -> Explanation:
    reply = client.chat(explain_prompt(ex.explain), EXPLAIN_MAX_TOKENS)
    return Explanation(ex.feature, "llm", parse_explanation(reply.text), reply.text, reply.prompt_tokens,
                       reply.completion_tokens, reply.seconds)


def explain_baseline(ex: FeatureExamples, n: int = 5) -> Explanation:
    """The latent's token profile (its most specific tokens), else the tokens it fires on in its top windows."""
    words = [p["string"].strip() for p in ex.profile]
    if not any(words):
        words = [w.pieces[i].strip() for w in ex.explain for i, a in enumerate(w.acts) if a > 0]
    seen: list[str] = []
    for w in words:
        if w and w not in seen:
            seen.append(w)
    text = ("fires on " + ", ".join(f"'{w}'" for w in seen[:n])) if seen else None
    return Explanation(ex.feature, "baseline", text, text or "")
