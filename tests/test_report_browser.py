"""The HTML report, opened from disk in real headless Chromium: figures and tables render."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench import report

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found (Debian package 'chromium')"
)


class _Page(HTMLParser):
    """Collects <img> sources and the text of each row of the recommendation table."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._table_depth = 0
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table" and attrs.get("id") == "recommendations":
            self._table_depth = 1
        elif self._table_depth and tag == "tr":
            self.rows.append([])
        elif self._table_depth and tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False
        if tag == "table":
            self._table_depth = 0

    def handle_data(self, data: str) -> None:
        if self._table_depth and self._in_cell:
            self.rows[-1][-1] += data


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    inputs = [
        str(shutil.copy(DATA / name, tmp / name))
        for name in ("bench_cpu.json", "bench_cuda.json", "audit.json")
    ]
    assert report.main([*inputs, "--plots-dir", str(tmp / "plots")]) == 0
    return tmp


def test_rendered_page_has_embedded_figures_and_recommendations(built):
    page_path = built / "plots" / "report.html"
    dom = _chromium(f"--user-data-dir={built / 'profile'}", "--dump-dom", page_path.as_uri()).stdout
    page = _Page()
    page.feed(dom)
    assert len(page.images) >= 4
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    recommendations = json.loads((built / "plots" / "recommendations.json").read_text())
    header, *rows = page.rows
    assert "fastest" in header and "leanest" in header
    assert len(rows) == len(recommendations)
    for row, rec in zip(rows, recommendations):
        assert row[header.index("machine")] == rec["machine"]
        assert row[header.index("fastest")].removeprefix("tie: ").startswith(rec["fastest"])
        assert row[header.index("fastest")].startswith("tie: ") == rec["tie"]


def test_screenshot_renders(built):
    shot = built / "shot.png"
    _chromium(
        f"--user-data-dir={built / 'profile'}",
        "--window-size=1400,2400",
        f"--screenshot={shot}",
        (built / "plots" / "report.html").as_uri(),
    )
    assert shot.read_bytes().startswith(b"\x89PNG")
