"""The feature store on disk: its format, `write_store`, and `FeatureStore`, the read-only view the app uses.

Store directory (the app reads the big arrays lazily, one latent's rows at a time):
  manifest.json            SAE hash, kind of dictionary (sae | transcoder | skip-transcoder), hook (a transcoder's
                           input) and hook_out, model, dataset, tokens, config, saekit version, map method
  stats.safetensors        small per-latent arrays the overview needs at once
  features.safetensors     per-latent rows: histogram, examples + windows, sample, logits, profile, neighbours
  contexts.safetensors     token ids of every analysed context (example windows index into it)
  vocab.safetensors        each token's bytes, so pieces display correctly (multi-byte characters merged)
  labels.sqlite            labels and notes written by the app (kept when the store is rebuilt)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ..errors import FileFormatError
from ..files import read_json, write_json, write_tensors
from ..tokens import Vocab, display_token
from .config import hist_edges, hist_quantiles

STORE_KIND = "saekit-feature-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS, FEATURES, CONTEXTS, VOCAB = "stats.safetensors", "features.safetensors", "contexts.safetensors", "vocab.safetensors"
LABELS = "labels.sqlite"  # the user's labels and notes (apps/labels.py): carried over when the store is rebuilt
REBUILD = "rebuild the store with `saekit analyze SAE_DIR --out STORE` (labels.sqlite in it is kept)"
# The tensors each file must hold; those marked per latent have d_sae rows. Optional groups: all or none.
PER_LATENT = {
    STATS: ("count", "act_sum", "act_max", "map_xy", "top_tokens"),
    FEATURES: ("hist", *(f"{p}_{k}" for p in ("top", "sample") for k in ("value", "ctx", "pos", "acts")),
               "profile_token", "profile_fires", "profile_token_count", "profile_mean", "neighbour_id", "neighbour_cos"),
}
OPTIONAL_PER_LATENT = {FEATURES: ("logit_top_token", "logit_top_value", "logit_bottom_token", "logit_bottom_value")}
REQUIRED = {CONTEXTS: ("tokens",), VOCAB: ("bytes", "offsets", "special")}
READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)  # what safetensors raises for a bad file


def write_store(out: str | Path, manifest: dict[str, Any], stats: dict[str, torch.Tensor],
                feats: dict[str, torch.Tensor], contexts: torch.Tensor, vocab: Vocab, started: float | None = None) -> Path:
    """Write every array (atomically), then the manifest last; labels.sqlite in `out` is left alone.
    With `started` (a perf_counter time), the manifest's timings get the write time and the total."""
    out = Path(out)
    t0 = time.perf_counter()
    write_tensors(out / STATS, stats)
    write_tensors(out / FEATURES, feats)
    write_tensors(out / CONTEXTS, {"tokens": contexts.to(torch.int32)})
    write_tensors(out / VOCAB, vocab.tensors())
    if started is not None:
        manifest["timings"] |= {"write_seconds": time.perf_counter() - t0, "total_seconds": time.perf_counter() - started}
    write_json(out / MANIFEST, manifest)
    return out


@dataclass
class Example:
    """One activating context: the window's tokens, display pieces and the latent's activation on each."""

    value: float
    context: int
    position: int
    tokens: list[int]
    pieces: list[str]
    acts: list[float]
    focus: int  # index in the window of the token the example was chosen for


@dataclass
class QuantileGroup:
    q_lo: float
    q_hi: float
    lo: float
    hi: float
    examples: list[Example]


@dataclass
class Feature:
    id: int
    count: int
    tokens: int
    density: float
    mean: float
    max: float
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    top: list[Example]
    groups: list[QuantileGroup]
    logits_top: list[tuple[int, str, float]]
    logits_bottom: list[tuple[int, str, float]]
    profile: list[dict[str, Any]]
    neighbours: list[tuple[int, float]]


