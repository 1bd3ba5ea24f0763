"""Bottlenecks: what sits between encoder and decoder and defines the model kind.

A bottleneck maps encoder features to the latent the decoder reads and reports its raw
loss terms (weighted later by `compute_loss`) and detached statistics. `ae` is the
identity, `vae` the diagonal Gaussian; the quantisers (`vq.py`, `fsq.py`, `simvq.py`,
`rvq.py`) share `Quantizer`.

A bottleneck is also what the rest of the pipeline asks about the model instead of
branching on names: its kind, its code alphabet, whether it has a prior, and, from the
`stats` of a forward pass, the per-image rate, the code indices, the KL and the scalar
statistics worth logging. The base class gives the answers of a continuous latent.
What `pipeline encode` stores (`encode_latents`: the latent, the VAE's moments, the
codes) and how the decoder reads it back (`decoder_input`) are the bottleneck's too.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..utils import PipelineError
from .registry import get_quantizer, register_model
from .usage import USAGE_STATS


class BottleneckOutput(NamedTuple):
    z: Tensor                 # the latent handed to the decoder
    terms: dict[str, Tensor]  # raw scalar loss terms
    stats: dict[str, Tensor]  # detached diagnostics


class Bottleneck(nn.Module):
    """Base class. Subclasses set the channel counts and implement `forward`."""

    kind: str                               # registry name of the model kind (--model)
    quantizer_name: str | None = None       # registry name of the quantiser (--model.quantizer)
    in_channels: int                        # channels the encoder must produce
    latent_channels: int                    # channels of the latent `encode` returns
    bits_per_position: float | None = None  # information per latent position (quantisers)
    num_codes: int | None = None            # code alphabet of one latent position (quantisers)
    has_prior: bool = False                 # sample_prior() works
    latent_kind: str = "latent"             # what encode_latents gives: latent | moments | codes
    code_stages: int = 1                    # codes per latent position (RVQ: its stages)

    def encode(self, h: Tensor) -> Tensor:
        return self(h).z

    def encode_latents(self, h: Tensor) -> Tensor:
        """What `pipeline encode` stores for encoder features h (eval mode): the latent."""
        return self(h).z

    def decoder_input(self, latents: Tensor) -> Tensor:
        """The decoder's input for stored latents: decoding it gives the model's own
        reconstruction, as `forward` would."""
        return latents

    def rate_bits(self, stats: dict[str, Tensor]) -> Tensor | None:
        """Per-image rate in bits (B,); None for a latent without a finite rate."""
        return None

    def code_indices(self, stats: dict[str, Tensor]) -> Tensor | None:
        """The code indices of the batch (B×h×w); None for a continuous latent."""
        return None

    def kl_per_image(self, stats: dict[str, Tensor]) -> Tensor | None:
        """KL(q(z|x) || prior) in nats per image (B,); None without a posterior."""
        return None

    def logged_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached scalar statistics worth logging, under their logged names."""
        return {}

    def diffusers_codebook(self) -> Tensor | None:
        """K×D codes a plain Euclidean nearest-code lookup (diffusers' VectorQuantizer)
        must hold to quantise as this bottleneck does; None when it cannot (no codebook)."""
        return None

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None,
                     device: torch.device) -> Tensor:
        raise PipelineError(f"{type(self).__name__} has no prior to sample from; "
                            f"only --model vae supports sample()")


class IdentityBottleneck(Bottleneck):
    """The plain autoencoder: the encoder's output is the latent."""

    kind = "ae"

    def __init__(self, channels: int):
        super().__init__()
        self.in_channels = self.latent_channels = channels

    def forward(self, h: Tensor) -> BottleneckOutput:
        return BottleneckOutput(h, {}, {})


