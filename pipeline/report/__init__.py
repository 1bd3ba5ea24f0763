"""`pipeline report`: compare evaluated checkpoints in one self-contained HTML page + Markdown.

The report reads files only: each checkpoint's `metrics.json` with the image strips written
beside it by `pipeline evaluate`, the `history.jsonl` training log of its run, and with
`--latents` / `--export` the manifest of `pipeline encode` and the export.json of `pipeline
export`. It imports
no torch, model, data or trainer code and never touches a live run, so it can be rebuilt
wherever evaluation outputs were copied to.

The page is built once as a small document model and rendered twice: HTML with every image
embedded as a data: URI (one file to mail or archive), and Markdown that points to the same
images written under `assets/`. One concern per module:

- `inputs`:    finding and reading metrics.json files, their strips, runs and histories
- `document`:  the document model (Text, Code, Table, Image, Section, Report)
- `figures`:   matplotlib figures (rate–distortion, training curves, code usage)
- `sections`:  the report's sections, in page order, and `build_report`
- `handoff`:   the Hand-off section (`--latents`, `--export`): latent shards and exports
               for the next stage, read from encode's manifest and export's export.json
- `html`, `markdown`: the two renderers
- `tracker`:   the W&B upload (`--tracker wandb`)
- `cli`:       options, `write_report` and `main`
"""
from __future__ import annotations

from ..layout import Column
from .cli import DEFAULT_TITLE, build_parser, main, write_report
from .document import Block, Cell, Code, Image, Report, Section, Table, Text, images_of
from .html import render_html
from .inputs import (REQUIRED_KEYS, Checkpoint, Run, find_metrics_files, group_runs,
                     load_checkpoints, model_kind, read_metrics, unique_labels)
from .markdown import render_markdown
from .sections import (COLUMNS, IDENTITY_HEADER, SECTION_BUILDERS, SSIM_CONVENTIONS, best_rows,
                       build_report, format_value)
from .tracker import log_to_wandb, wandb_table_rows

__all__ = [
    "Block", "COLUMNS", "Cell", "Checkpoint", "Code", "Column", "DEFAULT_TITLE",
    "IDENTITY_HEADER", "Image", "REQUIRED_KEYS", "Report", "Run", "SECTION_BUILDERS",
    "SSIM_CONVENTIONS", "Section", "Table", "Text", "best_rows", "build_parser", "build_report",
    "find_metrics_files", "format_value", "group_runs", "images_of", "load_checkpoints",
    "log_to_wandb", "main", "model_kind", "read_metrics", "render_html", "render_markdown",
    "unique_labels", "wandb_table_rows", "write_report",
]
