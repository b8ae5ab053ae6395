"""The documentation site builds in strict mode (broken links or references fail)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="pip install -e '.[docs]'")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = _mkdocs("build", "--strict", "-d", str(site), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").exists()
    for page in ("concepts", "choices", "api", "evaluation", "benchmarks"):
        assert (site / page / "index.html").exists(), page
    api = (site / "api" / "index.html").read_text()
    # the reference is generated from the docstrings, not written by hand
    for name in (
        "RepresentativeInterpretation",
        "Interpretation",
        "greedy_cover",
        "sample_boundaries",
        "pulled_back_heatmap",
        "HeatmapRule",
        "plot_region",
        "build_report",
    ):
        assert name in api, name
    assert "Representative interpretations (Lam, Chu et al., ICCV 2021) as a Captum" in api
    # every image the pages show was copied into the site
    for html in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', html.read_text()):
            if not src.startswith(("http:", "https:", "data:")):
                assert (html.parent / src).resolve().exists(), (html, src)
    concepts = (site / "concepts" / "index.html").read_text()
    assert "img/region_mnist.png" in concepts


def test_strict_mode_fails_on_a_broken_link(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nnav:\n  - Home: index.md\n")
    proc = _mkdocs("build", "--strict", "-d", str(tmp_path / "site"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "missing.md" in proc.stdout + proc.stderr
