"""`pipeline evaluate` from the command line to the written results, across processes.

Every checkpoint is loaded and checked before any pass runs; the main process then holds
`DIR/.lock` for the whole run, so a second evaluate into the same DIR is refused. Work
that only the main process does (locking, reading the fixed images, writing) goes through
`on_main_process`, so a failure there stops every process instead of leaving them waiting
at the next collective.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import on_main_process
from ..config import to_yaml
from ..layout import EVALUATE_CONFIG_NAME, LOCK_NAME
from ..locking import Lock, acquire
from .checkpoints import Checkpoint, check_resolution, checkpoint_dir, load_checkpoints
from .config import EvaluateConfig, build_parser, resolve_config
from .outputs import (fixed_image_files, load_fixed_images, metrics_record, warn_if_incomplete,
                      write_checkpoint_dir)
from .run import load_optional_metrics, run_pass, summarize
from .throughput import measure_throughput
from .tracker import summarize_run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    from accelerate import Accelerator

    from ..shards import read_manifest

    manifest = read_manifest(cfg.shards)
    checkpoints = load_checkpoints(args.checkpoints)
    for ckpt in checkpoints:
        check_resolution(manifest, cfg.shards, ckpt)
    # Without cpu=True, Accelerate ignores torchrun's WORLD_SIZE on a machine without CUDA
    # and every process would evaluate every sample alone (DistributedType.NO).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    lock = on_main_process(accelerator, lambda: lock_output(cfg, checkpoints),
                           f"locking --output {cfg.output}")
    try:
        lpips, fid = load_optional_metrics(cfg, accelerator.device)
        fixed = on_main_process(accelerator, lambda: load_fixed_images(cfg.shards),
                                "reading the fixed images")
        records = [evaluate_checkpoint(ckpt, manifest, fixed, cfg, accelerator, lpips, fid)
                   for ckpt in checkpoints]
        on_main_process(accelerator, lambda: summarize_run(records, cfg, args.checkpoints),
                        "logging the results")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        if lock is not None:
            lock.release()
    return 0


def evaluate_checkpoint(ckpt: Checkpoint, manifest: dict[str, Any],
                        fixed: tuple[torch.Tensor, list], cfg: EvaluateConfig, accelerator,
                        lpips, fid) -> dict[str, Any] | None:
    """Metrics of one checkpoint; the main process writes its directory and returns them."""
    ckpt.model.to(accelerator.device)
    totals, worst, rfid = run_pass(ckpt, manifest, cfg, accelerator, lpips, fid)

    def summarize_and_write() -> dict[str, Any]:
        result = summarize(ckpt, totals, worst, rfid, manifest["classes"], lpips is not None)
        fixed_images, fixed_keys = fixed
        code_counts = totals["code_counts"] if ckpt.model.num_codes is not None else None
        files = fixed_image_files(ckpt.model, fixed_images, accelerator.device, code_counts)
        result.update(measure_throughput(ckpt.model, fixed_images, accelerator.device,
                                         cfg.batch_size, cfg.throughput_batches))
        result = metrics_record(ckpt, result, manifest, fixed_keys, files, cfg, accelerator)
        # Beside each result, not once in DIR: a later evaluate into DIR with other options
        # replaces only the directories it writes.
        files["evaluate_config"] = (EVALUATE_CONFIG_NAME, to_yaml(cfg).encode())
        write_checkpoint_dir(checkpoint_dir(cfg.output, ckpt.name), result, files)
        warn_if_incomplete(result)
        return result

    result = on_main_process(accelerator, summarize_and_write, f"writing {ckpt.name}")
    ckpt.model.to("cpu")  # free accelerator memory for the next checkpoint
    return result


def lock_output(cfg: EvaluateConfig, checkpoints: list[Checkpoint]) -> Lock:
    """Take DIR/.lock (the first thing written into DIR) and check every checkpoint's
    directory stays inside DIR, before any pass runs."""
    lock = acquire(Path(cfg.output) / LOCK_NAME, f"--output {cfg.output}")
    try:
        for ckpt in checkpoints:
            checkpoint_dir(cfg.output, ckpt.name)
    except BaseException:
        lock.release()
        raise
    return lock
