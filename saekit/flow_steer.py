"""Steering a feature along its flow (Laptev et al. 2025): the edit of a residual feature at layer L is applied as
well to its matched residual predecessors at L−1, L−2, … (the top match at each step, while its cosine stays above
the flow's threshold), each at its own SAE's hook through steer.py's `Steering` — so every layer's edit keeps the
guarantees of single-layer steering (an edit that changes nothing is the identity; leaving the context restores
the model bit for bit).

How the strength is shared (the paper steers the flow's members together; its exact rescaling was not found):
  add    the strength is split equally over the n layers (s/n each): the flow injects as many typical activations
         as the single-layer edit, spread along the path
  scale  the same factor at every layer (a factor is not additive)
  clamp  the same value at every layer, in each SAE's own units
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from .errors import SaekitError
from .flow import FlowStore
from .sae import SparseAutoencoder
from .steer import Edit, Scale, Steering, make_edit, steer


@dataclass(frozen=True)
class Step:
    """One member of a feature's flow path: the feature `latent` of the SAE on `hook`, matched to the previous step
    (the later layer) with cosine `cos` (1 for the feature itself)."""

    hook: str
    latent: int
    cos: float


def flow_path(flow: FlowStore, hook: str, feature: int, depth: int = 3, min_cos: float | None = None) -> list[Step]:
    """The feature and up to `depth` residual predecessors, each the top match of the one after it."""
    min_cos = flow.cfg.threshold if min_cos is None else min_cos
    if flow.set.by_hook(hook).kind != "resid":
        raise SaekitError(f"flow steering starts at a residual feature; {hook} is a block's output SAE.")
    path = [Step(hook, feature, 1.0)]
    for _ in range(depth):
        prev = [p for p in flow.predecessors(path[-1].hook, path[-1].latent, min_cos) if p["kind"] == "resid"]
        if not prev:
            break
        path.append(Step(prev[0]["hook"], prev[0]["latent"], prev[0]["cos"]))
    return path


def flow_edits(path: list[Step], mode: str, strength: float, positions: str = "all") -> list[tuple[str, Edit]]:
    """(hook, edit) per step, the strength shared as the module docstring says."""
    if mode not in ("add", "scale", "clamp"):
        raise SaekitError(f"flow steering supports add, scale and clamp, not {mode!r}.")
    value = strength / len(path) if mode == "add" else strength
    return [(s.hook, make_edit(mode, s.latent, value, positions)) for s in path]


@contextmanager
def steer_flow(model, saes: dict[str, SparseAutoencoder], edits: list[tuple[str, Edit]],
               scales: dict[str, Scale] | None = None) -> Iterator[list[Steering]]:
    """`with steer_flow(model, saes, flow_edits(...)): model(tokens)` runs with every layer's edit at its SAE's hook;
    on exit (or an exception) every hook is removed. `saes` maps each hook to its SAE, `scales` to the typical
    activations that add strengths are in (a feature store; raw units without)."""
    missing = [h for h, _ in edits if h not in saes]
    if missing:
        raise SaekitError(f"flow steering needs the SAE of every layer on the path; missing {', '.join(missing)}.")
    with ExitStack() as stack:
        yield [stack.enter_context(steer(model, saes[h], [e], hook=h, scale=(scales or {}).get(h))) for h, e in edits]
