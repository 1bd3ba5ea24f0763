"""`pipeline train`'s command line: the parser, the resolved config, and `preflight`,
everything that can be checked before any process trains (shards, image size, tracker,
the RUN_DIR lock, which checkpoint to resume from and whether its model fits)."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..checkpoint import check_model_matches, resolve_resume
from ..config import (ALIASES, Config, add_config_arguments, build_config, list_presets,
                      load_preset, preset_for)
from ..data import ShardSet, resolve_spec
from ..tracking import check_tracker_available
from ..utils import PipelineError
from .loop import train
from .setup import refuse_if_locked, refuse_overwrite
from .signals import EXIT_PREEMPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline train", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an AE / VAE / VQ-VAE on 64x64 shards (Accelerate: one GPU, DDP, "
                    "multi-node, bf16/fp16).\nEvery config field is an option "
                    "`--section.field VALUE`; the common ones have the short aliases listed "
                    "with them.",
        epilog=textwrap.fill("Short aliases: " + ", ".join(
            f"{alias} = --{dotted}" for alias, dotted in ALIASES.items()) + ".",
            width=79, break_on_hyphens=False)
        + f"\n\nExit status: 0 done, 2 bad input or non-finite loss, {EXIT_PREEMPTED} "
          f"preempted after a checkpoint\n(rerun the same command with --resume auto).")
    parser.add_argument(
        "--config", metavar="FILE_OR_PRESET", default=None,
        help="YAML file or preset name (" + ", ".join(list_presets()) + "); a run's "
             "config.yaml works too. Default: the preset named after --model "
             "(`resnet-<model>` with --arch resnet)")
    add_config_arguments(parser, ALIASES)
    return parser


def default_preset(args: argparse.Namespace) -> str | None:
    """The preset `--model/--arch` name when no --config is given (None if there is none:
    validation then reports an unknown model with the list of valid ones)."""
    return preset_for(getattr(args, "model.model") or "ae",
                      getattr(args, "model.arch") or "basic")


def resolve_config(args: argparse.Namespace) -> Config:
    preset = args.config or default_preset(args)
    data = load_preset(preset) if preset else {}
    data.pop("run", None)  # a run's config.yaml also records provenance; not a config field
    return build_config(None, args, defaults=data, aliases=ALIASES)


def check_shards(spec: str, option: str, split: str, need_counts: bool = False) -> ShardSet:
    """Shard specs must resolve now, not after every rank has started."""
    hint = f"run `pipeline prepare --output DIR` and pass {option} DIR/{split}"
    if not spec:
        raise PipelineError(f"{option} is required: the {split} shard directory written by "
                            f"`pipeline prepare`; {hint}")
    try:
        shards = resolve_spec(spec)
    except PipelineError as e:
        raise PipelineError(f"{split} shards not found: {spec} ({e}); {hint}") from None
    if need_counts and shards.counts is None:
        raise PipelineError(f"{option} {spec}: the fixed validation subset needs the split "
                            f"directory with its manifest (per-shard counts); {hint}")
    return shards


def check_image_size(shards: ShardSet, spec: str, option: str, cfg: Config) -> None:
    """A manifest states the shards' image size: it must be the model's (shards without a
    manifest are checked on their first batch, `check_batch_shape`)."""
    size = shards.manifest.get("image_size") if shards.manifest else None
    if size is not None and size != cfg.model.image_size:
        raise PipelineError(f"{option} {spec}: the shards hold {size}x{size} images (their "
                            f"manifest), but the model is built for {cfg.model.image_size}px "
                            f"(--model.image_size); pass --model.image_size {size}, or "
                            f"prepare shards of {cfg.model.image_size}px")


def preflight(cfg: Config) -> Path | None:
    """Everything that can be checked before any process trains; returns the checkpoint
    to resume from (None: a fresh run), verified against its COMPLETE record."""
    for spec, option, split in ((cfg.data.train_shards, "--train-shards", "train"),
                                (cfg.data.val_shards, "--val-shards", "val")):
        shards = check_shards(spec, option, split, need_counts=split == "val")
        check_image_size(shards, spec, option, cfg)
    check_tracker_available(cfg.tracker.tracker)
    run_dir = Path(cfg.train.output)
    refuse_if_locked(run_dir)
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    refuse_overwrite(run_dir, resume_from)
    if resume_from is not None:
        check_model_matches(resume_from, cfg.model)
    return resume_from


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    resume_from = preflight(cfg)
    return train(cfg, resume_from)
