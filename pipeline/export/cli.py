"""`pipeline export` from the command line to the written directory.

Order: options, the checkpoint (and whether diffusers can express it: refused before
anything is measured or written), the output lock, the scaling factor, the conversion, a
check of the converted model against this package's on fixed random images, then one
atomic directory: diffusers' `config.json` + `diffusion_pytorch_model.safetensors` and our
`export.json` (source checkpoint and its sha256, where the scaling factor came from, the
measured differences, the options).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..layout import EXPORT_RECORD_NAME
from ..locking import Lock, acquire
from ..utils import PipelineError, atomic_dir, atomic_write_json, provenance, sha256_file
from . import scaling
from .config import ExportConfig, build_parser, resolve_config

# Largest (relative) difference tolerated between the export and this package's model on the
# check images: float32 summation order alone stays well below it, a wrong mapping moves
# results by the size of the activations.
CHECK_TOLERANCE = 1e-4
CHECK_IMAGES = 4
CHECK_SEED = 0
# A nearest-code tie may fall either way in the two implementations (same distances, summed
# in another order); anything beyond this is a wrong codebook.
CHECK_INDEX_TOLERANCE = 0.01
MAX_STEP = 2 ** 63 - 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    from ..models import from_pretrained, read_export_config
    from ..models.diffusers import check_exportable, require_diffusers

    checkpoint = Path(args.checkpoint)
    export_config = read_export_config(checkpoint)
    step = checked_step(export_config, checkpoint)
    model = from_pretrained(checkpoint)
    target = check_exportable(model)
    require_diffusers()
    output = output_path(cfg.output)
    with lock_output(output):
        check_output(output, args.force, input_paths(cfg, checkpoint, export_config))
        found = find_scaling(cfg, model, checkpoint, export_config)
        record = write_export(model, output, found, {
            "checkpoint": {"path": str(checkpoint), "step": step,
                           "weights": export_config.get("weights"),
                           "run_name": export_config.get("run_name"),
                           "sha256": weights_sha256(checkpoint)},
            "options": {"checkpoint": str(checkpoint), **dataclasses.asdict(cfg),
                        "force": args.force}})
    print(f"exported {checkpoint} (step {step}) -> {output}: diffusers {target.class_name}, "
          f"scaling_factor {record['scaling_factor']:.6g} ({found.source['from']}); "
          f"largest difference {max(record['check']['differences'].values()):.2g}")
    return 0


def input_paths(cfg: ExportConfig, checkpoint: Path,
                export_config: dict[str, Any]) -> list[str]:
    """What the export reads, which a forced replacement of --output must not delete."""
    inputs = [str(checkpoint), cfg.latents, cfg.shards]
    if cfg.scaling_factor is None and cfg.latents is None and cfg.shards is None:
        inputs.append(scaling.val_shards_of(export_config))
    return [item for item in inputs if isinstance(item, str) and item]


def checked_step(export_config: dict[str, Any], checkpoint: Path) -> int:
    step = export_config.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise PipelineError(f"{checkpoint}/config.json: 'step' must be an integer >= 0, got "
                            f"{step!r}; re-export the model")
    return step


def weights_sha256(checkpoint: Path) -> str:
    from ..models.export import WEIGHTS_NAME

    return sha256_file(checkpoint / WEIGHTS_NAME)


# ---------------------------------------------------------------- the output directory

def output_path(option: str) -> Path:
    """--output as an absolute path (`.` has no name to lock or replace atomically)."""
    output = Path(os.path.abspath(option))
    if output == output.parent:
        raise PipelineError(f"--output {option} is a file system root: choose a directory "
                            f"to create")
    return output


def lock_output(output: Path) -> Lock:
    """The output is replaced as a whole, so its lock lives beside it, not in it."""
    return acquire(output.parent / f".{output.name}.lock", f"--output {output}")


def check_output(output: Path, force: bool, inputs: list[str]) -> None:
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise PipelineError(f"--output {output} exists and is not a directory: choose "
                            f"another --output")
    if not output.exists():
        return
    if not force:
        raise PipelineError(f"--output {output} exists: pass --force to replace it, or "
                            f"choose another --output")
    root = output.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == root or root in path.parents:
            raise PipelineError(f"--output {output} holds the input {item}: --force would "
                                f"delete it; choose another --output")


def write_export(model, output: Path, found: scaling.Scaling,
                 record: dict[str, Any]) -> dict[str, Any]:
    from ..models.diffusers import check_exportable, to_diffusers

    target = check_exportable(model)
    shift = found.shift_factor if target.class_name == "AutoencoderKL" else None
    exported = to_diffusers(model, found.scaling_factor, shift)
    check = check_export(model, exported)
    record = {"format": "diffusers", "class": target.class_name,
              "scaling_factor": found.scaling_factor, "shift_factor": shift,
              "scaling": {**found.source, "latent": target.describes},
              "check": check, **record, "version": __version__,
              "diffusers_version": diffusers_version(), "provenance": provenance()}
    with atomic_dir(output) as tmp:
        exported.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / EXPORT_RECORD_NAME, record)
        readable_as_created(tmp)
    return record


def readable_as_created(directory: Path) -> None:
    """Give files the mode a plain open() would: safetensors' `save_file` (what diffusers
    writes the weights with) creates them 0600, which would hide them from the other users
    of a shared file system."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def diffusers_version() -> str:
    from importlib import metadata

    return metadata.version("diffusers")


def check_export(model, exported) -> dict[str, Any]:
    """Run both models on fixed random images; refuse an export that computes otherwise."""
    from ..models.diffusers import export_differences

    cfg = model.config
    generator = torch.Generator().manual_seed(CHECK_SEED)
    x = torch.rand(CHECK_IMAGES, cfg.in_channels, cfg.image_size, cfg.image_size,
                   generator=generator) * 2 - 1
    differences = export_differences(model.cpu(), exported.cpu(), x)
    mismatched = {name: value for name, value in differences.items()
                  if value > (CHECK_INDEX_TOLERANCE if name == "indices_differing"
                              else CHECK_TOLERANCE)}
    if mismatched:
        raise PipelineError(f"the converted model does not compute what the checkpoint does "
                            f"({mismatched}): nothing was written; please report this")
    return {"images": CHECK_IMAGES, "seed": CHECK_SEED, "differences": differences}


# ---------------------------------------------------------------- the scaling factor

def find_scaling(cfg: ExportConfig, model, checkpoint: Path,
                 export_config: dict[str, Any]) -> scaling.Scaling:
    if cfg.scaling_factor is not None:
        return scaling.from_option(cfg.scaling_factor, cfg.shift_factor)
    if cfg.latents is not None:
        return scaling.from_latents(cfg.latents, weights_sha256(checkpoint))
    from ..models.diffusers import diffusion_latent

    if cfg.shards is not None:
        spec, source, allow_pipe = cfg.shards, {"from": "--shards", "shards": cfg.shards}, True
    else:
        spec = scaling.recorded_val_shards(export_config, checkpoint)
        source = {"from": "the run's data.val_shards", "shards": spec}
        allow_pipe = False  # a command recorded in a config is data, never run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    try:
        return scaling.from_shards(model, lambda x: diffusion_latent(model, x), spec,
                                   cfg.batch_size, cfg.num_workers, cfg.max_samples, device,
                                   allow_pipe, source)
    except PipelineError as e:
        if cfg.shards is not None:
            raise
        raise PipelineError(f"{e} (the run's data.val_shards, from {checkpoint}/config.json; "
                            f"pass --shards, --latents or --scaling-factor)") from None
    finally:
        model.cpu()
