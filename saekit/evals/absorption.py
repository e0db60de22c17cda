"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), scored as SAEBench scores it.

Task: single-token words from the tokenizer's vocabulary in an in-context first-letter prompt
("{word} has the first letter: {L}" lines, then "{word} has the first letter:"); the activation is read at the
word's token. A logistic probe for the first letter is trained on those activations (train words). Each letter's
main latents follow SAEBench's feature splits: latents ranked by the weights of an L1-penalised one-vs-rest probe
on the SAE's latents (train words), then k-sparse probes on the top k (k = 1 … 10), k kept while the probe's F1 on
the held-out words rises by more than `F1_JUMP`. On each held-out word whose letter the probe gets right (a true
positive), with p̂ the letter's unit probe direction, cos_j = cos(W_dec[j], p̂), proj_j = f_j · cos_j and
P = x · p̂ (SAEBench's `FeatureAbsorptionCalculator`):
- absorption fraction: 0 if Σ_main proj ≥ P or the top-3 other latents with cos ≥ 0.1 and proj > 0 project less
  than 0.4 P; 1 if Σ_main proj ≤ 0; else min(Σ top-3, P − Σ_main) / (that + Σ_main).
- full absorption: every main latent is off, the top-projecting latent has cos ≥ 0.025, P ≥ 0, and that latent
  projects at least 0.4 P.
Per letter: mean absorption fraction = Σ fraction / true positives, absorption rate = full absorptions / true
positives; the scores are their means over the letters whose probe F1 on the held-out words exceeds
`MIN_PROBE_F1` (SAEBench's filter), with a bootstrap interval over held-out words."""

from __future__ import annotations

import math
import string
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..evaluate import DRAWS, LEVEL, bootstrap
from .documents import split_examples

F1_JUMP = 0.03
MAX_SPLIT = 10
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
MIN_PROBE_F1 = 0.6
"""Letters whose probe F1 on the held-out words is at most this are reported but left out of the means (SAEBench)."""
L1_DECAY = 0.01
"""L1 strength of the probe that ranks a letter's candidate latents (SAEBench's k-sparse probing)."""
MIN_WORDS = 10
"""Letters with fewer single-token words than this are left out (their probe and F1 would be noise)."""


def vocabulary_words(tokenizer, n: int, seed: int = 0) -> list[tuple[int, str]]:
    """Up to n (token id, word) of single-token words: a leading space, then 2+ ASCII letters, lower case."""
    words = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha() and text[1:].islower():
            words.append((i, text[1:]))
    if not words:
        raise DataError("the tokenizer has no single-token lower-case words; absorption needs a word vocabulary.")
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    return [words[i] for i in order[:n]]


def prompts(tokenizer, words: list[tuple[int, str]], examples: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(token ids of each word's in-context prompt, the word token's position in it)."""
    from ..tokens import bos_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    suffix, newline = ids(" has the first letter:"), ids("\n")
    answer = {c: ids(" " + c.upper()) for c in string.ascii_lowercase}
    gen = torch.Generator().manual_seed(seed + 2)
    out, pos = [], []
    for i, (tid, _) in enumerate(words):
        seq = [bos_id(tokenizer)]
        for j in [j for j in torch.randperm(len(words), generator=gen)[: examples + 1].tolist() if j != i][:examples]:
            eid, ew = words[j]
            seq += [eid] + suffix + answer[ew[0]] + newline
        pos.append(len(seq))
        out.append(seq + [tid] + suffix)
    return out, pos


@torch.no_grad()
def word_activations(model, hook: str, seqs: list[list[int]], pos: list[int], batch: int = 32,
                     progress: bool = True) -> torch.Tensor:
    """[n, d] the hook's activation at each prompt's word token (one pass, right-padded: causal)."""
    from ..lm import check_hooks, stop_layer

    check_hooks(model, [hook])
    device = next(model.parameters()).device
    stop = stop_layer(model, [hook])
    out = []
    for lo in tqdm(range(0, len(seqs), batch), desc="absorption prompts", disable=not progress, dynamic_ncols=True):
        part = seqs[lo: lo + batch]
        width = max(len(s) for s in part)
        toks = torch.tensor([s + [s[0]] * (width - len(s)) for s in part], device=device)
        store = {}
        model.run_with_hooks(toks, stop_at_layer=stop, fwd_hooks=[(hook, lambda a, hook, store=store: store.setdefault("a", a.detach()))])
        out.append(store["a"][torch.arange(len(part)), torch.tensor(pos[lo: lo + batch])].float().cpu())
    return torch.cat(out)


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)


def one_vs_rest_probe(x: torch.Tensor, letters: torch.Tensor, classes: list[int], batch: int, weight_decay: float,
                      l1: float = 0.0, epochs: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [classes, d], b [classes]) of SAEBench's linear multi-probe: one-vs-rest BCE with positive weights
    (+ l1 · mean over classes of Σ|w|), Adam from lr 1e-2 decayed exponentially to 1e-5 over `epochs` shuffled
    passes. SAEBench trains its letter probe with it (batches of 64, L2 1e-4) and ranks latents with it (on the
    latents, batches of 4,096, L2 1e-6, L1 0.01); absorption moves with the probe (benchmarks/RESULTS.md, issue
    18: a better-fit sklearn probe gives the demo SAE 0.52 where this one gives 0.75), so saekit uses the same."""
    n, d = x.shape
    y = (letters[:, None] == torch.tensor(classes)[None]).float()
    gen = torch.Generator().manual_seed(seed)
    # Zero init, where SAEBench keeps nn.Linear's ±1/√d: Adam moves a weight ~0.08 in 50 epochs, so at 4,608
    # latents (±0.015) the init hardly matters, but at small widths it outranks what the data says.
    W = torch.zeros(len(classes), d, requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=(n - y.sum(0)) / y.sum(0).clamp_min(1))
    opt = torch.optim.Adam([W, b], lr=1e-2, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(1e-5 / 1e-2) / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(n, generator=gen).split(batch):
                opt.zero_grad()
                loss = bce(x[rows] @ W.t() + b, y[rows])
                if l1:
                    loss = loss + l1 * W.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return W.detach(), b.detach()


def main_latents(weights: torch.Tensor, lat_train: torch.Tensor, positive_train: torch.Tensor,
                 lat_test: torch.Tensor, positive_test: torch.Tensor) -> list[int]:
    """A letter's main latents (SAEBench's feature split): its top latents by ranking weight, k grown while the
    k-sparse probe's F1 on the held-out words rises by more than F1_JUMP."""
    from sklearn.linear_model import LogisticRegression

    top = weights.topk(min(MAX_SPLIT, len(weights))).indices
    best, kept = -np.inf, top[:1]
    for k in range(1, len(top) + 1):
        cols = top[:k]
        probe = LogisticRegression(max_iter=500, class_weight="balanced")
        probe.fit(lat_train[:, cols].double().numpy(), positive_train.numpy())
        score = f1(probe.decision_function(lat_test[:, cols].double().numpy()) > 0, positive_test.numpy())
        if score <= best + F1_JUMP:
            break
        best, kept = score, cols
    return kept.tolist()


def word_absorption(P: float, f: torch.Tensor, cos: torch.Tensor, main: list[int]) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one word: P = x · p̂ (its activation on the unit probe
    direction), its latents f [d_sae], and cos [d_sae] of the decoder rows with p̂."""
    proj = f * cos
    main_proj = float(proj[main].sum())
    others = torch.ones_like(proj, dtype=torch.bool)
    others[main] = False
    others &= (cos >= FRACTION_COS) & (proj > 0)
    top = proj[others].topk(min(MAX_ABSORBERS, int(others.sum()))).values.sum().item() if others.any() else 0.0
    if main_proj >= P or top / P < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(top, P - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    best = int(proj.argmax())
    full = (bool((f[main].abs() < 1e-8).all()) and float(cos[best]) >= FULL_COS and P >= 0
            and float(proj[best]) / P >= PROJECTION_SHARE)
    return fraction, full


@dataclass
class LetterProbe:
    """The first-letter probe on the hook's activations: it does not depend on the SAE, so it is fit once per task."""

    classes: list[int]
    directions: torch.Tensor  # [letters, d] unit probe directions
    predicted: torch.Tensor  # [test words] the probe's letter for each held-out word


def letter_probe(acts: torch.Tensor, letters: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                 seed: int = 0) -> LetterProbe:
    classes = sorted(set(letters[train].tolist()))
    W, b = one_vs_rest_probe(acts[train], letters[train], classes, batch=64, weight_decay=1e-4, seed=seed)
    predicted = torch.tensor(classes)[(acts[test] @ W.t() + b).argmax(-1)]
    return LetterProbe(classes, W / W.norm(dim=1, keepdim=True).clamp_min(1e-12), predicted)


def absorption_scores(acts: torch.Tensor, letters: torch.Tensor, sae, train: torch.Tensor, test: torch.Tensor,
                      names: list[str], seed: int = 0, probe: LetterProbe | None = None) -> dict[str, Any]:
    """eval.json's "absorption" part from word activations [n, d] and first-letter ids [n] (`probe`: the letter
    probe of these activations, when already fit)."""
    probe = probe or letter_probe(acts, letters, train, test)
    classes, directions, predicted = probe.classes, probe.directions, probe.predicted
    with torch.no_grad():
        lat = torch.cat([sae.dense_codes(acts[i: i + 1024]).float() for i in range(0, len(acts), 1024)])
    lat_train, lat_test, train_letters, truth = lat[train], lat[test], letters[train], letters[test]
    ranking = one_vs_rest_probe(lat_train, train_letters, classes, batch=4096, weight_decay=1e-6, l1=L1_DECAY,
                                seed=seed)[0]
    W_dec = sae.W_dec.detach().float().cpu()
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_test = len(test)
    frac = torch.zeros(n_test, len(classes), dtype=torch.float64)
    full, tp = torch.zeros_like(frac), torch.zeros_like(frac)
    splits, probe_f1 = {}, {}
    for j, c in enumerate(classes):
        main = main_latents(ranking[j], lat_train, train_letters == c, lat_test, truth == c)
        splits[names[c]] = main
        probe_f1[names[c]] = f1((predicted == c).numpy(), (truth == c).numpy())
        cos = W_dec @ directions[j]
        for r, i in enumerate(test.tolist()):
            if letters[i] != c or predicted[r] != c:
                continue
            fr, fu = word_absorption(float(acts[i] @ directions[j]), lat[i], cos, main)
            frac[r, j], full[r, j], tp[r, j] = fr, float(fu), 1.0

    scored = torch.tensor([probe_f1[names[c]] > MIN_PROBE_F1 for c in classes])

    def statistic(s):  # a letter with no true positive in a resample is left out of that resample's mean
        return {"mean_absorption_fraction": (s["frac"] / s["tp"])[..., scored].nanmean(-1),
                "absorption_rate": (s["full"] / s["tp"])[..., scored].nanmean(-1)}

    per_unit = {"frac": frac, "full": full, "tp": tp}
    point = statistic({k: v.sum(0) for k, v in per_unit.items()})
    ci = bootstrap(per_unit, statistic, seed=seed)
    per_letter = {names[c]: {"true_positives": int(tp[:, j].sum()), "mean_absorption_fraction":
                             (frac[:, j].sum() / tp[:, j].sum()).item() if tp[:, j].sum() else None,
                             "absorption_rate": (full[:, j].sum() / tp[:, j].sum()).item() if tp[:, j].sum() else None,
                             "main_latents": splits[names[c]], "probe_f1": probe_f1[names[c]],
                             "scored": bool(scored[j])} for j, c in enumerate(classes)}
    return {**{k: v.item() for k, v in point.items()}, "intervals": {k: list(v) for k, v in ci.items()},
            "probe_accuracy": (predicted == letters[test]).double().mean().item(), "letters": per_letter,
            "mean_split_latents": float(np.mean([len(v) for v in splits.values()])),
            "letters_scored": int(scored.sum()), "min_probe_f1": MIN_PROBE_F1,
            "train_words": len(train), "test_words": n_test,
            "interval_method": f"{LEVEL:.0%} percentile bootstrap over {n_test} held-out words ({DRAWS} resamples)"}


@dataclass
class WordActivations:
    """The first-letter task's inputs, made once per model and hook and shared by every SAE scored on them."""

    acts: torch.Tensor  # [n, d] at each word's token
    letters: torch.Tensor  # [n] 0 = a … 25 = z
    train: torch.Tensor
    test: torch.Tensor
    words: int
    examples: int
    seconds: float
    probe: LetterProbe | None = None


def word_task(model, hook: str, n_words: int = 1500, examples: int = 4, test_fraction: float = 0.2, seed: int = 0,
              progress: bool = True) -> WordActivations:
    """Words from the model's tokenizer (letters with at least MIN_WORDS of them), their prompts, one pass."""
    start = time.perf_counter()
    words = vocabulary_words(model.tokenizer, n_words, seed)
    counts = {c: sum(w[0] == c for _, w in words) for c in string.ascii_lowercase}
    kept = [(t, w) for t, w in words if counts[w[0]] >= MIN_WORDS]
    seqs, pos = prompts(model.tokenizer, kept, examples, seed)
    acts = word_activations(model, hook, seqs, pos, progress=progress)
    letters = torch.tensor([string.ascii_lowercase.index(w[0]) for _, w in kept])
    train, test = split_examples(letters, test_fraction, seed)
    return WordActivations(acts, letters, train, test, len(kept), examples, time.perf_counter() - start)


def absorption(task: WordActivations, sae, seed: int = 0) -> dict[str, Any]:
    """eval.json's "absorption" part for `sae` on a prepared first-letter task."""
    start = time.perf_counter()
    if task.probe is None:
        task.probe = letter_probe(task.acts, task.letters, task.train, task.test)
    out = absorption_scores(task.acts, task.letters, sae, task.train, task.test, list(string.ascii_lowercase), seed,
                            task.probe)
    return out | {"words": task.words, "examples": task.examples, "forward_seconds": task.seconds,
                  "prompt": "{word} has the first letter: {L} lines (examples), then {word} has the first letter:",
                  "seconds": time.perf_counter() - start}
