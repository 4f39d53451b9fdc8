"""The docs site builds in strict mode and its math renders, offline, in a real browser.

The site is built with ``mkdocs build --strict``, served from 127.0.0.1, and opened in
headless Chromium with every host name except 127.0.0.1 unresolvable, so a page that
needed a CDN would fail here. The test reads the DOM after MathJax ran and fails
unless every ``arithmatex`` element of the page became an SVG ``mjx-container``, no
MathJax error is shown, and no raw TeX delimiter is left in the visible text. It also
writes a screenshot of the geometry page (to ``$PSIOPT_DOCS_SCREENSHOT_DIR`` when set,
else to pytest's temporary folder) for a person to look at.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``); without a
Chromium binary the browser checks are skipped, with that reason.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Pages whose math is checked: the geometry page (the math-heaviest) and the API
# reference (math that comes from the docstrings, through docs/griffe_rst.py).
MATH_PAGES = {"geometry/": 40, "api/": 10}
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$", ":math:")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="the docs toolchain is not installed: pip install -e '.[docs]'",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


NO_CHROMIUM = "no Chromium binary on PATH (Debian: apt-get install -y chromium); math rendering not checked"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if find_chromium() is None:
        pytest.skip(NO_CHROMIUM)  # scripts/test.sh still builds the site in strict mode
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    failed: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.failed.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


@pytest.fixture(scope="module")
def served_site(site_dir: Path):
    """The built site over HTTP on 127.0.0.1; yields (base URL, list of failed requests)."""
    failed: list[str] = []
    handler = functools.partial(type("Handler", (_QuietHandler,), {"failed": failed}), directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", failed
    finally:
        server.shutdown()
        server.server_close()


def run_chromium(tmp_path: Path, *args: str) -> str:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(NO_CHROMIUM)
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # Offline: any host but the local server fails to resolve, so a CDN would break the page.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


class _VisibleText(HTMLParser):
    """Text a reader sees as prose: outside code, scripts, and MathJax's own markup."""

    SKIP = {"code", "pre", "script", "style", "mjx-container", "textarea"}

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.depth:
            self.parts.append(data)


def count_math_elements(static_html: str) -> int:
    return len(re.findall(r'<(?:span|div) class="arithmatex"', static_html))


@pytest.mark.parametrize("page", sorted(MATH_PAGES))
def test_math_renders_offline(page: str, site_dir: Path, served_site, tmp_path: Path) -> None:
    base, failed = served_site
    static_html = (site_dir / page / "index.html").read_text(encoding="utf-8")
    expected = count_math_elements(static_html)
    assert expected >= MATH_PAGES[page], (
        f"{page}: only {expected} math elements in the built HTML; is pymdownx.arithmatex "
        "(generic: true) still configured, and docs/griffe_rst.py still converting :math: roles?"
    )

    dom = run_chromium(tmp_path, "--dump-dom", base + page)

    containers = re.findall(r"<mjx-container\b.*?</mjx-container>", dom, flags=re.S)
    assert len(containers) == expected, (
        f"{page}: MathJax typeset {len(containers)} of {expected} formulas; "
        "check that assets/mathjax/tex-svg.js was served and javascripts/mathjax-config.js loaded"
    )
    not_svg = [c[:200] for c in containers if "<svg" not in c]
    assert not not_svg, f"{page}: formulas without SVG output: {not_svg[:3]}"
    errors = re.findall(r"<mjx-merror\b.*?</mjx-merror>|data-mjx-error=\"[^\"]*\"", dom, flags=re.S)
    assert not errors, f"{page}: MathJax reported TeX errors: {errors[:5]}"

    if page == "api/":
        # Docstring math that missed the arithmatex markup (e.g. a $$ block that Markdown
        # took for a code block) would hide from the visible-text check below.
        stray = [token for token in ("$$", ":math:", ".. math::") if token in static_html]
        assert not stray, f"{page}: docstring math left unconverted in the HTML: {stray} (see docs/griffe_rst.py)"

    parser = _VisibleText()
    parser.feed(dom)
    text = "".join(parser.parts)
    leftovers = {token: text.count(token) for token in RAW_TEX if token in text}
    assert not leftovers, f"{page}: raw TeX left in the visible text: {leftovers}"
    assert not failed, f"requests the site could not serve: {failed}"


def test_geometry_page_screenshot(served_site, tmp_path: Path) -> None:
    base, failed = served_site
    out_dir = Path(os.environ.get("PSIOPT_DOCS_SCREENSHOT_DIR", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / "geometry.png"
    run_chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", base + "geometry/")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{shot} is not a PNG"
    assert len(data) > 50_000, f"{shot} is {len(data)} bytes: the page looks empty"
    assert not failed, f"requests the site could not serve: {failed}"
