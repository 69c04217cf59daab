"""The page at / in a real browser (Debian's chromium + chromium-driver through selenium, headless):
upload images through the file input, wait for the answers, check them against /v1/predict, and look at the
pixels the browser drew (films, heatmaps, the enlarged view). Screenshots land in build/screenshots/."""
from __future__ import annotations

import re

import pytest
import requests
from browser import chromium
from conftest import ROOT
from serving import Server
from test_infer import radiograph, save_mode

pytestmark = pytest.mark.slow
SCREENSHOTS = ROOT / "build" / "screenshots"  # kept after the run, to look at


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("page_images")
    files = [save_mode(radiograph(700 + 50 * i, seed=20 + i), m, root / f"patient_{i}")
             for i, m in enumerate(("png8", "jpeg", "png16"))]
    from test_common_imageio import _find_rg1

    files.append(_find_rg1())  # the real chest CR DICOM: no browser preview, but classified
    bad = root / "notes.png"
    bad.write_text("this is not an image\n")
    return files, bad


def shown_percent(p: float) -> str:
    """What the page shows for a probability (app.js `percent`): one decimal, never 100.0 % or 0.0 %."""
    text = f"{100 * p:.1f}"
    if p >= 0.9995 or text == "100.0":
        return "> 99.9 %"
    if p < 0.0005 or text in ("0.0", "-0.0"):
        return "< 0.1 %"
    return text + " %"


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def test_page_uploads_images_and_shows_the_service_answers(browser, tiny_onnx, page_images):
    from selenium.webdriver.common.by import By

    files, bad = page_images
    with Server("--model", tiny_onnx[0]) as s:
        browser.get(s.url + "/")
        model = wait_for(browser, lambda d: (t := d.find_element(By.ID, "model").text) and "efficientnet" in t and t)
        assert "NORMAL, PNEUMONIA, TUBERCULOSIS" in model and "fp32" in model
        assert "not a medical device" in browser.find_element(By.ID, "notice").text.lower()
        assert not browser.find_element(By.ID, "keyform").is_displayed()  # no key on this server
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*files, bad]))
        cards = wait_for(browser, lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))
                         and len(c) == 5 and c)
        shown = {c.get_attribute("data-file"): c for c in cards}
        for path in files:
            want = requests.post(s.url + "/v1/predict", data=path.read_bytes(),
                                 headers={"Content-Type": "application/octet-stream",
                                          "X-Filename": path.name}).json()["predictions"][0]
            card = shown[path.name]
            assert card.get_attribute("data-prediction") == want["prediction"]
            assert float(card.get_attribute("data-probability")) == pytest.approx(want["probability"], abs=1e-9)
            assert card.find_element(By.CLASS_NAME, "pred").text == f"{want['prediction']} {shown_percent(want['probability'])}"
            bars = card.find_elements(By.CLASS_NAME, "bar")
            assert [b.find_element(By.CLASS_NAME, "cls").text for b in bars] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
            for bar in bars:
                p = want["probabilities"][bar.find_element(By.CLASS_NAME, "cls").text]
                assert bar.find_element(By.CLASS_NAME, "value").text == shown_percent(p)
            # a DICOM file no browser shows: the server's rendering; the rest: the browser's own copy
            assert card.get_attribute("data-view") == ("preview" if path.suffix == ".dcm" else "browser")
            thumb = card.find_element(By.CLASS_NAME, "base")
            assert browser.execute_script("return arguments[0].naturalWidth", thumb) > 0
            assert not card.find_element(By.CLASS_NAME, "heatctls").is_displayed()  # this model has no heatmaps
        failed = shown[bad.name]
        assert "could not read" in failed.text and "not a recognised image" in failed.text
        assert failed.find_element(By.CLASS_NAME, "noimg").text == "no preview"
        assert "done: 5 image(s)" in browser.find_element(By.ID, "status").text
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve_page_1280x800.png"))
        # a small laptop screen: no sideways scrolling, the picker still there
        browser.set_window_size(800, 600)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert browser.find_element(By.CSS_SELECTOR, "label.pick").is_displayed()
        browser.save_screenshot(str(SCREENSHOTS / "serve_page_800x600.png"))
        browser.set_window_size(1280, 800)


def test_page_asks_for_the_api_key(browser, tiny_onnx, page_images, tmp_path):
    from selenium.webdriver.common.by import By

    key = tmp_path / "key.txt"
    key.write_text("ward-7-key\n")
    with Server("--model", tiny_onnx[0], "--api-key-file", key) as s:
        browser.get(s.url + "/")
        wait_for(browser, lambda d: d.find_element(By.ID, "keyform").is_displayed())
        browser.find_element(By.ID, "key").send_keys("ward-7-key")
        browser.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(str(page_images[0][0]))
        card = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))[0]
        assert card.get_attribute("data-prediction") in ("NORMAL", "PNEUMONIA", "TUBERCULOSIS")


def coloured_pixels(element) -> int:
    """Pixels of an element's screenshot that are not grey: the films are greyscale, the heatmap is the colour."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 10).sum())


@pytest.fixture(scope="module")
def clinic_files(exported, tmp_path_factory):
    """For the trained run's export: two of its test films whose heatmaps are coloured, a 2000 px film, a noise
    picture (flagged by the guard), the real CR DICOM and a file that is no image."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from test_common_imageio import _find_rg1

    folder, _ = exported
    root = tmp_path_factory.mktemp("clinic")
    noise = root / "circuit_board.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)).save(noise)
    big = save_mode(radiograph(2000, seed=4), "png8", root / "film_2000px")
    bad = root / "notes.png"
    bad.write_text("this is not an image\n")
    coverage = {}  # film -> the share of its heatmap layer that shows
    with Server("--model", folder / "model.onnx") as s:
        for p in sorted((folder.parent.parent / "data" / "test").glob("*/*")):
            rec = requests.post(s.url + "/v1/predict?heatmap=true&ood_action=abstain", data=p.read_bytes(),
                                headers={"Content-Type": "image/png"}).json()["predictions"][0]
            if rec.get("heatmap"):
                rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(rec["heatmap"].split(",", 1)[1]))))
                coverage[p] = float((rgba[..., 3] > 60).mean())
    films = sorted((p for p, c in coverage.items() if c > 0.02), key=coverage.get)[:2]  # the most local ones
    assert len(films) == 2, f"the trained run gave no two films with a visible heatmap: {coverage}"
    return {"films": films, "big": big, "noise": noise, "dicom": _find_rg1(), "bad": bad}


