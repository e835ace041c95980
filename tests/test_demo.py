"""The web demo driven in a real browser (Debian's Chromium through selenium, headless): an empty query's error is
shown, an uploaded reference and a typed modification give the top k that `CIRIndex` ranks (the reference, a copy
of a gallery image, left out), the page's layout holds (no overflow, captions below their thumbnails and whole, the
pick strip without scrollbars, a small reference drawn at a readable size), and a picked gallery image is shown
by its id, clears the old results and is queried by its id. The retrieval report's page is checked in the same
browser: ten hits wrap instead of overflowing."""

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import retrieval_pipeline, solid_images, tiny_model, tiny_tokenizer

from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor
from modeling_spn4cir.retrieval import CIRIndex

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# No network, no first-run work, nothing shared with another profile.
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1400,1100"]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's Chromium: apt-get install -y chromium chromium-driver (.ci/run installs it)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium sends no usage statistics
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*HEADLESS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page did not show {what} within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shown_hits(driver) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    return [(f.get_attribute("data-image-id"), float(f.get_attribute("data-score")))
            for f in driver.find_elements(By.CSS_SELECTOR, "#hits figure")]


def _layout(driver) -> dict:
    """What a reader sees: overflow of the page, each result's caption against its image, the pick strip."""
    return driver.execute_script("""
        const box = e => e.getBoundingClientRect();
        const figures = [...document.querySelectorAll('#hits figure')].map(f => {
            const img = box(f.querySelector('img')), cap = f.querySelector('figcaption');
            return {below: box(cap).top >= img.bottom - 0.5, whole: cap.scrollWidth <= cap.clientWidth + 1,
                    width: img.width};
        });
        const strip = document.querySelector('#picks');
        const scrollbar = e => {  // a scrollbar takes the room between the border and the client area
            const style = getComputedStyle(e);
            const borders = (a, b) => parseFloat(style[a]) + parseFloat(style[b]);
            return e.offsetWidth - e.clientWidth - borders('borderLeftWidth', 'borderRightWidth') > 0.5 ||
                   e.offsetHeight - e.clientHeight - borders('borderTopWidth', 'borderBottomWidth') > 0.5;
        };
        const scrollers = [strip, ...strip.querySelectorAll('*')].filter(scrollbar).length;
        const inside = [...strip.querySelectorAll('img')].filter(i => {
            const r = box(i), s = box(strip);
            return r.width > 20 && r.top >= s.top - 1 && r.bottom <= s.bottom + 1 && r.left >= s.left - 1 &&
                   r.right <= s.right + 1;
        }).length;
        const drawn = i => {  // the width the image's pixels are drawn at inside its box (object-fit)
            if (!i || !i.naturalWidth) return 0;
            const r = box(i), fit = getComputedStyle(i).objectFit;
            const contain = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight);
            const scale = {contain, 'scale-down': Math.min(1, contain), none: 1}[fit];
            return scale === undefined ? r.width : i.naturalWidth * scale;
        };
        const reference = document.querySelector('#reference img');
        return {overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,
                figures, strip_scrollers: scrollers, strip_visible: inside,
                reference_width: drawn(reference)};
    """)


