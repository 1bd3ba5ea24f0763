"""Tiny model configs for tests, and the model cases the registry offers.

One factory for every test that builds a network (models, checkpoints, evaluation): tiny
widths, so that any model runs forward and backward in well under a second. `model_cases`
enumerates what the registry can build, so a newly registered model, family or quantiser
is tested without touching the tests (as timm's tests walk `list_models()`).
"""
from __future__ import annotations

from pipeline.config import ModelConfig, weight_fields
from pipeline.models import list_archs, list_kinds, list_quantizers

TINY_FIELDS = dict(widths=[16, 32, 64, 128], channels=16, channel_mult=[1, 2, 2],
                   num_res_blocks=1, num_groups=8, codebook_size=32, code_dim=8,
                   fsq_levels=[8, 5, 5, 5], usage_window=4)
TINY_LATENT_CHANNELS = 8  # of every latent but the basic AE's, which is its last width


def tiny_model_config(model: str = "ae", arch: str = "basic", quantizer: str = "vq",
                      **overrides) -> ModelConfig:
    """A small `ModelConfig` of the given kind; `overrides` replace any field. The basic
    AE's latent follows its last width unless `latent_channels` is given."""
    fields = {**TINY_FIELDS, "model": model, "arch": arch, "quantizer": quantizer,
              **overrides}
    if "latent_channels" not in overrides:
        basic_ae = (model, arch) == ("ae", "basic")
        fields["latent_channels"] = fields["widths"][-1] if basic_ae else TINY_LATENT_CHANNELS
    return ModelConfig(**fields)


def takes_quantizer(model: str) -> bool:
    """Whether `--model.quantizer` shapes this kind of model (the VQ-VAE)."""
    return "quantizer" in weight_fields(ModelConfig(model=model))


def model_cases() -> list[tuple[str, str, str]]:
    """(model, arch, quantizer) of every buildable combination; kinds without a quantiser
    appear once, with the default quantizer name (which they ignore)."""
    default = ModelConfig().quantizer
    return [(model, arch, quantizer) for model in list_kinds() for arch in list_archs()
            for quantizer in (list_quantizers() if takes_quantizer(model) else [default])]


def case_id(case: tuple[str, str, str]) -> str:
    model, arch, quantizer = case
    return f"{model}-{arch}" + (f"-{quantizer}" if takes_quantizer(model) else "")
