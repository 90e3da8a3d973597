"""Columns for the coordinator CLI's tables that never cut a word at 80 columns.

Rich shortens a cell that does not fit with an ellipsis ("hospi…"), which hides ids, site
names and reasons on an ordinary terminal. These columns keep an id whole (as wide as its
longest value) and let free text wrap between words; a word wider than its column folds onto
the next line rather than being cut off.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Column

__all__ = ["id_column", "text_column"]


def id_column(header: str, values: Iterable[str]) -> Column:
    """A column that is never wrapped nor cut: as wide as its longest value."""
    return Column(header, no_wrap=True, min_width=max([len(header), *map(len, values)]))


def text_column(header: str) -> Column:
    """A column whose text wraps between words; a word wider than the column folds."""
    return Column(header, overflow="fold", ratio=1)
