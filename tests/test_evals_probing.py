"""Sparse probing and TPP on constructed documents with a known answer: a planted class direction is found at
k = 1, and ablating the latents of one class hurts that class's probe (positive TPP) — or, when the latents
write another class's direction, the other probe (negative TPP)."""

from __future__ import annotations

import pytest
import torch

from saekit.config import SaeConfig
from saekit.errors import DataError
from saekit.evals.documents import DocumentActivations, labelled_documents, split_examples
from saekit.evals.probing import sparse_probing
from saekit.evals.tpp import targeted_probe_perturbation
from saekit.sae import SparseAutoencoder

C, D, T = 3, 16, 6


def planted_docs(n: int = 240, seed: int = 0) -> tuple[DocumentActivations, torch.Tensor]:
    """Documents of C classes; every token of a class-c document carries 2·dir_c plus noise. (docs, dirs)"""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=gen))[0][:C]  # orthonormal class directions
    labels = torch.arange(n) % C
    acts = 1.0 * torch.randn(n, T, D, generator=gen) + 2 * dirs[labels][:, None, :]
    mask = torch.ones(n, T, dtype=torch.bool)
    mask[::4, -2:] = False  # some shorter documents
    acts = acts * mask[..., None]
    return DocumentActivations(acts.half(), mask, labels, ["a", "b", "c"], "h", "m", 0.0), dirs


def planted_sae(dirs: torch.Tensor, decode_shift: int = 0) -> SparseAutoencoder:
    """Latent c reads class c's direction; it writes class (c + decode_shift)'s. The other latents are random."""
    gen = torch.Generator().manual_seed(1)
    sae = SparseAutoencoder(SaeConfig(d_in=D, d_sae=24, k=3))
    with torch.no_grad():
        rand = torch.randn(D, 24, generator=gen)
        sae.W_enc.copy_(0.2 * rand / rand.norm(dim=0))
        sae.W_enc[:, :C] = dirs.t()  # reads exactly the class component, so ablation removes it
        sae.b_enc.zero_()
        sae.W_dec.copy_(sae.W_enc.t() / sae.W_enc.t().norm(dim=1, keepdim=True))
        sae.W_dec[:C] = dirs.roll(-decode_shift, 0)
        sae.b_dec.zero_()
    return sae


def test_a_planted_class_direction_is_found_at_k_1():
    docs, dirs = planted_docs()
    train, test = split_examples(docs.labels, 0.25, 0)
    out = sparse_probing(docs, planted_sae(dirs), train, test, [1, 2, 5])
    assert out["sae_k1"] > 0.97 and out["raw_all"] > 0.97
    lo, hi = out["intervals"]["sae_k1"]
    assert lo <= out["sae_k1"] <= hi and out["test_documents"] == len(test)
    # the class direction is spread over all 16 dimensions: one raw dimension alone is a weaker probe
    assert out["raw_k1"] < out["sae_k1"]
    assert {"sae_last_token_k1", "raw_k5", "sae_k5"} <= set(out)


def test_tpp_is_positive_when_a_class_latents_write_its_direction_and_negative_when_they_write_another():
    docs, dirs = planted_docs()
    train, test = split_examples(docs.labels, 0.25, 0)
    good = targeted_probe_perturbation(docs, planted_sae(dirs), train, test, n_latents=1)
    assert good["tpp"] > 0.3 and good["targeted_drop"] > 0.3 and abs(good["untargeted_drop"]) < 0.1
    assert good["intervals"]["tpp"][0] > 0
    assert good["ablated_latents"] == {"a": [0], "b": [1], "c": [2]}
    crossed = targeted_probe_perturbation(docs, planted_sae(dirs, decode_shift=1), train, test, n_latents=1)
    assert crossed["tpp"] < 0 and crossed["intervals"]["tpp"][1] < 0


def test_labelled_documents_from_folders_and_the_missing_label_column(tmp_path):
    for label in ("x", "y"):
        (tmp_path / "folders" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folders" / label / f"{i}.txt").write_text(f"document {i} of {label}")
    got = labelled_documents(str(tmp_path / "folders"))
    assert got.names == ["x", "y"] and got.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "d.jsonl").write_text('{"text": "a b", "topic": "x"}\n{"text": "c d", "topic": "y"}\n')
    with pytest.raises(DataError, match="no column 'label'.*--label-column"):
        labelled_documents(str(tmp_path / "d.jsonl"))
    assert labelled_documents(str(tmp_path / "d.jsonl"), label_column="topic").names == ["x", "y"]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.txt").write_text("one")
    (flat / "b.txt").write_text("two")
    with pytest.raises(DataError, match="subfolder"):
        labelled_documents(str(flat))
