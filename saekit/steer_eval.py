"""`saekit steer-eval`: does steering a feature work, and what does it cost?

For each feature, strength sweep (strengths in units of the feature's typical activation: its mean
activation when it fires), all rows of one prompt sampled in one batch from the same seed and the same
Gumbel noise per step, so every row differs from the unsteered one only through its edit:
  hit    fraction of generated tokens on which the feature fires when the *unsteered* model reads the
         generated text and the SAE re-encodes it (any: fraction of generations with at least one);
  act    its mean activation there;
  p_top  probability the steered model puts on the feature's top logit tokens (W_dec[f]·diag(w_norm)·W_U),
         averaged over generation steps;
  ppl    perplexity of the generated tokens under the unsteered model (fluency), and ppl× its ratio to
         the unsteered generations';
  kl     KL(unsteered ‖ steered) of next-token distributions on neutral prompts (side effects).
Baseline: a difference-of-means vector (mean activation on the feature's top-activating tokens minus the
mean on random tokens), normalised and added at the same norm as the SAE edit — same strength, same norm.
Flow rows (`flow`, from `saekit steer-eval --flow`): the same edit applied along the feature's flow, to the feature
and its matched predecessors at earlier layers, each at its own SAE's hook with the strength shared as flow_steer.py
says; the hit rate is still read at the feature's own hook.

A transcoder is steered where it writes (the MLP output; steer.py), so its reference tokens are read at both its
hooks: the latents from the MLP input (the activations that define "fires"), the baseline's difference of means
from the MLP output, where that vector is added.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import steer
from .config import SteerEvalConfig
from .errors import DataError, SaekitError
from .sae import SparseAutoencoder

REPORT = "steer_eval.json"

PROMPTS_FILE = "steer_prompts.json"
PPL_LIMIT = 1.5


@dataclass
class FeatureRef:
    """What the sweep needs about one feature."""

    feature: int
    typical: float  # mean activation when it fires (raw units)
    frequency: float  # fraction of reference tokens it fires on
    top_tokens: torch.Tensor  # ids of its top logit tokens
    top_strings: list[str]
    dom: torch.Tensor | None = None  # unit difference-of-means direction


@dataclass
class Companion:
    """A predecessor the flow rows steer together with the feature: latent `feature` of `sae`, at the SAE's hook,
    with its own typical activation (add and clamp values are in it)."""

    sae: SparseAutoencoder
    feature: int
    typical: float


def default_prompts(path: str | None = None) -> dict[str, list[str]]:
    import json

    text = Path(path).read_text() if path else resources.files("saekit").joinpath(PROMPTS_FILE).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"prompts file {path or PROMPTS_FILE} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not data.get("steer") or not data.get("neutral"):
        raise DataError(f"prompts file {path or PROMPTS_FILE} needs non-empty lists 'steer' and 'neutral'.")
    return {"steer": [str(p) for p in data["steer"]], "neutral": [str(p) for p in data["neutral"]]}


# ----------------------------------------------------------------------------- reference activations

def reference_activations(model, sae: SparseAutoencoder, cache: str | None, tokens: int, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x [N, d_in] at the SAE's hook, None) — for a transcoder (x at its input hook, y [N, d_out] at its output
    hook) of the same tokens — the first shards of an activation cache, else a fresh harvest from the SAE's dataset.
    Massive tokens are left out at every hook read, each by its threshold recorded at harvest (the cache's, else the
    SAE's, which is of the hook it predicts), else 10× its median norm."""
    from .cache import MANIFEST, ActivationCache
    from .harvest import MASSIVE_MULTIPLE

    hooks = [sae.hook] + ([sae.hook_out] if sae.is_transcoder else [])
    if None in hooks:
        raise DataError(f"the {sae.kind} records no {'output ' if sae.hook else ''}hook, so there is nothing to read "
                        "reference activations at.")
    recorded: dict[str, float | None] = {h: None for h in hooks} | {hooks[-1]: sae.info.get("massive_threshold")}
    if len(hooks) > 1:
        recorded[hooks[0]] = sae.info.get("massive_threshold_in")
    cache = cache or sae.info.get("activations")
    if cache and (Path(cache) / MANIFEST).is_file():
        acts = ActivationCache(cache)
        if missing := [h for h in hooks if h not in acts.hooks]:
            raise DataError(f"the activation cache {cache} holds {acts.hooks}, not the {sae.kind}'s "
                            + (f"hooks {missing} (a transcoder's reference tokens are read at its input and output; "
                               "use the cache it was trained on)" if sae.is_transcoder else f"hook {sae.hook}") + ".")
        read = {h: acts.head(h, tokens) for h in hooks}
        recorded |= {h: acts.massive_threshold(h) for h in hooks if acts.massive_threshold(h) is not None}
    else:
        from .config import DataConfig
        from .data import load_contexts
        from .harvest import Harvester

        data = DataConfig.from_manifest(sae.info)
        train, _ = load_contexts(model.tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                                 data.text_column)
        tokens = min(tokens, train.usable_tokens)
        read = Harvester(model, hooks).harvest(train.tokens, tokens).acts
    keep = torch.ones(len(read[hooks[0]]), dtype=torch.bool)
    for h, a in read.items():
        norms = a.norm(dim=1)
        keep &= norms <= (recorded[h] or MASSIVE_MULTIPLE * float(norms.median()))
    return read[hooks[0]][keep], (read[hooks[1]][keep] if sae.is_transcoder else None)


