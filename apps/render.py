"""HTML and plotly pieces of the browser, kept free of Streamlit so they can be tested on their own."""

from __future__ import annotations

import html
import math
import re

import numpy as np

from saekit.features import Example, Feature

# Token spans carry no horizontal padding or margin, so a word split over tokens ("Mid"+"o") reads as one word;
# whitespace is never coloured (a token's leading space sits outside its highlight), so a wrapped line ends in no
# coloured sliver; `box-decoration-break: clone` gives each line of a wrapped span its own rounded background.
CSS = """
<style>
.sk-ex {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; line-height: 1.9;
        white-space: pre-wrap; word-break: break-word; margin: 0 0 0.35rem 0; padding: 0.2rem 0.4rem;
        border-left: 3px solid #ddd;}
.sk-ex .sk-val {display: inline-block; min-width: 3.2rem; color: #888; font-size: 0.75rem;}
.sk-ex .sk-t {border-radius: 2px; -webkit-box-decoration-break: clone; box-decoration-break: clone;}
.sk-ex .sk-focus {box-shadow: inset 0 -2px 0 #c0392b; font-weight: 600;}
.sk-ex .sk-special, .sk-ex .sk-split {color: #999;}
.sk-legend {color: #888; font-size: 0.75rem; margin: 0 0 0.5rem 0;}
</style>
"""
SPLIT_MARK = "∅"
SPLIT_HELP = ("part of a multi-byte character split over tokens: the character is shown whole on the token "
              "that completes it")


def visible(piece: str) -> str:
    """Whitespace a reader should see: newlines and tabs become symbols; spaces stay (pre-wrap)."""
    return piece.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def split_space(text: str) -> tuple[str, str, str]:
    """(leading whitespace, core, trailing whitespace) of a displayed piece; all-space pieces are all lead."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = text.index(core)
    return text[:start], core, text[start + len(core):]


def token_span(piece: str, act: float, vmax: float, focus: bool = False, special: bool = False) -> str:
    """One token: its leading/trailing spaces uncoloured outside the span, its visible characters coloured by
    activation inside it. A token that is only spaces and fires shows them as ␣ so the colour has a glyph to sit
    on (same width in the monospace font); an empty piece (a split character) shows ∅ with an explanation."""
    alpha = 0.0 if vmax <= 0 or act <= 0 else min(1.0, act / vmax) * 0.85 + 0.1
    style = f' style="background: rgba(255, 110, 0, {alpha:.2f});"' if alpha else ""
    cls = "sk-t" + (" sk-focus" if focus else "") + (" sk-special" if special else "")
    title = f"{piece!r}  activation {act:.3g}"
    lead, core, trail = split_space(visible(piece))
    if not piece:
        cls += " sk-split"
        core, title = SPLIT_MARK, f"{title} · {SPLIT_HELP}"
    elif not core:  # only spaces: inside the span (hover shows the activation), as ␣ when there is colour
        lead, core = "", lead.replace(" ", "␣") if alpha or focus else lead
    span = f'<span class="{cls}"{style} title="{html.escape(title, quote=True)}">{html.escape(core)}</span>'
    return html.escape(lead) + span + html.escape(trail)


def example_html(ex: Example, vmax: float, special: set[int] | None = None) -> str:
    """One example as coloured tokens; hovering a token shows its activation."""
    spans = "".join(token_span(p, a, vmax, i == ex.focus, bool(special and t in special))
                    for i, (t, p, a) in enumerate(zip(ex.tokens, ex.pieces, ex.acts)))
    return f'<div class="sk-ex"><span class="sk-val">{ex.value:.3g}</span>{spans}</div>'


def examples_html(examples: list[Example], vmax: float, special: set[int] | None = None) -> str:
    """Examples, and a legend for ∅ when one shows."""
    body = "".join(example_html(e, vmax, special) for e in examples)
    legend = f'<div class="sk-legend">{SPLIT_MARK} = {SPLIT_HELP}.</div>' if "sk-split" in body else ""
    return CSS + body + legend


def tick_texts(vals: list[float]) -> list[str]:
    """Labels for one axis, in one style: plain decimals when every value lies in [0.001, 10000), else powers of
    ten for all (2e-5, 1e-4, 1e-3), so an axis never mixes "1e-04" with "0.001"."""
    if all(1e-3 <= v < 1e4 for v in vals):
        return [f"{v:g}" for v in vals]
    return [re.sub(r"e([+-]?)0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", f"{v:.0e}") for v in vals]


def log_ticks(lo: float, hi: float, min_ticks: int = 3) -> tuple[list[float], list[str]]:
    """Ticks for a log axis over [lo, hi]: decades (0.1, 1, 10) when they give `min_ticks`, else 1-2-5 steps,
    else every digit. Plotly's own log ticks label the minor digits ("8 9 10 2 3"), which read as a broken axis."""
    if not 0 < lo <= hi:
        raise ValueError(f"log ticks need 0 < lo <= hi, got {lo}, {hi}")
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    vals: list[float] = []
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        vals = [float(f"{m}e{d}") for d in decades for m in mantissas if lo <= float(f"{m}e{d}") <= hi]
        if len(vals) >= min_ticks:
            break
    return vals, tick_texts(vals)


