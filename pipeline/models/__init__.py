"""Autoencoders on 64×64 images in [-1, 1]: `--model ae|vae|vqvae` × `--arch basic|resnet`.

Models know tensors only (no shards, trainer or tracker). Typical use::

    model = build_model(cfg.model)
    out = model(x)                                   # ModelOutput(recon, terms, stats)
    loss, parts = compute_loss(out, x, cfg.loss, step)
    save_pretrained(model, run_dir / "model", cfg, step)
    model = from_pretrained(run_dir / "model")       # eval mode
"""
from __future__ import annotations

from ..config import Config, ModelConfig, validate
from . import basic, bottleneck, resnet  # noqa: F401  (register the families and ae/vae)
from .autoencoder import AutoEncoder, ModelOutput
from .bottleneck import Bottleneck
from .export import from_pretrained, read_export_config, save_pretrained
from .fsq import FSQ
from .losses import compute_loss, kl_beta
from .registry import get_bottleneck, get_family, list_models, register_arch, register_model
from .vq import VectorQuantizer

QUANTIZERS = {"vq": VectorQuantizer.from_config, "fsq": FSQ.from_config}


@register_model("vqvae")
def build_quantizer(cfg: ModelConfig) -> Bottleneck:
    """`--model vqvae` with `--model.quantizer vq|fsq` (a name validate() has checked):
    same interface, so the report can set the two side by side at equal bits."""
    return QUANTIZERS[cfg.quantizer](cfg)


def build_model(model_cfg: ModelConfig) -> AutoEncoder:
    """The AutoEncoder described by `model_cfg` (checked first; errors say what to change)."""
    make_bottleneck = get_bottleneck(model_cfg.model)
    make_family = get_family(model_cfg.arch)
    validate(Config(model=model_cfg))
    neck = make_bottleneck(model_cfg)
    encoder, decoder = make_family(model_cfg, neck.in_channels, neck.latent_channels)
    return AutoEncoder(model_cfg, encoder, neck, decoder)


__all__ = ["AutoEncoder", "FSQ", "ModelOutput", "VectorQuantizer", "build_model",
           "compute_loss", "from_pretrained", "kl_beta", "list_models", "read_export_config",
           "register_arch", "register_model", "save_pretrained"]