@torch.no_grad()
def feature_codes(sae: SparseAutoencoder, x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [N, K] of the reference activations."""
    dev = sae.W_enc.device
    vs, ids = [], []
    for i in range(0, len(x), batch):
        v, j = sae.encode(x[i: i + batch].to(dev))
        vs.append(v.cpu())
        ids.append(j.cpu())
    return torch.cat(vs), torch.cat(ids)


def pick_features(values: torch.Tensor, indices: torch.Tensor, d_sae: int, n: int, seed: int = 0,
                  band: tuple[float, float] = (0.002, 0.05)) -> list[int]:
    """n features firing on a fraction of tokens inside `band` (random among them, by seed)."""
    fires = torch.bincount(indices[values > 0], minlength=d_sae).float() / len(values)
    ok = ((fires >= band[0]) & (fires <= band[1])).nonzero()[:, 0]
    if len(ok) == 0:
        raise SaekitError(f"no feature fires on {band[0]:.1%}–{band[1]:.0%} of the reference tokens; pass --features.")
    order = torch.randperm(len(ok), generator=torch.Generator().manual_seed(seed))
    return sorted(int(f) for f in ok[order[:n]])


def top_logit_tokens(sae: SparseAutoencoder, f: int, W_U: torch.Tensor, w_norm: torch.Tensor | None,
                     n: int = 10) -> torch.Tensor:
    """Ids of the n tokens whose logits W_dec[f] raises most (through the final norm's weight)."""
    from .features.weights import logit_effects

    return logit_effects(sae.W_dec[f: f + 1].detach(), W_U, w_norm, n)["logit_top_token"][0].long().cpu()


def simple_ref(model, sae: SparseAutoencoder, f: int, typical: float, top_tokens: int = 10) -> FeatureRef:
    """A FeatureRef without reference activations (no baseline): for the app's quick sweep."""
    from .lm import unembedding

    top = top_logit_tokens(sae, f, *unembedding(model), top_tokens)
    return FeatureRef(f, typical, float("nan"), top, [model.tokenizer.decode([int(t)]) for t in top])


@torch.no_grad()
def feature_refs(model, sae: SparseAutoencoder, x: torch.Tensor, features: list[int], top_tokens: int = 10,
                 dom_examples: int = 64, baseline: bool = True, store=None, seed: int = 0,
                 codes: tuple[torch.Tensor, torch.Tensor] | None = None, y: torch.Tensor | None = None
                 ) -> list[FeatureRef]:
    """`x`: reference activations the latents are encoded from; `y`: a transcoder's MLP outputs of the same tokens,
    where its edits and so its difference-of-means baseline act (an SAE's baseline is taken from x)."""
    from .lm import unembedding

    values, indices = codes if codes is not None else feature_codes(sae, x)
    W_U, w_norm = unembedding(model)
    scale = steer.feature_scale(store) if store is not None else None
    where = x
    if sae.is_transcoder and baseline:
        if y is None or len(y) != len(x):
            raise SaekitError(f"a {sae.kind}'s difference-of-means baseline is a direction in its output "
                              f"({sae.hook_out}), where its edits act: pass y, the MLP outputs of the reference tokens "
                              "(reference_activations gives both), or turn the baseline off.")
        where = y
    gen = torch.Generator().manual_seed(seed)
    rand = where[torch.randperm(len(x), generator=gen)[: max(dom_examples * 16, 1024)]]
    refs = []
    for f in features:
        if not 0 <= f < sae.cfg.d_sae:
            raise SaekitError(f"feature {f} is out of range: the SAE has {sae.cfg.d_sae} latents.")
        acts = (values * (indices == f)).sum(1)
        on = acts > 0
        if scale is not None:
            typical = scale(f)
        elif on.any():
            typical = float(acts[on].mean())
        else:
            raise SaekitError(f"feature {f} never fires on the {len(x):,} reference tokens, so it has no typical "
                              "activation; pick another, or raise --reference-tokens.")
        top = top_logit_tokens(sae, f, W_U, w_norm, top_tokens)
        dom = None
        if baseline and on.any():
            sel = acts.topk(min(dom_examples, int(on.sum()))).indices
            v = where[sel].mean(0) - rand.mean(0)
            dom = v / v.norm().clamp_min(1e-8)
        refs.append(FeatureRef(f, typical, float(on.float().mean()), top,
                               [model.tokenizer.decode([int(t)]) for t in top], dom))
    return refs


# ----------------------------------------------------------------------------- the sweep

@torch.no_grad()
def _score(model, sae: SparseAutoencoder, prompt: list[int], s: steer.Sampled, feature: int) -> dict[str, torch.Tensor]:
    """Per row: NLL of the generated tokens and the feature's activation on them, under the unsteered model."""
    device = next(model.parameters()).device
    P, N = len(prompt), s.tokens.shape[1]
    seq = torch.cat([torch.tensor([prompt] * len(s.tokens)), s.tokens], 1).to(device)
    seen = {}

    def grab(act, hook):
        seen["x"] = act.detach()

    logits = model.run_with_hooks(seq, fwd_hooks=[(sae.hook, grab)])
    logp = torch.log_softmax(logits[:, P - 1: P - 1 + N].float(), -1)
    nll = -logp.gather(2, s.tokens.to(device)[..., None])[..., 0].cpu()
    xg = seen["x"][:, P:].float()
    v, i = sae.encode(xg.reshape(-1, xg.shape[-1]).to(sae.W_enc.device))
    act = (v * (i == feature)).sum(1).view(len(s.tokens), N).cpu()
    valid = torch.arange(N)[None] < s.lengths[:, None]
    return {"nll": nll, "act": act, "valid": valid}


def _rows(strengths: list[float], methods: list[str]) -> list[tuple[str, float]]:
    nz = [float(s) for s in strengths if s != 0]
    return [("none", 0.0)] + [(m, s) for m in methods for s in nz]


def _steerings(sae: SparseAutoencoder, ref: FeatureRef, rows: list[tuple[str, float]], mode: str,
               positions: str, flow: list[Companion]) -> list[steer.Steering]:
    """One Steering per hook: the feature's own (sae and flow rows, and the baseline's), then each companion's."""
    from .flow_steer import shared_strength

    nan = float("nan")
    raw = lambda s, typical: s if mode == "scale" else s * typical  # noqa: E731
    n = len(flow) + 1
    sae_vals = torch.tensor([raw(s, ref.typical) if m == "sae" else
                             raw(shared_strength(mode, s, n), ref.typical) if m == "flow" else nan for m, s in rows])
    edits = [steer.Edit(ref.feature, mode, sae_vals, positions)]  # type: ignore[arg-type]
    if ref.dom is not None and any(m == "dom" for m, _ in rows):
        dom_vals = torch.tensor([s * ref.typical if m == "dom" else nan for m, s in rows])
        edits.append(steer.add_vector(ref.dom, dom_vals, positions))  # type: ignore[arg-type]
    out = [steer.Steering(sae, edits)]
    for c in flow:
        vals = torch.tensor([raw(shared_strength(mode, s, n), c.typical) if m == "flow" else nan for m, s in rows])
        out.append(steer.Steering(c.sae, [steer.Edit(c.feature, mode, vals, positions)]))  # type: ignore[arg-type]
    return out


@torch.no_grad()
def sweep_feature(model, sae: SparseAutoencoder, ref: FeatureRef, strengths: list[float], prompts: list[str],
                  neutral: list[str], mode: str = "add", positions: str = "all", max_new_tokens: int = 24,
                  temperature: float = 1.0, seed: int = 0, kv_cache: bool = True, progress: bool = True,
                  flow: list[Companion] | None = None) -> list[dict[str, Any]]:
    """One row of metrics per (method, strength) for one feature (see the module doc); `flow`: the predecessors
    steered with it in the flow rows (none: no flow rows)."""
    methods = ["sae"] + (["flow"] if flow else []) + (["dom"] if ref.dom is not None and mode != "scale" else [])
    rows = _rows(strengths, methods)
    B = len(rows)
    steerings = _steerings(sae, ref, rows, mode, positions, flow or [])
    acc = {k: torch.zeros(B, dtype=torch.float64) for k in ("nll", "tok", "act", "fire", "any", "ptop", "kl", "klpos")}
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts) * max_new_tokens + len(neutral), desc=f"steer-eval f{ref.feature}",
               unit="tok", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for i, text in enumerate(prompts):
        ids = steer.prompt_tokens(model.tokenizer, text)
        s = steer.sample(model, ids, B, max_new_tokens, seed + i, temperature, steerings, kv_cache,
                     track=ref.top_tokens, stop_early=False)
        sc = _score(model, sae, ids, s, ref.feature)
        valid = sc["valid"]
        acc["nll"] += (sc["nll"] * valid).sum(1)
        acc["tok"] += valid.sum(1)
        acc["act"] += (sc["act"] * valid).sum(1)
        acc["fire"] += ((sc["act"] > 0) & valid).sum(1)
        acc["any"] += ((sc["act"] > 0) & valid).any(1)
        acc["ptop"] += (s.tracked * valid).sum(1)
        bar.update(max_new_tokens)
    for text in neutral:
        toks = torch.tensor([steer.prompt_tokens(model.tokenizer, text)], device=device)
        # side effects of the edit wherever it would act: "generated" edits act on every position here
        with ExitStack() as stack:
            for st in steerings:
                st.offset, st.prompt_len = 0, (1 if positions == "generated" else toks.shape[1])
                stack.enter_context(steer.steer(model, st.sae, st))
            steered = torch.log_softmax(model(toks.expand(B, -1))[:, 1:].float(), -1)  # after steered positions
        # Row 0 carries no edit: it is the clean model, from the same batched forward (a separate batch-1
        # forward differs in the last bits, which would give the unsteered row a KL of ~1e-8).
        clean = steered[0]
        kl = (clean.exp() * (clean - steered)).sum(-1)  # [B, T-1]
        acc["kl"] += kl.sum(1).double().cpu()
        acc["klpos"] += kl.shape[1]
        bar.update(1)
    bar.close()
    tok = acc["tok"].clamp_min(1)
    ppl = torch.exp(acc["nll"] / tok)
    out = []
    for r, (method, strength) in enumerate(rows):
        out.append({
            "feature": ref.feature, "method": method, "strength": strength, "mode": mode,
            "hit": float(acc["fire"][r] / tok[r]), "any": float(acc["any"][r] / max(len(prompts), 1)),
            "act": float(acc["act"][r] / tok[r]), "p_top": float(acc["ptop"][r] / tok[r]),
            "ppl": float(ppl[r]), "ppl_ratio": float(ppl[r] / ppl[0]),
            "kl": float(acc["kl"][r] / max(float(acc["klpos"][r]), 1.0)), "tokens": int(acc["tok"][r]),
            "typical": ref.typical, "frequency": ref.frequency, "path": 1 + len(flow or []) if method == "flow" else 1,
        })
    out[0]["seconds"] = time.perf_counter() - start
    return out


def verdict(rows: list[dict[str, Any]], ppl_limit: float = PPL_LIMIT) -> list[dict[str, Any]]:
    """Per (feature, method): the strength with the highest hit rate whose perplexity stays within
    `ppl_limit` × the unsteered one, and the hit-rate gain there."""
    out = []
    for f in dict.fromkeys(r["feature"] for r in rows):
        base = next(r for r in rows if r["feature"] == f and r["method"] == "none")
        for m in ("sae", "flow", "dom"):
            cand = [r for r in rows if r["feature"] == f and r["method"] == m and r["ppl_ratio"] <= ppl_limit]
            if not any(r["feature"] == f and r["method"] == m for r in rows):
                continue
            best = max(cand, key=lambda r: (r["hit"], -r["strength"]), default=None)
            out.append({"feature": f, "method": m, "strength": best["strength"] if best else None,
                        "hit_base": base["hit"], "hit": best["hit"] if best else None,
                        "gain": (best["hit"] - base["hit"]) if best else None,
                        "ppl_ratio": best["ppl_ratio"] if best else None, "kl": best["kl"] if best else None})
    return out


TABLE = [("feature", "feature", 7, "{}"), ("method", "method", 9, "{}"), ("strength", "strength", 8, "{:g}"),
         ("hit", "hit", 6, "{:.3f}"), ("any", "any", 5, "{:.2f}"), ("act", "act", 7, "{:.2f}"),
         ("p_top", "p_top", 7, "{:.4f}"), ("ppl", "ppl", 8, "{:.2f}"), ("ppl_ratio", "ppl×", 6, "{:.2f}"),
         ("kl", "KL", 7, "{:.4f}")]


def method_name(r: dict[str, Any]) -> str:
    return {"none": "unsteered", "dom": "diff-mean", "flow": f"flow-{r['mode']}"}.get(r["method"], f"sae-{r['mode']}")


def table(rows: list[dict[str, Any]]) -> str:
    head = " ".join(f"{name:>{w}}" for _, name, w, _ in TABLE)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(f"{(method_name(r) if key == 'method' else fmt.format(r[key])):>{w}}"
                              for key, _, w, fmt in TABLE))
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], path: str | Path, title: str = "steering trade-off",
           ppl_limit: float = PPL_LIMIT) -> Path:
    """Plotly HTML: hit rate against perplexity ratio (fluency) and against KL (side effects)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .files import atomic_write

    fig = make_subplots(rows=1, cols=2, subplot_titles=("hit rate vs fluency cost", "hit rate vs side effects"))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
    for k, f in enumerate(dict.fromkeys(r["feature"] for r in rows)):
        base = next(r for r in rows if r["feature"] == f and r["method"] == "none")
        for m, dash, sym in (("sae", "solid", "circle"), ("flow", "dash", "square"), ("dom", "dot", "diamond")):
            pts = [base] + sorted((r for r in rows if r["feature"] == f and r["method"] == m), key=lambda r: r["strength"])
            if len(pts) == 1:
                continue
            name = f"f{f} " + {"sae": f"SAE {pts[1]['mode']}", "flow": f"flow {pts[1]['mode']} ({pts[1].get('path')} layers)",
                               "dom": "diff-of-means"}[m]
            text = [f"{r['strength']:g}" for r in pts]
            hover = "strength %{text}<br>hit %{y:.3f}<br>%{x:.3f}<extra>" + name + "</extra>"
            for col, key in ((1, "ppl_ratio"), (2, "kl")):
                fig.add_trace(go.Scatter(x=[r[key] for r in pts], y=[r["hit"] for r in pts], text=text,
                                         mode="lines+markers+text", textposition="top center", name=name,
                                         legendgroup=name, showlegend=col == 1, hovertemplate=hover,
                                         line=dict(color=palette[k % len(palette)], dash=dash),
                                         marker=dict(symbol=sym, size=8)), row=1, col=col)
    fig.add_vline(x=ppl_limit, line_dash="dash", line_color="grey", row=1, col=1,
                  annotation_text=f"{ppl_limit}× perplexity", annotation_position="top left")
    fig.update_xaxes(title_text="perplexity of generations / unsteered (unsteered model)", row=1, col=1)
    fig.update_xaxes(title_text="KL(unsteered ‖ steered), neutral prompts (nats/token)", row=1, col=2)
    fig.update_yaxes(title_text="hit rate (feature fires on generated tokens)", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=520, width=1200)
    return atomic_write(path, lambda p: fig.write_html(str(p), include_plotlyjs=True))


def run(model, sae: SparseAutoencoder, cfg: SteerEvalConfig, x: torch.Tensor | None = None, store=None,
        progress: bool = True, y: torch.Tensor | None = None, flows: dict[int, list[Companion]] | None = None
        ) -> dict[str, Any]:
    """The whole evaluation: reference activations → features → sweeps. Returns rows, verdicts and meta.
    `x` (and a transcoder's `y`): reference activations as `reference_activations` gives them (read when None).
    `flows`: per feature, the predecessors its flow rows steer too (flow_eval.py)."""
    prompts = default_prompts(cfg.prompts or None)
    steer_p, neutral = prompts["steer"][: cfg.n_prompts], prompts["neutral"][: cfg.n_neutral]
    start = time.perf_counter()
    if x is None:
        x, y = reference_activations(model, sae, cfg.activations or None, cfg.reference_tokens, cfg.seed)
    codes = feature_codes(sae, x)
    features = list(cfg.features) or pick_features(*codes, sae.cfg.d_sae, cfg.auto_features, cfg.seed)
    refs = feature_refs(model, sae, x, features, cfg.top_tokens, cfg.dom_examples, cfg.baseline, store, cfg.seed, codes,
                        y)
    strengths = sorted({0.0, *map(float, cfg.strengths)})
    rows: list[dict[str, Any]] = []
    for ref in refs:
        rows += sweep_feature(model, sae, ref, strengths, steer_p, neutral, cfg.mode, cfg.positions,
                              cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.kv_cache, progress,
                              (flows or {}).get(ref.feature))
    return {"rows": rows, "verdict": verdict(rows), "config": asdict(cfg), "features": [
        {"feature": r.feature, "typical": r.typical, "frequency": r.frequency, "top_tokens": r.top_strings,
         "baseline": r.dom is not None} for r in refs],
        "reference_tokens": len(x), "seconds": time.perf_counter() - start}


def claim_report(out: Path, cfg: SteerEvalConfig, overwrite: bool = False) -> None:
    """Refuse, before any work, an `out` holding anything but a steering evaluation of this same config."""
    from .files import claim_output, read_json

    def differs(path: Path) -> str | None:
        old = read_json(path / REPORT).get("config", {})
        return ", ".join(f"{k} {old.get(k)!r} → {v!r}" for k, v in asdict(cfg).items() if old.get(k) != v) or None

    claim_output(out, "a steering evaluation", lambda p: (p / REPORT).is_file(), overwrite, differs)


def run_and_report(model, sae: SparseAutoencoder, cfg: SteerEvalConfig, sae_dir: Path, store, out: Path) -> dict[str, Any]:
    """`saekit steer-eval`: run the sweep, write steer_eval.json and the plotly figure into `out` (a folder
    swapped in whole when both are written), print the table."""
    from .files import replacing, write_json
    from .lm import model_id

    res = run(model, sae, cfg, store=store)
    res |= {"sae": str(sae_dir), "model": model_id(model), "hook": sae.hook, "weights_sha256": sae.weights_hash(),
            "dictionary": sae.kind, "steered_at": sae.hook_out,
            "typical_from": str(store.path) if store is not None else "reference tokens"}
    at = f"{sae.hook} → {sae.hook_out}" if sae.is_transcoder else sae.hook
    with replacing(out) as staged:
        write_json(staged / REPORT, res)
        figure(res["rows"], staged / "steer_eval.html", title=f"steering trade-off — {sae_dir.name} at {at}")
    fig = out / "steer_eval.html"
    print()
    for f in res["features"]:
        print(f"feature {f['feature']}: fires on {f['frequency']:.2%} of reference tokens, typical activation "
              f"{f['typical']:.2f}; top logit tokens {' '.join(repr(t) for t in f['top_tokens'][:6])}")
    print(f"\ntypical activations from {res['typical_from']}")
    print(f"{cfg.mode} sweep, strengths in {'factors' if cfg.mode == 'scale' else 'typical activations'}; "
          f"{cfg.n_prompts} prompts × {cfg.max_new_tokens} tokens, T={cfg.temperature:g}, seed {cfg.seed}\n")
    print(table(res["rows"]))
    print(f"\nbest hit rate with perplexity ≤ {PPL_LIMIT}× the unsteered generations:")
    for v in res["verdict"]:
        if v["strength"] is None:
            print(f"  feature {v['feature']} {v['method']}: no strength keeps perplexity within {PPL_LIMIT}×")
        else:
            print(f"  feature {v['feature']} {v['method']}: strength {v['strength']:g}: hit {v['hit_base']:.3f} → "
                  f"{v['hit']:.3f} (+{v['gain']:.3f}), ppl× {v['ppl_ratio']:.2f}, KL {v['kl']:.4f}")
    print(f"\nwrote {out / REPORT} and {fig} ({res['seconds']:.0f} s)")
    return res
