"""The model and SAE behind a store, loaded once per server, for pages that run text live
("Your text", and the steering panel). Forwards are serialised with a lock: hooks are attached to the
shared model for the duration of a call, so two sessions must not interleave."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.features import FeatureStore
from saekit.tokens import bos_id, special_ids

MAX_TOKENS = 512  # one forward of the live model per click; longer texts are cut (and the page says so)


@dataclass
class LiveResult:
    tokens: list[int]
    pieces: list[str]
    values: np.ndarray   # [T, K] activations of the active latents per token (0 where dropped)
    indices: np.ndarray  # [T, K] their ids
    kept: np.ndarray     # [T] bool: position 0 and special tokens are not encoded (as in the store)
    total: int           # tokens the whole text has (BOS included): more than len(tokens) when it was cut

    @property
    def truncated(self) -> bool:
        return self.total > len(self.tokens)

    def dense(self, features: np.ndarray) -> np.ndarray:
        """[len(features), T] activations of the given latents on every token."""
        out = np.zeros((len(features), len(self.tokens)), dtype=np.float32)
        where = {int(f): r for r, f in enumerate(features)}
        for t in range(len(self.tokens)):
            for v, i in zip(self.values[t], self.indices[t]):
                r = where.get(int(i))
                if r is not None and v > 0:
                    out[r, t] = v
        return out

    def strongest(self, n: int) -> np.ndarray:
        """The n latents with the largest activation anywhere in the text, strongest first."""
        best: dict[int, float] = {}
        for v, i in zip(self.values.ravel(), self.indices.ravel()):
            if v > 0 and v > best.get(int(i), 0.0):
                best[int(i)] = float(v)
        return np.array(sorted(best, key=best.get, reverse=True)[:n], dtype=np.int64)

    def ranked(self, position: int) -> list[tuple[int, float]]:
        """The latents active on one token, strongest first."""
        pairs = [(int(i), float(v)) for v, i in zip(self.values[position], self.indices[position]) if v > 0]
        return sorted(pairs, key=lambda p: -p[1])


class LiveModel:
    """Model + SAE of a store. `run(text)` encodes a text the way the store's tokens were encoded."""

    def __init__(self, store: FeatureStore, device: str = "cpu"):
        from saekit.harvest import Harvester
        from saekit.lm import load_model
        from saekit.sae import load_sae

        man = store.manifest
        sae_dir = Path(man["sae_dir"])
        if not sae_dir.is_dir():
            raise SaekitError(f"the store's SAE directory {sae_dir} is gone; running text needs it (the other pages "
                              "work without it). Rebuild the store from the SAE's new place with `saekit analyze`.")
        self.sae = load_sae(sae_dir, device=device)
        self.stale = self.sae.weights_hash() != man.get("sae_weights_sha256")
        self.model = load_model(man.get("model_arg", "default"), device=device)
        self.hook = man["hook"]
        self.harvester = Harvester(self.model, [self.hook], device=device)
        self.tokenizer = self.model.tokenizer
        self.special = set(special_ids(self.tokenizer))
        self.vocab = store.vocab
        self.lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        """BOS and the text's tokens, uncut."""
        return [bos_id(self.tokenizer), *self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def run(self, text: str, max_tokens: int = MAX_TOKENS) -> LiveResult:
        """The SAE's activations on the first `max_tokens` tokens of `text` (BOS first); `total` says how many
        the whole text has. An empty text is refused: there would be nothing but BOS to encode."""
        if not text.strip():
            raise SaekitError("the text is empty: type some text to run the model on.")
        all_ids = self.tokenize(text)
        ids = all_ids[:max_tokens]
        tokens = torch.tensor([ids])
        with self.lock:
            acts = self.harvester.forward(tokens)[self.hook][0].float()
        kept = np.array([i > 0 and t not in self.special for i, t in enumerate(ids)])
        values, indices = self.sae.encode(acts.to(self.sae.W_enc.device))
        values = values.cpu().numpy() * kept[:, None]
        return LiveResult(ids, self.vocab.pieces(ids), values, indices.cpu().numpy(), kept, len(all_ids))
