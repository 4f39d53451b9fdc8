"""Griffe extension: psiopt's reST docstring roles, rewritten as Markdown for the site.

psiopt's docstrings follow numpydoc, so they write math as ``:math:`...``` and
``.. math::`` blocks, and cross-references as ``:class:`...```. mkdocstrings renders
docstrings as Markdown, where those roles would show up verbatim. This extension
rewrites them once, when griffe has loaded the package:

* ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block becomes ``$$ ... $$``, which
  ``pymdownx.arithmatex`` hands to MathJax (wrapped in ``aligned`` when it has ``&`` or
  ``\\``, as Sphinx does);
* ``:class:`~psiopt.Grouping``` (and ``:meth:``, ``:func:``, ``:attr:``, ...) becomes
  inline code, ```Grouping``` (a ``~`` keeps the last component, as in Sphinx).

The docstrings themselves stay as they are, so ``help()`` and Sphinx users see
the reST.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["RstRolesToMarkdown", "rst_to_markdown"]

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|exc|data|obj|const):`(~?)([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>\S.*)?$")


def _xref(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    # Sphinx's "text <target>" form shows the text.
    explicit = re.fullmatch(r"(.+?)\s*<(.+)>", target)
    if explicit:
        return f"`{explicit.group(1).strip()}`"
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(text: str) -> str:
    """``.. math::`` directives (with their indented body) to ``$$`` display blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body: list[str] = [match.group("inline")] if match.group("inline") else []
        i += 1
        # The body is every following line indented deeper than the directive (or blank).
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        equations = "\n".join(line for line in body if line)
        # Like Sphinx, a multi-line equation with alignment marks gets an aligned block
        # (MathJax rejects a bare & or \\ outside one).
        if ("&" in equations or "\\\\" in equations) and not equations.startswith("\\begin{"):
            equations = "\\begin{aligned}\n" + equations + "\n\\end{aligned}"
        # Markdown nests a block in a list item at exactly 4 spaces (reST indents by 2-3),
        # so an indented directive becomes a block 4 spaces deep, a top-level one stays at 0.
        pad = "    " if indent else ""
        out.extend(["", f"{pad}$$", *(f"{pad}{line}" for line in equations.splitlines()), f"{pad}$$", ""])
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """Rewrite the reST roles and math blocks of a docstring as Markdown."""
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _XREF_ROLE.sub(_xref, text)


class RstRolesToMarkdown(griffe.Extension):
    """Rewrites every docstring of the loaded objects with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
