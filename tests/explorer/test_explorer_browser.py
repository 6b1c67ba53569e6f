"""The explorer pages in a real browser: headless Chromium from Debian packages, driven by selenium.

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``apt-get install chromium chromium-driver``)
and selenium (the ``dev`` extra); nothing is downloaded at run time (``SE_OFFLINE``, explicit driver and
browser paths). Without them every test here skips with the reason; with ``DEXAR_REQUIRE_BROWSER=1``
(set by ``.ci/run``) a missing browser fails instead. Override the paths with ``DEXAR_CHROMIUM`` /
``DEXAR_CHROMEDRIVER``.

Artifacts — screenshots and ``explorer-load.json`` (measured load times and page sizes) — are written to
``$DEXAR_TEST_ARTIFACTS``, default ``test-artifacts/explorer/`` at the repository root.

Maps are checked by reading the overlay canvas back: its alpha channel must match the shown map
(bilinearly upsampled, through the page's transparency ramp) far better than any other word's map.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dexar.explorer import payload_from_explanations, write_explanation_html, write_run_explorer
from dexar.explorer.run import SIZE_BUDGET
from dexar.explorer.synthetic import synthetic_payload, synthetic_run

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DEXAR_TEST_ARTIFACTS", ROOT / "test-artifacts" / "explorer"))
CHROMIUM = os.environ.get("DEXAR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEXAR_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
WINDOW = (1280, 900)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found: apt-get install {package}"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("DEXAR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DEXAR_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dexar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # selenium manager must never download a driver or browser
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    payload = synthetic_payload(seed=1)  # three objects; "circle" and "triangle" are two pieces
    path = write_explanation_html(payload, tmp_path_factory.mktemp("page") / "explanation.html")
    return payload, path


# ---------------------------------------------------------------- helpers


def _open(driver, path: Path, ready: str = "document.documentElement.dataset.ready === '1'", fragment: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(*WINDOW)
    driver.get_log("browser")  # drop earlier messages
    driver.get(path.as_uri() + fragment)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(f"return {ready}"))


def _console_problems(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _screenshot(driver, path: Path, full_page: bool = True) -> Path:
    """Save a PNG screenshot at the window's width: the whole page when ``full_page``, else the viewport."""
    if full_page:
        height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
        clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": min(height, 4000), "scale": 1}
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] == WINDOW[0]
    return path


def _alpha(driver, panel: int = 0) -> np.ndarray:
    """The alpha channel of panel ``panel``'s overlay canvas, as drawn."""
    b64 = driver.execute_script(
        """
        const c = document.querySelectorAll('canvas.dx-overlay')[arguments[0]];
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const a = new Uint8Array(c.width * c.height);
        for (let i = 0; i < a.length; i++) a[i] = px[4 * i + 3];
        let s = ''; for (let i = 0; i < a.length; i += 8192) s += String.fromCharCode(...a.subarray(i, i + 8192));
        return [c.width, c.height, btoa(s)];
        """,
        panel,
    )
    width, height, data = b64
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width).astype(np.float64)