def hist_figure(feature: Feature, per_decade: int = 12):
    """The latent's non-zero activations on a log axis (the stored 36 bins/decade, merged for display), with
    the boundaries of its quantile groups (the bands the page samples examples from) as labelled dotted lines."""
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
        fig.add_bar(x=centres, y=c, width=np.diff(e), marker_color="#e67e22", name="firings",
                    hovertemplate="%{x:.3g}: %{y} tokens<extra></extra>")
        bounds = [g for g in feature.groups if 0 < g.lo < math.inf]
        for g in bounds:  # shapes take data values on a log axis, annotations take log10 of them
            fig.add_vline(x=g.lo, line_dash="dot", line_color="#888", line_width=1)
            fig.add_annotation(x=math.log10(g.lo), y=1, yref="paper", yanchor="bottom", text=f"{g.q_lo:.0%}",
                               showarrow=False, font=dict(size=10, color="#666"))
        if bounds:  # one legend entry explains every dotted line
            fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(dash="dot", color="#888", width=1),
                            name="quantile-group boundaries (% of firings below)")
        vals, text = log_ticks(float(e[0]), float(e[-1]))
        fig.update_xaxes(tickmode="array", tickvals=vals, ticktext=text)
    fig.update_xaxes(type="log", title="activation")
    fig.update_yaxes(title="tokens")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=50, b=10), bargap=0, showlegend=bool(len(nz)),
                      legend=dict(orientation="h", yanchor="top", y=-0.3, x=0, font=dict(size=10)),
                      title=f"{feature.count:,} firings ({feature.density:.3%} of {feature.tokens:,} tokens)")
    return fig


def density_figure(density: np.ndarray, highlight: np.ndarray | None = None, window: tuple[float, float] | None = None):
    """Live latents by log10 density. With `highlight` (a bool mask over latents), those latents are drawn over the
    rest (grey); `window` (lo, hi in log10) shades the density filter's range. No title: the page names the figure,
    so plotly's toolbar covers nothing."""
    import plotly.graph_objects as go

    live = density > 0
    ld = np.log10(density[live])
    fig = go.Figure()
    if len(ld):
        bins = dict(start=float(ld.min()), end=float(ld.max()) + 1e-9, size=max(float(np.ptp(ld)) / 60, 0.02))
        on = live if highlight is None else live & highlight
        if highlight is not None:
            fig.add_histogram(x=ld, xbins=bins, marker_color="#d0d0d0", name="all live latents",
                              hovertemplate="10^%{x:.2f}: %{y} latents<extra>all</extra>")
        fig.add_histogram(x=np.log10(density[on]), xbins=bins, marker_color="#2c7fb8",
                          name="matching the filter" if highlight is not None else "live latents",
                          hovertemplate="10^%{x:.2f}: %{y} latents<extra></extra>")
    if window is not None and len(ld) and (window[0] > ld.min() or window[1] < ld.max()):
        fig.add_vrect(x0=max(window[0], float(ld.min())), x1=min(window[1], float(ld.max())), fillcolor="#2c7fb8",
                      opacity=0.08, line_width=0)
    fig.update_xaxes(title="log10 density (share of tokens a latent fires on)")
    fig.update_yaxes(title="latents")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), barmode="overlay", showlegend=highlight is not None,
                      legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom"), uirevision="density")
    return fig