def test_page_shows_each_film_with_its_heatmap_and_does_not_assess_what_the_guard_flags(browser, exported,
                                                                                        clinic_files):
    """The clinician's view: every card shows its image (the browser's own copy, or the server's rendering for
    DICOM); the heatmap toggle and opacity lay coloured pixels over a film and take them away; a flagged picture's
    headline names no class and its numbers wait under "show anyway"; per-image errors stay visible."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder, _ = exported
    f = clinic_files
    with Server("--model", folder / "model.onnx") as s:
        browser.get(s.url + "/")
        wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
        files = [*f["films"], f["noise"], f["dicom"], f["bad"]]
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in files))
        cards = wait_for(browser, lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))
                         and len(c) == len(files) and c)
        assert [c.get_attribute("data-file") for c in cards] == [p.name for p in files]  # in the order picked
        shown = {c.get_attribute("data-file"): c for c in cards}
        classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]

        for film in f["films"]:  # the heatmap: off at first, coloured when on, gone at opacity 0
            card = shown[film.name]
            assert card.get_attribute("data-view") == "browser"
            assert card.get_attribute("data-prediction") in classes
            assert card.get_attribute("data-heatmap-class") == card.get_attribute("data-prediction")
            stack = card.find_element(By.CLASS_NAME, "stack")
            assert stack.size["height"] > 150  # the film itself, not a thumbnail stamp
            assert coloured_pixels(stack) == 0
            toggle = card.find_element(By.CLASS_NAME, "heat-toggle")
            toggle.click()
            assert card.get_attribute("data-heatmap-on") == "true"
            on = coloured_pixels(stack)
            assert on > 200, on
            opacity = card.find_element(By.CLASS_NAME, "opacity")
            opacity.send_keys(Keys.HOME)  # from the keyboard: opacity 0
            assert coloured_pixels(stack) == 0
            opacity.send_keys(Keys.END)
            assert coloured_pixels(stack) >= on
            toggle.send_keys(Keys.SPACE)  # off again, from the keyboard
            assert coloured_pixels(stack) == 0
            toggle.send_keys(Keys.SPACE)

        flagged = shown[f["noise"].name]  # the guard flags it: not assessed, no class, numbers folded away
        assert flagged.get_attribute("data-prediction") == "OUT_OF_DISTRIBUTION"
        headline = flagged.find_element(By.CLASS_NAME, "pred").text
        assert headline.startswith("Not assessed") and not any(c in headline.upper() for c in classes)
        assert "ood_score" in flagged.find_element(By.CLASS_NAME, "reason").text
        assert not flagged.find_element(By.CLASS_NAME, "heatctls").is_displayed()
        assert "not assessed" in flagged.find_element(By.CLASS_NAME, "noheat").text
        bars = flagged.find_elements(By.CLASS_NAME, "bar")
        assert len(bars) == 3 and not any(b.is_displayed() for b in bars)
        flagged.find_element(By.CSS_SELECTOR, ".anyway summary").click()
        assert all(b.is_displayed() for b in bars)
        want = requests.post(s.url + "/v1/predict", data=f["noise"].read_bytes(),
                             headers={"Content-Type": "image/png"}).json()["predictions"][0]["probabilities"]
        assert [b.find_element(By.CLASS_NAME, "value").text for b in bars] == [shown_percent(want[c]) for c in classes]

        dicom = shown[f["dicom"].name]  # no browser shows DICOM: the server's rendering, a real picture
        assert dicom.get_attribute("data-view") == "preview"
        base = dicom.find_element(By.CLASS_NAME, "base")
        assert base.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", base) > 500
        import io

        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(dicom.find_element(By.CLASS_NAME, "stack").screenshot_as_png))
                            .convert("L"))
        assert pixels.std() > 30 and pixels.mean() > 40  # lungs, ribs and mediastinum, not a black placeholder

        failed = shown[f["bad"].name]
        assert "could not read" in failed.text and "not a recognised image" in failed.text
        assert failed.find_element(By.CLASS_NAME, "noimg").text == "no preview"
        assert f"done: {len(files)} image(s)" in browser.find_element(By.ID, "status").text

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SCREENSHOTS / "serve_page_heatmap.png"))  # docs/serve_page.png is a copy
        browser.set_window_size(420, 900)  # a phone held upright: no sideways scrolling, the controls still there
        try:
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            card = shown[f["films"][0].name]
            browser.execute_script("arguments[0].scrollIntoView()", card)
            assert card.find_element(By.CLASS_NAME, "heat-toggle").is_displayed()
            assert card.size["width"] <= 420 and coloured_pixels(card.find_element(By.CLASS_NAME, "stack")) > 0
            browser.save_screenshot(str(SCREENSHOTS / "serve_page_420px.png"))
        finally:
            browser.set_window_size(1280, 800)


def test_enlarging_shows_full_resolution_with_zoom_and_pan_from_mouse_or_keyboard(browser, exported, clinic_files):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder, _ = exported
    big, dicom = clinic_files["big"], clinic_files["dicom"]
    width, height = Image.open(big).size
    assert max(width, height) >= 1800
    with Server("--model", folder / "model.onnx") as s:
        browser.get(s.url + "/")
        wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(f"{big}\n{dicom}")
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]")) == 2)
        film = browser.find_element(By.CSS_SELECTOR, f".card[data-file='{big.name}'] .film")
        film.click()
        viewer = browser.find_element(By.ID, "viewer")
        wait_for(browser, lambda d: viewer.get_attribute("open") is not None and viewer.get_attribute("data-scale"))
        base = browser.find_element(By.ID, "vbase")
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", base) \
            == [width, height]  # the browser's own full-resolution copy, not the server's 1024 px preview
        assert float(viewer.get_attribute("data-scale")) < 1  # fitted to the screen first
        browser.find_element(By.ID, "z1").click()  # one image pixel per screen pixel
        assert float(viewer.get_attribute("data-scale")) == 1
        assert browser.execute_script("return arguments[0].getBoundingClientRect().width",
                                      browser.find_element(By.ID, "vstack")) == pytest.approx(width, abs=1)
        browser.find_element(By.ID, "zin").click()
        assert float(viewer.get_attribute("data-scale")) == pytest.approx(1.25)
        stage = browser.find_element(By.ID, "stage")
        before = stage.find_element(By.ID, "vstack").value_of_css_property("transform")
        stage.send_keys(Keys.ARROW_LEFT)  # pan from the keyboard
        assert stage.find_element(By.ID, "vstack").value_of_css_property("transform") != before
        from selenium.webdriver.common.action_chains import ActionChains

        moved = stage.find_element(By.ID, "vstack").value_of_css_property("transform")
        ActionChains(browser).move_to_element(stage).click_and_hold().move_by_offset(-120, -80).release().perform()
        assert stage.find_element(By.ID, "vstack").value_of_css_property("transform") != moved  # pan by dragging
        stage.send_keys("0")
        assert float(viewer.get_attribute("data-scale")) < 1
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "viewer.png"))
        stage.send_keys(Keys.ESCAPE)
        wait_for(browser, lambda d: viewer.get_attribute("open") is None)
        assert browser.execute_script("return document.activeElement") == film  # focus back where it was

        dicom_film = browser.find_element(By.CSS_SELECTOR, f".card[data-file='{dicom.name}'] .film")
        browser.execute_script("arguments[0].focus()", dicom_film)
        dicom_film.send_keys(Keys.ENTER)  # open from the keyboard
        wait_for(browser, lambda d: viewer.get_attribute("open") is not None and viewer.get_attribute("data-scale"))
        assert base.get_attribute("src").startswith("data:image/jpeg")
        assert "server's rendering" in browser.find_element(By.ID, "vnote").text
        browser.find_element(By.ID, "vclose").click()
        wait_for(browser, lambda d: viewer.get_attribute("open") is None)


EXTREME = re.compile(r"\b100\.0 ?%|\b0\.0 ?%")  # what a calibrated model's probability never reads
GENERIC_LEGEND = "Colour = where the model looked for this class, strongest in red."
PER_IMAGE_NOTE = "(scaled per image: colours are not comparable between images or classes)"
# the server as a sure model would answer it, and a metadata `heatmap` field: wraps the page's fetch
MOCK_LEGEND = "Mock legend: red is where this model looked hardest."
MOCK_SERVER = """(() => {
  const real = window.fetch;
  window.fetch = async (url, options) => {
    const r = await real(url, options), path = String(url);
    if (!r.ok || !(path.startsWith("/v1/metadata") || path.startsWith("/v1/predict"))) return r;
    const body = await r.json();
    if (path.startsWith("/v1/metadata")) body.heatmap = {scale: "per_image", value: null, legend: "MOCK_LEGEND"};
    for (const rec of body.predictions || []) {
      Object.keys(rec.probabilities).forEach((k, i) => { rec.probabilities[k] = k === rec.prediction ? 1 : i % 2 ? 0 : 3e-7; });
      rec.probability = 1;
    }
    return new Response(JSON.stringify(body), {status: r.status, headers: r.headers});
  };
})();""".replace("MOCK_LEGEND", MOCK_LEGEND)


@pytest.fixture(scope="module")
def viewer_films(tmp_path_factory):
    """A 336 px film (smaller than the enlarged view) and a 2000 px one (larger)."""
    root = tmp_path_factory.mktemp("viewer_films")
    return (save_mode(radiograph(336, seed=5), "png8", root / "film_336px"),
            save_mode(radiograph(2000, seed=6), "png8", root / "film_2000px"))


def open_fitted(browser, card) -> float:
    """Enlarge a card's film; it opens fitted to the stage (one side equal, the other inside) with the zoom
    readout saying by how much. Returns the scale."""
    from selenium.webdriver.common.by import By

    card.find_element(By.CLASS_NAME, "film").click()
    viewer = browser.find_element(By.ID, "viewer")
    wait_for(browser, lambda d: viewer.get_attribute("open") is not None and viewer.get_attribute("data-scale"))
    w, h, stage_w, stage_h = browser.execute_script(
        "const r = document.getElementById('vbase').getBoundingClientRect(), s = document.getElementById('stage');"
        "return [r.width, r.height, s.clientWidth, s.clientHeight]")
    assert (abs(w - stage_w) <= 2 and h <= stage_h + 2) or (abs(h - stage_h) <= 2 and w <= stage_w + 2), \
        (w, h, stage_w, stage_h)
    scale = float(viewer.get_attribute("data-scale"))
    assert browser.find_element(By.ID, "vzoom").text == f"{int(100 * scale + 0.5)}%" != "100%"
    return scale


def close_viewer(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.ID, "stage").send_keys(Keys.ESCAPE)
    wait_for(browser, lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is None)


def test_probabilities_never_read_100_or_0_the_view_opens_fitted_and_heatmaps_have_a_legend(browser, cam_onnx,
                                                                                            viewer_films):
    """Issue items 4-6 on the page: every shown probability through one formatter ("> 99.9 %", "< 0.1 %" at the
    ends; the API keeps the numbers); the enlarged view opens fitted to the window, a 336 px film enlarged and a
    2000 px one shrunk; a heatmap carries a legend (the ramp, low / high, /v1/metadata's sentence or a generic
    one, and a warning when colours are scaled per image). Then the same page against a mocked server that is
    sure of everything and sends its own legend."""
    from selenium.webdriver.common.by import By

    small, big = viewer_films
    page_text = "return document.body.textContent"
    with Server("--model", cam_onnx) as s:
        heat = requests.get(s.url + "/v1/metadata").json().get("heatmap") or {}  # absent: a server before it
        browser.get(s.url + "/")
        wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
        values = [1, 0.9995, 0.99949, 0.5, 0.1234, 0.0005, 0.00049, 3e-9, 0]
        assert browser.execute_script("return arguments[0].map(window.xrayFormat.percent)", values) == \
            ["> 99.9 %", "> 99.9 %", "99.9 %", "50.0 %", "12.3 %", "0.1 %", "< 0.1 %", "< 0.1 %", "< 0.1 %"] == \
            [shown_percent(p) for p in values]
        browser.find_element(By.ID, "files").send_keys(f"{small}\n{big}")
        cards = wait_for(browser, lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))
                         and len(c) == 2 and c)
        for card in cards:
            legend = card.find_element(By.CLASS_NAME, "legend")
            assert not legend.is_displayed()  # no colours shown, nothing to explain
            card.find_element(By.CLASS_NAME, "heat-toggle").click()
            assert legend.is_displayed() and (heat.get("legend") or GENERIC_LEGEND) in legend.text
            assert "low" in legend.text and "high" in legend.text
            assert (PER_IMAGE_NOTE in legend.text) == (heat.get("scale") == "per_image")
            ramp = legend.find_element(By.CLASS_NAME, "ramp")
            assert "linear-gradient" in ramp.value_of_css_property("background-image") and ramp.size["width"] > 40
        assert not EXTREME.search(browser.execute_script(page_text))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve_page_legend.png"))

        shown = {c.get_attribute("data-file"): c for c in cards}
        fitted = open_fitted(browser, shown[small.name])
        assert fitted > 1.5  # 336 px enlarged to the window, not shown at 100 %
        assert (heat.get("legend") or GENERIC_LEGEND) in browser.find_element(By.ID, "vlegend").text
        browser.find_element(By.ID, "vheat").click()  # heatmap off: the legend goes with it
        assert not browser.find_element(By.ID, "vlegend").is_displayed()
        browser.find_element(By.ID, "vheat").click()
        browser.find_element(By.ID, "zin").click()
        browser.find_element(By.ID, "zfit").click()  # Fit: the same fit-to-window, upwards too
        assert float(browser.find_element(By.ID, "viewer").get_attribute("data-scale")) == pytest.approx(fitted)
        close_viewer(browser)
        assert open_fitted(browser, shown[big.name]) < 0.5  # 2000 px shrunk to the window
        close_viewer(browser)

        mock = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": MOCK_SERVER})
        try:
            browser.get(s.url + "/")
            wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
            browser.find_element(By.ID, "files").send_keys(str(small))
            card = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))[0]
            assert card.get_attribute("data-probability") == "1"  # the page got the mocked answer
            assert card.find_element(By.CLASS_NAME, "pred").text == card.get_attribute("data-prediction") + " > 99.9 %"
            assert sorted(v.text for v in card.find_elements(By.CSS_SELECTOR, ".bar .value")) == \
                ["< 0.1 %", "< 0.1 %", "> 99.9 %"]
            top = card.find_element(By.CSS_SELECTOR, ".bar.top")  # the bar's width is the number itself
            assert top.find_element(By.CLASS_NAME, "fill").size["width"] == \
                pytest.approx(top.find_element(By.CLASS_NAME, "track").size["width"], abs=1)
            card.find_element(By.CLASS_NAME, "heat-toggle").click()
            legend = card.find_element(By.CLASS_NAME, "legend").text
            assert MOCK_LEGEND in legend and PER_IMAGE_NOTE in legend and GENERIC_LEGEND not in legend
            assert not EXTREME.search(browser.execute_script(page_text))
            assert open_fitted(browser, card) > 1.5
            assert browser.find_element(By.ID, "vheading").text.endswith(" > 99.9 %")
            assert PER_IMAGE_NOTE in browser.find_element(By.ID, "vlegend").text
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(SCREENSHOTS / "viewer_fitted_336px.png"))
            close_viewer(browser)
        finally:
            browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": mock["identifier"]})


def test_docs_render_offline_in_the_browser(browser, tiny_onnx):
    """Swagger UI draws the API from /openapi.json with its own files from this server (no CDN reachable)."""
    from selenium.webdriver.common.by import By

    with Server("--model", tiny_onnx[0]) as s:
        browser.get(s.url + "/docs")
        title = wait_for(browser, lambda d: (e := d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
                         and e[0].text)
        assert "xray-edge" in title
        ops = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        assert "/v1/predict" in {o.text.strip() for o in ops}
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "docs.png"))

