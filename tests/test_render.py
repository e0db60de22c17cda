"""The browser's HTML and plotly pieces (apps/render.py), as pure functions: how tokens are coloured, the
histogram's axis and band lines, feature names, the token-profile table's columns."""

from __future__ import annotations

import math
import re
from html import unescape

import numpy as np
import pytest
from saekit.apps import render

from saekit.features import Example, Feature, QuantileGroup
from saekit.features.config import hist_edges


def spans(html: str) -> list[tuple[str, str]]:
    """(style, text) of each token span, in order."""
    return [(m[1] or "", unescape(m[2])) for m in
            re.finditer(r'<span class="sk-t[^"]*"(?: style="([^"]*)")? title="[^"]*">([^<]*)</span>', html)]


def text_of(html: str) -> str:
    """What a reader sees of the first example (tags dropped, entities decoded), its value label excluded."""
    body = re.search(r'<div class="sk-ex"><span class="sk-val">[^<]*</span>(.*?)</div>', html, flags=re.S)[1]
    return unescape(re.sub(r"<[^>]+>", "", body))


def example(pieces: list[str], acts: list[float], focus: int = 0) -> Example:
    return Example(max(acts), 0, focus, list(range(len(pieces))), pieces, acts, focus)


def test_a_word_split_over_tokens_has_no_inner_gap():
    html = render.examples_html([example([" Mid", "o", " said", " ."], [0.0, 2.0, 1.0, 0.5])], 2.0)
    css = render.CSS
    rule = re.search(r"\.sk-ex \.sk-t \{([^}]*)\}", css)[1]
    assert "padding" not in rule and "margin" not in rule  # nothing between "Mid" and "o"
    assert not re.search(r"\.sk-(focus|special|split)[^{]*\{[^}]*(padding|margin)", css)
    assert "box-decoration-break: clone" in rule
    assert text_of(html) == " Mido said ."  # the text reads exactly as written: "Mido", not "Mid o"
    assert [t for _, t in spans(html)] == ["Mid", "o", "said", "."]


def test_leading_spaces_are_outside_the_highlight():
    html = render.token_span(" word", 3.0, 3.0)
    assert html.startswith(" <span") and html.endswith(">word</span>")
    (style, text), = spans(html)
    assert "background" in style and text == "word"
    lead = render.token_span("  two  ", 1.0, 2.0)
    assert lead.startswith("  <span") and lead.endswith("</span>  ")  # trailing spaces too
    assert render.token_span(" x", 0.0, 3.0).startswith(" <span")  # uncoloured tokens split the same way
    # a token that is only spaces and fires: its colour sits on visible ␣, never on whitespace
    (style, text), = spans(render.token_span("  ", 1.0, 2.0))
    assert "background" in style and text == "␣␣"
    (style, text), = spans(render.token_span("  ", 0.0, 2.0))
    assert style == "" and text == "  "
    for piece in (" a", "a ", "\n b", "\t"):  # no coloured span ever holds whitespace
        for _, text in spans(render.token_span(piece, 1.0, 1.0)):
            assert text == text.strip(), (piece, text)


def test_newlines_and_tabs_are_symbols_and_split_characters_are_explained():
    (_, text), = spans(render.token_span("\n", 1.0, 1.0))
    assert text == "↵"
    html = render.examples_html([example(["caf", "", "é", " ok"], [1.0, 1.0, 2.0, 0.0])], 2.0)
    assert "sk-split" in html and "∅" in html
    split = re.search(r'<span class="sk-t sk-split"[^>]*title="([^"]*)"', html)[1]
    assert "multi-byte character" in unescape(split)  # the hover says what ∅ is
    assert "multi-byte character" in re.search(r'<div class="sk-legend">([^<]*)</div>', html)[1]  # and the legend
    plain = render.examples_html([example(["a", " b"], [1.0, 0.0])], 1.0)
    assert "class=\"sk-legend\"" not in plain  # no legend when no ∅ shows
    assert render.piece_text("").startswith("∅") and render.piece_text(" x") == "␣x"


@pytest.mark.parametrize("lo, hi, want", [
    (0.05, 200.0, ["0.1", "1", "10", "100"]),
    (0.8, 30.0, ["1", "2", "5", "10", "20"]),
    (3.1, 8.7, ["4", "5", "6", "7", "8"]),
    (2e-5, 3e-2, ["1e-4", "1e-3", "1e-2"]),  # one style per axis: never "1e-04" beside "0.001"
    (1e-4, 1e-4, ["1e-4"]),
    (2e4, 3e6, ["2e4", "5e4", "1e5", "2e5", "5e5", "1e6", "2e6"]),
    (0.3, 4.0, ["0.5", "1", "2"]),
    (0.3, 0.45, ["0.3", "0.4"]),
])
def test_log_ticks_label_only_round_values(lo, hi, want):
    vals, text = render.log_ticks(lo, hi)
    assert text == want
    assert all(lo <= v <= hi for v in vals) and vals == sorted(vals)
    assert [float(t) for t in text] == pytest.approx(vals)  # each label is its tick's value


