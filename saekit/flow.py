"""Feature flow across layers (Laptev et al. 2025, "Analyze Feature Flow to Enhance Interpretation and Steering"):
where a residual feature at layer L comes from, read off the weights alone, and checked on data.

    resid_pre[L] = resid_pre[L−1] + attn_out[L−1] + mlp_out[L−1]

so each feature of the residual SAE at L is matched (cosine of unit directions: decoder rows by default, encoder
columns as the variant) against the features of the SAEs on those three hooks. With the best cosines s_R, s_A,
s_M and a threshold τ a feature is
    persisting    s_R ≥ τ, no block above τ           carried by the residual stream
    transformed   s_R ≥ τ and s_A or s_M ≥ τ          carried and rewritten by a block
    mlp/attention s_R < τ, the larger of s_M, s_A ≥ τ  produced by that block
    new           all three below τ
Matches chain into flow graphs (residual predecessors of residual predecessors, …). A set of SAEs is a folder of
SAE directories over hooks of one model (`SaeSet`, manifest sae_set.json); the flow of a whole set is computed
once and stored (flow.safetensors + flow.json + report.md). The data check measures whether matched pairs
co-activate on held-out tokens, against a random feature of the same density.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import FlowConfig
from .errors import FileFormatError, SaekitError
from .files import read_json, read_tensors, replacing, write_json, write_tensors

SET_FILE = "sae_set.json"
FLOW_FILE = "flow.json"
TENSORS_FILE = "flow.safetensors"
REPORT_FILE = "report.md"
KIND_OF = {"hook_resid_pre": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp"}
SOURCES = ("resid", "attn", "mlp")  # the three hooks of layer L−1 that sum (with the residual) into resid_pre[L]
CLASSES = ("persisting", "transformed", "mlp", "attention", "new")
VARIANTS = ("decoder", "encoder")
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_attn_out|hook_mlp_out)$")


# ----------------------------------------------------------------------------- SAE sets

@dataclass(frozen=True)
class Member:
    """One SAE of a set."""

    hook: str
    layer: int
    kind: str  # resid | attn | mlp
    d_in: int
    d_sae: int
    model: str | None
    path: str

    @property
    def id(self) -> str:
        return self.hook


@dataclass
class SaeSet:
    """SAEs over many hooks of one model, one per (kind, layer)."""

    root: Path
    members: list[Member]

    def at(self, kind: str, layer: int) -> Member | None:
        return next((m for m in self.members if m.kind == kind and m.layer == layer), None)

    def layers(self, kind: str = "resid") -> list[int]:
        return sorted(m.layer for m in self.members if m.kind == kind)

    def by_hook(self, hook: str) -> Member:
        for m in self.members:
            if m.hook == hook:
                return m
        raise SaekitError(f"the set at {self.root} has no SAE on {hook}; it has {', '.join(m.hook for m in self.members)}.")

    @property
    def model(self) -> str | None:
        return self.members[0].model

    @property
    def d_sae(self) -> int:
        return self.members[0].d_sae

    def manifest(self) -> dict[str, Any]:
        from .version import __version__

        return {"kind": "sae_set", "saekit_version": __version__, "model": self.model, "d_sae": self.d_sae,
                "layers": {k: self.layers(k) for k in SOURCES}, "members": [asdict(m) for m in self.members]}


def member_of(directory: Path) -> Member:
    """A set member from an SAE directory's cfg.json alone (weights are read only when matched)."""
    cfg = read_json(directory / "cfg.json")
    own, meta = cfg.get("saekit", {}), cfg.get("metadata", {})
    if "transcoder" in str(cfg.get("architecture", "")):
        raise SaekitError(f"{directory} holds a transcoder; a feature flow reads SAEs on blocks.L.hook_resid_pre, "
                          "hook_attn_out and hook_mlp_out (train them with saekit train --hooks …).")
    hook = own.get("hook") or meta.get("hook_name") or ""
    m = _HOOK.match(hook)
    if not m:
        raise SaekitError(f"{directory} is an SAE on {hook or 'an unrecorded hook'}; a flow set holds SAEs on "
                          "blocks.L.hook_resid_pre, blocks.L.hook_attn_out and blocks.L.hook_mlp_out only: move it out.")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{directory / 'cfg.json'} lacks d_in or d_sae ({e}).") from e
    return Member(hook=hook, layer=int(m.group(1)), kind=KIND_OF[m.group(2)], d_in=d_in, d_sae=d_sae,
                  model=own.get("model") or meta.get("model_name"), path=str(directory))


