"""The `basic` family: the seed notebook's DCGAN-style encoder and decoder, unchanged.

Encoder: per width a Conv2d(4, stride 2, padding 1) + BatchNorm2d + LeakyReLU(0.2), so
the latent side is 64 / 2**len(widths) (4×4 with the seed's four widths). Decoder: the
mirror with ConvTranspose2d(4, 2, 1), BatchNorm2d + LeakyReLU(0.2) after all but the
last, tanh at the end (the output lives in [-1, 1], like the images).

The AE uses exactly these layers, so its numbers compare with the seed's. The VAE and
VQ-VAE need a different channel count at the bottleneck, so a 1×1 conv is appended to
the encoder (512 -> 2C, D or len(fsq_levels)) and prepended to the decoder (-> 512).
"""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .registry import register_arch


def seed_encoder(widths: list[int], in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip([in_channels, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                   nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


def seed_decoder(widths: list[int], out_channels: int = 3) -> nn.Sequential:
    channels = [*widths[::-1], out_channels]
    last = len(widths) - 1
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        layers += [nn.Tanh()] if i == last else [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


@register_arch("basic")
def build_basic(cfg: ModelConfig, encoder_out: int,
                decoder_in: int) -> tuple[nn.Module, nn.Module]:
    widths = list(cfg.widths)
    encoder = seed_encoder(widths, cfg.in_channels)
    decoder = seed_decoder(widths, cfg.in_channels)
    if cfg.model == "ae":
        return encoder, decoder  # the seed exactly; validate() ties latent_channels to it
    encoder.append(nn.Conv2d(widths[-1], encoder_out, 1))
    decoder.insert(0, nn.Conv2d(decoder_in, widths[-1], 1))
    return encoder, decoder
