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
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

MATHJAX_SITE_DIR = "assets/mathjax"
MATHJAX_SCRIPT = "tex-svg.js"


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


def on_files(files: Files, config: MkDocsConfig) -> Files:
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
