"""What `pipeline encode` stores per sample, and the latent statistics of a split.

`plan_latents` asks the model what its latent is (`latent_kind`, `latent_shape`,
`num_codes`, `bottleneck.code_stages`) and decides the member, shape and dtype of the
shards: float latents (AE latent, VAE moments / mean / draw) in float16, codes in uint16
when the alphabet fits, else int32. `BatchEncoder` turns a batch of images into those
arrays plus the values the statistics are taken over (the latent; for a VAE always the
posterior mean), which `LatentSums` keeps as float64 sums per channel: sum, sum of
squares, count. A split's figures come from its shards' sums, added exactly
(`math.fsum`), so they depend neither on which process encoded which shard nor on a
resume.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import LATENT_MEMBERS, normalize
from ..utils import PipelineError

FLIP_SUFFIX = "+flip"  # marks the mirrored image's key; `+` is never in a prepare key
FLOAT16_MAX = float(np.finfo(np.float16).max)
UINT16_CODES = 1 << 16


@dataclass(frozen=True)
class LatentPlan:
    """What every sample of the output holds, and what its statistics are taken over."""
    mode: str                   # latent | moments | mean | sample | codes
    kind: str                   # what the shards hold: latent | moments | codes
    shape: tuple[int, ...]
    dtype: str                  # float16 | uint16 | int32
    stat_channels: int | None   # channels of the statistics; None for codes
    num_codes: int | None
    seed: int = 0

    @property
    def member(self) -> str:
        return LATENT_MEMBERS[self.kind]

    def npy_header(self) -> bytes:
        """np.save's header for one sample: every sample of a split shares it."""
        zeros = np.zeros(self.shape, dtype=self.dtype)
        buffer = io.BytesIO()
        np.save(buffer, zeros, allow_pickle=False)
        return buffer.getvalue()[:-zeros.nbytes or None]

    def manifest_section(self, model) -> dict[str, Any]:
        return {"kind": self.kind, "member": self.member, "shape": list(self.shape),
                "dtype": self.dtype, "mode": self.mode, "model": model.kind,
                "quantizer": model.quantizer_name, "num_codes": self.num_codes,
                "code_stages": model.bottleneck.code_stages,
                "seed": self.seed if self.mode == "sample" else None,
                "statistics_of": STATISTICS_OF[self.mode]}


STATISTICS_OF = {"latent": "the latent", "moments": "the posterior mean",
                 "mean": "the posterior mean", "sample": "the posterior mean",
                 "codes": None}


def plan_latents(model, mode: str, seed: int = 0) -> LatentPlan:
    """The stored latent of `model` for `--latent mode`; a PipelineError for a mode that
    does not apply to the model."""
    channels, height, width = model.latent_shape
    kind = model.latent_kind
    if mode != "auto" and kind != "moments":
        raise PipelineError(f"--latent {mode} applies to a VAE (moments, mean or a draw of "
                            f"its posterior); this checkpoint is a {model.kind}: leave "
                            f"--latent at auto")
    if kind == "codes":
        stages = model.bottleneck.code_stages
        shape = (height, width) if stages == 1 else (stages, height, width)
        dtype = "uint16" if model.num_codes <= UINT16_CODES else "int32"
        return LatentPlan("codes", "codes", shape, dtype, None, model.num_codes)
    if kind == "latent":
        return LatentPlan("latent", "latent", (channels, height, width), "float16", channels,
                          None)
    if kind != "moments":
        raise PipelineError(f"the checkpoint's latent kind {kind!r} is not one `pipeline "
                            f"encode` knows (latent, moments, codes)")
    if mode in ("auto", "moments"):
        return LatentPlan("moments", "moments", (2 * channels, height, width), "float16",
                          channels, None)
    return LatentPlan(mode, "latent", (channels, height, width), "float16", channels, None,
                      seed)


