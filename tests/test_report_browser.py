"""The HTML report, opened from disk in real headless Chromium: figures and tables render."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import strategies
from bench import report

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="headless Chromium not found (Debian package 'chromium')"
    ),
    # one worker builds the report once for all of them (under ``pytest -n``)
    pytest.mark.xdist_group("report_browser"),
]


class _Page(HTMLParser):
    """Collects <img> sources and alt texts, the summary's text, the ids of the tables and the
    text of each row of the recommendation table."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.alts: list[str] = []
        self.rows: list[list[str]] = []
        self.tables: list[str] = []
        self.summary = ""
        self._table_depth = 0
        self._in_cell = False
        self._summary_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
            self.alts.append(attrs.get("alt", ""))
        if tag == "div" and attrs.get("id") == "summary":
            self._summary_depth = 1
        elif self._summary_depth and tag == "div":
            self._summary_depth += 1
        if tag == "table":
            self.tables.append(attrs.get("id", ""))
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
        if tag == "div" and self._summary_depth:
            self._summary_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._table_depth and self._in_cell:
            self.rows[-1][-1] += data
        if self._summary_depth:
            self.summary += data


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


#: the fixtures: two machines, an audit, and a run with compiled variants, three ways of
#: writing the net and a device where nothing ran
INPUTS = ("bench_cpu.json", "bench_cuda.json", "audit.json", "bench_compiled.json")
#: the compiled variants of bench_compiled.json and the eager strategy each compiles
COMPILED = {"torch_func_compiled": "torch_func", "vmap_jvp_compiled": "vmap_jvp"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    inputs = [str(shutil.copy(DATA / name, tmp / name)) for name in INPUTS]
    with pytest.MonkeyPatch.context() as patch:
        # registered as strategies/ registers them: the eager functions, eager naming them
        for name, eager in COMPILED.items():
            variant = dataclasses.replace(
                strategies.get(eager), name=name, compiles=True, eager=eager
            )
            patch.setitem(strategies._REGISTRY, name, variant)
        assert report.main([*inputs, "--plots-dir", str(tmp / "plots")]) == 0
    return tmp


def _rendered(built: Path) -> _Page:
    page_path = built / "plots" / "report.html"
    dom = _chromium(f"--user-data-dir={built / 'profile'}", "--dump-dom", page_path.as_uri()).stdout
    page = _Page()
    page.feed(dom)
    return page


def test_rendered_page_opens_with_the_summary(built):
    page = _rendered(built)
    text = " ".join(page.summary.split())
    assert text.startswith("Timed on ")
    questions = ("Is the symmetric-half loop faster than the full loop?", "What to use:")
    for heading in (*questions, "What to avoid:", "One Hessian or many:", "Not measured:"):
        assert heading in text
    assert "CUDA is not available on this machine" in text
    assert {"recommendations", "compiled", "not-timed", "accuracy-matrix"} <= set(page.tables)


def test_rendered_page_has_embedded_figures_and_recommendations(built):
    page = _rendered(built)
    assert len(page.images) >= 5
    assert any("Accuracy audit" in alt for alt in page.alts)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    recommendations = json.loads((built / "plots" / "recommendations.json").read_text())
    header, *rows = page.rows
    fastest = header.index("fastest (many Hessians)")
    single = header.index("fastest for one Hessian (first call included)")
    assert "leanest" in header
    assert len(rows) == len(recommendations)
    for row, rec in zip(rows, recommendations):
        assert row[header.index("machine")] == rec["machine"]
        refused = rec["cases"] - (rec["fastest_cases"] or rec["cases"])
        cases = (
            f"{rec['cases']} ({rec['fastest']} refused {refused})" if refused else f"{rec['cases']}"
        )
        assert row[header.index("cases")] == cases
        assert row[fastest].removeprefix("tie: ").startswith(rec["fastest"] or "none ran")
        assert row[fastest].startswith("tie: ") == rec["tie"]
        assert row[single].startswith(rec["fastest_single"] or "none ran")


def test_screenshot_renders(built):
    shot = built / "shot.png"
    _chromium(
        f"--user-data-dir={built / 'profile'}",
        "--window-size=1400,2400",
        f"--screenshot={shot}",
        (built / "plots" / "report.html").as_uri(),
    )
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_the_decision_box_is_on_the_first_screen(built):
    """At 1400 x 900 the decision box lies wholly in the first screen, before any scroll."""
    page = (built / "plots" / "report.html").read_text()
    probe = (
        "<script>const r = document.getElementById('decision').getBoundingClientRect();"
        "document.body.setAttribute('data-box', r.top + ' ' + r.bottom);</script></body>"
    )
    probed = built / "probed.html"
    probed.write_text(page.replace("</body>", probe))
    dom = _chromium(
        f"--user-data-dir={built / 'profile'}",
        "--window-size=1400,900",
        "--dump-dom",
        probed.as_uri(),
    ).stdout
    top, bottom = map(float, re.search(r'data-box="([\d.]+) ([\d.]+)"', dom).groups())
    assert 0 <= top < bottom <= 900