def read_set(dirs: list[Path], root: str | Path) -> SaeSet:
    """The set of SAEs in `dirs` (runner.dictionaries_in of `root`), refusing mixed models or widths (naming
    them) and two SAEs on one hook."""
    members = sorted((member_of(Path(d)) for d in dirs), key=lambda m: (m.layer, SOURCES.index(m.kind)))
    if not members:
        raise SaekitError(f"{root} holds no SAE.")
    for field, what in (("model", "models"), ("d_sae", "widths (d_sae)"), ("d_in", "input widths (d_in)")):
        groups: dict[Any, list[str]] = {}
        for m in members:
            groups.setdefault(getattr(m, field), []).append(m.hook)
        if len(groups) > 1:
            shown = "; ".join(f"{v}: {', '.join(h[:3])}{' …' if len(h) > 3 else ''}" for v, h in groups.items())
            raise SaekitError(f"{root} mixes SAEs of different {what} ({shown}); a flow set is one model at one "
                              "width: move the others out.")
    seen: dict[str, str] = {}
    for m in members:
        if m.hook in seen:
            raise SaekitError(f"{root} holds two SAEs on {m.hook} ({seen[m.hook]} and {m.path}); keep one per hook.")
        seen[m.hook] = m.path
    return SaeSet(Path(root), members)


def check_chain(s: SaeSet) -> list[int]:
    """The residual layers L whose flow can be computed (every L but the first), refusing a gap: each needs the
    residual SAE at L−1, and the attention/MLP SAEs at L−1 when the set has any of that kind."""
    resid = s.layers("resid")
    if len(resid) < 2:
        raise SaekitError(f"{s.root} has residual SAEs at {resid or 'no'} layer(s); a flow needs two or more adjacent "
                          "ones (blocks.{A..B}.hook_resid_pre).")
    for layer in range(resid[0], resid[-1] + 1):
        if layer not in resid:
            raise SaekitError(f"{s.root} has no SAE on blocks.{layer}.hook_resid_pre: layer {layer} is missing between "
                              f"{resid[0]} and {resid[-1]}; train it or flow over a range without the gap.")
    for kind in ("attn", "mlp"):
        if have := s.layers(kind):
            if missing := [lay for lay in resid[:-1] if lay not in have]:
                raise SaekitError(f"{s.root} has {kind} SAEs but none on blocks.{missing[0]}.hook_{kind}_out (layer(s) "
                                  f"{', '.join(map(str, missing))} missing) that feed resid layers {resid[1]}–"
                                  f"{resid[-1]}; train them, or remove the {kind} SAEs to flow over residuals only.")
    return resid[1:]


def write_set_manifest(s: SaeSet) -> Path:
    return write_json(s.root / SET_FILE, s.manifest())


# ----------------------------------------------------------------------------- matching

def unit_directions(sae, variant: str) -> torch.Tensor:
    """[d_sae, d_in] unit rows: decoder rows, or encoder columns."""
    W = sae.W_dec.detach() if variant == "decoder" else sae.W_enc.detach().t()
    return (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).float().contiguous()


