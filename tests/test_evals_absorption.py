"""Absorption on constructed word activations with a planted answer: letter 'a' has token-specific latents that
fire instead of its main latent on a few words (full absorption there); the other letters have none."""

from __future__ import annotations

import pytest
import torch

from saekit.config import SaeConfig
from saekit.evals.absorption import absorption_scores, vocabulary_words, word_absorption
from saekit.evals.documents import split_examples
from saekit.sae import SparseAutoencoder

D, LETTERS, ABSORBED = 32, 3, 8


def planted(n_per_letter: int = 60, seed: int = 0):
    """x = 2·dir_L + noise; ABSORBED words of letter 0 add 2·u_w, their own direction. SAE: latent L reads dir_L
    (and −1.5·u_w, so it is off on the absorbed words); latent 3 + w reads u_w and writes (u_w + dir_0)/√2."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]
    dirs, u = basis[:LETTERS], basis[LETTERS: LETTERS + ABSORBED]
    letters = torch.arange(LETTERS).repeat_interleave(n_per_letter)
    acts = 2 * dirs[letters] + 0.1 * torch.randn(len(letters), D, generator=gen)
    absorbed = torch.arange(ABSORBED) * 7  # words 0, 7, 14, … of letter 0
    acts[absorbed] += 2 * u
    d_sae = LETTERS + ABSORBED + 8
    sae = SparseAutoencoder(SaeConfig(d_in=D, d_sae=d_sae, k=2))
    with torch.no_grad():
        rand = torch.randn(D, 8, generator=gen)
        enc = torch.cat([dirs.t(), u.t(), 0.05 * rand / rand.norm(dim=0)], 1)
        enc[:, 0] -= 1.5 * u.sum(0)  # the main 'a' latent is pushed off where a specific latent takes over
        sae.W_enc.copy_(enc)
        sae.b_enc.zero_()
        dec = torch.cat([dirs, (u + dirs[0]) / 2 ** 0.5, rand.t() / rand.norm(dim=0)[:, None]])
        sae.W_dec.copy_(dec)
        sae.b_dec.zero_()
    return acts, letters, sae, absorbed


def test_a_planted_absorbing_latent_is_detected():
    acts, letters, sae, absorbed = planted()
    train, test = split_examples(letters, 0.3, 0)
    out = absorption_scores(acts, letters, sae, train, test, ["a", "b", "c"])
    a, b = out["letters"]["a"], out["letters"]["b"]
    assert out["probe_accuracy"] > 0.95
    assert a["main_latents"] == [0] and b["main_latents"] == [1]
    in_test = int(torch.isin(test, absorbed).sum())
    assert in_test >= 1
    assert a["absorption_rate"] == pytest.approx(in_test / a["true_positives"])
    assert a["mean_absorption_fraction"] == pytest.approx(in_test / a["true_positives"])
    assert b["absorption_rate"] == 0 and out["letters"]["c"]["mean_absorption_fraction"] == 0
    assert out["absorption_rate"] == pytest.approx(a["absorption_rate"] / 3)
    lo, hi = out["intervals"]["absorption_rate"]
    assert lo <= out["absorption_rate"] <= hi


def test_word_absorption_follows_saebench_definitions():
    cos = torch.tensor([0.9, 0.5, 0.05, 0.3])
    # main latent 0 carries everything: no absorption
    assert word_absorption(1.0, torch.tensor([1.2, 0, 0, 0]), cos, [0]) == (0.0, False)
    # main off, latent 1 projects 0.5 of P = 1 → fraction 1, full absorption
    assert word_absorption(1.0, torch.tensor([0, 1.0, 0, 0]), cos, [0]) == (1.0, True)
    # partial: main projects 0.45, latent 1 0.5 → min(0.5, 0.55) / (0.5 + 0.45)
    fr, full = word_absorption(1.0, torch.tensor([0.5, 1.0, 0, 0]), cos, [0])
    assert fr == pytest.approx(0.5 / 0.95) and not full
    # an aligned absorber below 0.4 P is not absorption; latent 2's cos is under 0.1 so it never counts
    assert word_absorption(1.0, torch.tensor([0, 0.6, 5.0, 0]), cos, [0])[0] == 0.0


def test_vocabulary_words_are_single_lower_case_tokens(tokenizer):
    words = vocabulary_words(tokenizer, 200)
    assert len(words) == 200
    for tid, w in words[:50]:
        assert tokenizer.decode([tid]) == " " + w and w.isalpha() and w.islower()
