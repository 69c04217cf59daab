"""Evaluation evidence: contact sheets with two rows keep every caption off the images above it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xray.evaluate import plots


@pytest.fixture
def drawn(monkeypatch):
    """Figures the plot functions save, kept (and drawn) so a test can measure their text."""
    figs = []
    save = plots._save

    def keep(fig, path):
        figs.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def assert_captions_clear(fig):
    """No caption (axes title) overlaps an image of the row above or a caption beside it, none leaves the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the saved figure is closed: draw it again, at the dpi it was saved with
    fig.set_dpi(100)
    canvas.draw()
    renderer = canvas.get_renderer()
    cells = [ax for ax in fig.axes if ax.images]
    rows = sorted({ax.get_subplotspec().rowspan.start for ax in cells})
    assert len(rows) >= 2, "the sheet should have two rows"
    by_row = {r: [ax for ax in cells if ax.get_subplotspec().rowspan.start == r] for r in rows}
    figure_box = fig.bbox
    for r in rows:
        titles = [ax.title.get_window_extent(renderer) for ax in by_row[r]]
        for box in titles:
            assert figure_box.x0 - 1 <= box.x0 and box.x1 <= figure_box.x1 + 1 and box.y1 <= figure_box.y1 + 1
        for i, a in enumerate(titles):
            assert not any(a.overlaps(b) for b in titles[i + 1:]), f"captions overlap in row {r}"
        if r == rows[0]:
            continue
        above = [ax.get_window_extent(renderer) for ax in by_row[r - 1]]
        for ax, box in zip(by_row[r], titles):
            hit = [b for b in above if box.overlaps(b)]
            assert not hit, f"row {r} caption {ax.get_title()!r} runs into the image above ({box} vs {hit[0]})"


def test_gradcam_sheet_captions_do_not_overlap_the_row_above(drawn, tmp_path):
    rng = np.random.default_rng(0)
    entries = [((rng.random((64, 64)) * 255).astype(np.uint8), rng.random((64, 64)),
                f"TUBERCULOSIS → PNEUMONIA p=0.87\nGrad-CAM: PNEUMONIA\nperson{i}123_bacteria_4567.png")
               for i in range(8)]  # failures_gradcam.png's three-line captions, 6 + 2 cells
    plots.gradcam_sheet(entries, tmp_path / "failures_gradcam.png")
    assert (tmp_path / "failures_gradcam.png").is_file()
    assert_captions_clear(drawn[0])


def test_failure_sheet_captions_do_not_overlap_the_row_above(drawn, tmp_path):
    files = []
    for i in range(9):
        p = tmp_path / f"person{i}1234_bacteria_98765.png"
        Image.fromarray(np.full((96, 80), 20 * i, np.uint8), "L").save(p)
        files.append(p)
    fails = {("TUBERCULOSIS", "PNEUMONIA"): [{"path": str(p), "probability": 0.9} for p in files[:5]],
             ("NORMAL", "TUBERCULOSIS"): [{"path": str(p), "probability": 0.8} for p in files[5:]]}
    plots.failure_sheet(fails, tmp_path / "failures.png")
    assert_captions_clear(drawn[0])
