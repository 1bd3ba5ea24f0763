"""The report as Markdown: the same document, its images pointing to `assets/` beside it.
Every text from the inputs is escaped, so a name cannot split a table cell or add markup."""
from __future__ import annotations

import re

from .document import ASSETS_DIR, Block, Cell, Code, Image, Report, Table

MD_SPECIAL = re.compile(r"([\\`\[\]<>|&])")


def md_text(text: str) -> str:
    """Escape what would break a table cell or inject markup: `|`, HTML, links, code."""
    return MD_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def md_image(image: Image) -> str:
    return f"![{md_text(image.alt)}]({ASSETS_DIR}/{image.asset})"


def md_cell(cell: Cell, bold: bool) -> str:
    if isinstance(cell, Image):
        return md_image(cell)
    return f"**{md_text(cell)}**" if bold else md_text(cell)


def md_table(table: Table) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(md_cell(c, (i, j) in table.best) for j, c in enumerate(row)) + " |"
              for i, row in enumerate(table.rows)]
    return "\n".join(lines)


def md_block(block: Block) -> str:
    if isinstance(block, Table):
        return md_table(block)
    if isinstance(block, Image):
        return md_image(block)
    if isinstance(block, Code):
        # An indented block cannot be closed early by the text it holds, unlike a fence.
        return "\n".join("    " + line for line in block.text.splitlines())
    return f"> **Note:** {md_text(block.text)}" if block.note else md_text(block.text)


def render_markdown(report: Report) -> str:
    parts = [f"# {md_text(report.title)}", md_text(report.subtitle)]
    for section in report.sections:
        parts.append(f"## {md_text(section.title)}")
        parts += [md_block(b) for b in section.blocks]
    return "\n\n".join(parts) + "\n"
