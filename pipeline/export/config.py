"""The options of `pipeline export`: one flat, typed `ExportConfig` and its parser.

The scaling factor of the export comes from exactly one place: `--scaling-factor`, an
encoded latent set (`--latents`, the manifest `pipeline encode` writes), or a pass over
image shards (`--shards`; without any of the three, the run's own `data.val_shards`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..config import add_config_arguments, build_config, flat_aliases, mark_required, opt, \
    require_declared
from ..config import flat_flag as flag
from ..utils import PipelineError

FORMATS = ("diffusers",)


@require_declared
@dataclass
class ExportConfig:
    format: str = opt("diffusers", "what to write: diffusers (AutoencoderKL for a resnet VAE, "
                                   "VQModel for a resnet VQ-VAE with a plain codebook)",
                      choices=FORMATS)
    output: str = opt("", "the export directory (written atomically; must not exist unless "
                          "--force)")
    scaling_factor: float | None = opt(None, "the export's scaling_factor as given (else "
                                             "measured: --latents or --shards)",
                                       bounds="(0, inf)")
    shift_factor: float | None = opt(None, "with --scaling-factor: the AutoencoderKL's "
                                           "shift_factor (unset: none)",
                                     bounds="(-inf, inf)")
    latents: str | None = opt(None, "split directory written by `pipeline encode` with this "
                                    "checkpoint: its manifest's scaling_factor and "
                                    "shift_factor")
    shards: str | None = opt(None, "image shards to measure the latents' statistics on "
                                   "(split dir, manifest or pattern; unset with no other "
                                   "source: the run's data.val_shards)")
    max_samples: int | None = opt(None, "measure on the first M samples of --shards only",
                                  bounds="[1, inf)")
    batch_size: int = opt(64, "images per batch of the measuring pass", bounds="[1, 65536]")
    num_workers: int = opt(2, "loader workers of the measuring pass", bounds="[0, 256]")

    def check(self) -> None:
        sources = [flag(name) for name in ("scaling_factor", "latents", "shards")
                   if getattr(self, name) is not None]
        if len(sources) > 1:
            raise PipelineError(f"{' and '.join(sources)}: give one source of the scaling "
                                f"factor")
        if self.shift_factor is not None and self.scaling_factor is None:
            raise PipelineError("--shift-factor goes with --scaling-factor (--latents and "
                                "--shards measure both)")
        if self.max_samples is not None and self.scaling_factor is not None:
            raise PipelineError("--max-samples limits the measuring pass; --scaling-factor "
                                "measures nothing")
        for name in ("latents", "shards"):
            if getattr(self, name) == "":
                raise PipelineError(f"{flag(name)} must not be empty")


ALIASES = flat_aliases(ExportConfig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline export",
        description="Write a checkpoint as a model another library loads: --format diffusers "
                    "gives a directory that diffusers.AutoencoderKL / VQModel.from_pretrained "
                    "read, checked against this package's model before it is written, with "
                    "export.json saying where it came from and how its scaling_factor was "
                    "found.",
        epilog="Exit status: 0 done; 2 a model diffusers cannot express (the message says "
               "what can be exported), bad options, an existing --output without --force, "
               "or another job on the same output.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="export directory (RUN_DIR/model) or checkpoint directory "
                        "(RUN_DIR/checkpoints/step-<N>)")
    add_config_arguments(p, ALIASES, cls=ExportConfig, title="export options")
    # Not a field: it decides what happens to an existing output, not what is exported.
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output directory")
    mark_required(p, ("output",))
    return p


def resolve_config(args: argparse.Namespace) -> ExportConfig:
    """The checked config of a parsed command line; a PipelineError names the option."""
    cfg = build_config(None, args, cls=ExportConfig, aliases=ALIASES)
    if not cfg.output:
        raise PipelineError("--output must not be empty")
    return cfg