def top_matches(targets: torch.Tensor, sources: torch.Tensor, k: int, chunk: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [n_t, k], index [n_t, k] int32): each unit target row's k most similar unit source rows, by a chunked
    matmul (memory chunk × n_s)."""
    k = min(k, sources.shape[0])
    cos = torch.empty(targets.shape[0], k)
    idx = torch.empty(targets.shape[0], k, dtype=torch.int32)
    st = sources.t().contiguous()
    for a in range(0, targets.shape[0], chunk):
        v, i = torch.topk(targets[a:a + chunk] @ st, k, dim=1)
        cos[a:a + chunk], idx[a:a + chunk] = v, i.int()
    return cos, idx


def classify(best: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
    """[n] uint8 index into CLASSES from the best cosines per source kind (missing kinds count as 0)."""
    n = next(iter(best.values())).shape[0]
    zero = torch.zeros(n)
    r, a, m = (best.get(k, zero) >= threshold for k in SOURCES)
    sa, sm = best.get("attn", zero), best.get("mlp", zero)
    out = torch.full((n,), CLASSES.index("new"), dtype=torch.uint8)
    block = a | m
    out[~r & block & (sm >= sa)] = CLASSES.index("mlp")
    out[~r & block & (sa > sm)] = CLASSES.index("attention")
    out[r & block] = CLASSES.index("transformed")
    out[r & ~block] = CLASSES.index("persisting")
    return out


def compute_flow(s: SaeSet, cfg: FlowConfig, load: Callable[[str], Any] | None = None,
                 progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every residual layer's matches against its three predecessor SAEs, both variants, and its classes.
    Tensors are keyed '{variant}/{L}/{source kind}/cos|idx' and 'class/{L}' (by cfg.variant), 'class_alt/{L}'
    (by the other variant); the summary holds per-layer shares, timings and the two variants' agreement."""
    from tqdm.auto import tqdm

    from .sae import load_sae

    load = load or (lambda p: load_sae(p))
    targets = check_chain(s)
    other = VARIANTS[1 - VARIANTS.index(cfg.variant)]
    variants = (cfg.variant, other) if cfg.compare else (cfg.variant,)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def dirs(m: Member) -> dict[str, torch.Tensor]:
        if m.hook not in cache:
            sae = load(m.path)
            cache[m.hook] = {v: unit_directions(sae, v) for v in variants}
        return cache[m.hook]

    start, pairs = time.perf_counter(), 0
    bar = tqdm(targets, desc="flow", unit="layer", disable=not progress, dynamic_ncols=True)
    for layer in bar:
        tgt = dirs(s.at("resid", layer))
        best: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants}
        for kind in SOURCES:
            if (src := s.at(kind, layer - 1)) is None:
                continue
            for v in variants:
                cos, idx = top_matches(tgt[v], dirs(src)[v], cfg.top_k, cfg.chunk)
                tensors[f"{v}/{layer}/{kind}/cos"], tensors[f"{v}/{layer}/{kind}/idx"] = cos, idx
                best[v][kind] = cos[:, 0]
                pairs += 1
            if kind != "resid":
                cache.pop(src.hook, None)  # a block's SAE feeds one residual layer only
        cache.pop(s.at("resid", layer - 1).hook, None)
        tensors[f"class/{layer}"] = cls = classify(best[cfg.variant], cfg.threshold)
        layers[str(layer)] = row = {
            "shares": {c: float((cls == i).float().mean()) for i, c in enumerate(CLASSES)},
            "mean_best_cos": {k: float(b.mean()) for k, b in best[cfg.variant].items()},
            # SAEs started from one random init and trained briefly keep it: their top matches are the same index
            "same_index_top1": {k: float((tensors[f"{cfg.variant}/{layer}/{k}/idx"][:, 0] == torch.arange(len(cls))
                                          ).float().mean()) for k in best[cfg.variant]},
        }
        if cfg.compare:
            tensors[f"class_alt/{layer}"] = alt = classify(best[other], cfg.threshold)
            agree = tensors[f"decoder/{layer}/resid/idx"][:, 0] == tensors[f"encoder/{layer}/resid/idx"][:, 0]
            row |= {"shares_alt": {c: float((alt == i).float().mean()) for i, c in enumerate(CLASSES)},
                    "top1_resid_agreement": float(agree.float().mean()),
                    "class_agreement": float((cls == alt).float().mean())}
        bar.set_postfix(pairs_per_s=f"{pairs / (time.perf_counter() - start):.1f}")
    seconds = time.perf_counter() - start
    summary = {"layers": layers, "seconds": seconds, "pairs_matched": pairs, "target_layers": targets,
               "sources": {k: bool(s.layers(k)) for k in SOURCES}}
    return tensors, summary


# ----------------------------------------------------------------------------- the stored flow

