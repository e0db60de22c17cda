"""Which SAE features of a set of residual SAEs drive a metric over a prompt set: attribution patching with error
terms (Marks et al. 2024, "Sparse Feature Circuits").

At an SAE's hook the activation is x = x̂(z) + ε: the decoded latents z plus the SAE's error ε. A node is a latent
of one SAE (its activations at every position summed, as for prompts that are not aligned token by token), or the
SAE's error. Its effect is the change of the metric m when it is switched off (z_f → 0, ε → 0), estimated
  - by attribution patching (AtP): −Σ_p z[p, f] · (W_dec[f] · ∂m/∂x[p]), one forward and backward per prompt;
  - by integrated gradients (IG): the same with ∂m/∂x averaged along the straight path on which every node of that
    SAE is switched off together (midpoints of `steps` equal segments), one batch of `steps` passes per SAE. The
    path ends at b_dec, which training puts near the activations' mean; toward the zero vector, where the norm
    reading the stream is singular, a 10-step integral would not converge.
The downstream model is the real one (no SAE spliced in), so a node's effect is that of removing its write at its
hook. m averages over the prompts: a logit difference "A|B" at the last position, or a logit minus the mean logit.
Position 0 (BOS, which the SAEs never saw) holds no node. Validation ablates the top nodes one at a time in the
real model and ranks the measured change against both estimates.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SaekitError
from ..lm import model_id
from ..sae import SparseAutoencoder
from .build import single_token


@dataclass(frozen=True)
class MetricPrompt:
    """One prompt of the set and what its metric reads at the last position."""
    prompt: str
    target: str
    """The token whose logit is read (one token, often with its leading space: " Paris")."""
    contrast: str | None = None
    """A token to subtract (m = logit[target] − logit[contrast]); None: m = logit[target] − mean logit."""


def read_prompts(path: str | Path) -> list[MetricPrompt]:
    """A prompt set: JSON lines {"prompt": …, "target": …, "contrast": …} (contrast optional), or tab-separated
    lines `prompt<TAB>target[<TAB>contrast]`. Blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SaekitError(f"the prompt set {path} does not exist; write one prompt per line as JSON "
                          '({"prompt": "The capital of France is", "target": " Paris", "contrast": " London"}) or as '
                          "'prompt<TAB>target<TAB>contrast'.")
    items: list[MetricPrompt] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            if line.lstrip().startswith("{"):
                d = json.loads(line)
                items.append(MetricPrompt(d["prompt"], d["target"], d.get("contrast")))
            else:
                parts = line.split("\t")
                if len(parts) not in (2, 3):
                    raise ValueError(f"{len(parts)} tab-separated fields")
                items.append(MetricPrompt(parts[0], parts[1], parts[2] if len(parts) == 3 else None))
        except (ValueError, KeyError, TypeError) as e:
            raise SaekitError(f"{path}:{n} is not a prompt line ({e}): write JSON with 'prompt' and 'target' (and "
                              "optionally 'contrast'), or 'prompt<TAB>target[<TAB>contrast]'.") from None
    if not items:
        raise SaekitError(f"{path} holds no prompts.")
    return items


def residual_sae_set(path: str | Path) -> dict[str, SparseAutoencoder]:
    """The SAEs of a run or folder by hook, in the model's order; transcoders are refused (they take
    `saekit attribute --transcoders`)."""
    from ..lm import hook_layer
    from ..runner import dictionaries_in
    from ..sae import load_sae

    dirs = dictionaries_in(path)
    saes = [load_sae(p) for p in dirs]
    if tcs := [str(p) for p, s in zip(dirs, saes) if s.is_transcoder]:
        raise SaekitError(f"{', '.join(tcs[:3])} hold transcoders: attribution patching reads SAEs; build a graph "
                          "of a transcoder set with `saekit attribute --transcoders`.")
    by_hook: dict[str, SparseAutoencoder] = {}
    for p, s in zip(dirs, saes):
        if s.hook in by_hook:
            raise SaekitError(f"{path} holds two SAEs for {s.hook} (one of them {p}); keep one per hook in the folder "
                              "you point at.")
        by_hook[s.hook] = s
    return dict(sorted(by_hook.items(), key=lambda kv: (hook_layer(kv[0]) or 0, kv[0])))


