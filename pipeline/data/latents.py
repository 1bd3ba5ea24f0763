"""Latent shards (written by `pipeline encode`): their format, read from the manifest, and
one sample's latent member decoded.

A latent split's manifest has `format: ae-pipeline-latents/1` and a `latent` section
that says what each sample holds (`kind`, `member`, `shape`, `dtype`); the loader takes
that as given for every sample and refuses a sample that differs. The manifest is data:
every field is checked here, so a crafted one cannot make the loader allocate without
bound or read an unexpected member. Batches of float latents are float16 B x C x h x w,
batches of codes int64 (B x h x w, or B x S x h x w for S code stages).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..layout import LATENT_FORMAT
from ..shards import MANIFEST_NAME
from ..utils import PipelineError

if TYPE_CHECKING:
    from .spec import ShardSet

# kind -> the member each sample stores it in (`<key>.<member>`)
LATENT_MEMBERS = {"latent": "latent.npy", "moments": "moments.npy", "codes": "codes.npy"}
# kind -> dtypes a shard may store it in -> the dtype of the loader's batches
STORED_DTYPES = {"latent": {"float16": np.float16}, "moments": {"float16": np.float16},
                 "codes": {"uint16": np.int64, "int32": np.int64}}
MAX_LATENT_DIMS = 4            # C x h x w; codes h x w or S x h x w
MAX_LATENT_ELEMENTS = 1 << 24  # per sample: a bound a crafted manifest cannot exceed


@dataclass(frozen=True)
class LatentFormat:
    """What every sample of a latent split holds: `<key>.<member>`, `shape`, `dtype`."""
    kind: str                 # latent | moments | codes
    member: str               # latent.npy | moments.npy | codes.npy
    shape: tuple[int, ...]
    dtype: np.dtype           # as stored
    batch_dtype: torch.dtype  # as batched: float16, or int64 for codes


def latent_format(manifest: dict[str, Any] | None, where: str | Path) -> LatentFormat | None:
    """The latent format a manifest declares, None for an image split (or no manifest);
    a PipelineError naming `where` (the manifest) for a latent section that is not sound."""
    if manifest is None or manifest.get("format") != LATENT_FORMAT:
        return None
    section = manifest.get("latent")
    if not isinstance(section, dict):
        raise PipelineError(f"latent shard manifest {where} has no 'latent' section: "
                            f"re-run `pipeline encode`")
    kind, member = section.get("kind"), section.get("member")
    if kind not in LATENT_MEMBERS or member != LATENT_MEMBERS[kind]:
        raise PipelineError(f"latent shard manifest {where}: kind {kind!r} with member "
                            f"{member!r} is not one of {LATENT_MEMBERS}: re-run `pipeline encode`")
    shape, dtype = section.get("shape"), section.get("dtype")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_LATENT_DIMS
            or not all(type(d) is int and d >= 1 for d in shape)
            or math.prod(shape) > MAX_LATENT_ELEMENTS):
        raise PipelineError(f"latent shard manifest {where}: shape {shape!r} is not a list of "
                            f"1 to {MAX_LATENT_DIMS} positive integers (at most "
                            f"{MAX_LATENT_ELEMENTS} elements): re-run `pipeline encode`")
    if dtype not in STORED_DTYPES[kind]:
        raise PipelineError(f"latent shard manifest {where}: {kind} stored as {dtype!r}, not "
                            f"one of {sorted(STORED_DTYPES[kind])}: re-run `pipeline encode`")
    batch = torch.from_numpy(np.empty(0, STORED_DTYPES[kind][dtype])).dtype
    return LatentFormat(kind, member, tuple(shape), np.dtype(dtype), batch)


def latent_format_of(shards: "ShardSet") -> LatentFormat | None:
    """The latent format of a resolved shard set, from its manifest (beside its first
    shard); None for image shards or shards without a manifest."""
    return latent_format(shards.manifest, Path(shards.urls[0]).parent / MANIFEST_NAME)


def sample_moments(moments: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """A draw z = mean + exp(logvar / 2) * eps from a batch of VAE moments (B x 2C x h x w:
    the mean's C channels, then the log-variance's), in float32 on the moments' device."""
    mean, logvar = moments.float().chunk(2, dim=1)
    # Drawn where the generator lives: a seeded CPU generator gives the same draws on
    # any device.
    where = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=where).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise
