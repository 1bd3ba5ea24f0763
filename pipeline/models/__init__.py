"""Autoencoders on 64×64 images in [-1, 1]: `--model ae|vae|vqvae` × `--arch basic|resnet`
(× `--model.quantizer vq|fsq|simvq|rvq` for the VQ-VAE).

Models know tensors only (no shards, trainer or tracker). Callers ask the model what its
latent is (`kind`, `quantizer_name`, `num_codes`, `has_prior`, `bits_per_image`) and,
from a forward pass's stats, `rate_bits`, `code_indices`, `kl_per_image`, `logged_stats`,
rather than branching on names; what `pipeline encode` stores is theirs too
(`latent_kind`, `encode_latents`, `decode_latents`). Typical use::

    model = build_model(cfg.model)
    out = model(x)                                   # ModelOutput(recon, terms, stats)
    loss, parts = compute_loss(out, x, cfg.loss, step)
    save_pretrained(model, run_dir / "model", cfg, step)
    model = from_pretrained(run_dir / "model")       # eval mode
"""
from __future__ import annotations

from types import MappingProxyType

from ..config import Config, ModelConfig, validate
from . import basic, bottleneck, fsq, resnet, rvq, simvq, vq  # noqa: F401 (register them all)
from .autoencoder import AutoEncoder, ModelOutput
from .bottleneck import Bottleneck, Quantizer
from .export import from_pretrained, read_export_config, save_pretrained
from .fsq import FSQ
from .discriminator import PatchDiscriminator, build_discriminator
from .losses import Objective, PerceptualLoss, compute_loss, kl_beta, load_perceptual
from .registry import (_QUANTIZERS, get_bottleneck, get_family, get_quantizer, list_archs,
                       list_kinds, list_models, list_quantizers, register_arch, register_model,
                       register_quantizer)
from .rvq import ResidualQuantizer
from .simvq import SimVQ
from .vq import VectorQuantizer

# Quantiser name -> builder, as registered (read-only; register with @register_quantizer).
QUANTIZERS = MappingProxyType(_QUANTIZERS)


def build_model(model_cfg: ModelConfig) -> AutoEncoder:
    """The AutoEncoder described by `model_cfg` (checked first; errors say what to change)."""
    make_bottleneck = get_bottleneck(model_cfg.model)
    make_family = get_family(model_cfg.arch)
    validate(Config(model=model_cfg))
    neck = make_bottleneck(model_cfg)
    encoder, decoder = make_family(model_cfg, neck.in_channels, neck.latent_channels)
    return AutoEncoder(model_cfg, encoder, neck, decoder)


__all__ = ["AutoEncoder", "Bottleneck", "FSQ", "ModelOutput", "QUANTIZERS", "Quantizer",
           "ResidualQuantizer", "SimVQ",
           "VectorQuantizer", "build_model", "compute_loss", "from_pretrained", "get_quantizer",
           "kl_beta", "list_archs", "list_kinds", "list_models", "list_quantizers",
           "read_export_config", "register_arch", "register_model", "register_quantizer",
           "save_pretrained", "Objective", "PatchDiscriminator", "PerceptualLoss",
           "build_discriminator", "load_perceptual"]
