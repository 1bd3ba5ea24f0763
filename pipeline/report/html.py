"""The report as one self-contained HTML page: every image embedded as a data: URI, so the
file can be mailed or archived alone. Every text from the inputs is escaped."""
from __future__ import annotations

import base64
import html
import re

from .document import Block, Cell, Code, Image, Report, Table

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733;
       margin: 0 auto; padding: 20px 28px 60px; max-width: 2400px; }
p { max-width: 1100px; }
h1 { margin-bottom: 2px; } h2 { margin-top: 36px; border-bottom: 1px solid #d5dbe3; }
.subtitle { color: #5b6775; margin-top: 0; }
nav a { margin-right: 14px; }
.scroll { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e4e8ee; text-align: left;
         vertical-align: middle; white-space: nowrap; }
th { background: #f2f4f7; white-space: normal; vertical-align: bottom; }
td { background: #fff; }
tr:nth-child(even) td { background: #fafbfc; }
/* The first column names the row: keep it in view while the table scrolls sideways. */
td:first-child, th:first-child { position: sticky; left: 0; z-index: 1;
                                 box-shadow: 1px 0 0 #e4e8ee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #e3f4e1 !important; }
td.img { padding: 2px 4px; }
img.strip { image-rendering: pixelated; display: block; }
img.plot { max-width: 100%; height: auto; }
.note { background: #fff5d6; border-left: 4px solid #e0a800; padding: 6px 10px; }
pre { background: #f4f6f8; padding: 10px; overflow-x: auto; font-size: 12px; }
"""
NUMBER = re.compile(r"^-?[\d.]+(e[-+]\d+)?$")  # right-aligned in tabular figures


def data_uri(image: Image) -> str:
    return "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")


def html_image(image: Image) -> str:
    kind = "strip" if image.pixelated else "plot"
    return (f'<img class="{kind}" src="{data_uri(image)}" alt="{html.escape(image.alt)}" '
            f'width="{image.width}">')


def html_cell(cell: Cell, bold: bool) -> str:
    if isinstance(cell, Image):
        return f'<td class="img">{html_image(cell)}</td>'
    classes = ["num"] if NUMBER.match(cell) else []
    text = html.escape(cell)
    if bold:
        classes.append("best")
        text = f"<b>{text}</b>"
    return f'<td class="{" ".join(classes)}">{text}</td>' if classes else f"<td>{text}</td>"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(html_cell(c, (i, j) in table.best) for j, c in enumerate(row))
                   + "</tr>\n" for i, row in enumerate(table.rows))
    return f'<div class="scroll"><table>\n<tr>{head}</tr>\n{body}</table></div>'


def html_block(block: Block) -> str:
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        return f'<div class="scroll">{html_image(block)}</div>'
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    css = ' class="note"' if block.note else ""
    return f"<p{css}>{html.escape(block.text)}</p>"


def render_html(report: Report) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in report.sections)
    body = "\n".join(f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>\n'
                     + "\n".join(html_block(b) for b in s.blocks) for s in report.sections)
    title = html.escape(report.title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f'<h1>{title}</h1>\n<p class="subtitle">{html.escape(report.subtitle)}</p>\n'
            f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")
