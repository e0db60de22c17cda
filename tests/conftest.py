"""Shared fixtures: the real default model (once per session), the default corpus's contexts, a tiny
synthetic activation set with a known sparse structure, a small saved SAE directory and the tiny feature world.
Helpers that tests import live in helpers.py (the tests directory is on `pythonpath`).

Integration tests (the real SmolLM2-135M at tiny budgets) run by default — CI must run them. Any test
that uses the `model`, `tokenizer` or `default_contexts` fixture is marked `integration` automatically,
so `pytest -m "not integration"` gives a quick unit-only pass when wanted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from helpers import SyntheticActs, build_store, make_synthetic, small_sae

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

@pytest.fixture(scope="session")
def synthetic() -> SyntheticActs:
    """8192 tokens of width 32 built from 4 of 96 dictionary atoms each (a TopK SAE can learn this)."""
    return make_synthetic()


# ----------------------------------------------------------------------------- a saved SAE

@pytest.fixture
def sae_dir(tmp_path) -> Path:
    """A freshly saved small TopK SAE directory (safe to corrupt: one per test)."""
    return small_sae().save(tmp_path / "sae")


# ----------------------------------------------------------------------------- the tiny world

@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> dict[str, Path]:
    """{data, model, sae, store} of the tiny world (helpers.build_store), built once per session."""
    return build_store(tmp_path_factory.getbasetemp() / "feature_world")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test, printed so that a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)
