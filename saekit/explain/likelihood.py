"""The likelihood scorer: an LLM judge that needs no answer format, so a small model can be one.

For each held-out detection excerpt (the same activating and non-activating windows the detection scorer uses),
the judge's mean log-probability of the excerpt's tokens after a short context stating the explanation
(prompts.LIKELIHOOD_CONTEXT), minus the same after the template with no explanation: the *gain*, in nats per
token. The score is the AUROC of the gain between activating and non-activating excerpts; the votes (gain > 0:
the explanation made the excerpt likelier) give the counts and balanced accuracy the other scorers report.

What it measures: whether the explanation's words make the excerpts where the feature fires more predictable
than the others — the lexical scorer's question asked with the model's knowledge of related words and
paraphrase. What it does not: whether the explanation names *where* in the excerpt the feature fires, or
anything the text itself does not show.

Backends: in-process (`local:MODEL`), one padded forward per feature (the model's BOS token first, when it has
one); over HTTP, `/v1/completions` with `echo` and `logprobs` (prompt-token log-probabilities, one request per
excerpt and context), checked once per server on a counting prompt: llama-cpp-python 0.3.36 pairs each echoed
token with the distribution of the *next* one unless the prompt starts with the model's BOS token, so a shifted
server is refused with the flag that fixes it (--likelihood-prefix). The neutral context's log-probabilities do
not depend on the explanation, so each excerpt's is computed once per judge and reused (own and shuffled)."""

from __future__ import annotations

import random
import threading

from ..errors import SaekitError
from .client import HttpClient, LocalClient
from .examples import FeatureExamples
from .prompts import likelihood_context
from .scorers import Score, samples

FORWARD_BATCH = 16  # sequences per in-process forward (memory stays small: ~100 tokens each)
COUNTING = ", ".join(str(i) for i in range(1, 21))  # any aligned LM predicts its tail almost surely
ALIGNED_BELOW = 3.0  # nats per token on COUNTING's last 10 tokens; shifted servers give ~10

_lock = threading.Lock()


def _memo(client, name: str):
    """A dict or set kept on the client (the judge's neutral log-probabilities, the prefixes checked)."""
    with _lock:
        if not hasattr(client, name):
            setattr(client, name, {} if name.endswith("neutral") else set())
        return getattr(client, name)


def one_line(text: str) -> str:
    return " ".join(text.split())


def excerpt_logprobs(client, pairs: list[tuple[str, str]], prefix: str = "") -> tuple[list[list[float]], int]:
    """For each (context, excerpt): the log-probabilities of the excerpt's tokens given the context; plus the
    prompt tokens processed. A client other than the two backends may bring its own
    `excerpt_logprobs(pairs)` (tests do)."""
    if isinstance(client, LocalClient):
        return _local(client.model, client.tokenizer, pairs, client.device, client._lock)
    if isinstance(client, HttpClient):
        return _http(client, pairs, prefix)
    if hasattr(client, "excerpt_logprobs"):
        return client.excerpt_logprobs(pairs)
    raise SaekitError(f"the likelihood scorer needs a backend that gives prompt-token log-probabilities "
                      f"(--llm local:MODEL or an OpenAI-compatible server with /v1/completions echo); "
                      f"{getattr(client, 'name', type(client).__name__)} does not.")


