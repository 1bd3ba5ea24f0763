"""The summary of an evaluate call: a table on stdout and, with `--tracker wandb`, a W&B run.

Both take their columns from `pipeline.layout.METRIC_COLUMNS`, the columns the report uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..layout import METRIC_COLUMNS
from .config import EvaluateConfig

TABLE_COLUMNS = ("name", "step", "num_samples", *(c.key for c in METRIC_COLUMNS))
# The printed table keeps to what fits a terminal line; metrics.json and W&B have them all.
PRINTED_COLUMNS = tuple(c for c in METRIC_COLUMNS
                        if c.key in ("psnr", "ssim", "ms_ssim", "bits_per_image", "images_per_s"))


def summarize_run(records: list[dict[str, Any]], cfg: EvaluateConfig,
                  checkpoints: list[str]) -> None:
    print_table(records)
    if cfg.tracker == "wandb":
        log_to_wandb(records, cfg, checkpoints)


def print_table(records: list[dict[str, Any]]) -> None:
    widths = [max(len(c.title), 7) for c in PRINTED_COLUMNS]
    titles = " ".join(f"{c.title:>{w}}" for c, w in zip(PRINTED_COLUMNS, widths))
    print(f"{'checkpoint':<28} {'N':>6} {titles}")
    for r in records:
        cells = " ".join(f"{cell(r.get(c.key), c.fmt):>{w}}"
                         for c, w in zip(PRINTED_COLUMNS, widths))
        print(f"{r['name']:<28} {r['num_samples']:>6} {cells}")


def cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def log_to_wandb(records: list[dict[str, Any]], cfg: EvaluateConfig,
                 checkpoints: list[str]) -> None:
    """One W&B run per evaluate call: summary metrics per checkpoint and a comparison table;
    `checkpoints` as given on the command line."""
    import wandb

    name = cfg.run_name or f"evaluate-{Path(cfg.output).name}"
    run = wandb.init(project=cfg.project, name=name, job_type="evaluate", dir=str(cfg.output),
                     config={"shards": cfg.shards, "checkpoints": checkpoints})
    table = wandb.Table(columns=list(TABLE_COLUMNS))
    for r in records:
        table.add_data(*[r.get(c) for c in TABLE_COLUMNS])
        for c in TABLE_COLUMNS[2:]:
            if r.get(c) is not None:
                run.summary[f"{r['name']}/{c}"] = r[c]
    run.log({"evaluation": table})
    run.finish()
