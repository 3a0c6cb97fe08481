"""The HTML report of an experiment store: `render(analysis, frame)` → one HTML page."""

from muestra.report.html import render

__all__ = ["render"]
