"""Helpers the tests import (`from helpers import …`): synthetic activations with a known sparse structure,
a small SAE with non-trivial biases, and a tiny self-contained model world for the feature-store and browser
tests. Fixtures live in conftest.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit.config import SaeConfig
from saekit.sae import SparseAutoencoder

HOOK = "blocks.15.hook_resid_pre"  # a real hook of the default model
TINY_HOOK = "blocks.1.hook_resid_pre"  # the tiny world's model has two layers


# ----------------------------------------------------------------------------- synthetic data

@dataclass
class SyntheticActs:
    """x = offset + Σ_{j ∈ S(x)} c_j · D_j with |S(x)| = k_true atoms of a unit-norm dictionary D."""

    acts: torch.Tensor  # [N, d]
    dictionary: torch.Tensor  # [n_atoms, d]
    k_true: int
    offset: torch.Tensor  # [d]


def make_synthetic(n: int = 8192, d: int = 32, n_atoms: int = 96, k_true: int = 4, seed: int = 0) -> SyntheticActs:
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=gen)
    D /= D.norm(dim=1, keepdim=True)
    # A skewed atom frequency, as real features have: some atoms are common, many are rare.
    probs = torch.linspace(1.0, 0.2, n_atoms)
    idx = torch.multinomial(probs.expand(n, -1), k_true, replacement=False, generator=gen)
    coef = 1 + 3 * torch.rand(n, k_true, generator=gen)
    offset = 0.5 * torch.randn(d, generator=gen)
    acts = offset + torch.einsum("nk,nkd->nd", coef, D[idx])
    return SyntheticActs(acts, D, k_true, offset)


# ----------------------------------------------------------------------------- a small SAE

def small_sae(d_in: int = 16, d_sae: int = 48, k: int = 4, architecture: str = "topk", seed: int = 0) -> SparseAutoencoder:
    """A random SAE with non-trivial biases (zero biases would hide bias bugs)."""
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture), seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(torch.randn(d_in, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(d_in, d_sae, generator=gen))
    sae.info = {"hook": HOOK, "model": "test/model", "model_arg": "default", "dataset": "default",
                "context_size": 128, "seed": 0, "heldout_fraction": 0.05}
    return sae


# ----------------------------------------------------------------------------- the tiny world
# A byte-level BPE tokenizer and a 2-layer random Llama built on the spot (no download, no default model), a
# few text files with multi-byte characters, a random TopK SAE on TINY_HOOK, and the store `saekit analyze`
# builds from them.

TEXTS = [
    "The central bank raised interest rates on Thursday. Markets fell as shares in banks slid.\n"
    "Analysts said the bank would raise rates again in March.",
    "Le café était fermé. Naïve visitors paid 3€ for a crêpe — “délicieux”, they said.\n"
    "日本語のテキストも少し。 Emoji: 🙂🙂.",
    "The striker scored twice as the club won the cup final 3-1 in front of 80,000 fans.\n"
    "The coach said the team had played its best football of the season.",
    "Shares in the mobile phone firm rose 5% after it reported record profits of £2bn.\n"
    "The firm said sales of phones grew in Europe and Asia.",
    "The film won three awards, including best actress, at a ceremony in London on Sunday.\n"
    "Critics said the film was the best British drama in years.",
]


def tiny_llama(texts: list[str], d_model: int):
    """A random 2-layer Llama (seed 0) and a byte-level BPE tokenizer trained on `texts`: (model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    return LlamaForCausalLM(cfg), fast


def build_world(root: Path, texts: list[str] = TEXTS) -> dict[str, Path]:
    """Tokenizer + tiny model dir, dataset dir and SAE dir under root (idempotent)."""
    data, lm, sae_dir = root / "data", root / "tinylm", root / "sae"
    if (sae_dir / "cfg.json").is_file():
        return {"data": data, "model": lm, "sae": sae_dir}
    data.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts * 6):  # several copies: enough tokens for dozens of contexts
        (data / f"doc{i:02d}.txt").write_text(t.replace("The", ["The", "A", "This"][i % 3], 1) + f" Item {i}.")
    model, fast = tiny_llama(texts, d_model=32)
    with torch.no_grad():  # a visible final-norm weight, so tests can tell whether it was applied
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, 32))
    model.save_pretrained(lm)
    fast.save_pretrained(lm)
    sae = SparseAutoencoder.initialized(SaeConfig(d_in=32, d_sae=64, k=4), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most latents fire sometimes
    sae.info = {"hook": TINY_HOOK, "model": "tiny-llama", "model_arg": str(lm), "dataset": str(data),
                "text_column": "text", "context_size": 32, "heldout_fraction": 0.1, "seed": 0}
    sae.save(sae_dir)
    return {"data": data, "model": lm, "sae": sae_dir}


def build_store(root: Path, tokens: int = 1500) -> dict[str, Path]:
    from saekit.features import FeatureConfig, analyze

    world = build_world(root)
    store = root / "store"
    if not (store / "manifest.json").is_file():
        analyze(world["sae"], store, FeatureConfig(tokens=tokens, top_n=6, sample_size=12, quantile_groups=3,
                                                   batch_contexts=4, device="cpu"), progress=False)
    return {**world, "store": store}


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


BROWSER_SCRIPT = str(Path(__file__).resolve().parents[1] / "apps" / "browse.py")


def ok(at):
    """An AppTest run that showed no exception and no error element (returned for chaining)."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def random_transcoders(n_layers: int, d: int, d_sae: int = 64, k: int = 6, skip_layers=(1,),
                       arch: str = "topk") -> dict[int, SparseAutoencoder]:
    """Random transcoders for every layer (seed = layer; b_enc 0.3 so latents fire; skip paths on skip_layers)."""
    tcs = {}
    for L in range(n_layers):
        t = SparseAutoencoder.initialized(SaeConfig(d_in=d, d_sae=d_sae, k=k, transcoder=True, skip=L in skip_layers,
                                                    architecture=arch), seed=L, init="independent")
        with torch.no_grad():
            t.b_enc.fill_(0.3)
            if t.W_skip is not None:
                t.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(L))
            if arch == "batchtopk":
                t.threshold.fill_(0.5)
        t.info = {"hook": f"blocks.{L}.mlp.hook_in", "hook_out": f"blocks.{L}.hook_mlp_out"}
        tcs[L] = t
    return tcs


# ----------------------------------------------------------------------------- small HTTP test servers

class JsonHandler:
    """Mixin for a BaseHTTPRequestHandler that answers JSON and logs nothing (the fake OpenAI-style servers)."""

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
