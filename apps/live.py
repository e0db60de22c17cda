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


@dataclass
class LiveResult:
    tokens: list[int]
    pieces: list[str]
    values: np.ndarray   # [T, K] activations of the active latents per token (0 where dropped)
    indices: np.ndarray  # [T, K] their ids
    kept: np.ndarray     # [T] bool: position 0 and special tokens are not encoded (as in the store)

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

    def tokenize(self, text: str, max_tokens: int = 512) -> list[int]:
        return [bos_id(self.tokenizer), *self.tokenizer(text, add_special_tokens=False)["input_ids"]][:max_tokens]

    @torch.no_grad()
    def run(self, text: str, max_tokens: int = 512) -> LiveResult:
        ids = self.tokenize(text, max_tokens)
        tokens = torch.tensor([ids])
        with self.lock:
            acts = self.harvester.forward(tokens)[self.hook][0].float()
        kept = np.array([i > 0 and t not in self.special for i, t in enumerate(ids)])
        values, indices = self.sae.encode(acts.to(self.sae.W_enc.device))
        values = values.cpu().numpy() * kept[:, None]
        return LiveResult(ids, self.vocab.pieces(ids), values, indices.cpu().numpy(), kept)
