"""`saekit steer-eval --flow`: single-layer vs along-the-flow steering of the same features, on the same sweep.

Every strength is run both ways in one batch (steer_eval.sweep_feature with the feature's flow predecessors as
companions): `sae` rows edit the feature at its own hook only, `flow` rows edit it and its residual predecessors
(flow_steer.flow_path: the top match at each earlier layer while its cosine clears the threshold), the strength shared
as flow_steer.py says. Typical activations (the unit of add and clamp) are measured on the reference tokens at each
SAE's own hook, so both methods are in the same units everywhere.

Compared at equal perplexity increase: each method's curve is its points (ppl×, hit) — the unsteered point (1, hit₀)
first, then every strength — taken as a piecewise-linear function of ppl× (points ordered by ppl×). At every steered
point of one method, the other's hit rate is interpolated at the same ppl×, only inside the ppl× range the other
reached (no extrapolation: a point beyond it is listed without a partner). Δ = flow − single at matched points; a
positive mean Δ says flow steering buys more hits for the same fluency cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import SteerEvalConfig
from .errors import SaekitError
from .flow import FlowStore
from .flow_steer import Step, flow_path
from .sae import SparseAutoencoder, load_sae
from .steer_eval import Companion, feature_codes, reference_activations


def flow_paths(flow: FlowStore, hook: str, features: list[int], depth: int, min_cos: float | None) -> dict[int, list[Step]]:
    """Each feature's flow path; refused when a feature has no predecessor above `min_cos` (flow rows would equal
    single-layer rows)."""
    paths = {}
    for f in features:
        flow.check_latent(hook, f)
        paths[f] = flow_path(flow, hook, f, depth, min_cos)
    lone = [f for f, p in paths.items() if len(p) == 1]
    if lone:
        tau = flow.cfg.threshold if min_cos is None else min_cos
        raise SaekitError(f"feature{'s' if len(lone) > 1 else ''} {', '.join(map(str, lone))} of {hook} "
                          f"{'have' if len(lone) > 1 else 'has'} no residual predecessor with cosine ≥ {tau:g}, so "
                          "flow steering would equal single-layer steering: pick features whose Flow section lists "
                          "one (saekit browse), or lower --flow-min-cos.")
    return paths


def typical_activations(model, sae: SparseAutoencoder, latents: list[int], cfg: SteerEvalConfig) -> dict[int, float]:
    """Mean activation when firing, on the reference tokens at the SAE's hook (its cache, else a harvest)."""
    x, _ = reference_activations(model, sae, cfg.activations or None, cfg.reference_tokens, cfg.seed)
    values, indices = feature_codes(sae, x)
    out = {}
    for f in latents:
        acts = (values * (indices == f)).sum(1)
        if not (acts > 0).any():
            raise SaekitError(f"feature {f} of {sae.hook} (a flow predecessor) never fires on the {len(x):,} "
                              "reference tokens, so it has no typical activation; raise --reference-tokens.")
        out[f] = float(acts[acts > 0].mean())
    return out


def companions(model, flow: FlowStore, paths: dict[int, list[Step]], cfg: SteerEvalConfig
               ) -> dict[int, list[Companion]]:
    """Per feature, its predecessors (path without its first step) with their SAEs and typical activations."""
    need: dict[str, set[int]] = {}
    for p in paths.values():
        for s in p[1:]:
            need.setdefault(s.hook, set()).add(s.latent)
    saes = {h: load_sae(flow.set.by_hook(h).path) for h in need}
    typical = {h: typical_activations(model, saes[h], sorted(ls), cfg) for h, ls in need.items()}
    return {f: [Companion(saes[s.hook], s.latent, typical[s.hook][s.latent]) for s in p[1:]] for f, p in paths.items()}


def _curve(rows: list[dict[str, Any]], f: int, method: str) -> list[tuple[float, float, float]]:
    """(ppl×, hit, strength) of the unsteered point and every strength of `method`, ordered by ppl×."""
    base = next(r for r in rows if r["feature"] == f and r["method"] == "none")
    pts = [base] + [r for r in rows if r["feature"] == f and r["method"] == method]
    return sorted((r["ppl_ratio"], r["hit"], r["strength"]) for r in pts)


def hit_at(curve: list[tuple[float, float, float]], ppl: float) -> float | None:
    """The curve's hit rate at perplexity ratio `ppl`, linear between its points; None outside its range."""
    import numpy as np

    xs = [c[0] for c in curve]
    if not xs[0] <= ppl <= xs[-1]:
        return None
    return float(np.interp(ppl, xs, [c[1] for c in curve]))