@dataclass
class NodeEffects:
    """Effects on the metric of switching each node off, averaged over the prompts."""
    hooks: list[str]
    metric: float
    """m on the clean prompts (mean over the set)."""
    atp: list[torch.Tensor]
    """Per hook: [d_sae + 1] AtP effects; the last entry is the SAE's error node."""
    ig: list[torch.Tensor] | None
    """The same by integrated gradients (None when not computed)."""
    ig_sum_check: list[dict[str, float]] | None
    """Per hook: Σ of its IG effects against the measured change when every node of it is off at once (IG's
    completeness: the two agree up to the path integral's discretisation)."""
    per_prompt_ig: list[torch.Tensor] | None
    """Per hook: [prompts, d_sae + 1] IG effects (for intervals over prompts)."""
    activations: list[torch.Tensor]
    """Per hook: [d_sae] each latent's activation summed over positions, mean over prompts."""
    meta: dict[str, Any]


def _metric(logits: torch.Tensor, target: int, contrast: int | None) -> torch.Tensor:
    last = logits[:, -1].float()
    return last[:, target] - (last[:, contrast] if contrast is not None else last.mean(-1))


def _ids(tokenizer, item: MetricPrompt, vocab: int) -> tuple[int, int | None]:
    """The metric's token ids (target, contrast)."""
    con = single_token(tokenizer, item.contrast, vocab) if item.contrast else None
    return single_token(tokenizer, item.target, vocab), con


def node_effects(model, saes: dict[str, SparseAutoencoder], prompts: list[MetricPrompt], ig_steps: int = 10,
                 max_tokens: int = 64, progress: bool = True) -> NodeEffects:
    """AtP and (ig_steps > 0) IG effects of every latent and error node of every SAE, averaged over `prompts`."""
    from ..steer import prompt_tokens

    hooks = list(saes)
    vocab = model.cfg.d_vocab
    start = time.perf_counter()
    P = len(prompts)
    atp = [torch.zeros(s.cfg.d_sae + 1) for s in saes.values()]
    per_ig = [torch.zeros(P, s.cfg.d_sae + 1) for s in saes.values()] if ig_steps else None
    acts = [torch.zeros(s.cfg.d_sae) for s in saes.values()]
    checks = [{"ig_sum": 0.0, "measured": 0.0} for _ in hooks] if ig_steps else None
    clean_m = 0.0
    passes = 0
    bar = tqdm(total=P, desc="attribution patching", unit="prompt", disable=not progress)
    for i, item in enumerate(prompts):
        ids = prompt_tokens(model.tokenizer, item.prompt)
        if len(ids) > max_tokens:
            raise SaekitError(f"prompt {i + 1} is {len(ids)} tokens (BOS included) and the limit is {max_tokens}: "
                              "shorten it, or raise it (--max-tokens).")
        tgt, con = _ids(model.tokenizer, item, vocab)
        tokens = torch.tensor(ids)[None]
        x, g, m = _grads(model, hooks, tokens, tgt, con)
        passes += 1
        clean_m += float(m) / P
        for h, (hook, sae) in enumerate(saes.items()):
            z, err = _codes(sae, x[hook])
            acts[h] += z.sum(0) / P
            atp[h] += _effects(sae, z, err, g[hook]) / P
            if ig_steps:
                gbar, m_off = _path_grads(model, hook, sae, x[hook], tokens, tgt, con, ig_steps)
                passes += 1
                per_ig[h][i] = _effects(sae, z, err, gbar)
                checks[h]["ig_sum"] += float(per_ig[h][i].sum()) / P
                checks[h]["measured"] += float(m_off - m) / P
        bar.update(1)
        bar.set_postfix_str(f"{(i + 1) / (time.perf_counter() - start):.2f} prompts/s")
    bar.close()
    ig = [e.mean(0) for e in per_ig] if ig_steps else None
    meta = {"prompts": P, "ig_steps": ig_steps, "seconds": time.perf_counter() - start, "forward_backward_batches":
            passes, "hooks": hooks, "weights": {h: s.weights_hash() for h, s in saes.items()},
            "model": model_id(model)}
    return NodeEffects(hooks, clean_m, atp, ig, checks, per_ig, acts, meta)