def _expected_alpha(driver, values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What the page should draw for a map: 8-bit, bilinear to the canvas, through the transparency ramp."""
    ramp = driver.execute_script("return dexarExplorer.alpha")
    grey = Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8), mode="L")
    v = np.asarray(grey.resize(size, Image.BILINEAR), np.float64) / 255
    t = np.clip((v - ramp["low"]) / (ramp["high"] - ramp["low"]), 0, 1)
    return 255 * t * t * (3 - 2 * t)


def _match(driver, alpha: np.ndarray, values) -> float:
    """Correlation between a drawn alpha channel and the one ``values`` should give."""
    expected = _expected_alpha(driver, np.asarray(values, np.float64), (alpha.shape[1], alpha.shape[0]))
    return float(np.corrcoef(alpha.ravel(), expected.ravel())[0, 1])


def _shows(driver, alpha: np.ndarray, values, others: list) -> None:
    """``alpha`` is ``values``' map (correlation > 0.98) and none of ``others`` (each < 0.95)."""
    own = _match(driver, alpha, values)
    assert own > 0.98, f"the canvas does not show the expected map (correlation {own:.3f})"
    for other in others:
        assert _match(driver, alpha, other) < 0.95, "the canvas matches another map as well"


def _word_elements(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".dx-words [role=option]")


def _hover(driver, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()


def _content_words(payload, method: int = 0) -> list[int]:
    return [i for i, w in enumerate(payload.methods[method].words) if w.filler is False]


# ---------------------------------------------------------------- one explanation page


def test_page_opens_offline_without_console_errors_and_shows_the_sequence_map(browser, page):
    payload, path = page
    _open(browser, path)
    assert _console_problems(browser) == []
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith("data:") for u in urls), urls  # nothing but inlined data was loaded
    assert browser.execute_script("return dexarExplorer.shownMap()")[0]["unit"] == "sequence"
    words = [w.map for w in payload.methods[0].words]
    _shows(browser, _alpha(browser), payload.methods[0].sequence_map, [words[i] for i in _content_words(payload)])
    labels = [e.get_attribute("aria-label") for e in _word_elements(browser)]
    assert labels[0].startswith("Whole answer") and all(labels)
    assert "filler" in labels[1] and "content" in labels[_content_words(payload)[0] + 1]


def test_hovering_a_content_word_shows_that_words_map(browser, page, artifacts):
    payload, path = page
    _open(browser, path)
    words = payload.methods[0].words
    content = _content_words(payload)
    before = _alpha(browser)
    first, last = content[0], content[-1]  # two words naming different objects
    _hover(browser, _word_elements(browser)[first + 1])
    shown = _alpha(browser)
    _shows(browser, shown, words[first].map, [words[last].map, payload.methods[0].sequence_map])
    assert np.abs(shown - before).mean() > 5
    assert browser.execute_script("return dexarExplorer.shownMap()")[0]["map"] == browser.execute_script(
        f"return dexarExplorer.data.methods[0].words[{first}].map"
    )
    _screenshot(browser, artifacts / "explanation-word.png")
    _hover(browser, _word_elements(browser)[last + 1])
    _shows(browser, _alpha(browser), words[last].map, [words[first].map])
    from selenium.webdriver.common.by import By

    _hover(browser, browser.find_element(By.CSS_SELECTOR, ".dx-title"))  # leaving the words: back to the sequence
    _shows(browser, _alpha(browser), payload.methods[0].sequence_map, [words[first].map, words[last].map])
    assert _console_problems(browser) == []


def test_arrow_keys_walk_through_the_words(browser, page):
    from selenium.webdriver.common.keys import Keys

    payload, path = page
    _open(browser, path)
    words = payload.methods[0].words
    options = _word_elements(browser)
    options[0].click()  # the "whole answer" chip takes the focus
    for i in range(len(words)):
        browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        active = browser.switch_to.active_element
        assert active.get_attribute("data-unit") == f"w{i}" and active.get_attribute("aria-selected") == "true"
        assert browser.execute_script("return dexarExplorer.shownMap()")[0]["unit"] == f"w{i}"
        if words[i].filler is False:
            others = [words[j].map for j in _content_words(payload) if j != i and words[j].map is not words[i].map]
            _shows(browser, _alpha(browser), words[i].map, [o for o in others if _differs(o, words[i].map)])
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)  # stays on the last word
    assert browser.switch_to.active_element.get_attribute("data-unit") == f"w{len(words) - 1}"
    browser.switch_to.active_element.send_keys(Keys.HOME)
    assert browser.switch_to.active_element.get_attribute("data-unit") == "sequence"
    browser.switch_to.active_element.send_keys(Keys.END, Keys.ESCAPE)
    assert browser.execute_script("return dexarExplorer.shownMap()")[0]["unit"] == "sequence"
    assert sum(e.get_attribute("tabindex") == "0" for e in _word_elements(browser)) == 1  # one tab stop
    assert _console_problems(browser) == []


def _differs(a, b) -> bool:
    """Maps of different objects (a colour and its shape name the same object: their maps coincide)."""
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) < 0.5


