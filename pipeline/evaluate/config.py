"""The options of `pipeline evaluate`: one flat, typed `EvaluateConfig` and its parser.

Every option is a field declared with `pipeline.config.fields.opt` (default, help, valid
range); `build_parser` gives each its `--field` option plus the hyphenated spelling users'
scripts type (`--batch-size`), and `resolve_config` turns the parsed command line into a
checked config before anything is read or written. The checkpoints stay positional.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .. import metrics
from ..config import (Bounds, add_config_arguments, build_config, config_fields, flat_aliases,
                      from_dict, mark_required, opt, require_declared)
from ..config import flat_flag as flag  # the option as users have always typed it
from ..utils import PipelineError

DEFAULT_VAE_SIGMA = 0.05      # decoder std of the VAE likelihood, in [0, 1] pixel units
# W&B refuses these in project names.
WANDB_PROJECT_CHARS = re.compile(r"[^/\\#?%:]{1,128}")


@require_declared
@dataclass
class EvaluateConfig:
    shards: str = opt("", "val split directory holding manifest.json (the manifest gives the "
                          "sample count, the class names and the 16 fixed images)")
    output: str = opt("", "writes DIR/<run>-step<N>/metrics.json and image strips per "
                          "checkpoint")
    batch_size: int = opt(64, "images per batch and process", bounds="[1, 65536]")
    num_workers: int = opt(2, "loader worker processes per evaluating process",
                           bounds="[0, 256]")
    max_samples: int | None = opt(None, "evaluate only the first M val samples in manifest "
                                        "order (quick checks; recorded in metrics.json)",
                                  bounds="[1, inf)")
    worst_k: int = opt(16, "how many lowest-PSNR images to list (their keys) in metrics.json",
                       bounds="[1, 10000]")
    vae_sigma: float = opt(DEFAULT_VAE_SIGMA, "std of the VAE's discretised Gaussian decoder "
                                              "in [0, 1] pixel units, used for neg_elbo and "
                                              "bits_per_dim", bounds="(0, 1]")
    throughput_batches: int = opt(5, "timed encode and decode batches after one warm-up batch",
                                  bounds="[1, 10000]")
    lpips_backbone: str | None = opt(None, "enables LPIPS: torchvision ImageNet state dict of "
                                           "the backbone (alexnet-owt-7be5be79.pth, or "
                                           "vgg16-397923af.pth with --lpips-net vgg)")
    lpips_linear: str | None = opt(None, "LPIPS linear-layer weights, the lpips package's "
                                         "weights/v0.1/<net>.pth; unset: the copy shipped "
                                         "inside torchmetrics")
    lpips_net: str = opt("alex", "LPIPS backbone the two files belong to: alex | vgg",
                         choices=tuple(sorted(metrics.LPIPS_NETS)))
    inception_weights: str | None = opt(None, "enables rFID: torch-fidelity's "
                                              "weights-inception-2015-12-05-6726825d.pth "
                                              "(needs the torch-fidelity package)")
    on_error: str = opt("warn", "warn | raise: an unreadable sample is counted as skipped "
                                "(warn) or stops the run", choices=("warn", "raise"))
    tracker: str = opt("none", "none | wandb: also log summary metrics and a table to "
                               "W&B (WANDB_MODE=offline works)", choices=("none", "wandb"))
    project: str = opt("ae-pipeline", "W&B project")
    run_name: str | None = opt(None, "W&B run name; unset: evaluate-<DIR name>")

    def check(self) -> None:
        """Rules beyond each field's declared range (validate() calls it last)."""
        if not WANDB_PROJECT_CHARS.fullmatch(self.project):
            raise PipelineError(f"--project {self.project!r}: 1 to 128 characters, none of "
                                f"/ \\ # ? % : (W&B refuses them)")
        if self.run_name is not None and not self.run_name.strip():
            raise PipelineError("--run-name must not be empty (leave it out for the default)")
        if self.lpips_linear and not self.lpips_backbone:
            raise PipelineError("--lpips-linear needs --lpips-backbone (the backbone's weights)")
        output = Path(self.output)
        if output.exists() and not output.is_dir():
            raise PipelineError(f"--output {output}: exists and is not a directory")


FIELD_NAMES = tuple(name for name, _, _ in config_fields(EvaluateConfig))
# Today's hyphenated spellings (in users' scripts) -> the field they set.
ALIASES = flat_aliases(EvaluateConfig)
REQUIRED = ("shards", "output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline evaluate",
        description="Reconstruction metrics of one or several checkpoints on the val shards. "
                    "Runs under `accelerate launch` / `torchrun` too: every val sample is "
                    "counted once across processes.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="export directory (RUN_DIR/model) or checkpoint directory "
                        "(RUN_DIR/checkpoints/step-<N>); several compare steps or runs")
    add_config_arguments(p, ALIASES, cls=EvaluateConfig, title="evaluation options")
    mark_required(p, REQUIRED)
    return p


def resolve_config(args: argparse.Namespace) -> EvaluateConfig:
    """The checked config of a parsed command line; a PipelineError names the option."""
    refuse_out_of_range(args)
    return build_config(None, args, cls=EvaluateConfig, aliases=ALIASES)


def refuse_out_of_range(args: argparse.Namespace) -> None:
    """A value outside its field's declared range, in the words `pipeline evaluate` has
    always used ("--batch-size must be between 1 and 65536, got 0"): users' scripts and
    tests match them. Everything else is left to build_config's generic validation."""
    given = {name: getattr(args, name) for name in FIELD_NAMES
             if getattr(args, name, None) is not None}
    try:
        cfg = from_dict(EvaluateConfig, given)
    except PipelineError:
        return  # not even of the field's type: build_config says so, naming the option
    for name, f, _ in config_fields(EvaluateConfig):
        value, bounds = getattr(cfg, name), f.metadata["rule"].bounds
        if bounds is not None and isinstance(value, (int, float)) and value not in bounds:
            raise PipelineError(f"{flag(name)} must be {range_words(bounds)}, got {value}")


def range_words(bounds: Bounds) -> str:
    """'between 1 and 65536' for a closed finite range, else the interval's own words."""
    closed = not (bounds.low_open or bounds.high_open)
    if closed and math.isfinite(bounds.low) and math.isfinite(bounds.high):
        return f"between {_plain(bounds.low)} and {_plain(bounds.high)}"
    return bounds.describe()


def _plain(number: float) -> str:
    return str(int(number)) if number.is_integer() else repr(number)


def check_args(args: argparse.Namespace) -> None:
    """Kept for callers of the earlier module: `resolve_config` without the result."""
    resolve_config(args)