def at_equal_perplexity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per steered point of either method, the other's hit rate at the same ppl× and Δ = flow − single; per
    feature and over all features, the mean Δ over matched points (see the module doc)."""
    points, per_feature = [], []
    for f in dict.fromkeys(r["feature"] for r in rows):
        curves = {m: _curve(rows, f, m) for m in ("sae", "flow")}
        deltas = []
        for m, other in (("sae", "flow"), ("flow", "sae")):
            for ppl, hit, strength in curves[m]:
                if strength == 0:
                    continue
                partner = hit_at(curves[other], ppl)
                delta = None if partner is None else (hit - partner if m == "flow" else partner - hit)
                points.append({"feature": f, "method": m, "strength": strength, "ppl_ratio": ppl, "hit": hit,
                               "other_hit": partner, "delta": delta})
                if delta is not None:
                    deltas.append(delta)
        per_feature.append({"feature": f, "matched": len(deltas),
                            "mean_delta": sum(deltas) / len(deltas) if deltas else None})
    matched = [p["delta"] for p in points if p["delta"] is not None]
    return {"points": points, "features": per_feature,
            "mean_delta": sum(matched) / len(matched) if matched else None, "matched": len(matched),
            "flow_better": sum(1 for p in per_feature if (p["mean_delta"] or 0) > 0),
            "rule": "hit of the other method interpolated linearly in ppl× at each steered point, inside its range"}


def comparison_table(cmp: dict[str, Any]) -> str:
    lines = [f"{'feature':>7} {'method':>7} {'strength':>8} {'ppl×':>6} {'hit':>6} {'other':>6} {'Δ flow−sae':>10}",
             "-" * 56]
    for p in cmp["points"]:
        other = "—" if p["other_hit"] is None else f"{p['other_hit']:.3f}"
        delta = "—" if p["delta"] is None else f"{p['delta']:+.3f}"
        lines.append(f"{p['feature']:>7} {p['method']:>7} {p['strength']:>8g} {p['ppl_ratio']:>6.2f} {p['hit']:>6.3f} "
                     f"{other:>6} {delta:>10}")
    return "\n".join(lines)


def run_and_report(flow_dir: str, sae_dir: str, cfg: SteerEvalConfig, out: Path, depth: int = 3,
                   min_cos: float | None = None, model_name: str | None = None) -> dict[str, Any]:
    """`saekit steer-eval --flow`: sweep single-layer and flow steering of cfg.features, write steer_eval.json and
    the plotly figure into `out`, print the sweep table and the equal-perplexity comparison."""
    from . import steer_eval as E
    from .files import replacing, write_json
    from .lm import load_model, model_id

    if not cfg.features:
        raise SaekitError("steer-eval --flow needs --features: pick residual features whose Flow section (saekit "
                          "browse) lists a predecessor.")
    flow = FlowStore(flow_dir)
    sae = load_sae(sae_dir)
    if sae.hook is None:
        raise SaekitError(f"{sae_dir} records no hook; flow steering finds the feature's SAE in the set by its hook.")
    paths = flow_paths(flow, sae.hook, list(cfg.features), depth, min_cos)
    model = load_model(model_name or sae.info.get("model_arg") or "default")
    res = E.run(model, sae, cfg, store=None, flows=companions(model, flow, paths, cfg))
    res["comparison"] = at_equal_perplexity(res["rows"])
    res["paths"] = {str(f): [vars(s) for s in p] for f, p in paths.items()}
    res |= {"sae": str(sae_dir), "flow": str(flow_dir), "model": model_id(model), "hook": sae.hook,
            "weights_sha256": sae.weights_hash(), "typical_from": "reference tokens at each SAE's hook"}
    with replacing(out) as staged:
        write_json(staged / E.REPORT, res)
        E.figure(res["rows"], staged / "steer_eval.html", title=f"single-layer vs flow steering — {sae.hook}")
    print()
    for f in res["features"]:
        steps = " ← ".join(f"{s['hook']}:{s['latent']}" + (f" (cos {s['cos']:.2f})" if i else "")
                           for i, s in enumerate(res["paths"][str(f["feature"])]))
        print(f"feature {f['feature']}: fires on {f['frequency']:.2%} of reference tokens, typical {f['typical']:.2f}; "
              f"top logit tokens {' '.join(repr(t) for t in f['top_tokens'][:6])}\n  flow path: {steps}")
    print(f"\n{cfg.mode} sweep ({'factors' if cfg.mode == 'scale' else 'typical activations at each hook'}; flow "
          f"rows share it as flow_steer.py says); {cfg.n_prompts} prompts × {cfg.max_new_tokens} tokens, "
          f"T={cfg.temperature:g}, seed {cfg.seed}\n")
    print(E.table(res["rows"]))
    c = res["comparison"]
    print(f"\nat equal perplexity increase ({c['rule']}):\n")
    print(comparison_table(c))
    for p in c["features"]:
        md = "no point in the other's range" if p["mean_delta"] is None else f"mean Δ {p['mean_delta']:+.3f}"
        print(f"  feature {p['feature']}: {md} over {p['matched']} matched points")
    overall = "—" if c["mean_delta"] is None else f"{c['mean_delta']:+.3f}"
    print(f"overall mean Δ hit (flow − single) at equal ppl×: {overall} over {c['matched']} points; flow better on "
          f"{c['flow_better']} of {len(c['features'])} features")
    print(f"\nwrote {out / E.REPORT} and {out / 'steer_eval.html'} ({res['seconds']:.0f} s)")
    return res
