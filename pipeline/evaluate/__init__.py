"""`pipeline evaluate CKPT [CKPT ...] --shards SPEC --output DIR`: reconstruction metrics.

Each checkpoint (an export directory or a `step-<N>/` directory) is run over the val
shards once, under `accelerate launch` / `torchrun` too (every val sample counted once
across processes), and gets `DIR/<run>-step<N>/`: `metrics.json`, image strips of the 16
fixed images and `evaluate.yaml` (see docs/interfaces.md "Evaluation output"), so the
report stage needs no model. One concern per module:

    config.py       EvaluateConfig (every option, its default and range), the parser
    checkpoints.py  loading the checkpoints, their safe output names and directories
    run.py          the metric pass over the shards, its reduction, summarize()
    outputs.py      fixed images, strips, error maps, the metrics.json record, writing
    throughput.py   encode / decode images per second
    tracker.py      the printed table and the W&B run
    cli.py          main(): the order of it all, the output lock, main-process-only work
"""
from ..layout import LOCK_NAME

# outputs.write_checkpoint_dir looks the writer up here, so replacing it here takes effect.
from ..utils import atomic_write_json
from .checkpoints import (MAX_RUN_NAME_BYTES, MAX_STEP, UNSAFE_NAME_CHARS, Checkpoint,
                          check_resolution, checkpoint_dir, checkpoint_identity, load_checkpoints,
                          safe_component)
from .cli import evaluate_checkpoint, lock_output, main, on_main_process
from .config import (ALIASES, DEFAULT_VAE_SIGMA, WANDB_PROJECT_CHARS, EvaluateConfig,
                     build_parser, check_args, resolve_config)
from .outputs import (ERROR_MAP_CMAP, ERROR_MAP_MAX, NUM_FIXED_IMAGES, PRIOR_SEED, error_maps,
                      fixed_image_files, load_fixed_images, metrics_record, png_strip,
                      scale_sizes, settings, to_uint8, warn_if_incomplete, write_checkpoint_dir)
from .run import (Evaluation, expected_samples, load_optional_metrics, per_class_psnr, run_pass,
                  summarize)
from .throughput import measure_throughput
from .tracker import TABLE_COLUMNS, log_to_wandb, print_table, summarize_run

__all__ = ["ALIASES", "DEFAULT_VAE_SIGMA", "ERROR_MAP_CMAP", "ERROR_MAP_MAX", "LOCK_NAME",
           "MAX_RUN_NAME_BYTES", "MAX_STEP", "NUM_FIXED_IMAGES", "PRIOR_SEED", "TABLE_COLUMNS",
           "UNSAFE_NAME_CHARS", "WANDB_PROJECT_CHARS", "Checkpoint", "EvaluateConfig", "Evaluation",
           "atomic_write_json", "build_parser", "check_args", "check_resolution", "checkpoint_dir",
           "checkpoint_identity", "error_maps", "evaluate_checkpoint", "expected_samples",
           "fixed_image_files", "load_checkpoints", "load_fixed_images", "load_optional_metrics",
           "lock_output", "log_to_wandb", "main", "measure_throughput", "metrics_record",
           "on_main_process", "per_class_psnr", "png_strip", "print_table", "resolve_config",
           "run_pass", "safe_component", "scale_sizes", "settings", "summarize", "summarize_run",
           "to_uint8", "warn_if_incomplete", "write_checkpoint_dir"]