def test_method_switcher_and_side_by_side(browser, page, artifacts):
    from selenium.webdriver.common.by import By

    payload, path = page
    _open(browser, path)
    tabs = browser.find_elements(By.CSS_SELECTOR, "[role=tab]")
    assert [t.text for t in tabs] == ["DEX-AR", "Attention", "CheferCAM"]
    tints = [e.get_attribute("style") for e in _word_elements(browser)[1:]]
    tabs[1].click()
    assert tabs[1].get_attribute("aria-selected") == "true" and tabs[0].get_attribute("aria-selected") == "false"
    panels = browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")
    assert [p.get_attribute("data-method") for p in panels] == ["attention"]
    seq = [m.sequence_map for m in payload.methods]
    _shows(browser, _alpha(browser), seq[1], [seq[0]])
    assert [e.get_attribute("style") for e in _word_elements(browser)[1:]] != tints  # tinted by attention's λ
    word = _content_words(payload)[0]
    _hover(browser, _word_elements(browser)[word + 1])
    _shows(browser, _alpha(browser), payload.methods[1].words[word].map, [payload.methods[0].words[word].map])

    side = browser.find_element(By.ID, "dx-side")
    side.click()
    assert side.get_attribute("aria-pressed") == "true"
    panels = browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")
    assert [p.get_attribute("data-method") for p in panels] == ["dexar", "attention", "chefercam"]
    _hover(browser, _word_elements(browser)[word + 1])
    for m in range(3):
        own = payload.methods[m].words[word].map
        _shows(browser, _alpha(browser, m), own, [payload.methods[(m + 1) % 3].words[word].map])
    _screenshot(browser, artifacts / "explanation-side-by-side.png")
    browser.find_element(By.TAG_NAME, "body").send_keys("s")  # keyboard shortcut back to one panel
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")) == 1
    assert _console_problems(browser) == []


