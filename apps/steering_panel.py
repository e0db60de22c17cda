"""The steering panel on the feature page: edit this feature (and others with it) while the model generates.

The feature page calls `steering_panel(store, feature_id, live=…)` once, at the bottom of the page. `store` is the
open `saekit.features.FeatureStore` (its manifest names the SAE directory, model and hook). The model and SAE come
from `live()` when given (any object with .model, .sae and .lock, e.g. the browser's cached `LiveModel`), else from
a LiveModel this module caches per store. Widget keys start with "steer_".

Generate: baseline and steered continuations from the same seed (saekit.steer.stream), streamed into the page token
by token; each edit's strength spelled out in the activation units of the store; the tokens the steered features
fire on (their token profile) and promote (their top logit effects) highlighted and counted in both texts; at the
end the tokens/s and the path the loop took (the plain HF model with its KV cache, or the bridge and why).
Sweep: a small strength sweep of this feature on the panel's prompt (saekit.steer_eval.sweep_feature): hit rate,
the probability of the feature's top logit tokens, perplexity ratio and side-effect KL against strength.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from saekit import steer as S
from saekit.errors import SaekitError

DEFAULT_PROMPT = "I think that"
SWEEP = (0.0, 1.0, 2.0, 4.0, 8.0)
NEUTRAL = 2  # neutral prompts for the sweep's side-effect KL (kept small: the panel runs on CPU)
MARKED = 10  # profile tokens and promoted logit tokens per steered feature that are highlighted
KINDS = {"fires": "a token it fires on (token profile)", "promotes": "a token it promotes (top logit effect)"}
STYLE = {"fires": "background:rgba(255,110,0,.35);border-radius:3px", "promotes": "border-bottom:2px solid #2c7fb8"}
CURSOR = "<span style='color:#bbb'>▌</span>"


@st.cache_resource(show_spinner="loading the model and SAE …")
def _live_for(path: str):
    from saekit.apps.live import LiveModel

    from saekit.features import FeatureStore

    return LiveModel(FeatureStore(path))


def _typical(store, fid: int) -> tuple[float, float]:
    """(mean activation when firing, max activation) from the store's stats (0 when it never fired)."""
    s = store.stats
    mean = float(np.asarray(s["mean"])[fid]) if "mean" in s else 0.0
    mx = float(np.asarray(s["act_max"])[fid]) if "act_max" in s else 0.0
    return mean, mx


# ----------------------------------------------------------------------------- edits, spelled out

@dataclass(frozen=True)
class Row:
    """One (feature, mode, value) row of the panel, with the feature's store statistics."""

    feature: int
    mode: str
    value: float
    typical: float  # mean activation when it fires (0: never fired)
    act_max: float
    target: str = "residual"  # what the edit moves: the residual (an SAE's hook), or a transcoder's "MLP output"

    @property
    def edit(self) -> S.Edit:
        return S.make_edit(self.mode, self.feature, self.value)

    @property
    def title(self) -> str:
        f, v, t = self.feature, self.value, self.typical
        if self.mode == "add":
            return f"add #{f} {v:g} × {t:.3g} = {v * t:.4g}" if t > 0 else f"add #{f} {v:g} (raw)"
        return {"clamp": f"clamp #{f} to {v:g}", "scale": f"scale #{f} × {v:g}", "ablate": f"ablate #{f}"}[self.mode]

    def explain(self) -> str:
        """What the edit does to the residual stream (a transcoder's: to the MLP output), in numbers (every position
        but BOS, prompt and generated)."""
        f, v, t, mx, moved = self.feature, self.value, self.typical, self.act_max, self.target
        kept = "the transcoder's prediction error" if moved == "MLP output" else "the SAE's reconstruction error"
        where = "at every position (prompt and generated; BOS excepted)"
        if self.mode == "add":
            to = "" if moved == "residual" else f" to the {moved}"
            if t > 0:
                return (f"**{v:g} × {t:.3g} = {v * t:.4g}** added along `W_dec[{f}]`{to} {where}: the multiplier × "
                        f"feature {f}'s typical activation (its mean when it fires; max {mx:.3g}).")
            return (f"**{v:g}** (raw: feature {f} never fired in the store, so it has no typical activation) added "
                    f"along `W_dec[{f}]`{to} {where}.")
        if self.mode == "clamp":
            rel = f" = {v / t:.3g} × its typical activation {t:.3g}" if t > 0 else " (it never fired in the store)"
            return (f"feature {f}'s activation **set to {v:g}**{rel} (max {mx:.3g}) {where}: the {moved} moves by "
                    f"({v:g} − z)·`W_dec[{f}]`, {kept} kept.")
        if self.mode == "scale":
            typ = f": a typical firing {t:.3g} becomes {v * t:.4g}" if t > 0 else " (it never fired in the store)"
            return (f"feature {f}'s activation **× {v:g}** wherever it fires{typ}; the {moved} moves by "
                    f"({v:g} − 1)·z·`W_dec[{f}]`.")
        typ = f"a typical firing removes {t:.3g}·`W_dec[{f}]`" if t > 0 else "it never fired in the store"
        return f"feature {f}'s activation **set to 0** {where}: {typ} from the {moved}."


def _scale(rows: Sequence[Row]) -> Callable[[int], float]:
    """Add strengths in typical activations; raw (unit 1) for a feature that never fired."""
    units = {r.feature: r.typical for r in rows if r.mode == "add" and r.typical > 0}
    return lambda f: units.get(f, 1.0)


# ----------------------------------------------------------------------------- highlighted text

def _norm(piece: str) -> str:
    return piece.strip().lower()


def feature_marks(store, features: Sequence[int], n: int = MARKED) -> dict[str, dict[str, list[int]]]:
    """{normalised token string: {kind: [features]}} for the tokens each feature fires on (its token profile) and
    promotes (its top logit effects; absent from stores built without them)."""
    marks: dict[str, dict[str, list[int]]] = {}
    for f in dict.fromkeys(features):
        feat = store.feature(int(f))
        for kind, strings in (("fires", [p["string"] for p in feat.profile[:n]]),
                              ("promotes", [s for _, s, _ in feat.logits_top[:n]])):
            for s in strings:
                if key := _norm(s):
                    marks.setdefault(key, {}).setdefault(kind, []).append(int(f))
    return marks


def marked_html(pieces: Sequence[str], marks: dict[str, dict[str, list[int]]]) -> tuple[str, dict[str, int]]:
    """The pieces as HTML, marked tokens highlighted (hover: which feature, which kind), and how many tokens of
    each kind there are."""
    counts = dict.fromkeys(KINDS, 0)
    out = []
    for p in pieces:
        text = html.escape(p).replace("\n", "<br>")
        hit = marks.get(_norm(p))
        if not hit:
            out.append(text)
            continue
        for kind in hit:
            counts[kind] += 1
        style = ";".join(STYLE[k] for k in hit)
        tip = "; ".join(f"{KINDS[k]} of feature{'s' if len(fs) > 1 else ''} {', '.join(map(str, fs))}"
                        for k, fs in hit.items())
        out.append(f"<span style='{style}' title='{html.escape(tip, quote=True)}'>{text}</span>")
    return "".join(out), counts


def _box(title: str, prompt: str, pieces: Sequence[str], marks, logprobs: Sequence[float] | None = None) -> str:
    """One continuation; `logprobs` None while it is still streaming (a cursor instead of the footer)."""
    body, counts = marked_html(pieces, marks)
    if logprobs is None:
        foot = CURSOR
    else:
        mean = sum(logprobs) / max(len(logprobs), 1)
        foot = (f"<br><small style='color:#888'>mean log-prob {mean:.3f} over {len(logprobs)} tokens · "
                f"{counts['fires']} fires-on · {counts['promotes']} promoted tokens</small>")
    return (f"<div style='border:1px solid #ddd;border-radius:6px;padding:8px;min-height:6em'>"
            f"<b>{html.escape(title)}</b><br><span style='color:#888'>{html.escape(prompt)}</span>{body}{foot}</div>")


LEGEND = (f"<small>Highlighted: <span style='{STYLE['fires']}'>tokens a steered feature fires on</span> (its token "
          f"profile) · <span style='{STYLE['promotes']}'>tokens it promotes</span> (its top logit effects); hover "
          "for the feature.</small>")


# ----------------------------------------------------------------------------- the panel

def _edit_rows(store, fid: int) -> list[Row]:
    """This feature's row, then the extra ones the user added (each with its own mode and strength)."""
    c1, c2 = st.columns(2)
    rows = [_row_widgets(store, fid, c1, c2, key=f"{fid}")]
    extra = st.session_state.setdefault(f"steer_extra_{fid}", [])
    for rid in list(extra):
        e1, e2, e3, e4 = st.columns([2, 2, 2, 1])
        f = int(e1.number_input("Also steer feature", min_value=0, max_value=store.d_sae - 1, step=1,
                                key=f"steer_xf_{fid}_{rid}"))
        rows.append(_row_widgets(store, f, e2, e3, key=f"{fid}_{rid}"))
        e4.button("✕", key=f"steer_xdel_{fid}_{rid}", help="stop steering this feature", on_click=extra.remove,
                  args=(rid,))
    st.button("+ steer another feature with it", key=f"steer_xadd_{fid}", on_click=_add_row, args=(store, fid, extra),
              help="a new row starts at this feature's nearest decoder neighbour")
    return rows


def _add_row(store, fid: int, extra: list[int]) -> None:
    """Widget callback: a new row, its feature set to this one's nearest decoder neighbour (else the next feature)."""
    rid = max(extra, default=-1) + 1
    extra.append(rid)
    neighbours = store.feature(fid).neighbours
    st.session_state[f"steer_xf_{fid}_{rid}"] = int(neighbours[0][0]) if neighbours else (fid + 1) % store.d_sae


def _row_widgets(store, f: int, mode_col, value_col, key: str) -> Row:
    typical, act_max = _typical(store, f)
    mode = mode_col.selectbox("Mode", S.MODES, key=f"steer_mode_{key}")
    default = {"add": 4.0, "clamp": round(act_max or 10.0, 2), "scale": 2.0, "ablate": 0.0}[mode]
    label = {"add": "Strength (× typical activation)" if typical > 0 else "Strength (raw)", "clamp": "Value",
             "scale": "Factor", "ablate": "Strength"}[mode]
    value = value_col.number_input(label, value=default, step=1.0, key=f"steer_strength_{key}_{mode}",
                                   disabled=mode == "ablate")
    return Row(f, mode, 0.0 if mode == "ablate" else float(value), typical, act_max,
               "MLP output" if store.is_transcoder else "residual")


def steering_panel(store, feature_id: int, live: Callable[[], Any] | None = None) -> None:
    fid = int(feature_id)
    st.subheader("Steering")
    if store.is_transcoder:
        st.caption(f"Edits {store.dictionary} latents on every token, generated ones included: they are read from the "
                   f"MLP input and the edit changes the MLP output by Δz·W_dec (`{store.hooks_text}`; the MLP's own "
                   "output, with the transcoder's prediction error, is kept), while the model writes a baseline and a "
                   "steered continuation from the same seed, token by token.")
    else:
        st.caption("Edits features at the SAE's hook on every token, generated ones included (clamp/scale/ablate keep "
                   "the SAE's reconstruction error), while the model writes a baseline and a steered continuation from "
                   "the same seed, token by token.")
    rows = _edit_rows(store, fid)
    c3, c4, c5, c6 = st.columns([1, 1, 3, 1])
    seed = int(c3.number_input("Seed", value=0, min_value=0, step=1, key=f"steer_seed_{fid}"))
    tokens = int(c4.number_input("Tokens", value=30, min_value=1, max_value=200, step=5, key=f"steer_tokens_{fid}"))
    prompt = c5.text_input("Prompt", value=DEFAULT_PROMPT, key=f"steer_prompt_{fid}")
    temperature = c6.number_input("Temperature", value=1.0, min_value=0.0, max_value=2.0, step=0.1,
                                  key=f"steer_temp_{fid}")
    st.markdown("\n".join(f"- {r.explain()}" for r in rows))
    b1, b2 = st.columns(2)
    run = b1.button("Generate", key=f"steer_run_{fid}", type="primary")
    sweep = b2.button(f"Strength sweep of feature {fid} ({', '.join(f'{s:g}' for s in SWEEP[1:])})",
                      key=f"steer_sweep_{fid}", disabled=rows[0].mode == "ablate",
                      help="this feature alone, in its mode; add/clamp sweep in typical activations, scale as factors")
    left, right = st.columns(2)
    boxes = [left.empty(), right.empty()]
    info = st.empty()
    if run or sweep:
        try:
            lm = live() if live is not None else _live_for(str(store.path))
            with lm.lock:
                if run:
                    st.session_state[f"steer_result_{fid}"] = _generate(lm, store, rows, prompt, seed, tokens,
                                                                        float(temperature), boxes)
                else:
                    st.session_state[f"steer_sweep_result_{fid}"] = _sweep(lm, rows[0], prompt, seed, tokens,
                                                                           float(temperature))
        except SaekitError as e:
            st.error(str(e))
            return
    result = st.session_state.get(f"steer_result_{fid}")
    if result is not None:
        g, titles, marks = result["generation"], result["titles"], result["marks"]
        boxes[0].markdown(_box("baseline", g.prompt, g.baseline_pieces, marks, g.baseline_logprobs),
                          unsafe_allow_html=True)
        boxes[1].markdown(_box("steered: " + "; ".join(titles), g.prompt, g.steered_pieces, marks,
                               g.steered_logprobs), unsafe_allow_html=True)
        with info.container():
            st.markdown(LEGEND, unsafe_allow_html=True)
            st.caption(f"{len(g.baseline_tokens)} + {len(g.steered_tokens)} tokens in {g.seconds:.2f} s: "
                       f"{g.tokens_per_second:.1f} tokens/s (baseline and steered rows in one batch) · {g.path} · "
                       f"seed {g.seed}, temperature {g.temperature:g}")
            if not g.path.startswith("plain HF"):
                st.warning(f"Generation took the slow path: {g.path}.")
    sweep_rows = st.session_state.get(f"steer_sweep_result_{fid}")
    if sweep_rows:
        st.plotly_chart(sweep_figure(sweep_rows, fid), key=f"steer_sweep_chart_{fid}")
        st.dataframe([{k: r[k] for k in ("strength", "hit", "act", "p_top", "ppl", "ppl_ratio", "kl")}
                      for r in sweep_rows], hide_index=True, key=f"steer_sweep_table_{fid}")


def _generate(lm, store, rows: list[Row], prompt: str, seed: int, tokens: int, temperature: float,
              boxes) -> dict[str, Any]:
    """Stream both continuations into `boxes` as they are sampled; what the panel keeps to show them again."""
    marks = feature_marks(store, [r.feature for r in rows])
    titles = [r.title for r in rows]
    heads = ["baseline", "steered: " + "; ".join(titles)]
    with st.spinner("preparing the fast generation path (once per model) …"):
        S.plain_hf(lm.model, [h for h in S.steering_hooks(lm.sae) if h])  # built and checked here, so the timing
        # below is the generation alone
    pieces: list[list[str]] = [[], []]
    for r in (0, 1):
        boxes[r].markdown(_box(heads[r], prompt, [], marks), unsafe_allow_html=True)
    with S.stream(lm.model, lm.sae, prompt, [r.edit for r in rows], seed, tokens, temperature,
                  scale=_scale(rows)) as steps:
        for t in steps:
            pieces[t.row].append(t.piece)
            boxes[t.row].markdown(_box(heads[t.row], prompt, pieces[t.row], marks), unsafe_allow_html=True)
        g = steps.generation
    return {"generation": g, "titles": titles, "marks": marks}


def sweep_figure(rows: list[dict[str, Any]], feature: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    xs = [r["strength"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("does it steer?", "what does it cost?"),
                        specs=[[{"secondary_y": True}, {"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=xs, y=[r["hit"] for r in rows], name="hit rate", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=xs, y=[r["p_top"] for r in rows], name="p(top logit tokens)", mode="lines+markers",
                             line=dict(dash="dot")), 1, 1, secondary_y=True)
    fig.add_trace(go.Scatter(x=xs, y=[r["ppl_ratio"] for r in rows], name="perplexity ratio", mode="lines+markers"),
                  1, 2)
    fig.add_trace(go.Scatter(x=xs, y=[r["kl"] for r in rows], name="KL on neutral text", mode="lines+markers",
                             line=dict(dash="dot")), 1, 2, secondary_y=True)
    fig.add_hline(y=1.5, line_dash="dash", line_color="grey", row=1, col=2)
    fig.update_xaxes(title_text="strength")
    fig.update_yaxes(title_text="hit rate", row=1, col=1)
    fig.update_yaxes(title_text="p(top tokens)", row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="perplexity / unsteered", row=1, col=2)
    fig.update_yaxes(title_text="KL (nats/token)", row=1, col=2, secondary_y=True)
    fig.update_layout(title=f"feature {feature}: strength sweep", template="plotly_white", height=380,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def _sweep(lm, row: Row, prompt: str, seed: int, tokens: int, temperature: float) -> list[dict[str, Any]]:
    from saekit.steer_eval import default_prompts, simple_ref, sweep_feature

    if row.mode == "add" and row.typical <= 0:
        raise SaekitError("this feature never fired in the store, so it has no typical activation to sweep in.")
    ref = simple_ref(lm.model, lm.sae, row.feature, row.typical if row.typical > 0 else 1.0)
    with st.spinner("sweeping strengths …"):
        return sweep_feature(lm.model, lm.sae, ref, list(SWEEP), [prompt], default_prompts()["neutral"][:NEUTRAL],
                             row.mode, "all", tokens, temperature, seed, progress=False)
