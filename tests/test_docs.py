"""The manual (issue #31): docs/ builds as a mkdocs-material site with --strict (a broken link or anchor fails),
reads offline (no font, script or stylesheet from another host), includes ARCHITECTURE.md rather than a copy, and
the README stays short, every link of it pointing at a file of the repository."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

MKDOCS = Path(sys.executable).parent / "mkdocs"


def build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


def test_the_site_builds_strict_and_offline(tmp_path):
    assert MKDOCS.exists(), "mkdocs missing: make test installs the [docs] extra"
    proc = build(tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) >= 12, pages
    for page in pages:
        html = page.read_text()
        remote = re.findall(r'<(?:link|script|img)[^>]+(?:href|src)="(https?://[^"]+)"', html)
        assert remote == [], (page, remote)  # fonts, scripts, stylesheets, images: all from the site itself
    architecture = (tmp_path / "site" / "architecture" / "index.html").read_text()
    assert "Contracts (files are the interfaces between stages)" in architecture  # included, one copy


def test_a_broken_link_fails_the_build(tmp_path):
    """--strict is what keeps the docs honest: prove it fails on a link to a missing anchor (on a copy)."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy(ROOT / "ARCHITECTURE.md", copy / "ARCHITECTURE.md")
    with open(copy / "docs" / "quickstart.md", "a") as f:
        f.write("\nSee [the guard](export.md#no-such-section).\n")
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=copy,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "no-such-section" in proc.stderr, proc.stderr[-2000:]


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]
    assert local and all((ROOT / link).exists() for link in local), [l for l in local if not (ROOT / l).exists()]
