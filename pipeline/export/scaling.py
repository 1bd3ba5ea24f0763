"""Where an export's `scaling_factor` (and AutoencoderKL's `shift_factor`) come from.

Diffusion trainers multiply latents by `scaling_factor` (after subtracting `shift_factor`)
so they have unit variance: SD's 0.18215, SD3's shift. One definition everywhere, the one
`pipeline encode` records: over every element of the latent that the exported model's
`encode` gives (the VAE's posterior mean; a VQ model's encoder output), in float64 from
per-channel sums, count and sum of squares (`pipeline.encode.store.LatentSums`, reduced by
its `latent_statistics`), `shift_factor` = the mean m and
`scaling_factor` = 1 / std, with the population variance E[z²] − m².

Sources, exactly one per export: `--scaling-factor` (as given), `--latents` (the manifest of
a latent set `pipeline encode` wrote with this very checkpoint: its sha256 must match), or
a pass over image shards (`--shards`, else the run's `data.val_shards`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..encode.store import LatentSums, latent_statistics
from ..shards import manifest_path
from ..utils import PipelineError, read_json


@dataclass
class Scaling:
    scaling_factor: float
    shift_factor: float | None
    source: dict[str, Any] = field(default_factory=dict)   # how it was found (export.json)


def from_statistics(stats: dict[str, Any], source: dict[str, Any]) -> Scaling:
    std = stats["std"]
    if not (math.isfinite(std) and std > 0):
        raise PipelineError(f"the latents' standard deviation is {std}: no scaling factor "
                            f"exists (a constant latent); pass --scaling-factor")
    return Scaling(1.0 / std, stats["mean"], {**source, "latent_stats": stats})


def from_option(scaling_factor: float, shift_factor: float | None) -> Scaling:
    return Scaling(scaling_factor, shift_factor, {"from": "--scaling-factor"})


# ---------------------------------------------------------------- an encoded latent set

def from_latents(directory: str, weights_sha256: str) -> Scaling:
    """The factors `pipeline encode` recorded for a latent set of this checkpoint."""
    path = manifest_path(directory)
    manifest = read_json(path, "latent manifest", "point --latents at a split directory "
                                                  "written by `pipeline encode`")
    if not isinstance(manifest, dict):
        raise PipelineError(f"latent manifest {path} is not a JSON object")
    recorded = recorded_weights_sha256(manifest)
    if recorded != weights_sha256:
        raise PipelineError(f"--latents {directory}: encoded with model weights of sha256 "
                            f"{recorded} but the checkpoint's are {weights_sha256}; encode with "
                            f"this checkpoint, or pass --shards")
    scaling, shift = manifest.get("scaling_factor"), manifest.get("shift_factor")
    if scaling is None:
        raise PipelineError(f"--latents {directory}: {path} records no scaling_factor (code "
                            f"latents carry no statistics); pass --shards or --scaling-factor")
    if not _finite_number(scaling) or scaling <= 0:
        raise PipelineError(f"{path}: scaling_factor must be a number > 0, got {scaling!r}")
    if shift is not None and not _finite_number(shift):
        raise PipelineError(f"{path}: shift_factor must be a number or null, got {shift!r}")
    return Scaling(float(scaling), None if shift is None else float(shift),
                   {"from": "--latents", "latents": str(directory),
                    "latent_stats": manifest.get("latent_stats")})


def recorded_weights_sha256(manifest: dict[str, Any]) -> str | None:
    """The sha256 of the `model.safetensors` a latent manifest says it was encoded with."""
    checkpoint = manifest.get("checkpoint")
    sha = checkpoint.get("model_sha256") if isinstance(checkpoint, dict) else None
    return sha if isinstance(sha, str) else None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- a pass over image shards

def from_shards(model: torch.nn.Module, latent: Callable[[Tensor], Tensor], spec: str,
                batch_size: int, num_workers: int, max_samples: int | None,
                device: torch.device, allow_pipe: bool, source: dict[str, Any]) -> Scaling:
    """Measure the statistics of `latent(images)` over the shards `spec`, once each."""
    from ..data import make_eval_loader, normalize, resolve_spec

    shards = resolve_spec(spec, allow_pipe)
    size = model.config.image_size
    found = (shards.manifest or {}).get("image_size", size)
    if found != size:
        raise PipelineError(f"shards {spec} hold {found}x{found} images but the checkpoint was "
                            f"trained on {size}x{size}: measure on shards prepared at {size} px")
    loader = make_eval_loader(spec, batch_size, num_workers, rank=0, world_size=1,
                              max_samples=max_samples, allow_pipe=allow_pipe)
    total = max_samples if max_samples is not None else shards.total
    sums, samples = None, 0
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="scaling factor",
                                      disable=None) as bar:
        for batch in loader:
            images = _checked_images(batch[0], spec, model.config)
            z = latent(normalize(images.to(device)))
            if sums is None:
                sums = LatentSums(z.shape[1], z.device)
            sums.add(z)
            samples += len(images)
            bar.update(len(images))
    stats = latent_statistics([sums.to_record()]) if sums is not None else None
    if stats is None:
        raise PipelineError(f"no latent was measured: the shards {spec} hold no sample")
    return from_statistics(stats, {**source, "samples": samples})


def _checked_images(images: Tensor, spec: str, cfg) -> Tensor:
    expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected:
        raise PipelineError(f"--shards {spec}: batches of {images.dtype} "
                            f"{tuple(images.shape[1:])}, not uint8 images {expected}: pass "
                            f"image shards (from `pipeline prepare`)")
    return images


def recorded_val_shards(export_config: dict[str, Any], checkpoint: Path) -> str:
    """The run's `data.val_shards` from the checkpoint's config.json (data: it must be a
    non-empty string; a `pipe:` command in it is never run)."""
    spec = val_shards_of(export_config)
    if spec is None:
        raise PipelineError(f"checkpoint {checkpoint} records no data.val_shards: give the "
                            f"scaling factor's source: --scaling-factor X, --latents DIR "
                            f"(from `pipeline encode`) or --shards SPEC")
    return spec


def val_shards_of(export_config: dict[str, Any]) -> str | None:
    """`config.data.val_shards` of an export's config.json if it is a non-empty string."""
    config = export_config.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    spec = data.get("val_shards") if isinstance(data, dict) else None
    return spec if isinstance(spec, str) and spec else None