def test_pieces_on_demand_and_the_opacity_slider(browser, page, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    payload, path = page
    _open(browser, path)
    words = payload.methods[0].words
    split = next(i for i, w in enumerate(words) if len(w.pieces) > 1)
    before = len(_word_elements(browser))
    toggle = browser.find_element(By.ID, "dx-pieces")
    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "true"
    assert len(_word_elements(browser)) == before + sum(len(w.pieces) - 1 for w in words)
    piece = browser.find_element(By.CSS_SELECTOR, f'[data-unit="w{split}p1"]')
    assert piece.text == words[split].pieces[1].text.lstrip("▁")
    _hover(browser, piece)
    _shows(browser, _alpha(browser), words[split].pieces[1].map, [words[split].pieces[0].map])
    _screenshot(browser, artifacts / "explanation-pieces.png")

    slider = browser.find_element(By.ID, "dx-opacity")
    opacity = lambda: float(  # noqa: E731
        browser.execute_script("return getComputedStyle(document.querySelector('canvas.dx-overlay')).opacity")
    )
    start = opacity()
    slider.send_keys(Keys.HOME)
    assert opacity() == 0 and browser.find_element(By.CSS_SELECTOR, ".dx-out").text == "0%"
    slider.send_keys(Keys.END)
    assert opacity() == 1 and start not in (0, 1)
    assert _console_problems(browser) == []


def test_real_explanation_of_the_bundled_shapes_model(browser, tmp_path, artifacts):
    """DEX-AR and attention from one trace of the bundled model, grouped into words by the adapter."""
    from datamodules.shapes import make_shapes_sample
    from dexar import SHAPES_CHECKPOINT, Explainer, build_method, load_model

    model, processor = load_model(SHAPES_CHECKPOINT)
    sample = make_shapes_sample(3, "test")
    explainer = Explainer(model, processor, {"dexar": build_method("dexar"), "attention": build_method("attention")})
    explanations = {name: exps[0] for name, exps in explainer.explain_samples([sample]).items()}
    filler = [not c for c in sample.word_is_content]
    payload = payload_from_explanations(explanations, image=sample.image, prompt=sample.prompt, filler=filler)
    assert [m.label for m in payload.methods] == ["DEX-AR", "Attention"]
    path = write_explanation_html(payload, tmp_path / "explanation.html")
    _open(browser, path)
    assert _console_problems(browser) == []
    words = payload.methods[0].words
    assert [w.display for w in words] == sample.answer.split()
    content = _content_words(payload)
    assert content
    exp = explanations["dexar"]
    # each word shows the tokenizer's pieces (one for the word-level model, several for the sub-word one)
    assert [[p.text for p in v.pieces] for v in words] == [exp.tokens[w.start : w.end] for w in exp.words]
    for i in content:
        _hover(browser, _word_elements(browser)[i + 1])
        pieces = list(exp.words[i].pieces)
        if len(pieces) == 1:
            expect = exp.token_maps[pieces[0]].double()
        else:  # MinMax(Σ λ⁺ E) over the word's pieces
            lam = exp.token_weights[pieces].double().clamp(min=0)
            lam = lam if lam.sum() > 0 else torch.ones_like(lam)
            combined = torch.tensordot(lam, exp.token_maps[pieces].double(), 1)
            expect = (combined - combined.min()) / (combined.max() - combined.min())
        assert np.allclose(np.asarray(words[i].map, dtype=np.float64), expect.numpy(), atol=1e-6)
        others = [words[j].map for j in range(len(words)) if _differs(words[j].map, words[i].map)]
        _shows(browser, _alpha(browser), words[i].map, others[:3])
    _hover(browser, _word_elements(browser)[content[-1] + 1])
    _screenshot(browser, artifacts / "shapes-explanation.png")


# ---------------------------------------------------------------- the run explorer


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """100 samples × 3 methods (24×24 grids, 320×240 images), written once for the run tests."""
    run = synthetic_run(samples=100)
    index = write_run_explorer(run, tmp_path_factory.mktemp("run"))
    return run, index


def _wait_for_sample(driver, sample_id: str) -> None:
    """Wait until the index's frame reports the page of ``sample_id`` ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return dexarRun.timing.sampleReady") == sample_id)


def test_run_explorer_loads_100_samples_sorts_and_opens_them(browser, big_run, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run, index = big_run
    ready = "window.dexarRun && dexarRun.timing.firstSampleReadyAt !== null"
    loads = []
    for _ in range(3):
        _open(browser, index, ready=ready)
        timing = browser.execute_script("return dexarRun.timing")
        nav = browser.execute_script("return performance.getEntriesByType('navigation')[0].toJSON()")
        loads.append(
            {
                "index_ready_ms": timing["indexReadyAt"],
                "first_sample_ready_ms": timing["firstSampleReadyAt"],
                "dom_content_loaded_ms": nav["domContentLoadedEventEnd"],
            }
        )
        assert _console_problems(browser) == []
    rows = browser.find_elements(By.CSS_SELECTOR, ".dx-table tbody tr")
    assert len(rows) == 100

    # sort: worst EPG first (EPG: higher is better, so ascending) by DEX-AR's values
    browser.find_element(By.ID, "dx-worst").click()
    order = [int(r.get_attribute("data-index")) for r in browser.find_elements(By.CSS_SELECTOR, ".dx-table tbody tr")]
    epg = [s.metrics["dexar"]["epg"] for s in run.samples]
    assert order == sorted(range(100), key=lambda i: (epg[i], i))
    header = browser.find_element(By.CSS_SELECTOR, 'button.dx-sort[data-key="dexar"]').find_element(By.XPATH, "..")
    assert header.get_attribute("aria-sort") == "ascending"
    # Neg. AUC: lower is better, so the worst (highest) come first
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "dx-metric")).select_by_value("neg_auc")
    browser.find_element(By.ID, "dx-worst").click()
    order = [int(r.get_attribute("data-index")) for r in browser.find_elements(By.CSS_SELECTOR, ".dx-table tbody tr")]
    neg = [s.metrics["dexar"]["neg_auc"] for s in run.samples]
    assert order == sorted(range(100), key=lambda i: (-neg[i], i))
    worst = run.samples[order[0]].payload
    frame = browser.find_element(By.ID, "dx-frame")
    _wait_for_sample(browser, worst.sample_id)
    assert frame.get_attribute("src").endswith(f"samples/{worst.sample_id}.html#side")

    # keyboard: the next row opens the next sample
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    second = run.samples[order[1]].payload
    _wait_for_sample(browser, second.sample_id)
    _screenshot(browser, artifacts / "run-index.png")

    # inside the sample's page: methods side by side, hovering works
    browser.switch_to.frame(frame)
    try:
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")) == 3
        word = _content_words(second)[0]
        _hover(browser, _word_elements(browser)[word + 1])
        for m in range(3):
            _shows(browser, _alpha(browser, m), second.methods[m].words[word].map, [second.methods[m].sequence_map])
    finally:
        browser.switch_to.default_content()
    assert _console_problems(browser) == []

    # what it costs: sizes against the budget, load times (recorded, not asserted: shared machines)
    pages = sorted((index.parent / "samples").glob("*.html"))
    sizes = [p.stat().st_size for p in pages]
    assert len(pages) == 100
    assert max(sizes) <= SIZE_BUDGET["page_fixed"] + 3 * SIZE_BUDGET["page_per_method"]
    assert index.stat().st_size <= SIZE_BUDGET["index_fixed"] + 100 * SIZE_BUDGET["index_per_sample"]
    direct = []  # one sample page opened on its own (the explanation.html case)
    for _ in range(3):
        _open(browser, pages[0])
        direct.append(browser.execute_script("return window.dexarReadyAt"))
    report = {
        "samples": 100,
        "methods": 3,
        "index_bytes": index.stat().st_size,
        "sample_page_bytes": {"max": max(sizes), "mean": round(statistics.mean(sizes)), "total": sum(sizes)},
        "budget": SIZE_BUDGET,
        "loads": loads,
        "median_first_sample_ready_ms": statistics.median(x["first_sample_ready_ms"] for x in loads),
        "sample_page_ready_ms": direct,
    }
    (artifacts / "explorer-load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


# ---------------------------------------------------------------- pages written by dexar itself

REAL_METHODS = ("dexar", "attention", "chefercam")


def _reference_payload(sample):
    """The sample's words and maps computed here, in Python, from one trace of the bundled model."""
    from dexar import SHAPES_CHECKPOINT, Explainer, build_method, load_model

    model, processor = load_model(SHAPES_CHECKPOINT)
    explainer = Explainer(model, processor, {name: build_method(name) for name in REAL_METHODS})
    explanations = {name: exps[0] for name, exps in explainer.explain_samples([sample]).items()}
    return payload_from_explanations(explanations, image=sample.image)


def _check_words_show_their_maps(driver, payload, content: list[int], panels: int = 1) -> None:
    """Hover each content word: every panel shows that word's map of its method, not a different word's."""
    for i in content:
        _hover(driver, _word_elements(driver)[i + 1])
        assert driver.execute_script("return dexarExplorer.shownMap()")[0]["unit"] == f"w{i}"
        for panel in range(panels):
            method = payload.methods[
                panel if panels > 1 else driver.execute_script("return dexarExplorer.state.method")
            ]
            words = method.words
            others = [words[j].map for j in range(len(words)) if _differs(words[j].map, words[i].map)]
            _shows(driver, _alpha(driver, panel), words[i].map, others[:3])


@pytest.fixture(scope="module")
def cli_page(tmp_path_factory):
    """``dexar explain IMAGE --method dexar,attention,chefercam --html`` on a Shapes image (bundled model)."""
    from datamodules.shapes import make_shapes_sample
    from dexar.pipeline.cli import main as cli_main

    sample = make_shapes_sample(5, "test")
    out = tmp_path_factory.mktemp("cli")
    sample.image.save(out / "shapes-test-5.png")
    args = ["explain", str(out / "shapes-test-5.png"), "--prompt", sample.prompt, "--answer", sample.answer]
    assert cli_main([*args, "--method", ",".join(REAL_METHODS), "--html", "--out", str(out)]) == 0
    return sample, out / "explanation.html"


def test_dexar_explain_html_on_the_bundled_model(browser, cli_page, artifacts):
    from selenium.webdriver.common.by import By

    sample, path = cli_page
    payload = _reference_payload(sample)
    _open(browser, path)
    assert _console_problems(browser) == []
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith("data:") for u in urls), urls
    assert [e.text for e in _word_elements(browser)[1:]] == sample.answer.split()
    content = [i for i, c in enumerate(sample.word_is_content) if c]
    tabs = browser.find_elements(By.CSS_SELECTOR, "[role=tab]")
    assert [t.text for t in tabs] == ["DEX-AR", "Attention", "CheferCAM"]
    before = _alpha(browser)
    _check_words_show_their_maps(browser, payload, content)
    for m in (1, 2):  # switch methods: the same word now shows the other method's map
        tabs[m].click()
        assert tabs[m].get_attribute("aria-selected") == "true"
        _check_words_show_their_maps(browser, payload, content[:1])
    assert np.abs(_alpha(browser) - before).mean() > 1  # the displayed map changed from the sequence map
    browser.find_element(By.ID, "dx-side").click()
    assert [p.get_attribute("data-method") for p in browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")] == list(
        REAL_METHODS
    )
    _check_words_show_their_maps(browser, payload, content[-1:], panels=3)
    _screenshot(browser, artifacts / "cli-explanation-side-by-side.png")
    assert _console_problems(browser) == []


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory):
    """A real predict of the bundled model: 4 Shapes samples, three methods, EPG per content token."""
    import lightning as L

    import metrics as M
    from callbacks import HeatmapWriter
    from datamodules.shapes import ShapesDataModule
    from dexar.pipeline.module import ExplainerModule

    out = tmp_path_factory.mktemp("predict")
    module = ExplainerModule(
        methods={name: {} for name in REAL_METHODS},
        answer_source="ground_truth",
        metrics={"epg": M.EnergyPointingGame()},
        localization_target="tokens",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        callbacks=[HeatmapWriter(num_overlays=4)],
    )
    trainer.predict(module, datamodule=ShapesDataModule(num_samples=4, batch_size=2), return_predictions=False)
    return out / "explorer" / "index.html"


