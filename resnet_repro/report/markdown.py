"""GitHub Markdown tables from DataFrames (`DataFrame.to_markdown`, i.e. tabulate), and number cells.

The tables keep the seed README's convention: cells are not padded to a column width (a changed number
is a one-cell diff, not a re-aligned table), and the alignment row says left/centre/right with colons.
tabulate pads every cell of its "pipe" format, so the format here is tabulate's own TableFormat without
padding (alignment None) and with the alignment row drawn from the columns' alignments.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tabulate import DataRow, TableFormat

DASH = "—"
RULE = {"left": ":---", "center": ":---:", "right": "---:"}


def _format(align: Sequence[str]) -> TableFormat:
    row = DataRow("| ", " | ", " |")
    rule = "| " + " | ".join(RULE[a] for a in align) + " |"
    return TableFormat(
        lineabove=None,
        linebelowheader=lambda _widths, _aligns: rule,
        linebetweenrows=None,
        linebelow=None,
        headerrow=row,
        datarow=row,
        padding=0,
        with_header_hide=None,
    )


def table(frame: pd.DataFrame, align: Sequence[str] | None = None) -> str:
    """The frame as a Markdown table; `align` per column (default: the first left, the rest centred)."""
    align = list(align or ["left", *["center"] * (len(frame.columns) - 1)])
    return frame.astype(str).to_markdown(
        index=False, tablefmt=_format(align), stralign=None, numalign=None, disable_numparse=True
    )


def fmt(value: float | None, digits: int = 2) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def fmt_diff(value: float | None) -> str:
    if value is None or pd.isna(value):
        return DASH
    rounded = round(float(value), 2)
    return f"{rounded:+.2f}" if rounded != 0 else "+0.00"  # never "-0.00"
