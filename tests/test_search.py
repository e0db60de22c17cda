"""Token search (FeatureStore.search_tokens) on a planted store written by hand, so every count, score and rank
is known; and the Search page on that store under AppTest (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BROWSER_SCRIPT, ok
from saekit.apps.labels import Labels
from streamlit.testing.v1 import AppTest

from saekit.features import HIST_BINS, FeatureStore, write_store
from saekit.features.store import FORMAT_VERSION, STORE_KIND
from saekit.tokens import Vocab

PRIOR = 2.0
SPECIAL = ["<s>"]
TOKENS = SPECIAL + [" sport", "transport", " Sports", "Sport", " London", " Stock", " Exchange", " the", " goal", " ball"]
T = {s: i for i, s in enumerate(TOKENS)}
OCCURRENCES = {" sport": 40, "transport": 20, " Sports": 8, "Sport": 3, " London": 900, " Stock": 900,
               " Exchange": 900, " the": 2000, " goal": 50, " ball": 50}
# latent → (its firings, its profile: token → fires); the profile is stored best score first, as the builder does
PLANTED = {
    0: (20, {"transport": 20}),  # the "transport" latent: a high score, but only a substring of "sport"
    1: (1000, {" Stock": 330, " Exchange": 330, " London": 332, " Sports": 8}),  # 8 of 8 " Sports", yet a stock latent
    2: (60, {" sport": 30, " goal": 20, " ball": 10}),  # the sport latent: the best whole-word score
    3: (3, {"Sport": 3}),  # "Sport" seen 3 times: the best score of all, but under the minimum count
    4: (500, {" the": 490, " sport": 10}),  # fires on " sport" too, but mostly elsewhere: a low score
    5: (30, {" goal": 30}),  # matches "sport" only in its top logit tokens
    6: (20, {" Sports": 6, " ball": 14}),  # 6 of 8 " Sports": a lower rate than latent 1, a far higher share
}
LOGITS = {5: (" sport", 2.5), 2: (" ball", 1.0)}
D, P, L, N_TOP, W = len(PLANTED), 4, 3, 2, 5  # latents, profile width, logit tokens, top examples, window


def score(fires: int, occurrences: int, count: int) -> float:
    rate, share = fires / (occurrences + PRIOR), fires / count
    return 2 * rate * share / (rate + share)


def planted_store(root: Path) -> Path:
    """A store of D latents over the vocabulary TOKENS with the profiles and logit tokens above; each latent's
    top example is context f, whose window centres on its first profile token."""
    blob = b"".join(s.encode() for s in TOKENS)
    offsets = np.concatenate([[0], np.cumsum([len(s.encode()) for s in TOKENS])]).astype(np.int64)
    vocab = Vocab(np.frombuffer(blob, dtype=np.uint8), offsets, np.array([s in SPECIAL for s in TOKENS]))
    token_count = torch.zeros(len(TOKENS), dtype=torch.long)
    for s, n in OCCURRENCES.items():
        token_count[T[s]] = n
    count = torch.tensor([PLANTED[f][0] for f in range(D)])
    prof = {k: torch.full((D, P), -1 if k == "profile_token" else 0, dtype=torch.int32)
            for k in ("profile_token", "profile_fires", "profile_token_count")}
    prof["profile_mean"] = torch.zeros(D, P)
    contexts = torch.full((D, 2 * W), T[" the"], dtype=torch.int32)
    contexts[:, 0] = T["<s>"]
    top = {"top_value": torch.zeros(D, N_TOP), "top_ctx": torch.full((D, N_TOP), -1, dtype=torch.int32),
           "top_pos": torch.zeros(D, N_TOP, dtype=torch.int32), "top_acts": torch.zeros(D, N_TOP, W)}
    for f, (n, profile) in PLANTED.items():
        ranked = sorted(profile.items(), key=lambda kv: -score(kv[1], OCCURRENCES[kv[0]], n))
        for j, (s, fires) in enumerate(ranked):
            prof["profile_token"][f, j], prof["profile_fires"][f, j] = T[s], fires
            prof["profile_token_count"][f, j], prof["profile_mean"][f, j] = OCCURRENCES[s], 1.0
        contexts[f, 4] = T[ranked[0][0]]
        top["top_value"][f, 0], top["top_ctx"][f, 0], top["top_pos"][f, 0] = 1.0 + f, f, 4
        top["top_acts"][f, 0, 2] = 1.0 + f  # window_before 2: position 4 is the window's third token
    logit_token = torch.full((D, L), T[" the"], dtype=torch.int32)
    logit_value = torch.full((D, L), 0.1)
    for f, (s, v) in LOGITS.items():
        logit_token[f, 0], logit_value[f, 0] = T[s], v
    stats = {"count": count, "act_sum": count.float(), "act_max": 1.0 + torch.arange(D).float(),
             "map_xy": torch.zeros(D, 2), "top_tokens": prof["profile_token"][:, :3].clone(), "token_count": token_count}
    feats = {"hist": torch.zeros(D, HIST_BINS, dtype=torch.long), **top,
             **{f"sample_{k[4:]}": v[:, :1].clone() for k, v in top.items()}, **prof,
             "neighbour_id": torch.zeros(D, 1, dtype=torch.int32), "neighbour_cos": torch.zeros(D, 1),
             "logit_top_token": logit_token, "logit_top_value": logit_value,
             "logit_bottom_token": logit_token.clone(), "logit_bottom_value": -logit_value}
    manifest = {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "d_sae": D, "tokens": sum(OCCURRENCES.values()),
                "hook": "blocks.0.hook_resid_pre", "model": "planted", "map_method": "pca",
                "config": {"window_before": 2, "window_after": 2, "quantile_groups": 2, "profile_prior": PRIOR}}
    return write_store(root / "store", manifest, stats, feats, contexts, vocab)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return planted_store(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def store(store_dir) -> FeatureStore:
    return FeatureStore(store_dir)


def ids(found) -> list[int]:
    return [h.feature for h in found.hits]


def test_whole_word_matches_only_unless_substring_is_on(store):
    found = store.search_tokens("sport")
    assert ids(found) == [2, 4, 5]  # " sport" by score, then the logit-only match; no transport, no " Sports"
    assert all(h.whole_word for h in found.hits)
    assert [(s, n, whole) for s, n, whole in found.vocab] == [
        (" sport", 40, True), ("Sport", 3, True), ("transport", 20, False), (" Sports", 8, False)]
    wide = store.search_tokens("sport", substring=True)
    # whole-word matches stay first though "transport" (latent 0) outscores every one of them
    assert ids(wide)[:3] == [2, 4, 5] and set(ids(wide)[3:]) == {0, 1, 6}
    assert not any(h.whole_word for h in wide.hits[3:])
    assert wide.hits[3].feature == 0 and wide.hits[3].tokens == ["transport"]
    assert score(20, 20, 20) > score(30, 40, 60)  # the planted trap: 0 would win on score alone


def test_case_and_leading_space_do_not_matter(store):
    assert ids(store.search_tokens("SPORT")) == ids(store.search_tokens("  sport ")) == [2, 4, 5]
    assert ids(store.search_tokens("sports")) == [6, 1]


def test_min_count_filters_rare_tokens(store):
    found = store.search_tokens("sport")  # default minimum 5: "Sport" occurs 3 times
    assert 3 not in ids(found) and found.below_min == 1
    loose = store.search_tokens("sport", min_count=1)
    assert ids(loose)[0] == 3 and loose.below_min == 0  # its score, 0.75, is the highest of all
    assert loose.hits[0].tokens == ["Sport"] and (loose.hits[0].fires, loose.hits[0].occurrences) == (3, 3)
    assert ids(store.search_tokens("sport", min_count=41)) == [5]  # logit tokens need no count
    with pytest.raises(ValueError, match="at least 1"):
        store.search_tokens("sport", min_count=0)


def test_ranking_by_the_profiles_combined_score(store):
    found = store.search_tokens("sports")
    stock, sports = {h.feature: h for h in found.hits}[1], {h.feature: h for h in found.hits}[6]
    # latent 1 fires on all 8 " Sports" (rate 8/10) but they are 0.8% of its firings; latent 6: 6/8 and 30%
    assert (stock.fires, stock.occurrences, sports.fires, sports.occurrences) == (8, 8, 6, 8)
    assert stock.score == pytest.approx(score(8, 8, 1000)) and sports.score == pytest.approx(score(6, 8, 20))
    assert ids(found) == [6, 1]
    by_score = store.search_tokens("sport").hits
    assert [h.score for h in by_score[:2]] == pytest.approx([score(30, 40, 60), score(10, 40, 500)])
    assert by_score[0].score > by_score[1].score


def test_logit_value_only_for_logit_matches(store):
    hits = {h.feature: h for h in store.search_tokens("sport").hits}
    assert hits[5].source == ["logit tokens"] and hits[5].logit == pytest.approx(2.5) and hits[5].score is None
    assert hits[2].source == ["token profile"] and hits[2].logit is None
    both = {h.feature: h for h in store.search_tokens("ball").hits}[2]
    assert both.source == ["token profile", "logit tokens"] and both.logit == pytest.approx(1.0)
    assert both.max_act == pytest.approx(3.0) and both.density == pytest.approx(60 / store.tokens)


def test_no_match_and_blank_query(store):
    assert store.search_tokens("cricket").hits == [] and store.search_tokens("cricket").vocab == []
    assert store.search_tokens("").hits == []


def test_best_example_is_the_top_example(store):
    ex = store.best_example(2)
    assert ex.value == pytest.approx(3.0) and ex.pieces[ex.focus] == " sport" and ex.acts[ex.focus] == pytest.approx(3.0)


# ----------------------------------------------------------------------------- the Search page

@pytest.fixture
def app(store_dir, monkeypatch, app_test_guard):
    monkeypatch.setenv("SAEKIT_STORE", str(store_dir))
    at = AppTest.from_file(BROWSER_SCRIPT, default_timeout=60)
    at.query_params["page"] = "search"
    return at


def test_search_page_one_box_for_tokens_logits_labels_and_notes(app, store_dir):
    Labels(store_dir).save(4, "determiner, and sport", "")
    Labels(store_dir).save(0, "movement", "fires on transport words")
    at = ok(app.run())
    at.text_input(key="search_query").set_value("sport").run()
    frame = ok(at).dataframe[0].value
    assert list(frame["feature"]) == [4, 2, 5]  # a label match first (your own words), then by score
    row = frame.set_index("feature")
    assert row.loc[4, "matched in"] == "label + token profile" and row.loc[4, "label"] == "determiner, and sport"
    assert row.loc[2, "matched in"] == "token profile" and row.loc[2, "tokens"] == "␣sport"
    assert row.loc[2, "fires / occurrences"] == "30 / 40" and row.loc[2, "score"] == f"{score(30, 40, 60):.3f}"
    assert row.loc[2, "logit"] == "" and row.loc[5, "logit"] == "+2.500" and row.loc[5, "score"] == ""
    assert row.loc[2, "top tokens"] == "␣sport · ␣goal · ␣ball" and "« sport»" in row.loc[2, "best example"]
    assert "open" not in " ".join(b.label for b in at.button)  # no stacked open buttons: a row opens its feature
    assert any("turn on substring" in c.value for c in at.caption)

    at.toggle(key="search_substring").set_value(True).run()
    row = ok(at).dataframe[0].value.set_index("feature")
    assert row.loc[0, "matched in"] == "notes + token profile (substring)" and list(row.index[:3]) == [4, 2, 5]

    at.toggle(key="search_substring").set_value(False)
    at.number_input(key="search_min_count").set_value(1).run()
    assert list(ok(at).dataframe[0].value["feature"])[:2] == [4, 3]  # the label first, then "Sport" (3 occurrences)


# ----------------------------------------------------------------------------- a row opens its feature (real browser)

@pytest.mark.browser
def test_clicking_a_result_row_opens_its_feature(store_dir):
    """AppTest cannot select a table row; Debian's chromium can."""
    from browser_server import browse_server, chromium_page
    from playwright.sync_api import expect

    with browse_server(store_dir) as url, chromium_page(1400, 900) as page:
        page.goto(url + "/?page=search")
        box = page.get_by_label("Search token profiles, top logit tokens, labels and notes")
        box.fill("sports")
        box.press("Enter")
        expect(page.get_by_text("2 features · click a row to open it.")).to_be_visible()
        grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
        page.mouse.click(grid["x"] + 15, grid["y"] + 35 + 17)  # the first row's selection cell
        expect(page.get_by_role("heading", name="Feature 6")).to_be_visible()  # the first result
        assert "page=feature" in page.url and "feature=6" in page.url
