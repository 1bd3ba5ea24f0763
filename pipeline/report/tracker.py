"""`--tracker wandb`: the metrics table and the written report files, as one artifact, in a
new W&B run. wandb is imported only here and only when asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..layout import METRIC_COLUMNS
from ..utils import PipelineError
from .document import ASSETS_DIR, HTML_NAME, MARKDOWN_NAME
from .inputs import Checkpoint, model_kind
from .sections import IDENTITY_HEADER


def wandb_table_rows(checkpoints: list[Checkpoint]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the W&B table: raw values (W&B formats them), keys as column names."""
    columns = IDENTITY_HEADER + [c.key for c in METRIC_COLUMNS]
    rows = [[ck.label, model_kind(ck.metrics), str(ck.metrics.get("arch")),
             ck.metrics["step"], ck.metrics.get("num_samples")]
            + [ck.metrics.get(c.key) for c in METRIC_COLUMNS] for ck in checkpoints]
    return columns, rows


def log_to_wandb(checkpoints: list[Checkpoint], out_dir: Path, title: str, project: str) -> None:
    """Log the metrics table and the report files (as one artifact) to a new W&B run."""
    import wandb

    try:
        run = wandb.init(project=project, dir=str(out_dir), name=title, job_type="report",
                         config={"metrics_files": [str(ck.path) for ck in checkpoints]})
        columns, rows = wandb_table_rows(checkpoints)
        run.log({"report/metrics": wandb.Table(columns=columns, data=rows)})
        artifact = wandb.Artifact("report", type="report", description=title)
        artifact.add_file(str(out_dir / HTML_NAME))
        artifact.add_file(str(out_dir / MARKDOWN_NAME))
        artifact.add_dir(str(out_dir / ASSETS_DIR), name=ASSETS_DIR)
        run.log_artifact(artifact)
        run.finish()
    except wandb.errors.Error as e:
        raise PipelineError(f"W&B logging failed ({e}); the report files are written. "
                            "Use WANDB_MODE=offline without network, or --tracker none") from e
