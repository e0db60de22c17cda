"""Shared fixtures: the real default model (once per session), the default corpus's contexts, a tiny
synthetic activation set with a known sparse structure, a small saved SAE directory and the tiny feature world.
Helpers that tests import live in helpers.py (the tests directory is on `pythonpath`).

Integration tests (the real SmolLM2-135M at tiny budgets) run by default — CI must run them. Any test
that uses the `model`, `tokenizer` or `default_contexts` fixture is marked `integration` automatically,
so `pytest -m "not integration"` gives a quick unit-only pass when wanted.

Seeds are fixed: before each test, torch, numpy and `random` are seeded from the run's base seed and the test's
id (each test its own stream, the same every run), and the `gen` fixture is a generator from that seed. The base
is SAEKIT_TEST_SEED (default 0); SAEKIT_TEST_SEED=random fuzzes by drawing a base, which the run prints at its
end: SAEKIT_TEST_SEED=<that number> replays the run.
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SyntheticActs, build_store, make_synthetic, small_sae

INTEGRATION_FIXTURES = {"model", "tokenizer", "default_contexts"}
SEED_ENV = "SAEKIT_TEST_SEED"
FUZZ = os.environ.get(SEED_ENV) == "random"
BASE_SEED = random.SystemRandom().randrange(2**31) if FUZZ else int(os.environ.get(SEED_ENV, "0"))


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


# ----------------------------------------------------------------------------- Streamlit's AppTest

@pytest.fixture(scope="module")
def app_test_guard():
    """For a module of AppTest tests. AppTest runs the app in this process as `__main__` and leaves it there,
    so spawned workers of later tests (which re-import the parent's `__main__` by path) would run the app;
    its `st.cache_*` keep what the app loaded (a model) for the whole session. Undo both after the module."""
    main = sys.modules["__main__"]
    yield
    import streamlit as st

    sys.modules["__main__"] = main
    st.cache_data.clear()
    st.cache_resource.clear()


# ----------------------------------------------------------------------------- seeds

def pytest_terminal_summary(terminalreporter) -> None:
    if FUZZ:
        terminalreporter.write_line(f"random seeds: replay with {SEED_ENV}={BASE_SEED}")


@pytest.fixture(autouse=True)
def rng_seed(request) -> int:
    """The test's seed, already given to torch, numpy and `random` (see the module docstring)."""
    seed = zlib.crc32(f"{BASE_SEED}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def gen(rng_seed) -> torch.Generator:
    """A generator seeded with the test's seed."""
    return torch.Generator().manual_seed(rng_seed)