@dataclass
class SearchHit:
    """One latent a token search found. The profile fields (score, fires, occurrences) are None when only its
    top logit tokens matched; `logit` is None unless they matched."""

    feature: int
    whole_word: bool  # a token equals a query word (else it only contains one: substring search)
    source: list[str]  # where the match is: "token profile", "logit tokens"
    tokens: list[str]  # the matched tokens, the one that ranks the latent first
    score: float | None  # that profile token's score: harmonic mean of rate and share
    fires: int | None  # the latent's firings on it
    occurrences: int | None  # its occurrences in the analysed tokens
    logit: float | None  # the best matched token's logit effect, if a top logit token matched
    max_act: float
    density: float


@dataclass
class TokenSearch:
    hits: list[SearchHit]
    words: list[str]  # the query's words, case-folded
    vocab: list[tuple[str, int, bool]]  # tokens holding a query word: (string, occurrences, whole word), whole first
    below_min: int  # latents left out because every profile token they matched occurs fewer than min_count times


class FeatureStore:
    """Read-only view of a store directory. Small arrays load once; a feature's rows load on demand
    (safetensors slices: only that latent's bytes are read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        man_path = self.path / MANIFEST
        if not man_path.is_file():
            raise FileFormatError(f"{self.path} is not a feature store (no {MANIFEST}); build one with "
                                  "`saekit analyze SAE_DIR --out STORE`.")
        self.manifest = read_json(man_path)
        if self.manifest.get("kind") != STORE_KIND:
            raise FileFormatError(f"{self.path}/{MANIFEST} is not a saekit feature store manifest.")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise FileFormatError(f"{self.path} was written by a newer saekit (format {self.manifest['format_version']}); "
                                  "upgrade saekit.")
        field = "d_sae"
        try:
            self.d_sae = int(self.manifest[field])
            field = "tokens"
            self.tokens = int(self.manifest[field])
            for key in ("window_before", "window_after", "quantile_groups"):
                field = f"config.{key}"
                int(self.manifest["config"][key])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{man_path} lacks or garbles {field!r} (it needs whole numbers d_sae, tokens and "
                                  f"config.window_before, window_after, quantile_groups); {REBUILD}.") from e
        if self.d_sae < 1:
            raise FileFormatError(f"{man_path} says the store has {self.d_sae} latents; {REBUILD}.")
        self._local = threading.local()  # safetensors handles per thread: app sessions are threads
        self.check()

    def check(self) -> None:
        """Cheap integrity check of every tensor file the store reads (headers only, no tensor data): each
        exists, its safetensors header parses and its size matches the header (safe_open checks that the data
        covers the file exactly, so a truncated or padded file fails), and it holds the tensors the reader
        needs, per-latent ones with d_sae rows. A FileFormatError names the file and says to rebuild."""
        for name in (STATS, FEATURES, CONTEXTS, VOCAB):
            f = self._open(name)
            path = self.path / name
            keys = set(f.keys())
            need = [*PER_LATENT.get(name, ()), *REQUIRED.get(name, ())]
            optional = OPTIONAL_PER_LATENT.get(name, ())
            if any(k in keys for k in optional):
                need += optional
            if missing := [k for k in need if k not in keys]:
                raise FileFormatError(f"{path} lacks the tensors {missing} (it holds {sorted(keys)}); it is from "
                                      f"another saekit version or damaged: {REBUILD}.")
            for k in need:
                shape = self._shape(f, name, k)
                if k in PER_LATENT.get(name, ()) or k in optional:
                    if not shape or shape[0] != self.d_sae:
                        raise FileFormatError(f"{path}: tensor {k!r} has shape {shape}, but the manifest says "
                                              f"{self.d_sae} latents, one row each; {REBUILD}.")
        if len(self._shape(self._open(CONTEXTS), CONTEXTS, "tokens")) != 2:
            raise FileFormatError(f"{self.path / CONTEXTS}: 'tokens' is not a [contexts, positions] array; {REBUILD}.")
        v = self._open(VOCAB)
        n_off, n_special = (self._shape(v, VOCAB, k) for k in ("offsets", "special"))
        if len(n_off) != 1 or n_special != [n_off[0] - 1]:
            raise FileFormatError(f"{self.path / VOCAB}: offsets {n_off} and special {n_special} do not describe "
                                  f"one vocabulary; {REBUILD}.")

    def _shape(self, f, name: str, key: str) -> list[int]:
        try:
            return list(f.get_slice(key).get_shape())
        except READ_ERRORS as e:
            raise self._damaged(name, e) from e

    def _damaged(self, name: str, e: Exception) -> FileFormatError:
        return FileFormatError(f"{self.path / name} is damaged or truncated ({type(e).__name__}: {e}); {REBUILD}.")

    def _open(self, name: str):
        from safetensors import safe_open

        handles = self._local.__dict__.setdefault("handles", {})
        if name not in handles:
            path = self.path / name
            if not path.is_file():
                raise FileFormatError(f"{path} is missing; {REBUILD}.")
            try:  # parses the header and checks the data covers the file exactly; reads no tensor data
                handles[name] = safe_open(str(path), framework="pt")
            except READ_ERRORS as e:
                raise self._damaged(name, e) from e
        return handles[name]

    def _all(self, name: str) -> dict[str, torch.Tensor]:
        f = self._open(name)
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except READ_ERRORS as e:  # the file changed under an open handle
            raise self._damaged(name, e) from e

    def _row(self, key: str, i: int) -> torch.Tensor:
        try:
            return self._open(FEATURES).get_slice(key)[i: i + 1][0]
        except READ_ERRORS as e:
            raise self._damaged(FEATURES, e) from e

    @property
    def dictionary(self) -> str:
        """What the latents belong to: "sae", "transcoder" or "skip-transcoder" (stores from before transcoders: "sae")."""
        return str(self.manifest.get("dictionary", "sae"))

    @property
    def is_transcoder(self) -> bool:
        return self.dictionary != "sae"

    @property
    def hooks_text(self) -> str:
        """Where the dictionary reads and writes: "blocks.6.mlp.hook_in → blocks.6.hook_mlp_out" for a transcoder (its
        MLP's input → output), the one hook for an SAE."""
        hook = self.manifest.get("hook", "?")
        return f"{hook} → {self.manifest.get('hook_out', '?')}" if self.is_transcoder else str(hook)

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        s = {k: v.numpy() for k, v in self._all(STATS).items()}
        count = s["count"]
        s["density"] = count / max(self.tokens, 1)
        s["mean"] = np.where(count > 0, s["act_sum"] / np.maximum(count, 1), 0.0)
        return s

    @cached_property
    def vocab(self) -> Vocab:
        v = self._all(VOCAB)
        return Vocab(v["bytes"].numpy(), v["offsets"].numpy(), v["special"].numpy())

    @cached_property
    def feature_keys(self) -> set[str]:
        return set(self._open(FEATURES).keys())

    def column(self, key: str) -> np.ndarray:
        """A whole per-latent array from features.safetensors (e.g. for search)."""
        try:
            return self._open(FEATURES).get_tensor(key).numpy()
        except READ_ERRORS as e:
            raise self._damaged(FEATURES, e) from e

    def top_tokens_text(self, i: int, n: int = 3) -> str:
        ids = self.stats["top_tokens"][i][:n]
        return " · ".join(display_token(self.vocab.token_str(t)) for t in ids if t >= 0)

    def _examples(self, prefix: str, i: int, keep=None) -> list[Example]:
        value, ctx, pos, acts = (self._row(f"{prefix}_{k}", i) for k in ("value", "ctx", "pos", "acts"))
        tokens_slice = self._open(CONTEXTS).get_slice("tokens")
        cfg = self.manifest["config"]
        before, W = cfg["window_before"], cfg["window_before"] + 1 + cfg["window_after"]
        T = tokens_slice.get_shape()[1]
        out = []
        for j in range(len(ctx)):
            c = int(ctx[j])
            if c < 0 or (keep is not None and j not in keep):
                continue
            p = int(pos[j])
            lo, hi = max(0, p - before), min(T, p - before + W)
            try:
                ids = tokens_slice[c: c + 1, lo:hi][0].tolist()
            except (READ_ERRORS + (IndexError,)) as e:  # an example pointing past the contexts stored
                raise self._damaged(CONTEXTS, e) from e
            a = acts[j, lo - (p - before): hi - (p - before)].float().tolist()
            out.append(Example(float(value[j]), c, p, ids, self.vocab.pieces(ids), a, p - lo))
        return out

    def feature(self, i: int, groups: int | None = None, per_group: int = 5) -> Feature:
        """Everything a feature page shows for latent i."""
        if not 0 <= i < self.d_sae:
            raise IndexError(f"feature {i} is out of range (the store has {self.d_sae} latents).")
        s = self.stats
        count = int(s["count"][i])
        hist = self._row("hist", i).numpy()
        groups = groups or int(self.manifest["config"]["quantile_groups"])
        vs = self.vocab
        logits_top = logits_bottom = []
        if "logit_top_token" in self.feature_keys:
            logits_top = [(int(t), vs.token_str(t), float(v)) for t, v in
                          zip(self._row("logit_top_token", i), self._row("logit_top_value", i))]
            logits_bottom = [(int(t), vs.token_str(t), float(v)) for t, v in
                             zip(self._row("logit_bottom_token", i), self._row("logit_bottom_value", i))]
        prof = [{"token": int(t), "string": vs.token_str(t), "fires": int(f), "token_count": int(c),
                 "rate": int(f) / max(int(c), 1), "share": int(f) / max(count, 1), "mean_act": float(m)}
                for t, f, c, m in zip(*(self._row(k, i) for k in ("profile_token", "profile_fires",
                                                                   "profile_token_count", "profile_mean")))
                if int(t) >= 0]
        return Feature(
            id=i, count=count, tokens=self.tokens, density=count / max(self.tokens, 1),
            mean=float(s["mean"][i]), max=float(s["act_max"][i]), hist_edges=hist_edges(), hist_counts=hist,
            top=self._examples("top", i), groups=self._groups(i, hist, groups, per_group),
            logits_top=logits_top, logits_bottom=logits_bottom, profile=prof,
            neighbours=[(int(j), float(c)) for j, c in zip(self._row("neighbour_id", i), self._row("neighbour_cos", i))],
        )

    def _groups(self, i: int, hist: np.ndarray, groups: int, per_group: int) -> list[QuantileGroup]:
        """Bands between activation quantiles (from all firings), filled from the uniform sample."""
        if hist.sum() == 0:
            return []
        qs = np.linspace(0, 1, groups + 1)
        edges = hist_quantiles(hist, qs)
        edges[0], edges[-1] = 0.0, np.inf
        value, ctx = self._row("sample_value", i).numpy(), self._row("sample_ctx", i).numpy()
        valid = ctx >= 0
        out = []
        for g in range(groups - 1, -1, -1):  # highest band first, like the top examples above it
            lo, hi = edges[g], edges[g + 1]
            idx = np.nonzero(valid & (value >= lo) & (value < hi))[0]
            if len(idx) > per_group:  # spread over the band: idx is sorted by value (descending)
                idx = idx[np.linspace(0, len(idx) - 1, per_group).round().astype(int)]
            out.append(QuantileGroup(float(qs[g]), float(qs[g + 1]), float(lo), float(hi),
                                     self._examples("sample", i, keep=set(idx.tolist()))))
        return out

    # ------------------------------------------------------------------------- search

    @cached_property
    def _search_keys(self) -> list[str]:
        """Each token as a query word would spell it: no surrounding whitespace, case-folded (a whitespace
        token keeps itself, so a query of one space finds the space token)."""
        return [s.strip().casefold() or s for s in self.vocab.strings]

    def best_example(self, i: int) -> Example | None:
        """The latent's highest-activating example (None if it never fired)."""
        top = self._examples("top", i, keep={0})
        return top[0] if top else None

    def search_tokens(self, query: str, substring: bool = False, min_count: int = 5, limit: int = 100) -> TokenSearch:
        """Latents whose token profile or top logit tokens hold a token matching a word of `query`.

        A token matches a word when, stripped of surrounding whitespace (the byte-level Ġ / SentencePiece ▁
        marker is a leading space here) and case, it equals the word; with `substring`, tokens that merely
        contain a word match too, ranked after every whole-word match. A profile token must occur at least
        `min_count` times in the analysed tokens (a token seen twice makes any latent look specific to it);
        logit tokens come from the weights, so no count applies to them. Within each kind, latents rank by the
        matched profile token's score, the harmonic mean of rate = fires / (occurrences + profile_prior) and
        share = fires / the latent's firings (the token profile's own order); latents matched only through
        logit tokens follow, by logit."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1 (got {min_count}).")
        words = [w.casefold() for w in query.split()] or ([query] if query else [])
        if not words:
            return TokenSearch([], [], [], 0)
        strings, keys = self.vocab.strings, self._search_keys
        whole = np.array([k in words for k in keys], dtype=bool)
        part = np.array([any(w in k for w in words) for k in keys], dtype=bool) & ~whole
        occurrences = self.stats.get("token_count")
        if occurrences is None:
            raise FileFormatError(f"{self.path / STATS} lacks 'token_count' (each token's occurrences); {REBUILD}.")
        vocab = sorted(((strings[t], int(occurrences[t]), bool(whole[t])) for t in np.nonzero(whole | part)[0]),
                       key=lambda v: (not v[2], -v[1]))
        tier = np.where(whole, 0, np.where(part & substring, 1, 2))  # 2: no match
        prior = self.manifest["config"].get("profile_prior")
        if prior is None:
            raise FileFormatError(f"{self.path / MANIFEST} lacks config.profile_prior (the token profile's rate "
                                  f"prior, needed to score matches); {REBUILD}.")

        hits: dict[int, SearchHit] = {}
        tok = self.column("profile_token")
        fires, tc = self.column("profile_fires"), self.column("profile_token_count")
        count = self.stats["count"].astype(np.float64)[:, None]
        rate, share = fires / (tc + float(prior)), fires / np.maximum(count, 1)
        score = np.where(fires > 0, 2 * rate * share / np.maximum(rate + share, 1e-30), 0.0)
        t_tier = np.where(tok >= 0, tier[np.clip(tok, 0, len(tier) - 1)], 2)
        matched = t_tier < 2
        below_min = set(np.nonzero(matched.any(1))[0].tolist())
        matched &= tc >= min_count
        # best matched profile token per latent: lowest tier, then highest score
        order = np.lexsort((-score, t_tier), axis=-1)  # per row; the last key is the primary one
        for f in np.nonzero(matched.any(1))[0]:
            cols = [j for j in order[f] if matched[f, j]]
            j = cols[0]
            hits[int(f)] = SearchHit(
                int(f), bool(t_tier[f, j] == 0), ["token profile"], [strings[tok[f, c]] for c in cols],
                float(score[f, j]), int(fires[f, j]), int(tc[f, j]), None, 0.0, 0.0)
        below_min -= set(hits)
        if "logit_top_token" in self.feature_keys:
            lt, lv = self.column("logit_top_token"), self.column("logit_top_value")
            l_tier = np.where(lt >= 0, tier[np.clip(lt, 0, len(tier) - 1)], 2)
            for f in np.nonzero((l_tier < 2).any(1))[0]:
                cols = [j for j in np.lexsort((-lv[f], l_tier[f])) if l_tier[f, j] < 2]
                best, word = float(lv[f, cols[0]]), bool(l_tier[f, cols[0]] == 0)
                h = hits.get(int(f))
                if h is None:
                    hits[int(f)] = SearchHit(int(f), word, ["logit tokens"], [strings[lt[f, c]] for c in cols],
                                             None, None, None, best, 0.0, 0.0)
                    below_min.discard(int(f))
                elif word or not h.whole_word:  # the logit match is as good as the profile's: it counts too
                    h.source.append("logit tokens")
                    h.whole_word |= word
                    h.tokens += [s for s in (strings[lt[f, c]] for c in cols) if s not in h.tokens]
                    h.logit = best
        out = sorted(hits.values(), key=lambda h: (not h.whole_word, h.score is None, -(h.score or 0.0),
                                                  -(h.logit or 0.0), h.feature))[:limit]
        for h in out:
            h.max_act = float(self.stats["act_max"][h.feature])
            h.density = float(self.stats["density"][h.feature])
        return TokenSearch(out, words, vocab, len(below_min))


def open_store(path: str | Path) -> FeatureStore:
    return FeatureStore(path)