def _local(model, tokenizer, pairs, device="cpu", lock=None) -> tuple[list[list[float]], int]:
    """Excerpt tokens = the tokens of context + excerpt that start inside the excerpt (as the server sees it)."""
    import torch

    rows, starts = [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for context, excerpt in pairs:
        enc = tokenizer(context + excerpt, add_special_tokens=False, return_offsets_mapping=True)
        first = next((i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= len(context)), len(enc["input_ids"]))
        rows.append(bos + enc["input_ids"])
        starts.append(len(bos) + max(first, 1))  # the very first token has no prediction
    out, tokens = [], sum(map(len, rows))
    for i in range(0, len(rows), FORWARD_BATCH):
        chunk = rows[i: i + FORWARD_BATCH]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        with (lock or threading.Lock()), torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        for j, r in enumerate(chunk):
            s = starts[i + j]
            out.append(lp[j, s - 1: len(r) - 1].tolist())
    return out, tokens


def _completion(client: HttpClient, prompt: str) -> tuple[list[str], list[float | None], int]:
    """The server's echoed prompt tokens and their log-probabilities (/v1/completions, echo, logprobs)."""
    body = {"model": client.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
    data = client.post("/completions", body)
    try:
        choice = data["choices"][0]
        lp = choice["logprobs"]
        tokens, values = list(lp["tokens"]), list(lp["token_logprobs"])
    except (KeyError, IndexError, TypeError):
        raise SaekitError(f"{client.base_url}/completions gave no prompt-token log-probabilities (echo + logprobs; "
                          f"answer: {str(data)[:300]}); the likelihood scorer needs a server that does (llama.cpp's, "
                          "vLLM) or the in-process backend --llm local:MODEL.") from None
    return tokens, values, int((data.get("usage") or {}).get("prompt_tokens", 0))


def _tail(tokens: list[str], values: list[float | None], text: str) -> list[float] | None:
    """The log-probabilities of the tokens that lie inside the last occurrence of `text` in the
    echoed tokens (token strings, not offsets: servers count offsets from different origins)."""
    joined = "".join(tokens)
    at = joined.rfind(text)
    if at < 0:
        return None
    out, pos = [], 0
    for t, v in zip(tokens, values):
        if pos >= at and pos + len(t) <= at + len(text) and v is not None:
            out.append(float(v))
        pos += len(t)
    return out or None


def check_alignment(client: HttpClient, prefix: str) -> None:
    """Once per server and prefix: refuse echoed log-probabilities that are shifted by a token."""
    checked = _memo(client, "_likelihood_checked")
    if prefix in checked:
        return
    tokens, values, _ = _completion(client, prefix + COUNTING)
    tail = _tail(tokens, values, COUNTING[-24:])
    nats = -sum(tail) / len(tail) if tail else float("inf")
    if nats > ALIGNED_BELOW:
        raise SaekitError(
            f"{client.base_url}/completions echoes prompt log-probabilities shifted by one token ({nats:.1f} nats "
            f"per token on '1, 2, …, 20', where an aligned model is near 0): llama-cpp-python pairs each prompt token "
            "with the distribution of the next one when the prompt does not start with the model's BOS token. Pass "
            "--likelihood-prefix with that token (SmolLM2: '<|im_start|>'), or use --llm local:MODEL.")
    with _lock:
        checked.add(prefix)


def _http(client: HttpClient, pairs, prefix: str) -> tuple[list[list[float]], int]:
    check_alignment(client, prefix)
    out, processed = [], 0
    for context, excerpt in pairs:
        tokens, values, prompt_tokens = _completion(client, prefix + context + excerpt)
        tail = _tail(tokens, values, excerpt)
        if tail is None:
            raise SaekitError(f"{client.base_url}/completions echoed a prompt that does not end in the excerpt "
                              f"{excerpt[:60]!r}; it cannot be scored by likelihood.")
        out.append(tail)
        processed += prompt_tokens
    return out, processed


def likelihood_score(client, explanation: str, ex: FeatureExamples, seed: int = 0, prefix: str = "") -> Score:
    """The scorer (module docstring). `calls` counts the (context, excerpt) sequences the judge read."""
    rng = random.Random(f"detection:{ex.feature}:{seed}")  # the detection scorer's excerpts, in its order
    items = [(one_line(t), y) for t, y in samples("detection", ex, rng)]
    told = likelihood_context(explanation)
    neutral = likelihood_context(None)
    memo = _memo(client, "_likelihood_neutral")
    with _lock:
        missing = [t for t, _ in items if (prefix, t) not in memo]
    pairs = [(told, t) for t, _ in items] + [(neutral, t) for t in dict.fromkeys(missing)]
    got, processed = excerpt_logprobs(client, pairs, prefix)
    with _lock:
        for (_, t), v in zip(pairs[len(items):], got[len(items):]):
            memo[(prefix, t)] = v
        base = [memo[(prefix, t)] for t, _ in items]
    s = Score("likelihood", calls=len(pairs), prompt_tokens=processed)
    for (_, y), told_lp, neutral_lp in zip(items, got, base):
        gain = sum(told_lp) / max(len(told_lp), 1) - sum(neutral_lp) / max(len(neutral_lp), 1)
        s.add([y], [int(gain > 0)])
        s.probs.append((y, gain))
        per_token = ([round(a - b, 3) for a, b in zip(told_lp, neutral_lp)]  # kept to study other aggregations
                     if len(told_lp) == len(neutral_lp) else None)
        s.answers.append({"labels": [y], "gain": round(gain, 4), "logprob": round(sum(told_lp), 3),
                          "neutral_logprob": round(sum(neutral_lp), 3), "tokens": len(told_lp),
                          "token_gains": per_token})
    return s
