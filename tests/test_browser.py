"""A real browser against a real `saekit browse` server (tests/browser_server.py): every page visited, no
exception or Streamlit error element anywhere; words split over tokens render without gaps; bad addresses
say what exists; the token selector follows a second run; the steered generation's latency printed."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from browser_server import browse_server, chromium_page

from saekit.features import FeatureStore

pytestmark = pytest.mark.browser
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'


@pytest.fixture
def server(tiny_store):
    with browse_server(tiny_store["store"]) as url:
        yield url


@pytest.fixture(scope="module")
def busiest(tiny_store) -> int:
    store = FeatureStore(tiny_store["store"])
    return int(np.argsort(-store.stats["count"])[0])


def no_errors(page, where: str) -> None:
    shown = [e.inner_text()[:300] for e in page.locator(ERRORS).all()]
    assert not shown, f"{where}: {shown}"


def run_text(page, text: str) -> None:
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Run", exact=True).click()


def test_every_page_and_the_way_between_them(server, busiest, tmp_path):
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(server)
        expect(page.get_by_role("heading", name="Features")).to_be_visible()
        expect(page.locator(".js-plotly-plot").first).to_be_visible()  # density histogram / map
        assert page.get_by_role("button", name="Deploy").count() == 0  # a local tool: no Streamlit deploy button
        no_errors(page, "overview")

        box = page.get_by_label("Open feature")  # overview → feature page
        box.fill(str(busiest))
        box.press("Enter")
        page.get_by_role("button", name="Open", exact=True).click()
        expect(page.get_by_role("heading", name=f"Feature {busiest}")).to_be_visible()
        examples = page.locator(".sk-ex")
        expect(examples.first).to_be_visible()
        assert examples.count() >= 2
        assert "activation" in (examples.first.locator(".sk-t").first.get_attribute("title") or "")
        expect(page.get_by_role("heading", name="Logit effects")).to_be_visible()
        assert page.locator('[data-testid="stDataFrame"]').count() >= 3  # promoted, suppressed, token profile
        assert "feature" in page.url and str(busiest) in page.url
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        no_errors(page, "feature page")

        page.get_by_text("Search", exact=True).click()
        expect(page.get_by_role("heading", name="Search")).to_be_visible()
        no_errors(page, "search")

        page.get_by_text("Your text", exact=True).click()  # runs the model live
        expect(page.get_by_role("heading", name="Your text")).to_be_visible()
        run_text(page, "The central bank raised rates. Le café était fermé.")
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=90_000)
        expect(page.get_by_role("heading", name="Features on one token")).to_be_visible()
        page.screenshot(path=str(tmp_path / "your_text.png"), full_page=True)
        no_errors(page, "your text")
    for name in ("feature.png", "your_text.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_words_split_over_tokens_render_whole(server, busiest):
    """Adjacent token spans on one line touch (no padding splitting "Mid o"), and no coloured span is only
    whitespace (no orange sliver at a line end)."""
    with chromium_page(1200, 1600) as page:
        page.goto(f"{server}/?page=feature&feature={busiest}")
        page.locator(".sk-ex").first.wait_for()
        boxes = page.evaluate("""() => [...document.querySelectorAll('.sk-ex')].map(ex =>
            [...ex.querySelectorAll('.sk-t')].map(s => {
                const r = s.getClientRects(); const first = r[0], last = r[r.length - 1];
                const prev = s.previousSibling;
                return {text: s.textContent, coloured: s.style.background !== '',
                        touches: prev !== null && prev.nodeType === 1 && prev.classList.contains('sk-t'),
                        left: first ? first.left : 0, top: first ? first.top : 0,
                        right: last ? last.right : 0, bottom: last ? last.top : 0};
            }))""")
    pairs = 0
    for spans in boxes:
        for a, b in zip(spans, spans[1:]):
            assert not (b["coloured"] and not b["text"].strip()), f"a coloured span of only whitespace: {b}"
            if b["touches"] and abs(a["bottom"] - b["top"]) < 1:  # no text between them, same line
                pairs += 1
                assert abs(b["left"] - a["right"]) < 0.5, f"gap inside a word between {a['text']!r} and {b['text']!r}"
    assert pairs > 0, "no adjacent token spans to check"


def test_bad_addresses_say_what_exists(server, tiny_store):
    from playwright.sync_api import expect

    d_sae = FeatureStore(tiny_store["store"]).d_sae
    with chromium_page() as page:
        for query, says in ((f"page=feature&feature={d_sae + 99}", f"does not exist: the store's features are numbered 0–{d_sae - 1}"),
                            ("page=feature&feature=abc", "'abc'"),
                            ("page=nowhere", "There is no page 'nowhere'")):
            page.goto(f"{server}/?{query}")
            expect(page.get_by_role("heading", name="Nothing at this address")).to_be_visible()
            expect(page.get_by_text(says).first).to_be_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.get_by_role("heading", name="Feature 0").count() == 0  # never another feature passed off


def test_the_token_selector_follows_a_second_run(server):
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(f"{server}/?page=text")
        run_text(page, "Chelsea won the match at home on Saturday afternoon again.")
        selector = page.get_by_role("combobox", name="Token")  # shows "position: token"
        expect(selector).to_have_value(re.compile(r"^\d+: "), timeout=90_000)
        first = selector.input_value()
        second = "Rates rose."
        run_text(page, second)
        expect(selector).not_to_have_value(first, timeout=90_000)  # the second run has landed
        position, piece = selector.input_value().split(": ", 1)
        assert int(position) <= len(second) and piece.replace("␣", " ") in second, \
            f"the selector does not point into the second text: {position}: {piece!r}"
        no_errors(page, "your text after two runs")


def test_steered_generation_latency(server, busiest):
    """Baseline + steered, 30 tokens, tiny model: the time from the click to the finished text, printed (the
    default model's figure is in benchmarks/browser.py's table)."""
    from playwright.sync_api import expect

    with chromium_page(1400, 1600) as page:
        page.goto(f"{server}/?page=feature&feature={busiest}")
        page.get_by_label("Tokens").fill("30")
        page.get_by_label("Tokens").press("Enter")
        expect(page.get_by_label("Tokens")).to_have_value("30")
        t0 = time.perf_counter()
        page.get_by_role("button", name="Generate").click()
        steered = page.locator("[data-testid=stMarkdownContainer]").filter(has_text="steered: add")
        expect(steered.first).to_contain_text("mean log-prob", timeout=120_000)
        seconds = time.perf_counter() - t0
        no_errors(page, "steering")
    print(f"steered + baseline generation, 30 tokens, tiny model, in the browser: {seconds:.2f} s")
