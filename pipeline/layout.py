"""Names of the files the stages write and read, and the columns of `metrics.json`: one place.

Torch-free, so every stage (and a report built on a laptop) can import it. A run directory::

    RUN_DIR/config.yaml            resolved config + how the job ran
    RUN_DIR/history.jsonl          one strict-JSON line per logged step
    RUN_DIR/checkpoints/step-<N>/  model.safetensors + config.json (the export),
                                   trainer.json, state/, COMPLETE (written last)
    RUN_DIR/model/                 export of the newest checkpoint
    RUN_DIR/samples/               step-<N>[-<name>].png image grids
    RUN_DIR/wandb_run_id           the W&B run id a resumed job continues
    RUN_DIR/preempted.json         left by a job stopped by a signal (exit 75)
    RUN_DIR/.lock                  held by the running trainer

An evaluation output directory holds `<name>/metrics.json` per checkpoint with the image
strips and the resolved options (`evaluate.yaml`) beside it, and `.lock` while `pipeline
evaluate` writes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- run directory
CONFIG_YAML = "config.yaml"
HISTORY_NAME = "history.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
SAMPLES_DIR = "samples"
RUN_ID_NAME = "wandb_run_id"
PREEMPTED_NAME = "preempted.json"
TENSORBOARD_DIR = "tensorboard"
LOCK_NAME = ".lock"  # run directories and evaluation outputs alike

# ---------------------------------------------------------------- checkpoints and exports
WEIGHTS_NAME = "model.safetensors"
EXPORT_CONFIG_NAME = "config.json"
EXPORT_FILES = (WEIGHTS_NAME, EXPORT_CONFIG_NAME)
# `pipeline export` writes this beside the diffusers files (source, scaling factor, check).
EXPORT_RECORD_NAME = "export.json"
# The `format` of the manifest of `pipeline encode`'s latent shards (beside `manifest.json`).
LATENT_FORMAT = "ae-pipeline-latents/1"
TRAINER_STATE_NAME = "trainer.json"
STATE_SUBDIR = "state"
COMPLETE_MARKER = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


# ---------------------------------------------------------------- evaluation outputs
METRICS_NAME = "metrics.json"
EVALUATE_CONFIG_NAME = "evaluate.yaml"  # the options of the evaluate call, beside metrics.json
STRIP_FILES = {"originals": "originals.png", "reconstructions": "reconstructions.png",
               "error_maps": "error_maps.png", "prior_samples": "prior_samples.png",
               "code_usage": "code_usage.json"}


@dataclass(frozen=True)
class Column:
    """A metric of `metrics.json` as tables show it (evaluate's summary, W&B, the report)."""
    key: str
    title: str
    fmt: str
    better: str | None  # "higher" | "lower"; None = a rate, a trade-off that is not ranked


METRIC_COLUMNS = (
    Column("psnr", "PSNR dB", "{:.2f}", "higher"),
    Column("psnr_of_mean_mse", "PSNR(mean MSE) dB", "{:.2f}", "higher"),
    Column("ssim", "SSIM", "{:.4f}", "higher"),
    Column("ms_ssim", "MS-SSIM", "{:.4f}", "higher"),
    Column("mse", "MSE", "{:.5f}", "lower"),
    Column("l1", "L1", "{:.4f}", "lower"),
    Column("lpips", "LPIPS", "{:.4f}", "lower"),
    Column("rfid", "rFID", "{:.2f}", "lower"),
    Column("bits_per_image", "bits/image", "{:.1f}", None),
    Column("latent_size", "latent size", "{:.0f}", None),
    Column("codebook_usage", "code usage %", "{:.1f}", "higher"),
    Column("perplexity", "perplexity", "{:.1f}", "higher"),
    Column("images_per_s", "images/s", "{:.0f}", "higher"),
)


# ---------------------------------------------------------------- training history

def read_history(run_dir: str | Path) -> tuple[list[dict[str, Any]], int] | None:
    """The records of `RUN_DIR/history.jsonl` and the number of lines that are not one
    (e.g. the half-written last line of a live run); None when there is no log."""
    path = Path(run_dir) / HISTORY_NAME
    if not path.is_file():
        return None
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            records.append(record)
        else:
            bad += 1
    return records, bad
