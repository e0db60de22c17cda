"""`saekit sweep`: every (architecture, k, d_sae) SAE trained from one activation stream of one hook (the trainer
feeds several SAEs from one stream), then the evaluation suite on the same held-out inputs for all of them."""

from __future__ import annotations

from pathlib import Path

from ..config import SaeConfig, TrainRun
from ..errors import SaekitError

ARCHITECTURES = ("topk", "batchtopk", "matryoshka")


def sweep_saes(architectures: list[str], k: list[int], d_sae: list[int]) -> list[SaeConfig]:
    """One SaeConfig per architecture × d_sae × k (d_in is set from the activations)."""
    if bad := [a for a in architectures if a not in ARCHITECTURES]:
        raise SaekitError(f"unknown architecture {bad[0]!r}; pick from {', '.join(ARCHITECTURES)}.")
    return [SaeConfig(d_sae=d, k=kk, architecture=a) for a in architectures for d in d_sae for kk in k]  # type: ignore[arg-type]


def check_sweep(spec: TrainRun) -> None:
    """Refuse, before any training, a sweep whose SAEs would disagree in hook or model: one model (the harvest's,
    or the cache's) and one hook, and SAEs rather than transcoders (the suite compares dictionaries of one hook)."""
    from ..cache import MANIFEST
    from ..files import read_json

    h = spec.harvest
    if any(s.transcoder for s in spec.train.saes):
        raise SaekitError("a sweep compares SAEs of one hook; transcoders are evaluated with saekit eval --replace-all.")
    hooks = list(h.hooks)
    if spec.run.activations:
        manifest = Path(spec.run.activations) / MANIFEST
        if not manifest.is_file():
            raise SaekitError(f"{spec.run.activations} is not an activation cache (no {MANIFEST}); make one with "
                              "saekit harvest.")
        cached = read_json(manifest)
        hooks = hooks or list(cached.get("hooks", []))
        models = {cached.get("model"), cached.get("data", {}).get("model")} - {None}
        if len(models) > 1:
            raise SaekitError(f"the cache records several models ({', '.join(map(str, models))}); sweep one model.")
    if h.layers or h.mlp_pairs or len(hooks) != 1:
        raise SaekitError(f"a sweep trains every SAE on one hook, so that all are compared on the same inputs; "
                          f"got {len(hooks)} hooks ({', '.join(hooks[:4]) or 'none'}{' …' if len(hooks) > 4 else ''}"
                          f"{', --layers' if h.layers else ''}). Pass one --hook.")
