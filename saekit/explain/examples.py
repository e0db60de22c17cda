"""The windows an explainer and the scorers see, cut from the feature store (no model pass).

Explainer input: the latent's top examples (the highest activations, one per context). Scorer input, held out
from those contexts: activating windows spread over the latent's quantile bands (the store's uniform sample), and
non-activating windows — random ones from contexts where the latent is not known to fire, and "hard" ones: the top
examples of its nearest decoder neighbours (delphi's contrastive negatives).

Whether a non-activating window is surely silent: the store keeps the latent's activations only in its own
example windows. Its sample holds one firing per context for up to `sample_size` contexts, so when the sample is
not full it holds *every* context the latent fired in, and any other context is silent (negatives "exact").
When it is full, a random window in another context may still contain a firing: the chance is estimated from the
latent's density, 1 − (1 − density)^window, and recorded with the scores (negatives "estimated")."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import SaekitError
from ..features.config import hist_quantiles
from ..features.store import FeatureStore

MARK_OPEN, MARK_CLOSE = "<<", ">>"


@dataclass
class Window:
    """One context window: its text pieces and the latent's activation on each (zeros: not activating)."""

    pieces: list[str]
    acts: list[float]
    activating: bool
    source: str  # "top", "quantile q0.6-0.8", "random", "neighbour 12"
    context: int = -1

    def text(self) -> str:
        return "".join(self.pieces)

    def spans(self) -> list[tuple[int, int]]:
        """Runs [start, end) of consecutive activating tokens."""
        out, i = [], 0
        while i < len(self.acts):
            if self.acts[i] > 0:
                j = i
                while j < len(self.acts) and self.acts[j] > 0:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    def marked(self, spans: list[tuple[int, int]] | None = None) -> str:
        """The text with each span's tokens wrapped in << >> (default: the activating runs)."""
        spans = self.spans() if spans is None else spans
        starts, ends = {s for s, _ in spans}, {e for _, e in spans}
        out = []
        for i, p in enumerate(self.pieces):
            if i in ends:
                out.append(MARK_CLOSE)
            out.append((MARK_OPEN if i in starts else "") + p)
        if len(self.pieces) in ends:
            out.append(MARK_CLOSE)
        return "".join(out)


@dataclass
class FeatureExamples:
    feature: int
    explain: list[Window]  # top examples, activating tokens marked in the prompt
    activating: list[Window]  # held out: from the quantile bands
    non_activating: list[Window]  # random + neighbours' top examples
    negatives_exact: bool
    contamination: float  # estimated chance that a non-activating window holds a firing (0 when exact)
    profile: list[dict] = field(default_factory=list)


class WindowSource:
    """Windows cut from a store's contexts without its per-example row readers: the contexts and each token's
    text are loaded once (a few MB), so a feature's windows cost a few row reads and string joins."""

    def __init__(self, store: FeatureStore):
        self.store = store
        cfg = store.manifest["config"]
        self.before, self.after = int(cfg["window_before"]), int(cfg["window_after"])
        self.tokens = store._all("contexts.safetensors")["tokens"].numpy()
        vocab = store.vocab
        self.strings = vocab.strings
        # a token whose bytes end a character cleanly shows as itself; others are decoded with their window
        self.unclean = {i for i, s in enumerate(self.strings) if "\\x" in s}
        self.special = set(np.nonzero(vocab.special)[0].tolist())
        self._columns: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def row(self, key: str, i: int) -> np.ndarray:
        """Latent i's row of a per-latent array; the whole column is read once (tens of MB for the demo)."""
        if key not in self._columns:
            with self._lock:
                if key not in self._columns:
                    col = self.store._open("features.safetensors").get_tensor(key)
                    self._columns[key] = (col.float() if col.is_floating_point() else col).numpy()
        return self._columns[key][i]

    def window(self, context: int, position: int, acts=None) -> Window:
        """The window around (context, position); `acts` (the store's row for it) or None for a silent window.
        Special tokens (BOS, separators) are dropped: they mean nothing to the reader."""
        T = self.tokens.shape[1]
        lo, hi = max(0, position - self.before), min(T, position + self.after + 1)
        ids = self.tokens[context, lo:hi].tolist()
        a = ([0.0] * len(ids) if acts is None
             else acts[lo - (position - self.before): hi - (position - self.before)].tolist())
        keep = [i for i, t in enumerate(ids) if t not in self.special]
        kept = [ids[i] for i in keep]
        pieces = ([self.strings[t] for t in kept] if self.unclean.isdisjoint(kept) else self.store.vocab.pieces(kept))
        return Window(pieces, [a[i] for i in keep], acts is not None, "", context)