def sample_seed(seed: int, key: str) -> int:
    """The noise seed of one sample's draw: its key and --seed alone, so the draw is the
    same whichever process, batch or resume encodes it."""
    digest = hashlib.sha256(f"{seed}/{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchEncoder:
    """Images (B x H x W x 3 uint8) -> the stored arrays (B x shape) and the values their
    statistics are taken over (B x C x h x w, float32, or None for codes)."""

    def __init__(self, model, plan: LatentPlan, device: torch.device):
        self.model, self.plan, self.device = model, plan, device

    @torch.inference_mode()
    def encode(self, images: np.ndarray, keys: list[str], mirrored: bool = False
               ) -> tuple[np.ndarray, Tensor | None]:
        """`mirrored`: encode the images flipped left to right (`keys` are theirs)."""
        x = normalize(torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2))
        if mirrored:
            x = x.flip(3)
        latents = self.model.encode_latents(x)
        plan = self.plan
        if plan.kind == "codes":
            return self._codes(latents, keys), None
        latents = latents.float()
        mean = latents[:, :plan.stat_channels]
        if plan.mode == "mean":
            latents = mean
        elif plan.mode == "sample":
            latents = mean + torch.exp(0.5 * latents[:, plan.stat_channels:]) * self._noise(keys)
        return self._float16(latents, keys), mean

    def _noise(self, keys: list[str]) -> Tensor:
        shape = self.plan.shape
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(
            sample_seed(self.plan.seed, key))) for key in keys]
        return torch.stack(draws).to(self.device)

    def _check_shape(self, latents: Tensor) -> None:
        if tuple(latents.shape[1:]) != self.plan.shape:
            raise PipelineError(f"the model's encode_latents gave {tuple(latents.shape[1:])} "
                                f"per image, but its latent should be {self.plan.shape}: the "
                                f"bottleneck's latent contract is broken (a bug; report it)")

    def _float16(self, latents: Tensor, keys: list[str]) -> np.ndarray:
        self._check_shape(latents)
        finite = torch.isfinite(latents).flatten(1).all(1) & (
            latents.abs().flatten(1).amax(1) <= FLOAT16_MAX)
        if not bool(finite.all()):
            key = keys[int((~finite).nonzero()[0])]
            raise PipelineError(f"sample {key}: its latent is not finite in float16 (NaN, "
                                f"inf or beyond +-{FLOAT16_MAX:g}): the checkpoint's encoder "
                                f"diverged, or its latents need rescaling before storage")
        return latents.to(torch.float16).cpu().numpy()

    def _codes(self, codes: Tensor, keys: list[str]) -> np.ndarray:
        self._check_shape(codes)
        bad = ((codes < 0) | (codes >= self.plan.num_codes)).flatten(1).any(1)
        if bool(bad.any()):
            key = keys[int(bad.nonzero()[0])]
            raise PipelineError(f"sample {key}: a code index outside [0, {self.plan.num_codes})"
                                f": the quantiser's code_indices are broken (a bug; report it)")
        return codes.to(torch.int32).cpu().numpy().astype(self.plan.dtype, copy=False)


class LatentSums:
    """float64 sum, sum of squares and count per channel of B x C x h x w values."""

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, values: Tensor) -> None:
        v = values.double()
        self.sum += v.sum((0, 2, 3))
        self.sum_sq += (v * v).sum((0, 2, 3))
        self.count += v[:, 0].numel()

    def to_record(self) -> dict[str, list[float]]:
        return {"sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist(),
                "count": self.count.tolist()}


def latent_statistics(partials: list[dict[str, list[float]]]) -> dict[str, Any] | None:
    """Per-channel mean and std and the global ones from per-shard sums, in float64;
    the sums are exactly rounded (fsum), so their order does not matter. None when
    nothing was summed."""
    if not partials:
        return None
    total = {name: [math.fsum(p[name][c] for p in partials)
                    for c in range(len(partials[0][name]))]
             for name in ("sum", "sum_sq", "count")}
    count, whole, whole_sq = (math.fsum(total[name]) for name in ("count", "sum", "sum_sq"))
    if count == 0:
        return None
    means = [s / n if n else None for s, n in zip(total["sum"], total["count"])]
    stds = [_std(q, s, n) for s, q, n in zip(total["sum"], total["sum_sq"], total["count"])]
    return {"channel_mean": means, "channel_std": stds, "mean": whole / count,
            "std": _std(whole_sq, whole, count), "count": int(count)}


def _std(sum_sq: float, total: float, count: float) -> float | None:
    """Population std from sums; cancellation cannot make the variance negative here."""
    if not count:
        return None
    return math.sqrt(max(sum_sq / count - (total / count) ** 2, 0.0))
