"""Shared fixtures: the real default model (once per session), the default corpus's contexts, a tiny
synthetic activation set with a known sparse structure, and a small saved SAE directory.

Integration tests (the real SmolLM2-135M at tiny budgets) run by default — CI must run them. Any test
that uses the `model`, `tokenizer` or `default_contexts` fixture is marked `integration` automatically,
so `pytest -m "not integration"` gives a quick unit-only pass when wanted.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from saekit.config import SaeConfig
from saekit.sae import SparseAutoencoder

HOOK = "blocks.15.hook_resid_pre"
INTEGRATION_FIXTURES = {"model", "tokenizer", "default_contexts"}


def _threads() -> int:
    """Torch threads for the test process. With more runnable processes than cores, OpenMP's spinning
    threads fight each other: a forward of the default model measured 3–6× faster on 1 thread than on 2
    while this 2-core machine was oversubscribed. Alone (CI), use every core. SAEKIT_TEST_THREADS overrides."""
    if env := os.environ.get("SAEKIT_TEST_THREADS"):
        return max(1, int(env))
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy > 0.75 * cores else cores


torch.set_num_threads(_threads())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="session")
def model():
    """The default model (SmolLM2-135M-Instruct) as a TransformerBridge, loaded once per session."""
    from saekit.lm import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def default_contexts(model):
    """(train, heldout) Contexts of the default corpus at context size 128, seed 0."""
    from saekit.data import load_contexts

    return load_contexts(model.tokenizer, "default", 128, 0.05, 0)


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


@pytest.fixture(scope="session")
def synthetic() -> SyntheticActs:
    """8192 tokens of width 32 built from 4 of 96 dictionary atoms each (a TopK SAE can learn this)."""
    return make_synthetic()


# ----------------------------------------------------------------------------- a saved SAE

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


@pytest.fixture
def sae_dir(tmp_path) -> Path:
    """A freshly saved small TopK SAE directory (safe to corrupt: one per test)."""
    return small_sae().save(tmp_path / "sae")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test, printed so that a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)
