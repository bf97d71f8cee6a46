"""Cells of the CSV files an auditor opens in a spreadsheet.

A spreadsheet runs a cell that begins with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage return
before one) as a formula, so an id chosen by whoever wrote a manifest, such as ``=HYPERLINK(…)``, could
run on the auditor's machine. Such a cell is written with a leading ``'``, which spreadsheets read as
"text" and do not show (the OWASP advice on CSV injection).
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """``cell`` as a spreadsheet will show it and never run it: prefixed with ``'`` when it could start
    a formula, unchanged otherwise."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell
