"""HTML and plotly pieces of the browser, kept free of Streamlit so they can be tested on their own."""

from __future__ import annotations

import html
import math

import numpy as np

from saekit.features import Example, Feature

CSS = """
<style>
.sk-ex {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; line-height: 1.9;
        white-space: pre-wrap; word-break: break-word; margin: 0 0 0.35rem 0; padding: 0.2rem 0.4rem;
        border-left: 3px solid #ddd;}
.sk-ex .sk-val {display: inline-block; min-width: 3.2rem; color: #888; font-size: 0.75rem;}
.sk-ex .sk-t {border-radius: 3px; padding: 0 1px;}
.sk-ex .sk-focus {outline: 1.5px solid #c0392b; font-weight: 600;}
.sk-ex .sk-special {color: #999;}
</style>
"""


def visible(piece: str) -> str:
    """Whitespace a reader should see: newlines and tabs become symbols; spaces stay (pre-wrap)."""
    return piece.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def token_span(piece: str, act: float, vmax: float, focus: bool = False, special: bool = False) -> str:
    alpha = 0.0 if vmax <= 0 or act <= 0 else min(1.0, act / vmax) * 0.85 + 0.1
    style = f"background: rgba(255, 110, 0, {alpha:.2f});" if alpha else ""
    cls = "sk-t" + (" sk-focus" if focus else "") + (" sk-special" if special else "")
    title = f"{piece!r}  activation {act:.3g}"
    return f'<span class="{cls}" style="{style}" title="{html.escape(title, quote=True)}">{html.escape(visible(piece)) or "∅"}</span>'


def example_html(ex: Example, vmax: float, special: set[int] | None = None) -> str:
    """One example as coloured tokens; hovering a token shows its activation."""
    spans = "".join(token_span(p, a, vmax, i == ex.focus, bool(special and t in special))
                    for i, (t, p, a) in enumerate(zip(ex.tokens, ex.pieces, ex.acts)))
    return f'<div class="sk-ex"><span class="sk-val">{ex.value:.3g}</span>{spans}</div>'


def examples_html(examples: list[Example], vmax: float, special: set[int] | None = None) -> str:
    return CSS + "".join(example_html(e, vmax, special) for e in examples)


def hist_figure(feature: Feature, per_decade: int = 12):
    """The latent's non-zero activations on a log axis (the stored 36 bins/decade, merged for display)."""
    import plotly.graph_objects as go

    counts, edges = feature.hist_counts, feature.hist_edges
    fig = go.Figure()
    nz = np.nonzero(counts)[0]
    if len(nz):
        step = max(1, round((len(edges) - 1) / 9 / per_decade))
        lo, hi = (nz[0] // step) * step, (nz[-1] // step + 1) * step
        c = np.add.reduceat(counts[lo:hi], np.arange(0, hi - lo, step))
        e = edges[lo: hi + 1: step]
        centres = np.sqrt(e[:-1] * e[1:])
        fig.add_bar(x=centres, y=c, width=np.diff(e), marker_color="#e67e22",
                    hovertemplate="%{x:.3g}: %{y} tokens<extra></extra>")
        for g in feature.groups:
            if 0 < g.lo < math.inf:
                fig.add_vline(x=g.lo, line_dash="dot", line_color="#888", line_width=1)
    fig.update_xaxes(type="log", title="activation")
    fig.update_yaxes(title="tokens")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), bargap=0,
                      title=f"{feature.count:,} firings ({feature.density:.3%} of {feature.tokens:,} tokens)")
    return fig


def density_figure(density: np.ndarray):
    import plotly.graph_objects as go

    alive = density[density > 0]
    fig = go.Figure()
    if len(alive):
        fig.add_histogram(x=np.log10(alive), nbinsx=60, marker_color="#2c7fb8",
                          hovertemplate="10^%{x:.2f}: %{y} latents<extra></extra>")
    fig.update_xaxes(title="log10 density (fraction of tokens a latent fires on)")
    fig.update_yaxes(title="latents")
    fig.update_layout(height=280, margin=dict(l=10, r=10, t=30, b=10),
                      title=f"{len(alive):,} live latents; {int((density == 0).sum()):,} never fired")
    return fig


def map_figure(xy: np.ndarray, density: np.ndarray, hover: list[str], method: str):
    """Every decoder direction as a point, coloured by log density; the point's customdata is its id."""
    import plotly.graph_objects as go

    floor = density[density > 0].min() if (density > 0).any() else 1e-9
    colour = np.log10(np.maximum(density, floor / 10))
    fig = go.Figure(go.Scattergl(
        x=xy[:, 0], y=xy[:, 1], mode="markers", customdata=np.arange(len(xy)), text=hover,
        hovertemplate="%{text}<extra></extra>",
        marker=dict(size=4 if len(xy) > 5000 else 6, color=colour, colorscale="Viridis", opacity=0.8,
                    colorbar=dict(title="log10<br>density"))))
    fig.update_layout(height=480, margin=dict(l=10, r=10, t=30, b=10), dragmode="pan",
                      title=f"decoder directions ({method.upper()}); click a point to open its page")
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def heatmap_figure(z: np.ndarray, pieces: list[str], rows: list[str]):
    """Per-token activations (columns: tokens, rows: features)."""
    import plotly.graph_objects as go

    x = list(range(len(pieces)))
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=rows, colorscale="Oranges", zmin=0,
        customdata=np.array([[visible(p) for p in pieces]] * len(rows)),
        hovertemplate="%{y}<br>token %{x} ‘%{customdata}’: %{z:.3g}<extra></extra>", colorbar=dict(title="act")))
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=[visible(p) or "∅" for p in pieces], tickangle=-60)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(height=140 + 26 * len(rows), margin=dict(l=10, r=10, t=10, b=10))
    return fig