def test_run_explorer_of_a_real_predict(browser, predict_run, artifacts):
    from selenium.webdriver.common.by import By

    from datamodules.shapes import make_shapes_sample

    index = predict_run
    _open(browser, index, ready="window.dexarRun && dexarRun.timing.firstSampleReadyAt !== null")
    assert _console_problems(browser) == []
    data = browser.execute_script("return JSON.parse(document.getElementById('dx-run-data').textContent)")
    assert [s["id"] for s in data["samples"]] == [f"shapes-test-{i}" for i in range(4)]
    browser.find_element(By.ID, "dx-worst").click()  # worst DEX-AR EPG first
    epg = {s["id"]: s["metrics"]["dexar"]["epg"] for s in data["samples"]}
    worst = min(epg, key=lambda k: (epg[k], k))
    _wait_for_sample(browser, worst)
    _screenshot(browser, artifacts / "predict-run-index.png")
    sample = make_shapes_sample(int(worst.rsplit("-", 1)[1]), "test")
    payload = _reference_payload(sample)
    content = [i for i, c in enumerate(sample.word_is_content) if c]
    browser.switch_to.frame(browser.find_element(By.ID, "dx-frame"))
    try:
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")) == 3
        filler = browser.execute_script("return dexarExplorer.data.methods[0].words.map(w => w.filler)")
        assert filler == [not c for c in sample.word_is_content]  # the dataset's labels mark the filler words
        _check_words_show_their_maps(browser, payload, content, panels=3)
        browser.find_element(By.ID, "dx-side").click()  # one panel, then switch methods
        tabs = browser.find_elements(By.CSS_SELECTOR, "[role=tab]")
        tabs[2].click()
        assert [p.get_attribute("data-method") for p in browser.find_elements(By.CSS_SELECTOR, "figure.dx-panel")] == [
            "chefercam"
        ]
        _check_words_show_their_maps(browser, payload, content[:1])
    finally:
        browser.switch_to.default_content()
    assert _console_problems(browser) == []
    pages = sorted((index.parent / "samples").glob("*.html"))
    sizes = {p.name: p.stat().st_size for p in pages}
    assert max(sizes.values()) <= SIZE_BUDGET["page_fixed"] + 3 * SIZE_BUDGET["page_per_method"]
    assert index.stat().st_size <= SIZE_BUDGET["index_fixed"] + len(pages) * SIZE_BUDGET["index_per_sample"]
    report = {"index_bytes": index.stat().st_size, "sample_page_bytes": sizes}
    (artifacts / "predict-run-sizes.json").write_text(json.dumps(report, indent=2))
