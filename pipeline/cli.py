"""`pipeline <stage> [options]`: one console script, one subcommand per stage.

Each stage module exposes `main(argv)` and also runs as `python -m pipeline.<stage>`;
this entry only picks the module, so `pipeline train --help` is the stage's own help.
Stages are imported lazily: `pipeline prepare` never pays for importing torch models.
"""
from __future__ import annotations

import importlib
import sys

from .utils import run_stage  # noqa: F401  (kept importable from here)

STAGES = {
    "sample": ("pipeline.sampledata", "write the embedded ImageNet-layout sample tree"),
    "prepare": ("pipeline.prepare", "JPEG tree -> 64x64 WebDataset shards + manifest"),
    "train": ("pipeline.train", "train an AE / VAE / VQ-VAE under Accelerate"),
    "evaluate": ("pipeline.evaluate", "reconstruction metrics of checkpoints on val shards"),
    "encode": ("pipeline.encode", "a split's images -> latent shards (+ latent statistics)"),
    "decode": ("pipeline.decode", "PNG grid of the first latents of latent shards"),
    "report": ("pipeline.report", "HTML + Markdown comparison of evaluated checkpoints"),
    "export": ("pipeline.export", "a checkpoint as a diffusers AutoencoderKL / VQModel"),
    "bench": ("pipeline.bench", "measure prepare, loader, training, GPU throughput and quantiser quality"),
    "demo": ("pipeline.demo", "sample -> prepare -> train -> evaluate -> encode + export -> report"),
}


def usage() -> str:
    lines = ["usage: pipeline <stage> [options]   (pipeline <stage> --help for its options)", "",
             "stages:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(__version__)
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return run_stage(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