def _expected(model, processor, index, image, text, **references):
    """The top 10 of `CIRIndex.search` for the query (the model's own query and target embeddings)."""
    with torch.no_grad():
        batch = processor(images=[image], text=[text])
        query = model.get_query_embeds(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
        if "reference_ids" not in references:
            references["reference_embeds"] = model.get_target_embeds(batch["pixel_values"])
    hits = index.search(query, top_k=10, similarity=model.similarity, **references)[0]
    return [(h["image_id"], h["score"]) for h in hits]


def test_the_demo_in_a_browser_shows_what_the_index_ranks(browser, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    pytest.importorskip("gradio", reason="needs gradio: pip install gradio (the demo extra)")
    import demo
    from PIL import Image
    from selenium.webdriver.common.by import By

    model = tiny_model("vit", "sum")
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 3
    model.eval()
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=32),
                                  tokenizer=tiny_tokenizer(["make it blue", "red circle", "and more"]))
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, image in enumerate(solid_images(24, size=64, seed=3)):  # 64 px: small references
        image.save(gallery / f"a_long_gallery_image_name_{i:03d}.png")
    index = CIRIndex.build(model, processor.image_processor, gallery, show_progress_bar=False)
    app = demo.RetrievalDemo(retrieval_pipeline(model, processor), index)
    ui, port = demo.build_ui(app, "Composed image retrieval"), _free_port()
    demo.launch(ui, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        search = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#search"), "the Search button")[0]
        search.click()  # nothing to search with: the error is on the page
        _wait(lambda: demo.EMPTY_QUERY in browser.find_element(By.ID, "status").text, "the empty query's error")

        upload = tmp_path / "upload.png"  # a copy of a gallery image, uploaded under another name
        shutil.copy(gallery / "a_long_gallery_image_name_005.png", upload)
        browser.find_element(By.CSS_SELECTOR, "#reference input[type=file]").send_keys(str(upload))
        _wait(lambda: "uploaded" in browser.find_element(By.ID, "picked").text, "the uploaded reference")
        browser.find_element(By.CSS_SELECTOR, "#text textarea").send_keys("make it blue")
        browser.find_element(By.ID, "search").click()
        shown = _wait(lambda: _shown_hits(browser), "the results")
        expected = _expected(model, processor, index, Image.open(upload).convert("RGB"), "make it blue")
        assert [i for i, _ in shown] == [i for i, _ in expected]
        assert [s for _, s in shown] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert "a_long_gallery_image_name_005.png" not in [i for i, _ in shown]  # the reference, by content

        layout = _layout(browser)
        assert not layout["overflow"], layout
        assert len(layout["figures"]) == 10 and all(f["below"] and f["whole"] for f in layout["figures"]), layout
        assert layout["strip_visible"] == 6 and layout["strip_scrollers"] == 0, layout
        assert layout["reference_width"] >= 192, layout  # the 64 px reference drawn at the box's size
        browser.save_screenshot(str(tmp_path / "demo.png"))

        picks = browser.find_elements(By.CSS_SELECTOR, "#picks button.thumbnail-item")
        assert len(picks) == 6
        picks[2].click()
        picked = app.examples()[2]
        _wait(lambda: picked in browser.find_element(By.ID, "picked").text, "the picked image's id")
        _wait(lambda: not _shown_hits(browser), "the old results cleared")
        browser.find_element(By.ID, "search").click()
        shown = _wait(lambda: _shown_hits(browser), "the picked reference's results")
        expected = _expected(model, processor, index, index.open_image(picked), "make it blue",
                             reference_ids=[picked])
        assert [i for i, _ in shown] == [i for i, _ in expected] and picked not in [i for i, _ in shown]
    finally:
        ui.close()


def test_the_report_page_wraps_ten_hits_in_a_browser(browser, tmp_path):
    from modeling_spn4cir.retrieval import ReportHit, ReportRow, render_html

    images = solid_images(11, size=64, seed=1)
    hits = [ReportHit(f"a_rather_long_image_id_{i:03d}.png", 0.9 - 0.01 * i, images[i], i + 1) for i in range(10)]
    page = tmp_path / "report.html"
    page.write_text(render_html([ReportRow("make it blue", hits, "ref", images[10])], "Composed image retrieval"))
    browser.set_window_size(1300, 900)
    browser.get(Path(page).as_uri())
    wraps = browser.execute_script("""
        const figures = [...document.querySelectorAll('figure.hit')];
        return {overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,
                lines: new Set(figures.map(f => Math.round(f.getBoundingClientRect().top))).size,
                text: document.querySelector('h2').textContent};
    """)
    assert not wraps["overflow"] and wraps["lines"] >= 2, wraps
    assert "top 10" in wraps["text"] and "ground truth" not in wraps["text"]  # a search says only what it shows