class FlowStore:
    """A computed flow: flow.json (set, config, summary, data check) + flow.safetensors (matches, classes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / FLOW_FILE).is_file():
            raise FileFormatError(f"{self.path} is not a flow store (no {FLOW_FILE}); make one with `saekit flow SET "
                                  f"--out {self.path}`.")
        self.meta = read_json(self.path / FLOW_FILE)
        self.tensors = read_tensors(self.path / TENSORS_FILE)
        self.set = SaeSet(Path(self.meta["set"]["root"]), [Member(**m) for m in self.meta["set"]["members"]])
        self.cfg = FlowConfig(**self.meta["config"])

    @staticmethod
    def holds_one(path: Path) -> bool:
        return (path / FLOW_FILE).is_file()

    def target_layers(self) -> list[int]:
        return [int(x) for x in self.meta["summary"]["target_layers"]]

    def check_latent(self, hook: str, latent: int) -> Member:
        m = self.set.by_hook(hook)
        if not 0 <= latent < m.d_sae:
            raise SaekitError(f"feature {latent} does not exist in {hook} (its SAE has d_sae {m.d_sae}: 0–{m.d_sae - 1}).")
        return m

    def class_of(self, layer: int, latent: int) -> str | None:
        t = self.tensors.get(f"class/{layer}")
        return None if t is None else CLASSES[int(t[latent])]

    def predecessors(self, hook: str, latent: int, min_cos: float = 0.0) -> list[dict[str, Any]]:
        """The matches of a residual feature at layer L among the layer L−1 SAEs, best first per source kind."""
        m = self.check_latent(hook, latent)
        v = self.cfg.variant
        out = []
        if m.kind != "resid":
            return out
        for kind in SOURCES:
            if (cos := self.tensors.get(f"{v}/{m.layer}/{kind}/cos")) is None:
                continue
            idx = self.tensors[f"{v}/{m.layer}/{kind}/idx"]
            src = self.set.at(kind, m.layer - 1)
            out += [{"hook": src.hook, "latent": int(i), "cos": float(c), "kind": kind, "layer": src.layer}
                    for c, i in zip(cos[latent].tolist(), idx[latent].tolist()) if c >= min_cos]
        return out

    def successors(self, hook: str, latent: int, min_cos: float = 0.0) -> list[dict[str, Any]]:
        """Residual features at the next layer that list this feature among their matches, best first."""
        m = self.check_latent(hook, latent)
        layer = m.layer + 1
        v = self.cfg.variant
        if (idx := self.tensors.get(f"{v}/{layer}/{m.kind}/idx")) is None:
            return []
        cos = self.tensors[f"{v}/{layer}/{m.kind}/cos"]
        hit = (idx == latent) & (cos >= min_cos)
        rows, cols = hit.nonzero(as_tuple=True)
        tgt = self.set.at("resid", layer)
        out = [{"hook": tgt.hook, "latent": int(r), "cos": float(cos[r, c]), "kind": "resid", "layer": layer}
               for r, c in zip(rows.tolist(), cols.tolist())]
        return sorted(out, key=lambda e: -e["cos"])

    def graph(self, hook: str, latent: int, depth: int = 3, min_cos: float | None = None, per_step: int = 2
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(nodes, edges) of a feature's flow graph: up to `depth` steps back through residual predecessors (block
        predecessors are leaves) and forward through residual successors, `per_step` best matches above
        `min_cos` (default the threshold) per source kind and step."""
        min_cos = self.cfg.threshold if min_cos is None else min_cos
        self.check_latent(hook, latent)
        nodes: dict[tuple[str, int], dict[str, Any]] = {}
        edges: list[dict[str, Any]] = []

        def node(h: str, i: int) -> tuple[str, int]:
            if (h, i) not in nodes:
                mem = self.set.by_hook(h)
                nodes[(h, i)] = {"hook": h, "latent": i, "layer": mem.layer, "kind": mem.kind,
                                 "class": self.class_of(mem.layer, i) if mem.kind == "resid" else None}
            return h, i

        node(hook, latent)
        frontier = [(hook, latent)]
        for _ in range(depth):
            nxt = []
            for h, i in frontier:
                by_kind: dict[str, int] = {}
                for p in self.predecessors(h, i, min_cos):
                    if by_kind.setdefault(p["kind"], 0) >= per_step:
                        continue
                    by_kind[p["kind"]] += 1
                    node(p["hook"], p["latent"])
                    edges.append({"source": (p["hook"], p["latent"]), "target": (h, i), "cos": p["cos"], "kind": p["kind"]})
                    if p["kind"] == "resid":
                        nxt.append((p["hook"], p["latent"]))
            frontier = nxt
        frontier = [(hook, latent)]
        for _ in range(depth):
            nxt = []
            for h, i in frontier:
                for q in self.successors(h, i, min_cos)[:per_step]:
                    node(q["hook"], q["latent"])
                    edges.append({"source": (h, i), "target": (q["hook"], q["latent"]), "cos": q["cos"], "kind": "resid"})
                    nxt.append((q["hook"], q["latent"]))
            frontier = nxt
        return list(nodes.values()), edges

    def shares(self) -> dict[int, dict[str, float]]:
        return {int(k): v["shares"] for k, v in self.meta["summary"]["layers"].items()}


