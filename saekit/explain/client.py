"""LLM backends behind one small interface, `chat(messages, max_tokens) -> Reply`:
  HttpClient    any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, a hosted API): chat completions
                over HTTP (httpx), key read from an environment variable only, timeouts, retries with backoff on
                connection errors / 429 / 5xx, an optional rate limit; safe to call from several threads
  LocalClient   a transformers causal LM in this process (`local:default` = the default model), greedy decoding;
                one call at a time
`make_client("http://127.0.0.1:8080/v1" | "local:default", ...)` picks one and checks it can answer."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ..errors import SaekitError

Messages = list[dict[str, str]]


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    p_yes: float | None = None  # with logprobs: P(1|yes|true) / P(1|yes|true or 0|no|false) at the first token


YES, NO = {"1", "yes", "true"}, {"0", "no", "false"}


def p_yes(candidates: list[tuple[str, float]]) -> float | None:
    """From (token, probability) pairs of the first answer token: the probability of a yes-vote among the votes."""
    py = sum(p for t, p in candidates if t.strip().lower() in YES)
    pn = sum(p for t, p in candidates if t.strip().lower() in NO)
    return py / (py + pn) if py + pn > 0 else None


class LLMClient(Protocol):
    name: str  # backend and model, for records and reports
    parallel: bool  # whether several threads may call chat at once

    def chat(self, messages: Messages, max_tokens: int, logprobs: bool = False) -> Reply: ...


class HttpClient:
    parallel = True

    def __init__(self, base_url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retries: int = 3, rate_limit: float = 0.0, check: bool = True):
        import httpx

        self.base_url = base_url.rstrip("/")
        key = os.environ.get(api_key_env) if api_key_env else None  # never stored on self, never logged
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.retries, self.min_interval = retries, (1.0 / rate_limit if rate_limit > 0 else 0.0)
        self._lock, self._next = threading.Lock(), 0.0
        self.model = model or ""
        if check:
            self.model = self._check(model)
        self.name = f"{self.model} @ {self.base_url}"

    def _get(self, path: str):
        import httpx

        try:
            r = self._http.get(path)
        except httpx.HTTPError as e:
            raise SaekitError(f"the LLM server at {self.base_url} is unreachable ({type(e).__name__}: {e}); start "
                              "it (e.g. `.venv-llama/bin/python -m llama_cpp.server --model FILE.gguf --port 8080`, "
                              "built by `make llama`) or pass the right --llm URL (it ends in /v1).") from None
        if r.status_code != 200:
            raise SaekitError(f"{self.base_url}{path} answered HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def _check(self, model: str | None) -> str:
        """The model to use: `model` if the server serves it, else the one it serves when it serves one."""
        served = [m.get("id", "") for m in self._get("/models").get("data", [])]
        if model is None:
            if len(served) == 1:
                return served[0]
            raise SaekitError(f"{self.base_url} serves {len(served)} models ({', '.join(served) or 'none listed'}); "
                              "name one with --model.")
        if served and model not in served:
            raise SaekitError(f"{self.base_url} does not serve the model {model!r}; it serves: {', '.join(served)}.")
        return model

    def _wait_turn(self) -> None:
        if not self.min_interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.min_interval
        time.sleep(max(0.0, start - now))

    def post(self, path: str, body: dict) -> dict:
        """POST body to base_url + path (JSON answer), with the retries, backoff and rate limit."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))  # backoff: 0.5, 1, 2, … s
            self._wait_turn()
            try:
                r = self._http.post(path, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code != 200:
                raise SaekitError(f"{self.base_url}{path} answered HTTP {r.status_code}: {r.text[:500]}")
            return r.json()
        raise SaekitError(f"{self.base_url}{path} failed {self.retries + 1} times; last: {last}")

    def chat(self, messages: Messages, max_tokens: int, logprobs: bool = False) -> Reply:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": 5}
        t0 = time.perf_counter()
        data = self.post("/chat/completions", body)
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise SaekitError(f"{self.base_url}/chat/completions answered without choices[0].message.content: "
                              f"{str(data)[:500]}") from None
        usage = data.get("usage") or {}
        first = ((data["choices"][0].get("logprobs") or {}).get("content") or [{}])[0]
        top = [(c.get("token", ""), math.exp(c.get("logprob", -math.inf))) for c in first.get("top_logprobs") or []]
        return Reply(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                     time.perf_counter() - t0, p_yes(top) if logprobs else None)


class LocalClient:
    parallel = False

    def __init__(self, model: str = "default", device: str = "cpu"):
        from ..lm import _load_hf, resolve

        where, model_id = resolve(model)
        if isinstance(where, str):
            raise SaekitError(f"local:{model}: the in-process backend takes 'default', a .gguf file or a local "
                              "Hugging Face directory.")
        self.model, self.tokenizer = _load_hf(where)
        self.model.to(device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise SaekitError(f"local:{model} ({model_id}) has no chat template; use an instruction-tuned model.")
        self.device, self.name = device, f"{model_id} (in-process transformers)"
        self._lock = threading.Lock()

    def chat(self, messages: Messages, max_tokens: int, logprobs: bool = False) -> Reply:
        import torch

        t0 = time.perf_counter()
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.device)
        with self._lock, torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id,
                                      output_scores=logprobs, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:]
        p = None
        if logprobs:
            probs = torch.softmax(out.scores[0][0].float(), -1)
            top = torch.topk(probs, 20)
            p = p_yes([(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)])
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(len(new)),
                     time.perf_counter() - t0, p)


def make_client(llm: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                retries: int = 3, rate_limit: float = 0.0) -> LLMClient:
    if llm.startswith("local:"):
        return LocalClient(llm.removeprefix("local:") or "default")
    if llm.startswith(("http://", "https://")):
        return HttpClient(llm, model, api_key_env, timeout, retries, rate_limit)
    raise SaekitError(f"--llm {llm!r}: give an OpenAI-compatible base URL (http://HOST:PORT/v1) or local:MODEL "
                      "(local:default = the default model in this process).")