def test_log_ticks_refuse_a_non_positive_range():
    with pytest.raises(ValueError, match="0 < lo"):
        render.log_ticks(0.0, 1.0)


def feature_with(values: np.ndarray) -> Feature:
    edges = hist_edges()
    counts = np.histogram(values, bins=edges)[0].astype(np.int64)
    groups = [QuantileGroup(q / 4, (q + 1) / 4, lo, hi, []) for q, (lo, hi) in
              enumerate(zip([0.0, 0.5, 1.0, 2.0], [0.5, 1.0, 2.0, math.inf]))][::-1]
    return Feature(3, len(values), 10_000, len(values) / 10_000, float(values.mean()), float(values.max()), edges,
                   counts, [], groups, [], [], [], [])


def test_histogram_has_round_log_ticks_and_explained_band_lines(gen):
    values = np.random.default_rng(0).lognormal(0.0, 0.8, 2000)
    fig = render.hist_figure(feature_with(values))
    x = fig.layout.xaxis
    assert x.type == "log" and x.tickmode == "array"
    assert list(x.ticktext) == render.tick_texts(list(x.tickvals))
    assert set(x.ticktext) <= {"0.1", "0.2", "0.5", "1", "2", "5", "10", "20"}
    bar = fig.data[0]
    assert min(x.tickvals) >= bar.x.min() / 2 and max(x.tickvals) <= bar.x.max() * 2  # within the drawn range
    lines = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert sorted(s.x0 for s in lines) == [0.5, 1.0, 2.0]  # the quantile-group boundaries, nothing else
    marks = sorted((a.x, a.text) for a in fig.layout.annotations)  # on a log axis an annotation's x is log10
    assert marks == [(pytest.approx(math.log10(v)), t) for v, t in ((0.5, "25%"), (1.0, "50%"), (2.0, "75%"))]
    legend = [t.name for t in fig.data if t.type == "scatter"]
    assert legend and "quantile-group boundaries" in legend[0] and fig.layout.showlegend


def test_histogram_of_a_latent_that_never_fired_is_empty_not_broken():
    f = feature_with(np.array([1.0]))
    f.hist_counts[:] = 0
    f.groups = []
    fig = render.hist_figure(f)
    assert not fig.data and not fig.layout.shapes and fig.layout.showlegend is False


def test_feature_names_prefer_the_label_then_top_tokens():
    assert render.feature_name(12, "Sports", ["␣football"]) == "#12 · Sports"
    assert render.feature_name(12, "", ["␣Sports", "␣sport", "␣football"]) == "#12 · ␣Sports, ␣sport, ␣football"
    assert render.feature_name(7) == "#7"
    long = render.feature_name(1, "x" * 100)
    assert len(long) == len("#1 · ") + 40 and long.endswith("…")


def test_heatmap_rows_and_split_pieces():
    fig = render.heatmap_figure(np.ones((2, 3)), ["caf", "", "é"], ["#1 · a", "#2 · b"])
    assert list(fig.data[0].y) == ["#1 · a", "#2 · b"]
    assert list(fig.layout.xaxis.ticktext) == ["caf", "∅", "é"]
    assert "multi-byte" in fig.data[0].customdata[0][1]


def test_profile_table_has_four_fitting_columns():
    profile = [{"token": 5, "string": " Scottish", "fires": 11, "token_count": 18, "rate": 11 / 18, "share": 0.0119,
                "mean_act": 8.536}, {"token": 7, "string": "%", "fires": 8, "token_count": 9, "rate": 8 / 9,
                                     "share": 0.0087, "mean_act": 7.27}]
    frame, cols = render.profile_table(profile)
    assert list(frame.columns) == list(cols) == ["token", "fires/seen", "share", "mean"]
    assert frame.to_dict("list") == {"token": ["␣Scottish", "%"], "fires/seen": ["11/18", "8/9"],
                                     "share": [pytest.approx(1.19), pytest.approx(0.87)], "mean": [8.536, 7.27]}
    for name, c in cols.items():
        assert c.get("help") and c["width"] is None, name  # content-sized: a fixed width cuts long tokens
    assert cols["share"]["type_config"]["format"] == "%.1f%%"
    empty, _ = render.profile_table([])
    assert list(empty.columns) == list(cols) and len(empty) == 0