def _grads(model, hooks: list[str], tokens: torch.Tensor, target: int, contrast: int | None
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Each hook's activation [n, d] and ∂m/∂activation [n, d] (total derivative through the real model)."""
    seen: dict[str, torch.Tensor] = {}

    def grabber(name: str):  # (hook.name may be an alias's target on a bridge: key by the name asked for)
        def grab(a, hook):
            if not seen:  # the earliest hook starts the graph: nothing upstream of it needs a gradient
                a = a.detach().requires_grad_(True)
            seen[name] = a
            return a
        return grab

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(h, grabber(h)) for h in hooks])
        m = _metric(logits, target, contrast).sum()
        grads = torch.autograd.grad(m, [seen[h] for h in hooks], allow_unused=True)
    x = {h: seen[h][0].detach().float() for h in hooks}
    g = {h: (torch.zeros_like(x[h]) if gr is None else gr[0].float()) for h, gr in zip(hooks, grads)}
    return x, g, float(m.detach())


def _codes(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [n, d_sae] and error [n, d] of positions ≥ 1 (position 0 zeroed: it holds no node)."""
    with torch.no_grad():
        xs = x.to(sae.W_enc.dtype)
        values, indices = sae.encode(xs)  # once, for both the dense codes and the reconstruction
        z = torch.zeros(len(x), sae.cfg.d_sae).scatter_(1, indices, values.float())
        err = x - sae.decode(values, indices, xs).float()
    z[0], err[0] = 0, 0
    return z, err


def _effects(sae: SparseAutoencoder, z: torch.Tensor, err: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[d_sae + 1]: −Σ_p z[p, f] (W_dec[f] · g[p]) per latent, then −Σ_p ε[p] · g[p] for the error node."""
    with torch.no_grad():
        feat = -(z * (g @ sae.W_dec.detach().float().t())).sum(0)
        return torch.cat([feat, -(err * g).sum().reshape(1)])


def _path_grads(model, hook: str, sae: SparseAutoencoder, x: torch.Tensor, tokens: torch.Tensor, target: int,
                contrast: int | None, steps: int) -> tuple[torch.Tensor, float]:
    """∂m/∂x at `hook` averaged over the path on which all of the SAE's nodes go to zero together: at α the
    activation (positions ≥ 1) is decode((1−α) z) + (1−α) ε = b_dec + (1−α)(x − b_dec); α at the midpoints of
    `steps` segments. Also m at α = 1 (every node of the SAE off) for IG's completeness check."""
    alphas = torch.cat([(torch.arange(steps) + 0.5) / steps, torch.ones(1)])
    b = sae.b_dec.detach().float()
    path = b + (1 - alphas)[:, None, None] * (x - b)
    path[:, 0] = x[0]
    leaf = path.requires_grad_(True)

    def put(a, hook):
        return leaf.to(a.dtype)

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens.expand(len(alphas), -1), fwd_hooks=[(hook, put)])
        m = _metric(logits, target, contrast)
        (grad,) = torch.autograd.grad(m[:steps].sum(), [leaf])
    return grad[:steps].mean(0), float(m[steps].detach())


# ----------------------------------------------------------------------------- validation

