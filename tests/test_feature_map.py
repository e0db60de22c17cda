"""The feature map: UMAP by default and what it keeps of the decoder geometry, the declared PCA fallback, the
builder's and the store's record of it, its figures, and the Overview page's filter highlighting it."""

from __future__ import annotations

import base64
import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import BROWSER_SCRIPT, manifest

from saekit.errors import DataError
from saekit.features import FeatureBuilder, FeatureConfig, FeatureStore
from saekit.features.weights import MAP_NEIGHBOURS, decoder_neighbours, feature_map, map_neighbour_recall


def planted(n: int = 400, d: int = 32, clusters: int = 20, spread: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Unit rows around `clusters` random centres: the structure a useful map must show."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    return torch.nn.functional.normalize(centres[torch.arange(n) % clusters] + spread * torch.randn(n, d, generator=g)
                                         / d**0.5, dim=1)


def values(v) -> list:
    """A plotly JSON array: a list, or (plotly ≥ 6, numpy data) base64 typed-array bytes."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


@pytest.fixture
def no_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError, as without umap-learn


# ----------------------------------------------------------------------------- the map

def test_umap_keeps_planted_neighbourhoods_far_better_than_pca():
    pytest.importorskip("umap")
    W = planted()
    near = decoder_neighbours(W, 10)["neighbour_id"]
    xy, method, note = feature_map(W)
    assert method == "umap" and note.startswith("UMAP: cosine") and xy.shape == (400, 2) and torch.isfinite(xy).all()
    pca, _, _ = feature_map(W, "pca")
    umap_recall, pca_recall = map_neighbour_recall(xy, near), map_neighbour_recall(pca, near)
    assert umap_recall > 0.4 and umap_recall > 2.5 * pca_recall, (umap_recall, pca_recall)


def test_umap_map_is_fixed_by_its_seed_and_uses_the_given_neighbours():
    pytest.importorskip("umap")
    W = planted(n=120, clusters=6, seed=1)
    xy, _, _ = feature_map(W, "umap", seed=3)
    assert torch.equal(xy, feature_map(W, "umap", seed=3)[0])
    assert not torch.equal(xy, feature_map(W, "umap", seed=4)[0])
    # the builder passes its own neighbour search (more columns than UMAP needs): the same map
    assert torch.equal(xy, feature_map(W, "umap", seed=3, neighbours=decoder_neighbours(W, 20))[0])


def test_pca_is_declared_when_asked_or_when_umap_learn_is_missing(no_umap):
    W = planted(n=50, clusters=5)
    xy, method, note = feature_map(W)  # auto
    assert method == "pca" and "umap-learn is not installed" in note and "pip install umap-learn" in note
    assert xy.shape == (50, 2)
    assert feature_map(W, "pca")[1:] == ("pca", "PCA: asked for (--map pca)")
    with pytest.raises(DataError, match="pip install umap-learn"):
        feature_map(W, "umap")


def test_too_few_latents_for_umap():
    pytest.importorskip("umap")
    W = planted(n=MAP_NEIGHBOURS, clusters=3)
    xy, method, note = feature_map(W)
    assert method == "pca" and f"{MAP_NEIGHBOURS} latents are too few" in note and xy.shape == (MAP_NEIGHBOURS, 2)
    with pytest.raises(DataError, match="more than"):
        feature_map(W, "umap")
    with pytest.raises(DataError, match="auto, umap or pca"):
        feature_map(W, "tsne")


def test_neighbour_recall_is_one_for_an_exact_map_and_k_over_n_for_a_random_one():
    g = torch.Generator().manual_seed(0)
    angle = torch.rand(300, generator=g) * 2 * math.pi  # a circle in 2 of 16 dims: PCA recovers it exactly
    W = torch.zeros(300, 16)
    W[:, 0], W[:, 1] = angle.cos(), angle.sin()
    near = decoder_neighbours(W, 10)["neighbour_id"]
    assert map_neighbour_recall(feature_map(W, "pca")[0], near) == pytest.approx(1.0)
    assert map_neighbour_recall(W[:, :2], near, chunk=7) == map_neighbour_recall(W[:, :2], near)
    assert map_neighbour_recall(W[:, :2], near, rows=50) == pytest.approx(1.0)  # a sample of latents
    random = torch.rand(300, 2, generator=g)
    assert map_neighbour_recall(random, near) < 0.1  # ≈ 10/300 plus the luck of a few


def test_builder_records_the_map_and_keeps_the_store_neighbours():
    n, V, d = 40, 12, 16
    cfg = FeatureConfig(top_n=3, sample_size=3, window_before=1, window_after=1, profile_tokens=2, logit_tokens=2,
                        neighbours=4, device="cpu")
    b = FeatureBuilder(n, V, cfg)
    g = torch.Generator().manual_seed(0)
    rows = 60
    values, indices = torch.rand(rows, 3, generator=g) + 0.1, torch.stack([torch.randperm(n, generator=g)[:3] for _ in range(rows)])
    b.add(values, indices, torch.randint(0, V, (rows,), generator=g), torch.arange(rows) % 6 + 1, torch.arange(rows) // 6)
    W_dec = planted(n=n, d=d, clusters=4)
    stats, feats, info = b.finish(W_dec, torch.randn(d, V, generator=g), None)
    expected = decoder_neighbours(W_dec, 4)
    assert torch.equal(feats["neighbour_id"], expected["neighbour_id"]) and feats["neighbour_id"].shape == (n, 4)
    assert torch.allclose(feats["neighbour_cos"], expected["neighbour_cos"])
    xy, method, note = feature_map(W_dec, "auto", cfg.seed)
    assert (info["map_method"], info["map_note"]) == (method, note) and torch.equal(stats["map_xy"], xy)
    assert info["map_neighbour_recall"] == pytest.approx(map_neighbour_recall(xy, decoder_neighbours(W_dec, 10)["neighbour_id"]))
    assert info["map_seconds"] >= 0


def test_store_manifest_says_which_map_and_how_good(tiny_store):
    man = manifest(tiny_store["store"])
    assert man["map_method"] in ("umap", "pca") and man["map_note"].startswith(man["map_method"].upper())
    assert 0 <= man["map_neighbour_recall"] <= 1
    try:
        import umap  # noqa: F401
    except ImportError:
        assert "umap-learn is not installed" in man["map_note"]
    else:
        assert man["map_method"] == "umap"


# ----------------------------------------------------------------------------- figures

def test_map_figure_greys_what_the_filter_leaves_out():
    from saekit.apps import render

    n = 30
    xy = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    density = np.r_[np.zeros(3), np.logspace(-5, -1, n - 3)]
    hover = [f"#{i}" for i in range(n)]
    fig = render.map_figure(xy, density, hover, "umap")
    assert len(fig.data) == 1 and list(fig.data[0].customdata) == list(range(n))
    assert not fig.layout.title.text  # the page names the map: plotly's toolbar covers no title
    bar = fig.data[0].marker.colorbar
    assert bar.title.text == "log10 density" and bar.orientation == "h"  # under the map, clear of hover labels

    keep = np.zeros(n, dtype=bool)
    keep[[4, 9, 20]] = True
    grey, coloured = render.map_figure(xy, density, hover, "umap", highlight=keep).data
    assert list(coloured.customdata) == [4, 9, 20] and list(coloured.text) == ["#4", "#9", "#20"]
    assert sorted(grey.customdata) == sorted(set(range(n)) - {4, 9, 20}) and grey.marker.color == "#d3d3d3"
    # the colour scale stays the whole store's, so a point keeps its colour whatever the filter
    assert coloured.marker.cmin == pytest.approx(np.log10(1e-5 / 10)) and coloured.marker.cmax == pytest.approx(-1)
    assert np.allclose(coloured.marker.color, np.log10(density[[4, 9, 20]]))


def test_density_figure_draws_the_matching_latents_over_the_rest():
    from saekit.apps import render

    density = np.r_[np.zeros(2), np.logspace(-6, -1, 50)]
    fig = render.density_figure(density)
    assert len(fig.data) == 1 and len(fig.data[0].x) == 50 and not fig.layout.title.text and not fig.layout.shapes
    keep = density > 1e-3
    everything, matching = render.density_figure(density, keep, (-3.0, 0.0)).data
    assert len(everything.x) == 50 and len(matching.x) == int(keep.sum())
    assert everything.xbins == matching.xbins  # the same bins, so the bars overlay
    shaded = render.density_figure(density, keep, (-3.0, 0.0)).layout.shapes
    assert len(shaded) == 1 and shaded[0].x0 == -3.0 and shaded[0].x1 == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- the Overview page

def test_overview_filter_highlights_the_tables_features_on_the_map(tiny_store, monkeypatch, app_test_guard):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=60).run()
    assert not at.exception and not at.error

    def charts():
        specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
        assert len(specs) == 2  # density histogram, map
        return specs

    store = FeatureStore(tiny_store["store"])
    live = np.flatnonzero(store.stats["density"] > 0)
    _, fig = charts()
    assert len(fig["data"]) == 1 or values(fig["data"][0]["customdata"]) == np.flatnonzero(store.stats["density"] == 0).tolist()
    assert sorted(values(fig["data"][-1]["customdata"])) == live.tolist()  # no filter but "hide dead": the live latents
    assert [s.value for s in at.subheader][:3] == ["Filter", "Density", "Feature map"]

    # the commonest top token of live latents, as the table shows it
    table = at.dataframe[0].value
    word = table["top tokens"].str.split(" · ").explode().value_counts().index[0]
    at.text_input(key="table_filter").set_value(word).run()
    assert not at.exception and not at.error
    shown = at.dataframe[0].value["feature"].tolist()
    assert 0 < len(shown) < len(live)
    density_fig, fig = charts()
    grey, coloured = fig["data"]
    assert sorted(values(coloured["customdata"])) == sorted(shown)
    assert sorted(values(grey["customdata"])) == sorted(set(range(store.d_sae)) - set(shown))
    assert any(f"{len(shown):,} of {store.d_sae:,} features match the filter" in c.value for c in at.caption)
    assert [len(values(t["x"])) for t in density_fig["data"]] == [len(live), len(shown)]
    assert all(json.loads(c.proto.config or "{}").get("displaylogo") is False for c in at.get("plotly_chart"))
