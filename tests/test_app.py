"""Every page of the feature browser under Streamlit's AppTest, on the tiny store (tiny model for 'Your text')."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BROWSER_SCRIPT, ok
from saekit.apps.labels import Labels
from streamlit.testing.v1 import AppTest

from saekit.features import FeatureStore


@pytest.fixture
def app(tiny_store, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    return AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)


def alive_feature(store_dir) -> int:
    store = FeatureStore(store_dir)
    return int(np.argsort(-store.stats["count"])[0])


def test_overview(app, tiny_store):
    at = ok(app.run())
    assert at.title[0].value == "Features"
    assert [m.value for m in at.metric][:2] == ["64", "1,500"]
    table = at.dataframe[0].value
    assert len(table) == int((FeatureStore(tiny_store["store"]).stats["count"] > 0).sum())
    assert {"feature", "label", "density", "fires", "max", "mean", "top tokens"} <= set(table.columns)
    at.text_input(key="table_filter").set_value("zzzz-no-such-token").run()
    assert len(ok(at).dataframe[0].value) == 0
    fid = alive_feature(tiny_store["store"])
    at.number_input(key="overview_open").set_value(fid).run()
    at.button(key="overview_open_btn").click().run()
    assert ok(at).title[0].value.startswith(f"Feature {fid}")
    assert at.query_params["page"] in ("feature", ["feature"]) and str(at.query_params["feature"]).strip("[]'") == str(fid)


def test_feature_page_shows_everything_and_saves_labels(app, tiny_store):
    fid = alive_feature(tiny_store["store"])
    app.query_params["page"] = "feature"
    app.query_params["feature"] = str(fid)
    at = ok(app.run())
    assert at.title[0].value == f"Feature {fid}"
    html = "".join(m.value for m in at.markdown)
    assert html.count('class="sk-ex"') >= 2 and "sk-focus" in html and "activation" in html  # examples + hover
    subheaders = [s.value for s in at.subheader]
    for name in ("Top activations", "Quantile groups", "Logit effects", "Token profile", "Neighbours"):
        assert name in subheaders
    frames = {tuple(d.value.columns)[0]: d.value for d in at.dataframe}
    assert len(frames["promoted"]) == 10 and len(frames["suppressed"]) == 10 and len(frames["token"]) > 0
    bands = at.button_group[0]  # quantile groups of the tiny store: one drawn at a time, the top band first
    assert len(bands.options) == 3 and bands.value == bands.options[-1]
    bands.set_value(bands.options[0]).run()
    assert ok(at).button_group[0].value == bands.options[0]
    assert "".join(m.value for m in at.markdown) != html  # the lowest band's examples drawn instead
    nb = [b for b in at.button if b.key and b.key.startswith("nb_")]
    assert len(nb) == 10
    target = int(nb[0].key[3:])
    nb[0].click().run()
    assert ok(at).title[0].value.startswith(f"Feature {target}")

    at.text_input(key=f"label_{target}").set_value("bank words")
    at.text_area(key=f"notes_{target}").set_value("fires on finance")
    next(b for b in at.button if b.label == "Save").click().run()  # the form's Save
    assert ok(at).title[0].value == f"Feature {target} — bank words"
    assert Labels(tiny_store["store"]).get(target).notes == "fires on finance"


def test_your_text_runs_the_model(app, tiny_store):
    app.query_params["page"] = "text"
    at = ok(app.run())
    at.text_area(key="user_text").set_value("The central bank raised rates. Le café était fermé.")
    at.button(key="text_run").click().run(timeout=120)
    ok(at)
    opens = [b for b in at.button if b.key and b.key.startswith("text_open_")]
    assert opens, "the strongest features should be listed"
    table = at.dataframe[0].value
    assert len(table) > 0 and (table["activation"] > 0).all()
    assert list(table["activation"]) == sorted(table["activation"], reverse=True)
    options = at.selectbox(key="text_token").options
    assert any("caf" in o or "é" in o for o in options)
    at.selectbox(key="text_token").set_value(2).run()
    ok(at)
    target = int(opens[0].key[len("text_open_"):])
    at.button(key=f"text_open_{target}").click().run()
    assert ok(at).title[0].value.startswith(f"Feature {target}")


def test_search_by_token_and_label(app, tiny_store):
    store = FeatureStore(tiny_store["store"])
    fid = alive_feature(tiny_store["store"])
    token = next(p["string"] for p in store.feature(fid).profile if p["string"].strip())
    Labels(tiny_store["store"]).save(fid, "searchable label", "a note about money")
    app.query_params["page"] = "search"
    at = ok(app.run())
    at.number_input(key="search_min_count").set_value(1)
    at.text_input(key="search_query").set_value(token.strip()).run()
    frame = ok(at).dataframe[0].value
    assert fid in set(frame["feature"])
    at.text_input(key="search_query").set_value("about money").run()
    frame = ok(at).dataframe[0].value
    assert list(frame["feature"]) == [fid] and frame["matched in"][0] == "notes"


def test_missing_store_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEKIT_STORE", str(tmp_path))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=30).run()
    assert at.error and "saekit analyze" in at.error[0].value


def _store_copy(tiny_store, tmp_path):
    import shutil

    return shutil.copytree(tiny_store["store"], tmp_path / "store", ignore=shutil.ignore_patterns("labels.sqlite*"))


def test_damaged_store_is_reported_once_at_open(tiny_store, monkeypatch, tmp_path, app_test_guard):
    """A truncated features.safetensors: one clear error when the app opens the store, no traceback, and no
    page that half-renders."""
    store = _store_copy(tiny_store, tmp_path)
    data = (store / "features.safetensors").read_bytes()
    (store / "features.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("SAEKIT_STORE", str(store))
    for page in ("overview", "feature"):
        at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=30)
        at.query_params["page"] = page
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1 and not at.title
        msg = at.error[0].value
        assert "features.safetensors" in msg and "truncated" in msg and "saekit analyze" in msg


def test_a_page_that_fails_shows_its_error_and_keeps_the_sidebar(tiny_store, monkeypatch, tmp_path, app_test_guard):
    """A SaekitError while one page renders (here: the feature file damaged after the store opened) is shown on
    that page; the sidebar and the other pages keep working."""
    from saekit.errors import FileFormatError

    store = _store_copy(tiny_store, tmp_path)
    monkeypatch.setenv("SAEKIT_STORE", str(store))
    at = ok(AppTest.from_file(BROWSER_SCRIPT, default_timeout=60).run())

    def damaged(self, i, *a, **k):
        raise FileFormatError(f"{self.path}/features.safetensors is damaged or truncated; rebuild the store with "
                              "`saekit analyze SAE_DIR --out STORE`.")

    monkeypatch.setattr(FeatureStore, "feature", damaged)
    at.sidebar.radio(key="nav").set_value("Feature").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "The Feature page could not be shown" in at.error[0].value
    assert "saekit analyze" in at.error[0].value
    assert at.sidebar.radio(key="nav").value == "Feature" and at.sidebar.number_input(key="feature_id")
    at.sidebar.radio(key="nav").set_value("Overview").run()
    assert ok(at).title[0].value == "Features"


def test_browse_checks_store_and_port_before_starting_a_server(tiny_store, tmp_path, monkeypatch, capsys):
    """`saekit browse` on a missing or damaged store, or with a bad --port, exits 2 with what to do, and never
    starts streamlit."""
    import os

    from saekit.apps.serve import browse, check_port

    from saekit.cli import main
    from saekit.errors import SaekitError

    started = []
    monkeypatch.setattr(os, "execve", lambda *a: started.append(a))
    store = _store_copy(tiny_store, tmp_path)
    data = (store / "stats.safetensors").read_bytes()
    (store / "stats.safetensors").write_bytes(data[:-3])
    with pytest.raises(SaekitError, match=r"stats.safetensors is damaged or truncated.*saekit analyze"):
        browse(store, 8599)
    assert main(["browse", str(store)]) == 2
    assert "stats.safetensors" in capsys.readouterr().err
    assert main(["browse", str(tmp_path / "absent")]) == 2
    assert "saekit analyze" in capsys.readouterr().err
    for port in (0, -1, 65536, "http", 80.5, None):
        with pytest.raises(SaekitError, match="--port"):
            browse(tiny_store["store"], port)
    assert check_port("8502") == 8502 and check_port(65535) == 65535
    assert not started