def ablate_nodes(model, saes: dict[str, SparseAutoencoder], prompts: list[MetricPrompt],
                 nodes: list[tuple[str, int]]) -> torch.Tensor:
    """The measured change of m (mean over prompts) when each node — (hook, latent), latent = d_sae for the
    error — is switched off alone in the real model: its write z[p, f]·W_dec[f] (or ε[p]) removed at every
    position ≥ 1."""
    from ..steer import prompt_tokens

    vocab = model.cfg.d_vocab
    out = torch.zeros(len(nodes))
    for item in prompts:
        ids = prompt_tokens(model.tokenizer, item.prompt)
        tgt, con = _ids(model.tokenizer, item, vocab)
        tokens = torch.tensor(ids)[None]
        R = len(nodes) + 1

        def remover(hook: str):
            sae = saes[hook]
            rows = [r for r, (h, _) in enumerate(nodes) if h == hook]

            def remove(a, hook):
                x = a[-1].float()  # the last row is the clean run
                z, err = _codes(sae, x)
                delta = torch.zeros_like(a, dtype=torch.float32)
                for r in rows:
                    f = nodes[r][1]
                    delta[r] = err if f == sae.cfg.d_sae else z[:, f, None] * sae.W_dec[f].detach().float()
                return a - delta.to(a.dtype)
            return remove

        with torch.no_grad():
            logits = model.run_with_hooks(tokens.expand(R, -1),
                                          fwd_hooks=[(h, remover(h)) for h in {h for h, _ in nodes}])
        m = _metric(logits, tgt, con)
        out += (m[:-1] - m[-1]) / len(prompts)
    return out


def validate_patching(model, saes: dict[str, SparseAutoencoder], prompts: list[MetricPrompt], effects: NodeEffects,
                      top: int = 20) -> dict[str, Any]:
    """Ablate the `top` feature nodes by |IG| (|AtP| without IG) one at a time in the real model; Spearman ρ
    (95% interval) of the measured change against each estimate."""
    from .validate import _spearman

    ranked = ranked_nodes(effects, errors=False)[:top]
    if len(ranked) < 3:
        raise SaekitError(f"the SAEs have {len(ranked)} active latents on these prompts; validation needs at least 3.")
    measured = ablate_nodes(model, saes, prompts, [(n["hook"], n["latent"]) for n in ranked])
    atp = torch.tensor([n["atp"] for n in ranked])
    result = {"nodes": len(ranked), "measured": measured.tolist(), "atp": _spearman(atp, measured)}
    if effects.ig is not None:
        result["ig"] = _spearman(torch.tensor([n["ig"] for n in ranked]), measured)
    for n, m in zip(ranked, measured.tolist()):
        n["measured"] = m
    result["per_node"] = ranked
    return result


# ----------------------------------------------------------------------------- the node list

def ranked_nodes(effects: NodeEffects, errors: bool = True, limit: int | None = None) -> list[dict[str, Any]]:
    """Nodes by |IG effect| (|AtP| without IG), largest first: hook, latent (None for an error node), both
    estimates, and IG's 95% interval over the prompts (a t interval; None with fewer than 2 prompts)."""
    from ..lm import hook_layer

    rows: list[dict[str, Any]] = []
    for h, hook in enumerate(effects.hooks):
        key = (effects.ig or effects.atp)[h]
        d_sae = len(key) - 1
        live = (effects.activations[h] > 0).nonzero().flatten().tolist() + ([d_sae] if errors else [])
        for f in live:
            row = {"hook": hook, "layer": hook_layer(hook), "latent": f, "error": f == d_sae,
                   "atp": float(effects.atp[h][f]), "ig": None if effects.ig is None else float(effects.ig[h][f]),
                   "activation": None if f == d_sae else float(effects.activations[h][f])}
            if effects.per_prompt_ig is not None and effects.per_prompt_ig[h].shape[0] > 1:
                row["ig_interval"] = _t_interval(effects.per_prompt_ig[h][:, f])
            rows.append(row)
    rows.sort(key=lambda r: -abs(r["ig"] if r["ig"] is not None else r["atp"]))
    return rows[:limit] if limit else rows


def _t_interval(v: torch.Tensor) -> list[float]:
    from scipy.stats import t

    n = len(v)
    half = float(t.ppf(0.975, n - 1) * v.std(unbiased=True) / n ** 0.5)
    return [float(v.mean()) - half, float(v.mean()) + half]


