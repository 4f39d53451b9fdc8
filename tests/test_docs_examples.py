"""Every Python example in the docs runs against the installed psiopt.

Each page of ``docs/`` is one test: its ```` ```python ```` blocks run in order, in one
namespace per page (a later block may use what an earlier one defined, as a reader
would), from the repository root. A block that is not meant to run is marked by an
HTML comment on the line before its fence, with the reason::

    <!-- docs-test: skip (needs a CUDA device) -->

A marker without a reason fails the test, and so does any block in a language this
file does not know how to treat (``py``, ``pycon``...), so no example escapes silently.
The figure script of the geometry page is run too, into a temporary folder.
"""

from __future__ import annotations

import re
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s{]*)?(?P<rest>.*)$")
SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->$")
RUN_LANGUAGES = {"python"}
# Code in these languages is shown, not run: shell commands, output, config, data.
SHOWN_LANGUAGES = {"bash", "console", "text", "yaml", "toml", "json", "ini", ""}


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line
    language: str
    code: str
    skip_reason: str | None


def extract_blocks(page: str) -> list[Block]:
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.group("fence"), (match.group("info") or "").lower()
        indent = len(match.group("indent"))
        # The marker, if any, is the last non-blank line before the fence.
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = SKIP_MARKER.match(lines[j].strip()) if j >= 0 else None
        skip_reason = None
        if marker:
            skip_reason = (marker.group("reason") or "").strip()
            if not skip_reason:
                raise AssertionError(f"{page}:{j + 1}: a docs-test skip marker needs a reason: <!-- docs-test: skip (why) -->")
        first_code_line = i + 2  # 1-based number of the line after the fence
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        blocks.append(Block(page, first_code_line, language, "\n".join(body), skip_reason))
        i += 1  # the closing fence
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in extract_blocks(page)]


def test_docs_have_examples() -> None:
    runnable = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES and b.skip_reason is None]
    assert len(runnable) >= 5, f"only {len(runnable)} runnable examples found in docs/; is the extractor broken?"


def test_every_block_language_is_known() -> None:
    unknown = [f"{b.page}:{b.line} ({b.language!r})" for b in ALL_BLOCKS if b.language not in RUN_LANGUAGES | SHOWN_LANGUAGES]
    assert not unknown, (
        "code blocks in a language this test neither runs nor knows to be display-only; "
        f"write them as ```python (run) or add the language to SHOWN_LANGUAGES: {unknown}"
    )


def test_skip_markers_only_on_python() -> None:
    misplaced = [f"{b.page}:{b.line}" for b in ALL_BLOCKS if b.skip_reason is not None and b.language not in RUN_LANGUAGES]
    assert not misplaced, f"docs-test skip markers on blocks that would not run anyway: {misplaced}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.page == p and b.language in RUN_LANGUAGES for b in ALL_BLOCKS)])
def test_page_examples_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": f"docs_example_{Path(page).stem}"}
    for block in (b for b in ALL_BLOCKS if b.page == page and b.language in RUN_LANGUAGES):
        if block.skip_reason is not None:
            continue
        # Pad with blank lines so a traceback's line numbers are the page's own.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(DOCS / page), "exec"), namespace)  # noqa: S102 (running the docs is the point)


def test_figure_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sys, "argv", ["make_figures.py", "--out", str(tmp_path)])
    runpy.run_path(str(DOCS / "scripts" / "make_figures.py"), run_name="__main__")
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    committed = sorted(p.name for p in (DOCS / "figures").glob("*.png"))
    missing = sorted(set(committed) - set(made))
    assert made and not missing, f"the script made {made}; committed figures it no longer makes: {missing}"
    for page in PAGES:
        for ref in re.findall(r"\]\(figures/([^)]+\.png)\)", (DOCS / page).read_text(encoding="utf-8")):
            assert ref in made, f"{page} shows figures/{ref}, which docs/scripts/make_figures.py does not make"
