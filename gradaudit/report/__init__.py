"""The edges: the audit's HTML report and its figures (``html.py``), rendered from the audit's dataclasses."""

from gradaudit.report.html import render

__all__ = ["render"]