def claim_flow(out: Path, cfg: FlowConfig, root: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out holding something else, or a flow of another set or config."""
    from .files import claim_output

    def differs(p: Path) -> str | None:
        old = read_json(p / FLOW_FILE)
        diff = [f"{k} {v!r} → {asdict(cfg)[k]!r}" for k, v in old.get("config", {}).items() if asdict(cfg).get(k) != v]
        if Path(old.get("set", {}).get("root", "")).resolve() != root.resolve():
            diff.insert(0, f"set {old.get('set', {}).get('root')} → {root}")
        return ", ".join(diff) or None

    claim_output(out, "a flow store", FlowStore.holds_one, overwrite, differs)


def save_flow(out: Path, s: SaeSet, cfg: FlowConfig, tensors: dict[str, torch.Tensor], summary: dict[str, Any],
              check: dict[str, Any]) -> Path:
    """Write the flow store as one folder swapped in whole."""
    from .version import __version__

    meta = {"kind": "flow", "saekit_version": __version__, "set": {"root": str(s.root), **s.manifest()},
            "config": asdict(cfg), "classes": list(CLASSES), "summary": summary, "data_check": check}
    with replacing(out) as staged:
        write_tensors(staged / TENSORS_FILE, tensors)
        write_json(staged / FLOW_FILE, meta)
        (staged / REPORT_FILE).write_text(report(meta))
    return out


# ----------------------------------------------------------------------------- the data check

def _standardized(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0, unbiased=False).clamp_min(1e-12)


def same_density_partners(fires_src: torch.Tensor, fires_tgt: torch.Tensor, avoid: torch.Tensor,
                          gen: torch.Generator) -> torch.Tensor:
    """For each target feature, a random source feature of (nearly) the same firing count, not `avoid`: the
    source features sorted by count, a pick among the 5 nearest ranks."""
    order = torch.argsort(fires_src.float() + torch.rand(len(fires_src), generator=gen) * 0.5)
    ranks = torch.searchsorted(fires_src[order].float().contiguous(), fires_tgt.float().contiguous())
    jitter = torch.randint(-2, 3, ranks.shape, generator=gen)
    pick = order[(ranks + jitter).clamp(0, len(order) - 1)]
    clash = pick == avoid
    pick[clash] = order[(ranks[clash] + 3).clamp(0, len(order) - 1)]
    return pick


def pair_statistics(z_t: torch.Tensor, z_s: torch.Tensor, partner: torch.Tensor, feats: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Pearson correlation over tokens, P(partner fires | target fires)) for target features `feats` paired with
    source features `partner` [len(feats)]."""
    a, b = z_t[:, feats], z_s[:, partner]
    corr = (_standardized(a) * _standardized(b)).mean(0)
    fires = a > 0
    prec = ((b > 0) & fires).sum(0).float() / fires.sum(0).clamp_min(1).float()
    return corr, prec


def data_check(s: SaeSet, tensors: dict[str, torch.Tensor], cfg: FlowConfig, acts: dict[str, torch.Tensor],
               load: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """On held-out activations `acts` (hook → [N, d_in]): for every residual feature that fires ≥ min_fires times,
    the correlation of its activations with its top match's (per source kind) against a random feature of the same
    density, and the precision of its persisting link (fraction of its firing tokens where the matched residual
    predecessor fires) against the same random partner."""
    from .sae import load_sae

    load = load or (lambda p: load_sae(p))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = next(iter(acts.values())).shape[0]
    codes: dict[str, torch.Tensor] = {}

    def z(m: Member) -> torch.Tensor:
        if m.hook not in codes:
            with torch.no_grad():
                codes[m.hook] = load(m.path).dense_codes(acts[m.hook].float())
        return codes[m.hook]

    per_layer: dict[str, Any] = {}
    totals: dict[str, list[torch.Tensor]] = {}
    for layer in [int(x) for x in sorted({int(k.split("/")[1]) for k in tensors if k.startswith("class/")})]:
        zt = z(s.at("resid", layer))
        fires_t = (zt > 0).sum(0)
        feats = (fires_t >= cfg.check_min_fires).nonzero().squeeze(1)
        cls = tensors[f"class/{layer}"][feats]
        row: dict[str, Any] = {"features_checked": int(len(feats))}
        for kind in SOURCES:
            if (src := s.at(kind, layer - 1)) is None or not len(feats):
                continue
            zs = z(src)
            top = tensors[f"{cfg.variant}/{layer}/{kind}/idx"][feats, 0].long()
            rand = same_density_partners((zs > 0).sum(0), fires_t[feats], top, gen)
            c_top, p_top = pair_statistics(zt, zs, top, feats)
            c_rand, p_rand = pair_statistics(zt, zs, rand, feats)
            row[kind] = {"corr_top": float(c_top.mean()), "corr_random": float(c_rand.mean())}
            for name, t in (("corr_top", c_top), ("corr_random", c_rand)):
                totals.setdefault(f"{kind}/{name}", []).append(t)
            if kind == "resid":
                totals.setdefault("precision_top", []).append(p_top)
                totals.setdefault("precision_top_random", []).append(p_rand)
                persist = (cls == CLASSES.index("persisting")) | (cls == CLASSES.index("transformed"))
                row["persisting_links"] = int(persist.sum())
                if persist.any():
                    row["precision_persisting"] = float(p_top[persist].mean())
                    row["precision_random"] = float(p_rand[persist].mean())
                    totals.setdefault("precision_persisting", []).append(p_top[persist])
                    totals.setdefault("precision_random", []).append(p_rand[persist])
        per_layer[str(layer)] = row
        codes.pop(s.at("resid", layer - 1).hook, None)
        for kind in ("attn", "mlp"):
            if (src := s.at(kind, layer - 1)) is not None:
                codes.pop(src.hook, None)
    overall = {k: float(torch.cat(v).mean()) for k, v in totals.items()}
    overall.update({f"{k}_n": int(sum(len(t) for t in v)) for k, v in totals.items() if k.endswith("corr_top")
                    or k == "precision_persisting"})
    return {"ran": True, "tokens": n, "min_fires": cfg.check_min_fires, "overall": overall, "layers": per_layer}


def harvest_heldout(s: SaeSet, tokens: int, model=None, model_arg: str | None = None, dataset: str | None = None,
                    device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every set hook's activations on `tokens` held-out tokens of the data the set was trained on, one forward
    pass per batch."""
    from .config import DataConfig
    from .data import load_contexts
    from .harvest import Harvester
    from .lm import load_model
    from .sae import load_sae

    info = load_sae(s.members[0].path).info
    data = DataConfig.from_manifest(info, model=model_arg, dataset=dataset)
    if model is None:
        print(f"saekit: loading model {data.model!r} for the data check", flush=True)
        model = load_model(data.model, device=device)
    _, held = load_contexts(model.tokenizer, data.dataset, data.context_size, data.heldout_fraction, data.seed,
                            data.text_column)
    if held is None:
        raise SaekitError("the set's data leaves no held-out documents for the data check; pass --check-tokens 0 "
                          "to skip it, or a --dataset with more documents.")
    h = Harvester(model, [m.hook for m in s.members]).harvest(held.tokens, tokens)
    return h.acts, {"model": data.model, "dataset": data.dataset, "split": "held-out"}


# ----------------------------------------------------------------------------- the command

def run_flow(root: str | Path, dirs: list[Path], out: str | Path, cfg: FlowConfig, model_arg: str | None = None,
             dataset: str | None = None, overwrite: bool = False, model=None) -> Path:
    """`saekit flow`: read and check the set (writing its manifest), match every residual layer, run the data
    check (unless --check-tokens 0), store and print the report."""
    out = Path(out)
    s = read_set(dirs, root)
    check_chain(s)
    claim_flow(out, cfg, Path(root), overwrite)
    write_set_manifest(s)
    print(f"saekit: flow over {len(s.members)} SAEs of {s.model} (d_sae {s.d_sae}): resid layers {s.layers('resid')}"
          + "".join(f", {k} layers {s.layers(k)}" for k in ("attn", "mlp") if s.layers(k)), flush=True)
    tensors, summary = compute_flow(s, cfg)
    if cfg.check_tokens:
        acts, where = harvest_heldout(s, cfg.check_tokens, model, model_arg, dataset)
        check = {**data_check(s, tensors, cfg, acts), **where}
    else:
        check = {"ran": False, "why": "skipped: --check-tokens 0"}
    save_flow(out, s, cfg, tensors, summary, check)
    print(report(read_json(out / FLOW_FILE)))
    print(f"flow store: {out}")
    return out


def report(meta: dict[str, Any]) -> str:
    """report.md: per-layer class shares, the two variants' agreement, timing, and the data check."""
    cfg, summ, check = meta["config"], meta["summary"], meta["data_check"]
    other = VARIANTS[1 - VARIANTS.index(cfg["variant"])]
    lines = [f"# Feature flow — {meta['set'].get('model')} (d_sae {meta['set'].get('d_sae')})", "",
             f"Matched by {cfg['variant']} cosine, threshold {cfg['threshold']}, top {cfg['top_k']} per source; "
             f"{summ['pairs_matched']} SAE pairs in {summ['seconds']:.2f} s. Sources present: "
             + ", ".join(k for k, v in summ["sources"].items() if v) + ".", "",
             "| layer | " + " | ".join(CLASSES) + (f" | top-1 resid match = {other}'s | class = {other}'s |"
                                                     if cfg.get("compare", True) else " |"),
             "|---" * (len(CLASSES) + 1 + 2 * cfg.get("compare", True)) + "|"]
    for layer, row in summ["layers"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{row['shares'][c]:.1%}" for c in CLASSES) + " |"
                     + (f" {row['top1_resid_agreement']:.1%} | {row['class_agreement']:.1%} |" if cfg.get("compare", True) else ""))
    if not cfg.get("compare", True):
        lines += ["", f"({other} variant not matched: --no-compare.)"]
    best = [row["mean_best_cos"] for row in summ["layers"].values()]
    lines += ["", "Mean best cosine per source: " + ", ".join(
        f"{k} {sum(b[k] for b in best) / len(best):.3f}" for k in SOURCES if all(k in b for b in best)) + "."]
    shared = {f"{layer} {k}": v for layer, row in summ["layers"].items() for k, v in row.get("same_index_top1", {}).items()
              if v > 0.2}
    if shared:
        lines += ["", f"**Warning: the SAEs look like they share their random initialization** — the top match is the "
                  f"feature with the same index for {max(shared.values()):.0%} of features ({', '.join(list(shared)[:4])}"
                  f"{' …' if len(shared) > 4 else ''}; chance: 1/d_sae). Matches then reflect the common init, not "
                  "the model: train each SAE from its own seed, or longer; the data check below says what holds."]
    lines += ["", "## Data check (held-out co-activation)", ""]
    if not check.get("ran"):
        lines.append(f"Not run — {check.get('why', 'no reason recorded')}.")
        return "\n".join(lines) + "\n"
    o = check["overall"]
    lines += [f"{check['tokens']} held-out tokens of {check.get('dataset')} through {check.get('model')}; residual "
              f"features firing ≥ {check['min_fires']} times. Correlation of activations at the same tokens, top "
              "match vs a random feature of the same density:", "",
              "| source | features | corr top match | corr random |", "|---|---|---|---|"]
    for kind in SOURCES:
        if f"{kind}/corr_top" in o:
            lines.append(f"| {kind} L−1 | {o[f'{kind}/corr_top_n']} | {o[f'{kind}/corr_top']:.3f} | "
                         f"{o[f'{kind}/corr_random']:.3f} |")
    if "precision_top" in o:
        lines += ["", f"Top residual match, every checked feature: it fires on {o['precision_top']:.1%} of the tokens "
                  f"where the feature fires; a random same-density feature on {o['precision_top_random']:.1%}."]
    if "precision_persisting" in o:
        lines += ["", f"Precision of persisting links ({o['precision_persisting_n']} features classified persisting "
                  f"or transformed): the predecessor fires on {o['precision_persisting']:.1%} of the tokens where the "
                  f"feature fires; a random same-density feature on {o['precision_random']:.1%}."]
    else:
        lines += ["", "No feature that fires often enough is classified persisting: no link precision."]
    return "\n".join(lines) + "\n"