def patching_report(effects: NodeEffects, validation: dict[str, Any] | None, prompts: list[MetricPrompt],
                    top: int = 30) -> tuple[dict[str, Any], str]:
    """(nodes.json's content, report.md's text)."""
    ranked = ranked_nodes(effects)
    if validation:
        measured = {(n["hook"], n["latent"]): n["measured"] for n in validation["per_node"]}
        for n in ranked:
            n["measured"] = measured.get((n["hook"], n["latent"]))
    data = {"kind": "attribution-patching", "hooks": effects.hooks, "metric": effects.metric,
            "prompts": [asdict(p) for p in prompts], "meta": effects.meta, "ig_completeness": effects.ig_sum_check,
            "validation": None if not validation else {k: v for k, v in validation.items() if k != "per_node"},
            "nodes": ranked}
    m = effects.meta
    first = prompts[0]
    read = f"{first.target!r} − " + (repr(first.contrast) if first.contrast else "mean logit")
    lines = [f"# Attribution patching over {len(prompts)} prompt(s)", "",
             f"SAEs: {', '.join(effects.hooks)}. Metric, mean over prompts: {effects.metric:+.3f} ({read}"
             + (", …" if len(prompts) > 1 else "") + f"). {m['seconds']:.1f} s, {m['forward_backward_batches']} "
             "forward-backward batches; " + (f"IG with {m['ig_steps']} steps." if m["ig_steps"] else "IG off."), ""]
    if effects.ig_sum_check:
        lines += ["IG completeness (Σ of an SAE's IG effects vs the measured change with all its nodes off): "
                  + "; ".join(f"{h}: {c['ig_sum']:+.3f} vs {c['measured']:+.3f}"
                              for h, c in zip(effects.hooks, effects.ig_sum_check)), ""]
    lines += ["| node | IG effect [95% over prompts] | AtP effect | measured ablation |", "|---|---|---|---|"]
    for n in ranked[:top]:
        name = f"{n['hook']} error" if n["error"] else f"{n['hook']} #{n['latent']}"
        iv = n.get("ig_interval")
        ig = "—" if n["ig"] is None else f"{n['ig']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "")
        meas = n.get("measured")
        lines.append(f"| {name} | {ig} | {n['atp']:+.3f} | {'—' if meas is None else f'{meas:+.3f}'} |")
    if validation:
        parts = [f"AtP {validation['atp']['rho']:+.2f} [{validation['atp']['low']:+.2f}, "
                 f"{validation['atp']['high']:+.2f}]"]
        if "ig" in validation:
            parts.insert(0, f"IG {validation['ig']['rho']:+.2f} [{validation['ig']['low']:+.2f}, "
                            f"{validation['ig']['high']:+.2f}]")
        lines += ["", f"**Validation in the real model** (top {validation['nodes']} feature nodes, each ablated alone "
                  "over the prompt set): Spearman ρ between estimated and measured change of the metric — "
                  + ", ".join(parts) + " (95% intervals)."]
    return data, "\n".join(lines) + "\n"


def patch_to_dir(saes_dir: str | Path, prompts: list[MetricPrompt], out: str | Path, ig_steps: int = 10,
                 validate_top: int = 20, max_tokens: int = 64, model_arg: str | None = None, device: str = "cpu",
                 overwrite: bool = False) -> NodeEffects:
    """`saekit attribute --saes DIR --prompts FILE`: OUT/nodes.json (the ranked node list the Graph page shows),
    OUT/report.md + report.json."""
    from ..config import DataConfig
    from ..files import claim_output, write_json
    from ..lm import load_model

    out = claim_output(out, "an attribution-patching result", lambda p: (p / "nodes.json").is_file(), overwrite)
    saes = residual_sae_set(saes_dir)
    first = next(iter(saes.values()))
    model = load_model(DataConfig.from_manifest(first.info, model=model_arg).model, device)
    effects = node_effects(model, saes, prompts, ig_steps, max_tokens)
    effects.meta["saes"] = str(Path(saes_dir).resolve())
    validation = validate_patching(model, saes, prompts, effects, validate_top) if validate_top else None
    data, md = patching_report(effects, validation, prompts)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "nodes.json", data)
    (out / "report.md").write_text(md)
    print(md)
    return effects
