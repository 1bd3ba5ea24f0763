"""The report's document model: sections of text, code, tables and images.

Sections are built once from this model (`sections.py`) and rendered twice (`html.py`,
`markdown.py`), so the two outputs cannot disagree about what the report says.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

MISSING = "—"  # a value that does not apply to this checkpoint (or was not reported)
# What `pipeline report --output DIR` writes: both renderings and the images Markdown links to.
HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
ASSETS_DIR = "assets"


@dataclass(frozen=True)
class Image:
    """A PNG shown in the report: embedded in HTML, written to assets/ for Markdown."""
    asset: str  # file name under DIR/assets/; generated, never taken from user data
    png: bytes
    alt: str
    width: int  # CSS width in the HTML page
    pixelated: bool = False  # image strips: scale up without smoothing


@dataclass
class Text:
    text: str
    note: bool = False  # a warning the reader should not miss


@dataclass
class Code:
    text: str


Cell = Union[str, Image]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) shown in bold


Block = Union[Text, Code, Table, Image]


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block]


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]


def images_of(report: Report) -> list[Image]:
    """Every image of the report, in reading order (each is written once under assets/)."""
    images = []
    for section in report.sections:
        for block in section.blocks:
            cells = [c for row in block.rows for c in row] if isinstance(block, Table) else [block]
            images += [c for c in cells if isinstance(c, Image)]
    return images
