"""The page at / in a real browser (Debian's chromium + chromium-driver through selenium, headless):
upload images through the file input, wait for the answers, check them against /v1/predict."""
from __future__ import annotations

import shutil

import pytest
import requests
from conftest import ROOT
from serving import Server
from test_infer import radiograph, save_mode

pytestmark = pytest.mark.slow
SCREENSHOTS = ROOT / "build" / "screenshots"  # kept after the run, to look at


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert shutil.which(tool), f"{tool} missing: make test installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
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
            assert card.find_element(By.CLASS_NAME, "pred").text == f"{want['prediction']} {want['probability']:.1%}"
            bars = card.find_elements(By.CLASS_NAME, "bar")
            assert [b.find_element(By.CLASS_NAME, "cls").text for b in bars] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
            for bar in bars:
                p = want["probabilities"][bar.find_element(By.CLASS_NAME, "cls").text]
                assert bar.find_element(By.CLASS_NAME, "value").text == f"{p:.1%}"
            if path.suffix == ".dcm":
                assert card.find_element(By.CLASS_NAME, "noimg").text == "DICOM"  # browsers cannot show DICOM
            else:
                thumb = card.find_element(By.TAG_NAME, "img")
                assert browser.execute_script("return arguments[0].naturalWidth", thumb) > 0  # the thumbnail decoded
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


def test_page_marks_what_the_guard_flags(browser, exported, tmp_path):
    """A model with the out-of-distribution guard: a noise picture's card says it is not like the training
    data, and why; a test film of the run's own split does not."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    folder, _ = exported
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)).save(noise)
    with Server("--model", folder / "model.onnx") as s:
        film = next(p for p in sorted((folder.parent.parent / "data" / "test").glob("*/*"))
                    if not requests.post(s.url + "/v1/predict", data=p.read_bytes(),
                                         headers={"Content-Type": "image/png"}).json()["predictions"][0]["ood"])
        browser.get(s.url + "/")
        wait_for(browser, lambda d: "efficientnet" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(f"{noise}\n{film}")
        cards = wait_for(browser, lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))
                         and len(c) == 2 and c)
        shown = {c.get_attribute("data-file"): c for c in cards}
        flagged, accepted = shown["noise.png"], shown[film.name]
        assert "ood" in flagged.get_attribute("class").split()
        assert "not like the training data" in flagged.find_element(By.CLASS_NAME, "pred").text
        assert "ood_score" in flagged.find_element(By.CLASS_NAME, "reason").text
        assert "ood" not in accepted.get_attribute("class").split()
        assert not accepted.find_elements(By.CLASS_NAME, "reason")
        assert "verified accuracy" in browser.find_element(By.ID, "model").text


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

