"""The browser's inputs under Streamlit's AppTest, on the tiny store: a bad address says what is wrong instead of
showing another feature or page; the feature box belongs to the Feature page; "Your text" refuses an empty text,
announces a cut, flags activations beyond the corpus and keeps its token selector on the latest run."""

from __future__ import annotations

import re

import pytest
import saekit.apps
from helpers import BROWSER_SCRIPT, ok
from saekit.apps import page_text
from streamlit.testing.v1 import AppTest

from saekit.features import FeatureStore


@pytest.fixture
def app(tiny_store, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(tiny_store["store"]))
    return AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)


def param(at: AppTest, name: str):
    value = at.query_params.get(name)
    return value[0] if isinstance(value, list) else value


def open_url(app: AppTest, **params: str) -> AppTest:
    for k, v in params.items():
        app.query_params[k] = v
    at = app.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("value, message", [
    ("99999", "Feature 99999 does not exist: the store's features are numbered 0–63."),
    ("64", "Feature 64 does not exist: the store's features are numbered 0–63."),
    ("-5", "Feature -5 does not exist: the store's features are numbered 0–63."),
    ("abc", "'abc' is not a feature id: the store's features are numbered 0–63."),
    ("2.5", "'2.5' is not a feature id: the store's features are numbered 0–63."),
])
def test_a_bad_feature_id_is_an_error_not_another_feature(app, value, message):
    at = open_url(app, page="feature", feature=value)
    assert [e.value for e in at.error] == [message]
    assert [t.value for t in at.title] == ["Nothing at this address"]  # no "Feature 63" or "Feature 0" page
    assert at.sidebar.number_input(key="feature_id").value is None  # the box shows no id it was not asked for
    assert param(at, "feature") == value  # the address stays as typed
    at.button(key="url_open_last").click().run()
    assert ok(at).title[0].value.startswith("Feature 63")
    assert param(at, "feature") == "63"


def test_after_a_bad_id_the_sidebar_box_opens_a_feature(app):
    at = open_url(app, page="feature", feature="abc")
    at.sidebar.number_input(key="feature_id").set_value(7).run()
    assert ok(at).title[0].value.startswith("Feature 7")


def test_an_unknown_page_is_an_error_that_lists_the_pages(app):
    at = open_url(app, page="foo", feature="3")
    assert [e.value for e in at.error] == ["There is no page 'foo' — pages: overview, feature, text, search, explanations."]
    assert not [t for t in at.title if t.value == "Features"]  # not the overview passed off as "foo"
    assert param(at, "page") == "foo"
    at.button(key="url_open_search").click().run()
    assert ok(at).title[0].value == "Search" and param(at, "page") == "search"


def test_good_addresses_still_open_their_page(app):
    at = ok(open_url(app, page="feature", feature="12"))
    assert at.title[0].value.startswith("Feature 12")
    at = ok(AppTest.from_file(BROWSER_SCRIPT, default_timeout=60).run())  # no parameters: the overview
    assert at.title[0].value == "Features"


def test_the_feature_box_shows_only_on_the_feature_page_and_keeps_its_id(app):
    at = ok(open_url(app, page="feature", feature="5"))
    assert at.sidebar.number_input(key="feature_id").value == 5
    for page, title in (("Overview", "Features"), ("Your text", "Your text"), ("Search", "Search")):
        at.sidebar.radio(key="nav").set_value(page).run()
        assert ok(at).title[0].value == title
        assert not [n for n in at.sidebar.number_input if n.key == "feature_id"], page
    at.sidebar.radio(key="nav").set_value("Feature").run()
    assert ok(at).title[0].value.startswith("Feature 5")  # the id survived the pages without its box


def run_text(at: AppTest, text: str) -> AppTest:
    at.text_area(key="user_text").set_value(text)
    at.button(key="text_run").click().run(timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_an_empty_text_asks_for_text_and_runs_nothing(app, monkeypatch):
    from saekit.apps.live import LiveModel

    ran = []
    monkeypatch.setattr(LiveModel, "run", lambda self, text, *a: ran.append(text))
    at = ok(open_url(app, page="text"))
    for text in ("", "  \n\t "):
        run_text(at, text)
        assert [w.value for w in at.warning] == ["The text box is empty: type some text, then press Run."]
        assert not at.error and not ran
        assert not [b for b in at.button if b.key and b.key.startswith("text_open_")]


def tokens_of(tiny_store, text: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_store["model"])
    return 1 + len(tok(text, add_special_tokens=False)["input_ids"])  # BOS first


def test_a_long_text_is_cut_and_the_page_says_so(app, tiny_store):
    text = " ".join(f"The bank raised rates {i}." for i in range(120))
    total = tokens_of(tiny_store, text)
    assert total > 512
    at = run_text(ok(open_url(app, page="text")), text)
    assert [w.value for w in at.warning] == [
        f"The text is long: used the first 512 of its {total} tokens (BOS included); at most 512 are run."]
    options = at.selectbox(key="text_token").options
    assert int(options[-1].split(":")[0]) <= 511
    short = run_text(at, "The bank raised rates.")
    assert not short.warning  # a text that fits is not announced


def test_the_token_selector_follows_a_second_run(app):
    at = run_text(ok(open_url(app, page="text")), "The central bank raised rates. Le café était fermé.")
    first = at.selectbox(key="text_token").options
    at.selectbox(key="text_token").set_value(len(first)).run()  # a late token of the first text
    at = run_text(at, "Chelsea won the match at home on Sunday afternoon.")
    box = at.selectbox(key="text_token")
    live = at.session_state["live"][1]
    shown = box.options[box.index]
    position = int(shown.split(":")[0])
    assert box.value == position == page_text.best_position(live)  # the new text's strongest token
    assert shown == f"{position}: {saekit.apps.render.piece_text(live.pieces[position])}"
    assert at.session_state["live"][0].startswith("Chelsea")
    assert all(o.split(": ", 1)[1] == saekit.apps.render.piece_text(live.pieces[int(o.split(":")[0])])
               for o in box.options)  # every label is the new text's token


def test_activations_beyond_the_corpus_are_flagged(app, monkeypatch, tiny_store):
    at = run_text(ok(open_url(app, page="text")), "The central bank raised rates.")
    table = at.dataframe[0].value
    assert "vs corpus" in table.columns
    act_max = FeatureStore(tiny_store["store"]).stats["act_max"]
    for _, row in table.iterrows():  # the tiny model on a corpus-like text: flagged only if really far above
        assert bool(row["vs corpus"]) == (row["activation"] > 2 * act_max[row["feature"]] or act_max[row["feature"]] <= 0)
    monkeypatch.setattr(page_text, "ABOVE_MAX", 0.0)  # every firing now counts as "far above": the flag shows
    at.run()
    table = at.dataframe[0].value
    assert len(table) and all("above anything seen in the analysed corpus" in n for n in table["vs corpus"])
    assert any(re.search(r"exceed 0× the largest", c.value) for c in at.caption)


def test_corpus_note():
    assert page_text.corpus_note(5.0, 2.0) == "2.5× the corpus max — above anything seen in the analysed corpus"
    assert page_text.corpus_note(3.9, 2.0) == ""  # within 2× of what the corpus showed
    assert page_text.corpus_note(0.1, 0.0).startswith("never fired in the analysed corpus")
