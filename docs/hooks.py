"""MkDocs hooks for the psiopt site.

MathJax, offline
    The math is typeset in the reader's browser by MathJax 3, and the site must read
    without a network. MathJax comes from PyPI at build time: the
    ``django-static-mathjax`` wheel (in psiopt's ``docs`` extra) ships MathJax's
    browser build as package data and needs nothing else (no Django import happens).
    :func:`on_files` adds its ``tex-svg.js`` to the site as
    ``assets/mathjax/tex-svg.js``, so ``mkdocs build`` and ``mkdocs serve`` both serve
    it. The SVG output is used rather than CHTML because it draws the glyphs as paths
    from that one file: no web fonts to load, so nothing can render blank while a
    font is still loading (which CHTML did in headless Chromium screenshots).

Benchmark results
    The benchmarks page shows what ``psiopt bench`` wrote and the project committed
    under ``benchmarks/results/``, and nothing else: :func:`on_page_markdown` replaces
    the marker ``<!-- psiopt-bench-results -->`` of ``benchmarks.md`` with the report
    that :func:`psiopt.bench.report.render_markdown` makes from each committed
    ``results.json`` (the same function that wrote the run's ``report.md``), and
    :func:`on_files` publishes the PNG plots each results file lists. So every number
    on that page is read from a committed results file when the site is built. The
    marker ``<!-- psiopt-gpu-status -->`` becomes :func:`gpu_status`: which GPUs the
    committed results were measured on, or that GPU figures are not yet measured.

    A results file of an older layout (``schema_version`` below
    :data:`psiopt.bench.records.SCHEMA_VERSION`) was measured with an older protocol
    (version 2: learning rates picked by the final training loss, no validation split,
    3 seeds, standard deviations): its numbers would sit next to this protocol's
    description as if they followed it, so the page says "not yet measured with this
    protocol" for it instead, names the file, and publishes none of its plots.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

MATHJAX_SITE_DIR = "assets/mathjax"
MATHJAX_SCRIPT = "tex-svg.js"

BENCH_RESULTS_DIR = "benchmarks/results"  # relative to the folder of mkdocs.yml
BENCH_PAGE = "benchmarks.md"
BENCH_MARKER = "<!-- psiopt-bench-results -->"
BENCH_SITE_DIR = "benchmark-results"  # where the plots go in the site
GPU_MARKER = "<!-- psiopt-gpu-status -->"


def mathjax_es5_dir() -> Path:
    """The ``es5`` folder (MathJax's browser build) of the installed MathJax wheel."""
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        es5 = Path(location) / "static" / "mathjax" / "es5"
        if (es5 / MATHJAX_SCRIPT).is_file():
            return es5
    raise PluginError(
        "MathJax is not installed, so the docs' math cannot render offline: install the docs "
        "extra (`pip install -e '.[docs]'`, which brings django-static-mathjax) and rebuild"
    )


def _results_root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent / BENCH_RESULTS_DIR


def committed_results(config: MkDocsConfig) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``results.json`` under ``benchmarks/results/``, sorted by path, with its content."""
    root = _results_root(config)
    found = []
    for path in sorted(root.rglob("results.json")) if root.is_dir() else []:
        try:
            found.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as err:
            raise PluginError(f"cannot read benchmark results {path}: {err}") from None
    return found


def _plot_uri(config: MkDocsConfig, results_path: Path, plot: str) -> str:
    rel_dir = results_path.parent.relative_to(_results_root(config)).as_posix()
    return f"{BENCH_SITE_DIR}/{rel_dir}/{plot}" if rel_dir != "." else f"{BENCH_SITE_DIR}/{plot}"


def _current(results: dict[str, Any]) -> bool:
    """Whether a results file was written with this protocol (this schema version)."""
    from psiopt.bench.records import SCHEMA_VERSION

    return results.get("schema_version") == SCHEMA_VERSION


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path, results in committed_results(config):
        if not _current(results):
            continue
        for plot in results.get("plots", []):
            png = path.parent / plot
            if not png.is_file():
                raise PluginError(f"{path} lists the plot {plot}, which is not committed beside it")
            files.append(File.generated(config, _plot_uri(config, path, plot), abs_src_path=str(png)))
    files.append(
        File(
            MATHJAX_SCRIPT,
            src_dir=str(mathjax_es5_dir()),
            dest_dir=config.site_dir,
            use_directory_urls=config.use_directory_urls,
            dest_uri=f"{MATHJAX_SITE_DIR}/{MATHJAX_SCRIPT}",
        )
    )
    return files


def _demote(markdown: str, levels: int) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def bench_section(config: MkDocsConfig) -> str:
    """The Markdown that replaces the benchmark page's marker."""
    sets = committed_results(config)
    if not sets:
        return (
            "*No benchmark results are committed in this checkout yet.* Run "
            "`bash scripts/bench.sh` (or `psiopt bench --out DIR`) to produce them; the report "
            "it writes (`report.md` beside `results.json`) has the tables this page shows."
        )
    from psiopt.bench.records import BenchResults, from_json
    from psiopt.bench.report import render_markdown  # the report the benchmark itself writes

    root = _results_root(config)
    parts = []
    for path, results in sets:
        source = path.relative_to(root.parent.parent).as_posix()
        if not _current(results):
            parts.append(
                f"## `{source}`\n\n*Not yet measured with this protocol*: this run was written with schema "
                f"version {results.get('schema_version')} (learning rates picked by the final training loss, no "
                "validation split), so its numbers are not shown here; the `report.md` committed beside it has them.\n"
            )
            continue
        try:
            typed = from_json(BenchResults, results)
        except ValueError as err:
            raise PluginError(f"{path} does not hold psiopt bench results of this version: {err}") from None
        report = render_markdown(typed)
        # Plots are published under BENCH_SITE_DIR (see on_files); point the images there.
        report = re.sub(
            r"!\[([^\]]*)\]\(([^)]+\.png)\)",
            lambda m: f"![{m.group(1)}]({_plot_uri(config, path, m.group(2))})",
            report,
        )
        parts.append(_demote(report, 1).rstrip() + f"\n\n*Generated from `{source}`.*\n")
    return "\n\n".join(parts)


def gpu_status(config: MkDocsConfig) -> str:
    """The sentence that replaces the benchmark page's GPU marker: which GPUs the committed
    results were measured on, or that no GPU figure is measured yet."""
    root = _results_root(config)
    runs = [
        (path, results)
        for path, results in committed_results(config)
        if str(results.get("config", {}).get("device", "")).startswith("cuda")
    ]
    if not runs:
        return (
            "**GPU figures are not yet measured.** Every figure on this page was measured on a CPU; "
            "the CUDA kernels are so far checked only by Triton's interpreter and compiler in the tests. "
            "They will be measured when `scripts/gpu-check.sh` has run on a GPU and its results are "
            "committed under `benchmarks/results/gpu-*/`."
        )
    where = ", ".join(
        f"{results.get('environment', {}).get('gpu_name') or 'a CUDA device'} "
        f"(`{path.parent.relative_to(root.parent.parent).as_posix()}`)"
        for path, results in runs
    )
    return f"GPU figures were measured by `scripts/gpu-check.sh` on {where}: they are among the results below."


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri != BENCH_PAGE:
        return markdown
    for marker in (BENCH_MARKER, GPU_MARKER):
        if marker not in markdown:
            raise PluginError(f"{BENCH_PAGE} lost its marker {marker}: what it stands for has nowhere to go")
    return markdown.replace(GPU_MARKER, gpu_status(config)).replace(BENCH_MARKER, bench_section(config))
