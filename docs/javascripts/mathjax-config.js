// MathJax 3 configuration for pymdownx.arithmatex (generic mode): it wraps math in
// <span class="arithmatex">\( ... \)</span> and <div class="arithmatex">\[ ... \]</div>,
// and MathJax typesets only those elements. MathJax itself is served from this site
// (assets/mathjax/, copied from the django-static-mathjax wheel by docs/hooks.py),
// so no CDN is contacted when a page is read. The SVG output draws glyphs as paths
// from tex-svg.js itself: there are no web fonts to fetch.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "ams",
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && window.MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
