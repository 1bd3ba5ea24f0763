"""The options of `pipeline encode`: one flat, typed `EncodeConfig` and its parser.

Every option is a field declared with `pipeline.config.fields.opt` (default, help, valid
range), as `pipeline evaluate` does; multi-word fields are also spelt with hyphens
(`--batch-size`). The checkpoint stays positional; `--no-progress` is a plain flag.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import SEED_MAX, add_config_arguments, build_config, flat_aliases, \
    mark_required, opt, require_declared
from ..utils import PipelineError

# What to store: the model's own latent (auto), or for a VAE its moments, mean or a draw.
LATENT_MODES = ("auto", "moments", "mean", "sample")
FLIPS = ("none", "both")
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # names DIR/<split>: one safe component


@require_declared
@dataclass
class EncodeConfig:
    shards: str = opt("", "source split: a directory holding manifest.json (or the manifest, "
                          "or a shard spec: brace pattern, list, pipe: commands)")
    output: str = opt("", "writes DIR/<split>/<split>-NNNNNN.tar (one per source shard, same "
                          "index) and DIR/<split>/manifest.json")
    latent: str = opt("auto", "what to store per sample: auto (AE: the latent; VAE: its "
                              "moments, mean and log-variance; VQ/FSQ: the codes), or for a "
                              "VAE moments | mean | sample (one seeded draw per sample)",
                      choices=LATENT_MODES)
    flip: str = opt("none", "none | both: also store the latents of each mirrored image "
                            "(keys marked +flip)", choices=FLIPS)
    batch_size: int = opt(64, "images per forward pass and process", bounds="[1, 65536]")
    num_workers: int = opt(2, "reader processes decoding source shards, per process (0: in "
                              "the encoding process)", bounds="[0, 64]")
    split: str | None = opt(None, "name of the output split; default: the source manifest's")
    seed: int = opt(0, "--latent sample: noise seed; a sample's draw depends on it and the "
                       "sample's key only", bounds=f"[0, {SEED_MAX}]")
    on_error: str = opt("warn", "warn | raise: an unreadable source sample is counted as "
                                "skipped (warn) or stops the job", choices=("warn", "raise"))

    def check(self) -> None:
        """Rules beyond each field's declared range (validate() calls it last)."""
        if self.split is not None and not SPLIT_NAME.fullmatch(self.split):
            raise PipelineError(f"--split {self.split!r}: letters, digits, '_' and '-' only "
                                f"(it names DIR/<split>)")
        if "://" in self.output:
            raise PipelineError(f"--output {self.output}: latent shards are written to a "
                                f"local (or mounted) directory, where every write can be an "
                                f"atomic rename; encode locally, then copy")
        output = Path(self.output)
        if output.exists() and not output.is_dir():
            raise PipelineError(f"--output {output}: exists and is not a directory")


ALIASES = flat_aliases(EncodeConfig)
REQUIRED = ("shards", "output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline encode",
        description="Encode a split's images with a checkpoint into latent shards (one per "
                    "source shard) + manifest with latent statistics. Runs under `accelerate "
                    "launch` / `torchrun` too: every sample is encoded once across processes; "
                    "a re-run resumes shard by shard.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="export directory (RUN_DIR/model) or checkpoint directory "
                        "(RUN_DIR/checkpoints/step-<N>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p, ALIASES, cls=EncodeConfig, title="encoding options")
    mark_required(p, REQUIRED)
    return p


def resolve_config(args: argparse.Namespace) -> EncodeConfig:
    """The checked config of a parsed command line; a PipelineError names the option."""
    return build_config(None, args, cls=EncodeConfig, aliases=ALIASES)
