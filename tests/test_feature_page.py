"""The Feature page under AppTest on a copy of the tiny store: the label edited in place near the title (its
confirmation survives the rerun, a conflicting save is refused and can be redone), and the inline test on the
user's text, coloured by this feature's activation as the live model computes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import BROWSER_SCRIPT, ok
from saekit.apps import render
from saekit.apps.labels import Labels
from saekit.apps.live import LiveModel
from streamlit.testing.v1 import AppTest

from saekit.features import Example, FeatureStore

TEXT = "The striker said the bank won the final. Shares rose."


@pytest.fixture
def store_dir(tiny_store, tmp_path) -> Path:
    """A copy without labels: these tests save labels of their own."""
    return Path(shutil.copytree(tiny_store["store"], tmp_path / "store", ignore=shutil.ignore_patterns("labels.sqlite*")))


def page(store_dir: Path, fid: int, monkeypatch) -> AppTest:
    monkeypatch.setenv("SAEKIT_STORE", str(store_dir))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=120)
    at.query_params["page"] = "feature"
    at.query_params["feature"] = str(fid)
    return ok(at.run())


def save(at: AppTest, fid: int, label: str, notes: str) -> AppTest:
    at.text_input(key=f"label_{fid}").set_value(label)
    at.text_area(key=f"notes_{fid}").set_value(notes)
    next(b for b in at.button if b.label == "Save").click().run()
    return at


def test_label_edit_near_the_title_confirms_after_the_rerun(store_dir, monkeypatch, app_test_guard):
    at = page(store_dir, 5, monkeypatch)
    assert at.title[0].value == "Feature 5" and at.caption[0].value.startswith("No label yet")
    ok(save(at, 5, "bank words", "fires on finance\nand on money"))
    assert at.title[0].value == "Feature 5 — bank words"
    assert at.caption[0].value == "Notes: fires on finance and on money"  # right under the title, on one line
    confirmation = [s.value for s in at.success]
    assert len(confirmation) == 1 and confirmation[0].startswith("Saved label ‘bank words’ at ")
    ok(at.run())  # any later run (another widget) still shows it
    assert [s.value for s in at.success] == confirmation
    stored = Labels(store_dir).get(5)
    assert (stored.label, stored.notes, stored.version) == ("bank words", "fires on finance\nand on money", 1)


def test_conflicting_save_is_refused_and_can_be_redone(store_dir, monkeypatch, app_test_guard):
    at = page(store_dir, 7, monkeypatch)
    Labels(store_dir).save(7, "theirs", "")
    save(at, 7, "mine", "")
    assert not at.exception and not at.success
    assert len(at.error) == 1 and "Not saved" in at.error[0].value and "‘theirs’" in at.error[0].value
    assert Labels(store_dir).get(7).label == "theirs" and at.title[0].value == "Feature 7 — theirs"
    assert at.text_input(key="label_7").value == "mine"  # the user's text is kept for a second try
    ok(save(at, 7, "mine", ""))
    assert Labels(store_dir).get(7).label == "mine" and at.success[0].value.startswith("Saved label ‘mine’")


def test_inline_text_test_colours_this_feature(store_dir, monkeypatch, app_test_guard):
    store = FeatureStore(store_dir)
    res = LiveModel(store).run(TEXT)
    fid = int(res.strongest(1)[0])  # a feature that fires on the text
    acts = res.dense(np.array([fid]))[0]
    assert (acts > 0).sum() >= 1 and (acts == 0).sum() >= 1  # some tokens coloured, some not
    at = page(store_dir, fid, monkeypatch)
    at.text_input(key="feature_test_text").set_value(TEXT)
    ok(at.button(key="feature_test_run").click().run(timeout=180))
    f = store.feature(fid)
    top = int(acts.argmax())
    special = {int(i) for i in np.nonzero(store.vocab.special)[0]}
    expected = render.examples_html([Example(float(acts[top]), -1, top, res.tokens, res.pieces, acts.tolist(), top)],
                                    f.max, special)
    assert expected.strip() in [m.value.strip() for m in at.markdown]  # the text, coloured by this feature on the store's scale
    caption = next(c.value for c in at.caption if c.value.startswith("Max activation on your text"))
    assert f"{acts.max():.3g}" in caption and f"the store's max {f.max:.3g}" in caption
