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


def shared_strength(mode: str, strength: float, n: int) -> float:
    """Each layer's value when a path of n layers is steered with `strength` (the module docstring's rule)."""
    if mode not in ("add", "scale", "clamp"):
        raise SaekitError(f"flow steering supports add, scale and clamp, not {mode!r}.")
    return strength / n if mode == "add" else strength


def flow_edits(path: list[Step], mode: str, strength: float, positions: str = "all") -> list[tuple[str, Edit]]:
    """(hook, edit) per step, the strength shared as the module docstring says."""
    value = shared_strength(mode, strength, len(path))
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


def generate_flow(model, saes: dict[str, SparseAutoencoder], edits: list[tuple[str, Edit]], prompt: str,
                  seed: int = 0, max_new_tokens: int = 40, temperature: float = 1.0,
                  scales: dict[str, Scale] | None = None, use_cache: bool = True, threads: int | None = 1):
    """Baseline and flow-steered continuations of `prompt` from one seed in one batch (steer.generate with one
    Steering per layer of the path)."""
    import torch

    from .steer import stream_steerings

    steerings = [Steering(saes[h], [e], h, (scales or {}).get(h), rows=torch.tensor([False, True])) for h, e in edits]
    described = [e.describe(s.scale(e.feature) if s.scale and e.mode == "add" else None) + f" at {h}"
                 for (h, e), s in zip(edits, steerings)]
    return stream_steerings(model, steerings, prompt, described, seed, max_new_tokens, temperature, use_cache,
                            threads).run()


def steer_along_flow(flow_dir: str, sae_dir: str, feature: int, cfg, model_name: str | None = None, depth: int = 3
                     ) -> str:
    """`saekit steer --flow`: the side-by-side text of baseline and flow-steered generation (cfg: SteerConfig),
    add strengths in typical activations when every SAE on the path has its feature store, else raw (said)."""
    from .features import open_store
    from .lm import load_model
    from .sae import load_sae
    from .steer import find_store

    flow = FlowStore(flow_dir)
    hook = load_sae(sae_dir).hook
    if hook is None:
        raise SaekitError(f"{sae_dir} records no hook; flow steering finds the feature's SAE in the set by its hook.")
    flow.check_latent(hook, feature)
    path = flow_path(flow, hook, feature, depth)
    saes = {s.hook: load_sae(flow.set.by_hook(s.hook).path) for s in path}
    model = load_model(model_name or saes[hook].info.get("model_arg") or "default")
    stores = {h: find_store(flow.set.by_hook(h).path, sae) for h, sae in saes.items()}
    typical = cfg.mode == "add" and all(stores.values())
    scales = {h: open_store(p) for h, p in stores.items()} if typical else None
    g = generate_flow(model, saes, flow_edits(path, cfg.mode, cfg.strength or 0.0, cfg.positions), cfg.prompt, cfg.seed,
                      cfg.max_new_tokens, cfg.temperature, scales, cfg.kv_cache)
    units = ("typical activations (each layer's feature store)" if typical else
             "raw units" + (" (not every SAE on the path has a feature store)" if cfg.mode == "add" else ""))
    steps = " ← ".join(f"{s.hook}:{s.latent}" + (f" (cos {s.cos:.2f})" if i else "") for i, s in enumerate(path))
    return (f"flow path: {steps}\n" + "\n".join(g.edits) + f"\nstrength in {units}; seed {g.seed}, temperature "
            f"{g.temperature:g}; {g.path}\n\n" + g.side_by_side(cfg.width))