def map_figure(xy: np.ndarray, density: np.ndarray, hover: list[str], method: str, highlight: np.ndarray | None = None):
    """Every decoder direction as a point, coloured by log10 density (a labelled colour bar under the map, clear of
    the hover labels). With `highlight` (a bool mask over latents) the other points are grey, drawn underneath.
    A point's customdata is its feature id. No title: the page names the map, so plotly's toolbar covers nothing;
    zoom and pan survive a change of highlight (uirevision)."""
    import plotly.graph_objects as go

    n = len(xy)
    floor = density[density > 0].min() if (density > 0).any() else 1e-9
    colour = np.log10(np.maximum(density, floor / 10))
    size = 4 if n > 5000 else 6
    on = np.ones(n, dtype=bool) if highlight is None else np.asarray(highlight, dtype=bool)
    fig = go.Figure()

    def points(ids: np.ndarray, **marker):
        return go.Scattergl(x=xy[ids, 0], y=xy[ids, 1], mode="markers", customdata=ids, text=[hover[i] for i in ids],
                            hovertemplate="%{text}<extra></extra>", showlegend=False, marker=dict(size=size, **marker))

    if not on.all():
        fig.add_trace(points(np.flatnonzero(~on), color="#d3d3d3", opacity=0.45))
    fig.add_trace(points(np.flatnonzero(on), color=colour[on], colorscale="Viridis", cmin=float(colour.min()),
                         cmax=float(colour.max()), opacity=0.85,
                         colorbar=dict(title=dict(text="log10 density", side="top"), orientation="h", x=0.5,
                                       xanchor="center", y=-0.02, yanchor="top", len=0.7, thickness=10)))
    fig.update_layout(height=520, margin=dict(l=10, r=10, t=30, b=10), dragmode="pan", uirevision=method,
                      hoverlabel=dict(align="left"))
    fig.update_xaxes(showticklabels=False, zeroline=False)  # the page's caption names the method; the axes mean nothing
    fig.update_yaxes(showticklabels=False, zeroline=False)
    return fig


def feature_name(i: int, label: str = "", top_tokens: list[str] | tuple[str, ...] = (), width: int = 40) -> str:
    """A feature as a reader knows it: its label if it has one, else its top tokens ("#12 · ␣Paris, ␣France")."""
    what = label.strip() or ", ".join(t for t in top_tokens if t)
    if len(what) > width:
        what = what[: width - 1] + "…"
    return f"#{i}" + (f" · {what}" if what else "")


def piece_text(piece: str) -> str:
    """A token shown on its own in a table, tick or hover: whitespace as symbols; ∅ for a split character."""
    from saekit.tokens import display_token

    return display_token(piece) if piece else f"{SPLIT_MARK} (part of a split multi-byte character)"


def heatmap_figure(z: np.ndarray, pieces: list[str], rows: list[str]):
    """Per-token activations (columns: tokens, rows: features)."""
    import plotly.graph_objects as go

    x = list(range(len(pieces)))
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=rows, colorscale="Oranges", zmin=0,
        customdata=np.array([[piece_text(p) for p in pieces]] * len(rows)),
        hovertemplate="%{y}<br>token %{x} ‘%{customdata}’: %{z:.3g}<extra></extra>", colorbar=dict(title="act")))
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=[visible(p) or SPLIT_MARK for p in pieces], tickangle=-60)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(height=140 + 26 * len(rows), margin=dict(l=10, r=10, t=10, b=10))
    return fig


def profile_table(profile: list[dict]):
    """The Feature page's token-profile table, made to fit the page's narrow right column (six numeric columns
    were cut at ordinary window widths): (frame, column_config) for st.dataframe. Four content-sized columns —
    token, fires/seen (firings on the token / its occurrences in the corpus: the rate, as the counts it comes
    from), share (% of the latent's firings on the token), mean activation; each header's help says what it is.
    `profile` is Feature.profile (dicts with string, fires, token_count, share, mean_act)."""
    import pandas as pd
    import streamlit as st

    from saekit.tokens import display_token

    frame = pd.DataFrame({"token": [display_token(p["string"]) for p in profile],
                          "fires/seen": [f"{p['fires']}/{p['token_count']}" for p in profile],
                          "share": [100 * p["share"] for p in profile],
                          "mean": [p["mean_act"] for p in profile]},
                         columns=["token", "fires/seen", "share", "mean"])
    text, num = st.column_config.TextColumn, st.column_config.NumberColumn
    return frame, {
        "token": text("token", help="the token (a space shown as ␣)"),
        "fires/seen": text("fires/seen", help="firings of this latent on the token / the token's occurrences in "
                                              "the analysed corpus: the rate at which the token makes it fire"),
        "share": num("share", format="%.1f%%", help="the share of the latent's firings that are on this token"),
        "mean": num("mean", format="%.2f", help="the latent's mean activation on the token"),
    }
