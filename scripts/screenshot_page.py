#!/usr/bin/env python
"""A screenshot of xray-serve's page at / as a clinician sees it: two synthetic films with their heatmaps on, the
real chest CR DICOM (RG1_UNCR.dcm from pydicom-data, rendered by the server), and a photograph that is plainly
not a chest film, which the out-of-distribution guard flags ("Not assessed").

docs/serve_page.png (the picture docs/service.md and the README show) is made from the demo model (`make demo`)
with exactly this command, and looked at before it is committed:

    .venv/bin/python scripts/screenshot_page.py --model runs/demo/export --out docs/serve_page.png

It starts `xray-serve --model EXPORT` on a free port of 127.0.0.1, makes its inputs in a temporary folder,
uploads the four files through the page's file input in headless Chromium (selenium; Debian's chromium and
chromium-driver in /usr/bin), turns each film's heatmap on and saves the page at --size (default 1280x900).

The films come from scripts/make_synthetic.py's renderer at the demo's training size (--film-size, make demo's
--synthetic-size); a few candidate seeds per class are classified with the model in this process (onnxruntime,
the same model file xray-serve picks) and the most confident correct one that the guard accepts and whose map has
something to draw is kept, so the picture never shows a film called by the wrong class; on the page each film's
heatmap must put colour on it. --any-prediction keeps the best candidate even when the
model calls it wrong (for the tests' small random-headed model only, never for the docs). Each card's shown
prediction is printed. Anything missing or wrong (model, Chromium, pydicom-data, a card, a heatmap, a flag) ends
the run with one line on stderr and exit code 1.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_synthetic import KNOWN_FINDINGS, Anatomy, encode, render  # noqa: E402

SERVE = [sys.executable, "-c", "from xray.serve.cli import main; main(prog_name='xray-serve')"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OOD = "OUT_OF_DISTRIBUTION"  # the prediction of a flagged image (ood_action abstain, as the page asks)
CANDIDATES = 8  # seeds tried per film class
CONFIDENT = 0.9  # a film's own class must get at least this probability


class Failed(Exception):
    """One line for the user: what went wrong."""


def find_rg1() -> Path | None:
    """RG1_UNCR.dcm from the installed pydicom-data package, found on disk (never downloaded); the tests use
    this lookup too (tests/test_common_imageio.py's _find_rg1)."""
    roots = []
    for mod in ("pydicom_data", "data_store"):
        spec = importlib.util.find_spec(mod)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(s) for s in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("pydicom-data")
        roots += [Path(dist.locate_file(f)).parent for f in (dist.files or []) if f.name == "RG1_UNCR.dcm"]
    except importlib.metadata.PackageNotFoundError:
        pass
    for root in roots:
        hits = sorted(root.glob("**/RG1_UNCR.dcm"))
        if hits:
            return hits[0]
    return None


def photograph(path: Path, width: int = 800, height: int = 600) -> Path:
    """A holiday snap, nothing like a chest film: blue sky fading to the horizon, a sun, green rolling ground
    with two trees."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = yy / height, xx / width
    top, horizon = np.array([40, 110, 200.0]), np.array([185, 220, 245.0])
    t = np.clip(y / 0.62, 0, 1)[..., None]
    rgb = top * (1 - t) + horizon * t
    sun = np.hypot((x - 0.76) * width, (y - 0.2) * height)
    glow = np.exp(-(sun / 90) ** 2)[..., None]
    rgb = rgb * (1 - glow) + np.array([255, 240, 190.0]) * glow
    rgb[sun < 42] = (255, 215, 60)
    hill = 0.62 + 0.05 * np.sin(2 * np.pi * x * 1.3 + 0.8) + 0.02 * np.sin(2 * np.pi * x * 4.1)
    ground = y > hill
    shade = np.clip((y - hill) / 0.4, 0, 1)[..., None]
    grass = np.array([95, 170, 60.0]) * (1 - shade) + np.array([40, 105, 35.0]) * shade
    grass = grass + np.random.default_rng(1).normal(0, 8, (height, width, 1))
    rgb = np.where(ground[..., None], grass, rgb)
    for tx, size in ((0.18, 1.0), (0.3, 0.75)):  # trees on the hill: a trunk and a round crown
        base = 0.62 + 0.05 * np.sin(2 * np.pi * tx * 1.3 + 0.8) + 0.02 * np.sin(2 * np.pi * tx * 4.1) + 0.03
        trunk = (np.abs(x - tx) < 0.008 * size) & (y < base) & (y > base - 0.14 * size)
        rgb[trunk] = (100, 65, 35)
        crown = np.hypot((x - tx) * width, (y - base + 0.17 * size) * height) < 48 * size
        rgb[crown] = (30, 110 + 20 * size, 40)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path, "JPEG", quality=90)
    return path


def pick_films(model_path: str, classes: list[str], size: int, any_prediction: bool, folder: Path) -> list[Path]:
    """For each class: the most confident of CANDIDATES rendered films the model gets right (and its guard
    accepts); with any_prediction the most confident one for its class, right or not. Prints the choice."""
    from xray.infer.model import open_model
    from xray.infer.predict import prepare

    try:
        model, _ = open_model(model_path)
    except Exception as e:
        raise Failed(f"{model_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not model.has_cam:
        raise Failed(f"{model.path}: this model has no heatmaps (class activation maps); export it with xray-export")
    if not model.has_guard:
        raise Failed(f"{model.path}: this model has no out-of-distribution guard, so nothing would be flagged; "
                     "export it with xray-export")
    names = model.info.classes
    unknown = [c for c in classes if c not in names or c not in KNOWN_FINDINGS]
    if unknown:
        raise Failed(f"{model.path}: no synthetic film for {', '.join(unknown)} (model classes: {', '.join(names)})")
    films = []
    for cls in classes:
        ci, tried = names.index(cls), []
        for seed in range(CANDIDATES):
            rng = np.random.default_rng([seed, ci, 7])
            data = encode(render(KNOWN_FINDINGS[cls], Anatomy.sample(rng, size), rng), "png")
            out = model.predict(prepare(data, model.info.spec, name="film.png")[None], cam=True)
            probs, called = out.probs[0], int(out.probs[0].argmax())
            tried.append({"seed": seed, "data": data, "p": float(probs[ci]), "called": names[called],
                          "ood": bool(out.ood[0]), "score": float(out.ood_score[0]),
                          "heat": bool(out.cam[0, called].max() > 0)})  # the page draws the map's positive part
        ok = [t for t in tried if not t["ood"] and t["heat"] and
              (any_prediction or (t["called"] == cls and t["p"] >= CONFIDENT))]
        summary = ", ".join(f"seed {t['seed']} {t['called']} {t['p']:.1%}{' flagged' if t['ood'] else ''}"
                            f"{'' if t['heat'] else ' no-heatmap'}" for t in tried)
        if not ok:
            wanted = "accepted by the guard with a heatmap" if any_prediction else \
                f"called {cls} with >= {CONFIDENT:.0%}, accepted by the guard and with a heatmap"
            raise Failed(f"none of {CANDIDATES} synthetic {cls} films is {wanted} ({summary})")
        best = max(ok, key=lambda t: (t["p"], -t["score"]))
        path = folder / f"synthetic_{cls.lower()}_seed{best['seed']}.png"
        path.write_bytes(best["data"])
        print(f"film {cls}: seed {best['seed']}, the model says {best['called']} ({cls} {best['p']:.1%}, "
              f"ood_score {best['score']:.2f}); candidates: {summary}")
        films.append(path)
    return films


class Server:
    """xray-serve ARGS on a free port of 127.0.0.1 (as tests/serving.py's Server); stop() sends SIGTERM."""

    def __init__(self, *args, ready_timeout: float = 120):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="xray-serve-screenshot-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([*SERVE, "--host", "127.0.0.1", "--port", "0", *map(str, args)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, ready_timeout: float):
        deadline = time.monotonic() + ready_timeout
        self.url = None
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.output())
            if match:
                self.url = match.group(1)
                break
            if self.proc.poll() is not None:
                raise Failed(f"xray-serve exited {self.proc.returncode}: {self.last_line()}")
            time.sleep(0.05)
        import requests

        while self.url and time.monotonic() < deadline:  # ready = model loaded and warmed up
            try:
                if requests.get(self.url + "/health/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise Failed(f"xray-serve not ready after {ready_timeout:.0f} s: {self.last_line()}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def last_line(self) -> str:
        lines = [ln for ln in self.output().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def chromium(width: int, height: int):
    """Headless Chromium whose viewport is exactly width x height CSS pixels at one device pixel each."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(tool):
            raise Failed(f"{tool} missing: install Debian's chromium and chromium-driver (make test-tools)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def wait_for(driver, what: str, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = condition(driver)
        except Exception:  # the page is still building the element
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")


def coloured_pixels(png: bytes) -> int:
    """Pixels of a screenshot that are not grey: a film is greyscale, its heatmap is the colour."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 10).sum())


LOADED = "return [...arguments[0].querySelectorAll('img')].every((i) => i.hidden || (i.complete && i.naturalWidth > 0))"


def shoot(url: str, films: list[Path], dicom: Path, photo: Path, out: Path, width: int, height: int,
          any_prediction: bool) -> list[str]:
    """Upload, turn the films' heatmaps on, check every card, save the screenshot; the cards' lines."""
    from selenium.webdriver.common.by import By

    files = [*films, dicom, photo]
    driver = chromium(width, height)
    try:
        driver.get(url + "/")
        wait_for(driver, "the model line", lambda d: (t := d.find_element(By.ID, "model").text) and
                 not t.startswith("loading") and t)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in files))
        cards = wait_for(driver, f"{len(files)} answered cards",
                         lambda d: (c := d.find_elements(By.CSS_SELECTOR, ".card[data-prediction]"))
                         and len(c) == len(files) and c, timeout=120)
        shown = {c.get_attribute("data-file"): c for c in cards}
        missing = [p.name for p in files if p.name not in shown]
        if missing:
            raise Failed(f"no card for {', '.join(missing)}")
        lines = []
        for path in files:
            card = shown[path.name]
            prediction = card.get_attribute("data-prediction")
            headline = card.find_element(By.CLASS_NAME, "pred").text.strip()
            if not prediction:
                raise Failed(f"{path.name}: the page could not classify it: {headline}")
            note = ""
            if path in films:
                want = path.name.split("_")[1].upper()
                if prediction == OOD:
                    raise Failed(f"{path.name}: flagged by the guard on the page ({headline})")
                if prediction != want and not any_prediction:
                    raise Failed(f"{path.name}: the page says {prediction}, the film is {want}")
                controls = card.find_element(By.CLASS_NAME, "heatctls")
                if not controls.is_displayed():
                    raise Failed(f"{path.name}: no heatmap toggle on its card")
                card.find_element(By.CLASS_NAME, "heat-toggle").click()
                wait_for(driver, f"{path.name}'s heatmap", lambda d, c=card: c.get_attribute("data-heatmap-on")
                         == "true" and c.find_element(By.CLASS_NAME, "heat").is_displayed())
                stack = card.find_element(By.CLASS_NAME, "stack")
                coloured = wait_for(driver, f"colour on {path.name}'s film",
                                    lambda d, e=stack: coloured_pixels(e.screenshot_as_png) > 200 and
                                    coloured_pixels(e.screenshot_as_png), timeout=10)
                note = (f" (synthetic {want}; heatmap on: {card.get_attribute('data-heatmap-class')}, "
                        f"{coloured} coloured pixels)")
            elif path == photo:
                if prediction != OOD or "ood" not in (card.get_attribute("class") or "").split():
                    raise Failed(f"{path.name}: the photograph was not flagged by the guard (the page says "
                                 f"{headline})")
                note = " (the photograph: flagged by the out-of-distribution guard)"
            else:
                if card.get_attribute("data-view") != "preview":
                    raise Failed(f"{path.name}: the card does not show the server's rendering of the DICOM")
                note = " (DICOM, the server's rendering)"
            lines.append(f"{path.name}: {headline}{note}")
        driver.execute_script("window.scrollTo(0, 0)")
        for path in files:
            wait_for(driver, f"{path.name}'s images to load", lambda d, c=shown[path.name]: d.execute_script(LOADED, c))
            bottom = driver.execute_script("return arguments[0].getBoundingClientRect().bottom", shown[path.name])
            if bottom > height:
                raise Failed(f"{path.name}'s card ends at y={bottom:.0f}, below the {width}x{height} screenshot: "
                             "pass a taller --size")
        time.sleep(0.3)  # the heatmap layers' first paint
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width < width or img.height < height:
        raise Failed(f"Chromium gave a {img.width}x{img.height} screenshot, smaller than {width}x{height}")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.crop((0, 0, width, height)).save(out, optimize=True)
    return lines


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not match or min(int(match.group(1)), int(match.group(2))) < 200:
        raise click.BadParameter(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1280x900 (each at least 200)")
    return int(match.group(1)), int(match.group(2))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="An export folder (or .onnx file) from xray-export.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The PNG to write.")
@click.option("--size", default="1280x900", show_default=True, help="Screenshot size WIDTHxHEIGHT in pixels.")
@click.option("--film-size", default=320, show_default=True, type=click.IntRange(64, 4096),
              help="Synthetic film height in pixels (make demo's --synthetic-size: the size the model trained on).")
@click.option("--finding", default="TUBERCULOSIS", show_default=True, type=click.Choice(["PNEUMONIA", "TUBERCULOSIS"]),
              help="The second film's class (the first is NORMAL).")
@click.option("--any-prediction", is_flag=True,
              help="Keep films the model calls wrong (tests with an untrained model only, never for the docs).")
def main(model_path, out, size, film_size, finding, any_prediction):
    """Screenshot the page at / with two films and their heatmaps, a DICOM and a flagged photograph."""
    width, height = parse_size(size)
    server = None
    try:
        if not Path(model_path).exists():
            raise Failed(f"{model_path}: no such model (make demo exports runs/demo/export)")
        dicom = find_rg1()
        if dicom is None:
            raise Failed("RG1_UNCR.dcm not found: install pydicom-data (the dev extra)")
        with tempfile.TemporaryDirectory(prefix="screenshot-page-") as tmp:
            folder = Path(tmp)
            films = pick_films(model_path, ["NORMAL", finding], film_size, any_prediction, folder)
            photo = photograph(folder / "holiday_photo.jpg")
            server = Server("--model", model_path)
            lines = shoot(server.url, films, dicom, photo, out, width, height, any_prediction)
        for i, line in enumerate(lines, 1):
            print(f"card {i}: {line}")
        print(f"wrote {out} ({width}x{height})")
    except Failed as e:
        sys.exit(f"screenshot_page: {e}")
    except Exception as e:  # selenium, onnxruntime, ...: their first line is enough
        first = (str(e).strip().splitlines() or [""])[0]
        sys.exit(f"screenshot_page: {type(e).__name__}: {first[:300]}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