class GaussianBottleneck(Bottleneck):
    """Diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) with a N(0, I) prior.

    The encoder predicts 2C channels (mean, log-variance). Training uses the
    reparameterised sample, evaluation the mean, so validation numbers are deterministic.
    """

    kind = "vae"
    has_prior = True
    latent_kind = "moments"

    def __init__(self, channels: int, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.in_channels = 2 * channels
        self.latent_channels = channels
        # Clamping keeps exp(logvar) finite early in training, when the encoder is random.
        self.logvar_min, self.logvar_max = logvar_clamp

    def posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # float32: exp/log of bf16 values loses most of the KL's precision.
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(self.logvar_min, self.logvar_max)

    def encode(self, h: Tensor) -> Tensor:
        mean, logvar = self.posterior(h)
        z = self._sample(mean, logvar) if self.training else mean
        return z.to(h.dtype)

    def encode_latents(self, h: Tensor) -> Tensor:
        """The posterior's moments cat(mean, logvar), B×2C×h×w float32: a later stage can
        draw a fresh sample each epoch, as latent-diffusion trainers do."""
        return torch.cat(self.posterior(h), dim=1)

    def decoder_input(self, latents: Tensor) -> Tensor:
        """The mean half of the moments: what the decoder reads in eval mode."""
        return latents[:, :self.latent_channels]

    def forward(self, h: Tensor) -> BottleneckOutput:
        mean, logvar = self.posterior(h)
        z = self._sample(mean, logvar) if self.training else mean
        kl_per_image = gaussian_kl(mean, logvar)
        return BottleneckOutput(z.to(h.dtype), {"kl": kl_per_image.mean()},
                                {"kl_per_image": kl_per_image.detach()})

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None,
                     device: torch.device) -> Tensor:
        # Drawn where the generator lives, so a seeded CPU generator gives the same
        # samples whichever device the model is on.
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=where).to(device)

    def kl_per_image(self, stats: dict[str, Tensor]) -> Tensor:
        return stats["kl_per_image"]

    def rate_bits(self, stats: dict[str, Tensor]) -> Tensor:
        """The KL in bits: the rate term of the ELBO (float64, as evaluation sums it)."""
        return stats["kl_per_image"].double() / math.log(2)

    @staticmethod
    def _sample(mean: Tensor, logvar: Tensor) -> Tensor:
        # Drawn in logical order, not randn_like's memory order: a channels-last run gets
        # the noise of a contiguous one (the same numbers as before for contiguous runs).
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise


class Quantizer(Bottleneck):
    """A discrete latent: one of `num_codes` codes per latent position (and code stage),
    whose index is in `stats["indices"]` (B×h×w; B×S×h×w for `code_stages` S > 1), with
    the code-usage statistics of `usage.CodeUsage`."""

    kind = "vqvae"
    latent_kind = "codes"
    # Prefix of the logged usage statistics (kept "vq/" for FSQ too: runs compare by it).
    LOGGED_PREFIX = "vq/"

    def code_indices(self, stats: dict[str, Tensor]) -> Tensor:
        return stats["indices"]

    def encode_latents(self, h: Tensor) -> Tensor:
        """The code indices, int64 B×h×w (a quantiser with code_stages S > 1 overrides
        this to give B×S×h×w)."""
        return self.code_indices(self(h).stats)

    def decoder_input(self, latents: Tensor) -> Tensor:
        return self.latent_from_codes(latents)

    def latent_from_codes(self, codes: Tensor) -> Tensor:
        """The decoder's input z (B×D×h×w) for code indices as `encode_latents` gives them."""
        raise NotImplementedError(f"{type(self).__name__} does not map codes back to latents")

    def rate_bits(self, stats: dict[str, Tensor]) -> Tensor:
        """The constant code size: h·w·bits_per_position for every image (float64, so the
        figure is the exact one of `AutoEncoder.bits_per_image`)."""
        indices = stats["indices"]
        bits = indices[0].numel() * self.bits_per_position
        return torch.full((len(indices),), bits, dtype=torch.float64, device=indices.device)

    def logged_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.LOGGED_PREFIX + name: stats[name].detach().float()
                for name in USAGE_STATS if name in stats}


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all latent elements: nats per image."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@register_model("ae")
def build_identity(cfg: ModelConfig) -> Bottleneck:
    return IdentityBottleneck(cfg.latent_channels)


@register_model("vae")
def build_gaussian(cfg: ModelConfig) -> Bottleneck:
    return GaussianBottleneck(cfg.latent_channels, tuple(cfg.logvar_clamp))


@register_model("vqvae")
def build_quantizer(cfg: ModelConfig) -> Bottleneck:
    """`--model vqvae` with `--model.quantizer vq|fsq|simvq|rvq` (a name validate() has
    checked): same interface, so the report can set them side by side at equal bits."""
    return get_quantizer(cfg.quantizer)(cfg)