def _rows(src: WindowSource, prefix: str, i: int) -> tuple[np.ndarray, ...]:
    return tuple(src.row(f"{prefix}_{k}", i) for k in ("value", "ctx", "pos", "acts"))


def feature_examples(store: FeatureStore, feature: int, n_explain: int = 10, n_activating: int = 5,
                     n_random: int = 3, n_hard: int = 2, seed: int = 0,
                     source: WindowSource | None = None) -> FeatureExamples:
    """The windows for one latent (deterministic for a seed). Raises a SaekitError when the store holds too few
    held-out activating windows or silent contexts for the counts asked."""
    src = source or WindowSource(store)
    rng = random.Random(seed * 1_000_003 + feature)
    t_val, t_ctx, t_pos, t_acts = _rows(src, "top", feature)
    valid = np.nonzero(t_ctx >= 0)[0]
    if not len(valid):
        raise SaekitError(f"feature {feature} never fired in the store's {store.tokens:,} tokens: nothing to explain.")
    explain = []
    for j in valid[:n_explain]:
        w = src.window(int(t_ctx[j]), int(t_pos[j]), t_acts[j])
        w.source = "top"
        explain.append(w)
    used = {w.context for w in explain}
    # held out: the store's uniform sample split into quantile bands of the latent's activations (from its
    # histogram), taken round-robin from the highest band, skipping contexts the explainer saw
    s_val, s_ctx, s_pos, s_acts = _rows(src, "sample", feature)
    groups = int(store.manifest["config"]["quantile_groups"])
    qs = np.linspace(0, 1, groups + 1)
    edges = hist_quantiles(src.row("hist", feature), qs)
    edges[0], edges[-1] = 0.0, np.inf
    band = np.clip(np.searchsorted(edges, s_val, side="right") - 1, 0, groups - 1)
    bands = [[j for j in np.argsort(-s_val) if band[j] == g and s_ctx[j] >= 0 and int(s_ctx[j]) not in used]
             for g in range(groups - 1, -1, -1)]
    activating: list[Window] = []
    while len(activating) < n_activating and any(bands):
        for g, members in zip(range(groups - 1, -1, -1), bands):
            if members and len(activating) < n_activating:
                j = members.pop(len(members) // 2)  # the band's middle: typical of it
                w = src.window(int(s_ctx[j]), int(s_pos[j]), s_acts[j])
                w.source = f"quantile q{qs[g]:.1f}-{qs[g + 1]:.1f}"
                activating.append(w)
    if len(activating) < n_activating:
        raise SaekitError(f"feature {feature} has {len(activating)} held-out activating windows in the store "
                          f"(its sample minus the {len(explain)} contexts shown to the explainer), fewer than the "
                          f"{n_activating} asked; ask for fewer (--n-activating / --n-explain) or rebuild the store "
                          "with a larger --sample-size.")
    known = {int(c) for c in np.concatenate([t_ctx, s_ctx]) if c >= 0}
    exact = int((s_ctx >= 0).sum()) < len(s_ctx)
    n_ctx, T = src.tokens.shape
    need = n_random + n_hard
    if n_ctx - len(known) < need:
        raise SaekitError(f"feature {feature}: the store has {n_ctx - len(known)} contexts where it is not known to "
                          f"fire, fewer than the {need} non-activating windows asked; rebuild the store over more "
                          "text (`saekit analyze ... --tokens N` with a larger N) or ask for fewer (--n-random, --n-hard).")
    non: list[Window] = []
    taken: set[int] = set()
    for j in src.row("neighbour_id", feature):  # hard negatives: a neighbour's best silent window
        if len(non) >= n_hard:
            break
        n_ctx_row, n_pos_row = src.row("top_ctx", int(j)), src.row("top_pos", int(j))
        for c, p in zip(n_ctx_row, n_pos_row):
            if c >= 0 and int(c) not in known and int(c) not in taken:
                w = src.window(int(c), int(p))
                w.source = f"neighbour {int(j)}"
                non.append(w)
                taken.add(int(c))
                break
    while len(non) < need:  # random windows in contexts where it is not known to fire
        c = rng.randrange(n_ctx)
        if c in known or c in taken:
            continue
        w = src.window(c, rng.randrange(1, T))
        w.source = "random"
        non.append(w)
        taken.add(c)
    W = src.before + 1 + src.after
    contamination = 0.0 if exact else float(1 - (1 - float(store.stats["density"][feature])) ** W)
    vs = store.vocab
    profile = [{"token": int(t), "string": vs.token_str(int(t))} for t in src.row("profile_token", feature) if t >= 0]
    return FeatureExamples(feature, explain, activating, non, exact, contamination, profile)
