"""Bottlenecks: what sits between encoder and decoder and defines the model kind.

A bottleneck maps encoder features to the latent the decoder reads and reports its raw
loss terms (weighted later by `compute_loss`) and detached statistics. `ae` is the
identity, `vae` the diagonal Gaussian; the quantisers (`vq.py`, `fsq.py`) follow the same
interface.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..utils import PipelineError
from .registry import register_model


class BottleneckOutput(NamedTuple):
    z: Tensor                 # the latent handed to the decoder
    terms: dict[str, Tensor]  # raw scalar loss terms
    stats: dict[str, Tensor]  # detached diagnostics


class Bottleneck(nn.Module):
    """Base class. Subclasses set the channel counts and implement `forward`."""

    in_channels: int                        # channels the encoder must produce
    latent_channels: int                    # channels of the latent `encode` returns
    bits_per_position: float | None = None  # information per latent position (quantisers)

    def encode(self, h: Tensor) -> Tensor:
        return self(h).z

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None,
                     device: torch.device) -> Tensor:
        raise PipelineError(f"{type(self).__name__} has no prior to sample from; "
                            f"only --model vae supports sample()")


class IdentityBottleneck(Bottleneck):
    """The plain autoencoder: the encoder's output is the latent."""

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

    @staticmethod
    def _sample(mean: Tensor, logvar: Tensor) -> Tensor:
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all latent elements: nats per image."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@register_model("ae")
def build_identity(cfg: ModelConfig) -> Bottleneck:
    return IdentityBottleneck(cfg.latent_channels)


@register_model("vae")
def build_gaussian(cfg: ModelConfig) -> Bottleneck:
    return GaussianBottleneck(cfg.latent_channels, tuple(cfg.logvar_clamp))
