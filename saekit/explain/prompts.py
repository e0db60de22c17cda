"""Every prompt the explainer and the scorers send, and the parsers of their answers (one file, so the wording
can be read and changed in one place). Prompts are chat messages: a system turn and a user turn."""

from __future__ import annotations

import re

from .examples import MARK_CLOSE, MARK_OPEN, Window

Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = (
    "You study a single feature of a language model. You are shown text excerpts where the feature is active; "
    f"the tokens where it fires are wrapped in {MARK_OPEN} {MARK_CLOSE}. Find what the marked tokens have in "
    "common (the words themselves, their meaning, or the context around them) and describe the feature in one "
    "short phrase. Answer with one line: Explanation: <phrase>")

DETECTION_SYSTEM = (
    "A feature of a language model has this explanation. You are shown numbered text excerpts. For each excerpt, "
    "say whether the feature is active somewhere in it (1) or not (0). Answer only with a list of 0s and 1s, one "
    "per excerpt, in order, like [1, 0, 0, 1, 0].")

FUZZING_SYSTEM = (
    f"A feature of a language model has this explanation. You are shown numbered text excerpts with some tokens "
    f"wrapped in {MARK_OPEN} {MARK_CLOSE}. For each excerpt, say whether the wrapped tokens are exactly where the "
    "feature, as explained, is active (1) or not (0). Answer only with a list of 0s and 1s, one per excerpt, in "
    "order, like [1, 0, 0, 1, 0].")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def explain_prompt(windows: list[Window]) -> Messages:
    body = "\n".join(f"Excerpt {i + 1}: {_one_line(w.marked())}" for i, w in enumerate(windows))
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": body + "\n\nExplanation:"}]


DETECTION_ONE = (
    "A feature of a language model has this explanation. You are shown one text excerpt. Answer 1 if the feature "
    "is active somewhere in it, else 0. Answer with the single number.")

FUZZING_ONE = (
    f"A feature of a language model has this explanation. You are shown one text excerpt with some tokens wrapped "
    f"in {MARK_OPEN} {MARK_CLOSE}. Answer 1 if the wrapped tokens are exactly where the feature, as explained, is "
    "active, else 0. Answer with the single number.")


def classify_prompt(kind: str, explanation: str, texts: list[str]) -> Messages:
    """The detection (plain texts) or fuzzing (texts with marked tokens) prompt for one batch (one excerpt: a
    one-number answer, which small models follow far more often than a list)."""
    system = ({"detection": DETECTION_ONE, "fuzzing": FUZZING_ONE} if len(texts) == 1
              else {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM})[kind]
    body = "\n".join(f"Excerpt {i + 1}: {_one_line(t)}" for i, t in enumerate(texts))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation: {_one_line(explanation)}\n\n{body}\n\n"
                                        + ("Answer (1 or 0):" if len(texts) == 1 else f"Answer with {len(texts)} numbers:")}]


_LABEL = re.compile(r"(?:explanation|answer|feature|description)\s*[:\-]\s*", re.I)
MAX_EXPLANATION = 200


def parse_explanation(answer: str) -> str | None:
    """The phrase from an explainer's answer: the text after the last "Explanation:" (else the first non-empty
    line), without quotes and markers, at most 200 characters. None if nothing usable is left."""
    text = answer.strip()
    labels = list(_LABEL.finditer(text))
    if labels:
        text = text[labels[-1].end():]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if quoted := re.search(r'(?:^|:|\bis)\s*"([^"]+)"', line):  # 'The feature in one phrase is: "sport"'
        line = quoted.group(1)
    line = re.sub(r"^excerpt\s*\d+\s*:\s*", "", line, flags=re.I)  # a copied excerpt number
    line = line.replace(MARK_OPEN, "").replace(MARK_CLOSE, "").strip(" *-:").rstrip(".").strip()
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":  # one pair of quotes around it all
        line = line[1:-1].strip()
    if not line or not re.search(r"\w", line):
        return None
    return line[:MAX_EXPLANATION]


_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
_VOTE = re.compile(r"\b(1|0|true|false|yes|no)\b", re.I)


def parse_votes(answer: str, n: int) -> list[int] | None:
    """n votes (1/0) from a classifier's answer: the first bracketed list holding exactly n of 1/0/true/false/
    yes/no, else those words in the answer when there are exactly n of them (n = 1: also an answer that starts
    with one). None when unparseable."""
    for m in re.finditer(r"\[([^\[\]]*)\]", answer):
        votes = [_WORDS[v.lower()] for v in _VOTE.findall(m.group(1))]
        if len(votes) == n:
            return votes
    votes = [_WORDS[v.lower()] for v in _VOTE.findall(answer)]
    if n == 1 and votes and re.match(r"\W*(1|0|true|false|yes|no)\b", answer, re.I):
        return votes[:1]  # one question: an answer that starts with its vote ("1. Because …")
    return votes if len(votes) == n else None


# The likelihood scorer's context (not a chat: the judge reads it as plain text before the excerpt). The neutral
# context is the same template with no explanation, so their difference is what the explanation adds.
LIKELIHOOD_CONTEXT = "Topic: {explanation}\nText:\n"


def likelihood_context(explanation: str | None) -> str:
    return LIKELIHOOD_CONTEXT.format(explanation=_one_line(explanation or "")).replace(": \n", ":\n")
