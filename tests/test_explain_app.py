"""The browser's explanations under AppTest: on the feature page (beside the user's label), the Explanations page
(search, sort, filter by score, best and worst), and the Search page's explanation matches."""

from __future__ import annotations

import shutil

import pytest
from helpers import BROWSER_SCRIPT, ok
from saekit.apps.labels import Labels
from streamlit.testing.v1 import AppTest
from test_explain import CFG, KeywordClient

from saekit.config import ExplainConfig
from saekit.explain import Results, run
from saekit.features import FeatureStore


@pytest.fixture(scope="module")
def explained(tiny_store, tmp_path_factory):
    dst = tmp_path_factory.mktemp("explained") / "store"
    shutil.copytree(tiny_store["store"], dst)
    run(FeatureStore(dst), KeywordClient(), ExplainConfig(**CFG | {"features": "0-7"}), progress=False)
    return dst


@pytest.fixture
def app(explained, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(explained))
    return AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)


def test_feature_page_shows_explanation_beside_label(app, explained):
    table = Results(explained, create=False).table()
    fid = int(table.index[0])
    Labels(explained).save(fid, "my own name", "", 0)
    app.query_params["page"] = "feature"
    app.query_params["feature"] = str(fid)
    at = ok(app.run())
    assert at.title[0].value == f"Feature {fid} — my own name"  # the user's label stays the name
    text = " ".join(m.value for m in at.markdown)
    assert f"**Explanation (LLM):** {table.loc[fid, 'llm']}" in text and "detection" in text
    assert "**Token-profile baseline:** fires on" in text
    assert any("Your label ‘my own name’" in c.value for c in at.caption)


def test_explanations_page_search_sort_filter(app, explained):
    table = Results(explained, create=False).table()
    app.query_params["page"] = "explanations"
    at = ok(app.run())
    assert at.title[0].value == "Explanations"
    frame = at.dataframe[-1].value
    assert len(frame) == len(table) and {"llm", "baseline", "llm_detection", "llm_fuzzing"} <= set(frame.columns)
    by = at.selectbox(key="explain_sort").value
    assert list(frame[by].dropna()) == sorted(frame[by].dropna(), reverse=True)  # sorted by score, best first
    assert "Best explained" in [s.value for s in at.subheader] and "Worst explained" in [s.value for s in at.subheader]
    at.selectbox(key="explain_sort").set_value("baseline_fuzzing").run()
    frame = ok(at).dataframe[-1].value
    assert list(frame["baseline_fuzzing"].dropna()) == sorted(frame["baseline_fuzzing"].dropna(), reverse=True)
    at.slider(key="explain_range").set_value((0.99, 1.0)).run()
    assert (ok(at).dataframe[-1].value["baseline_fuzzing"] >= 0.99).all()
    at.slider(key="explain_range").set_value((0.0, 1.0)).run()
    word = str(table["llm"].dropna().iloc[0]).split("'")[1]
    at.text_input(key="explain_query").set_value(word).run()
    found = ok(at).dataframe[-1].value
    assert 0 < len(found) <= len(table) and all(word in t for t in found["llm"].fillna("") + found["baseline"].fillna(""))


def test_search_page_finds_explanations(app, explained):
    table = Results(explained, create=False).table()
    word = str(table["llm"].dropna().iloc[0]).split("'")[1]
    app.query_params["page"] = "search"
    at = ok(app.run())
    at.text_input(key="search_query").set_value(word).run()
    assert "Explanations" in [s.value for s in ok(at).subheader]
    assert len(at.dataframe[-1].value) >= 1


def test_no_results_no_section(tiny_store, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)
    at.query_params["page"] = "explanations"
    at = ok(at.run())
    assert "No explanations yet" in at.info[0].value
