"""`AutoEncoder`: encoder -> bottleneck -> decoder, the one model class of the package."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .bottleneck import Bottleneck


class ModelOutput(NamedTuple):
    recon: Tensor             # B×3×H×W, same range as the input ([-1, 1])
    terms: dict[str, Tensor]  # raw bottleneck loss terms: kl | commitment, codebook
    stats: dict[str, Tensor]  # detached: indices, kl_per_image, usage, perplexity, ...


class AutoEncoder(nn.Module):
    """Images in [-1, 1] -> latent -> reconstruction.

    The family (`--arch`) supplies encoder and decoder, the bottleneck (`--model`)
    decides what the latent is and which loss terms come with it. What callers need to
    know about the latent (kind, code alphabet, rate, logged statistics) they ask the
    model, which asks its bottleneck: no caller branches on model names.
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module, bottleneck: Bottleneck,
                 decoder: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder

    # ------------------------------------------------------------ what the latent is

    @property
    def kind(self) -> str:
        """Registry name of the model kind: "ae" | "vae" | "vqvae"."""
        return self.bottleneck.kind

    @property
    def quantizer_name(self) -> str | None:
        """"vq" | "fsq" | "simvq" | "rvq" for a VQ-VAE, None otherwise."""
        return self.bottleneck.quantizer_name

    @property
    def num_codes(self) -> int | None:
        """Codes one latent position can take (K; the product of the FSQ levels); None
        for a continuous latent."""
        return self.bottleneck.num_codes

    @property
    def has_prior(self) -> bool:
        """Whether `sample()` works (the VAE)."""
        return self.bottleneck.has_prior

    @property
    def latent_kind(self) -> str:
        """What `encode_latents` gives: "latent" (AE), "moments" (VAE), "codes" (quantisers)."""
        return self.bottleneck.latent_kind

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latent that `encode` returns and `decode` accepts."""
        side = self.config.latent_side
        return (self.bottleneck.latent_channels, side, side)

    @property
    def bits_per_image(self) -> float | None:
        """Size of the discrete code of one image (VQ: h·w·log2 K); None for AE/VAE."""
        bits = self.bottleneck.bits_per_position
        _, height, width = self.latent_shape
        return None if bits is None else height * width * bits

    # ------------------------------------------------------------ from a forward's stats

    def rate_bits(self, stats: dict[str, Tensor]) -> Tensor | None:
        """Per-image rate in bits (B,): KL / ln 2 for the VAE, the constant code size for
        VQ/FSQ, None for the AE. `stats` is `ModelOutput.stats`."""
        return self.bottleneck.rate_bits(stats)

    def code_indices(self, stats: dict[str, Tensor]) -> Tensor | None:
        """The batch's code indices (B×h×w, int64) or None for a continuous latent."""
        return self.bottleneck.code_indices(stats)

    def kl_per_image(self, stats: dict[str, Tensor]) -> Tensor | None:
        """The VAE's KL in nats per image (B,), else None."""
        return self.bottleneck.kl_per_image(stats)

    def logged_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached float scalars worth logging, keyed by their logged names
        ("vq/usage", "vq/perplexity", ... for VQ/FSQ; nothing for AE/VAE)."""
        return self.bottleneck.logged_stats(stats)

    # ------------------------------------------------------------ the network

    def forward(self, x: Tensor) -> ModelOutput:
        z, terms, stats = self.bottleneck(self.encoder(x))
        return ModelOutput(self.decoder(z), terms, stats)

    def encode(self, x: Tensor) -> Tensor:
        """AE: z; VAE: the mean in eval mode, a sample in train mode; VQ/FSQ: the codes."""
        return self.bottleneck.encode(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def encode_latents(self, x: Tensor) -> Tensor:
        """What `pipeline encode` stores (call in eval mode): AE z (B×C×h×w); VAE the
        posterior's cat(mean, logvar) (B×2C×h×w, float32); quantisers the code indices
        (int64 B×h×w, or B×S×h×w for S code stages)."""
        return self.bottleneck.encode_latents(self.encoder(x))

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from stored latents: the model's own reconstructions (the
        VAE decodes the mean half of its moments). Float latents of another precision
        (the float16 of latent shards) are cast to the decoder's."""
        z = self.bottleneck.decoder_input(latents)
        if z.is_floating_point():
            z = z.to(next(self.decoder.parameters()).dtype)
        return self.decoder(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode n draws from the prior (VAE only). Call in eval mode: BatchNorm layers
        in train mode would normalise the samples by their own statistics."""
        device = next(self.parameters()).device
        z = self.bottleneck.sample_prior((n, *self.latent_shape), generator, device)
        return self.decode(z)
