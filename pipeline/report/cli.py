"""`pipeline report` options and `main`: find and read the metrics files, build the document,
write both renderings (and, if asked, upload them to W&B), print the HTML page's path."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..utils import PipelineError, atomic_dir, atomic_write_bytes, atomic_write_text
from .document import ASSETS_DIR, HTML_NAME, MARKDOWN_NAME, Report, images_of
from .handoff import handoff_section, read_export, read_latent_set
from .html import render_html
from .inputs import find_metrics_files, load_checkpoints
from .markdown import render_markdown
from .sections import build_report
from .tracker import log_to_wandb

DEFAULT_TITLE = "Autoencoder checkpoint comparison"


def write_report(report: Report, out_dir: Path) -> Path:
    """Write assets/, report.md and report.html; each file appears whole or not at all."""
    with atomic_dir(out_dir / ASSETS_DIR) as assets:  # replaces, so no stale images survive
        for image in images_of(report):
            atomic_write_bytes(assets / image.asset, image.png)
    atomic_write_text(out_dir / MARKDOWN_NAME, render_markdown(report))
    atomic_write_text(out_dir / HTML_NAME, render_html(report))
    return out_dir / HTML_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline report",
        description="Compare evaluated checkpoints: writes DIR/report.html (self-contained, "
                    "images embedded), DIR/report.md and its images under DIR/assets/.")
    parser.add_argument("inputs", nargs="+", metavar="METRICS_OR_DIR",
                        help="metrics.json files written by pipeline evaluate, or directories "
                             "searched recursively for metrics.json (sorted by path)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory for report.html, report.md and assets/ (created)")
    parser.add_argument("--title", default=DEFAULT_TITLE,
                        help=f"title of the report and of the W&B run (default: {DEFAULT_TITLE!r})")
    parser.add_argument("--tracker", choices=("none", "wandb"), default="none",
                        help="wandb: also log the metrics table and the report files as an "
                             "artifact to a new W&B run under DIR/wandb/ (WANDB_MODE=offline "
                             "works without network); default: none")
    parser.add_argument("--project", default="ae-pipeline",
                        help="W&B project for --tracker wandb (default: ae-pipeline)")
    parser.add_argument("--latents", action="append", default=[], metavar="SPLIT_DIR",
                        help="a split directory written by pipeline encode: listed (kind, "
                             "shape, scaling factor, checkpoint) in a Hand-off section; "
                             "repeatable")
    parser.add_argument("--export", action="append", default=[], metavar="DIR",
                        help="a directory written by pipeline export: listed in the Hand-off "
                             "section; repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"--output {out_dir}: exists and is not a directory")
    latents = [read_latent_set(path) for path in args.latents]
    exports = [read_export(path) for path in args.export]
    checkpoints = load_checkpoints(find_metrics_files(args.inputs))
    extra = [handoff_section(latents, exports)] if latents or exports else []
    report_path = write_report(build_report(checkpoints, args.title, extra), out_dir)
    if args.tracker == "wandb":
        log_to_wandb(checkpoints, out_dir, args.title, args.project)
    print(report_path)
    return 0
