"""`pipeline export CKPT --format diffusers --output DIR`: a checkpoint as a diffusers model.

A resnet-family VAE becomes `diffusers.AutoencoderKL`, a resnet-family VQ-VAE with a plain
codebook `diffusers.VQModel` (the conversion table: `pipeline/models/diffusers.py`); what
diffusers cannot express is refused with what can be exported. DIR holds what
`from_pretrained(DIR)` reads plus `export.json` (source, scaling factor and its source, the
check against this package's model). One concern per module:

    config.py   ExportConfig (every option, its default and range), the parser
    scaling.py  the scaling factor: as given, from `pipeline encode`'s manifest, or measured
    cli.py      main(): checkpoint, lock, scaling, conversion, check, atomic write
"""
from .cli import (CHECK_TOLERANCE, EXPORT_RECORD_NAME, check_export, check_output,
                  find_scaling, lock_output, main, write_export)
from .config import ALIASES, FORMATS, ExportConfig, build_parser, resolve_config
from .scaling import Scaling, from_latents, from_shards, recorded_weights_sha256

__all__ = ["ALIASES", "CHECK_TOLERANCE", "EXPORT_RECORD_NAME", "ExportConfig", "FORMATS",
           "Scaling", "build_parser", "check_export", "check_output",
           "find_scaling", "from_latents", "from_shards", "lock_output", "main",
           "recorded_weights_sha256", "resolve_config", "write_export"]
