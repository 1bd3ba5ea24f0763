"""The model registry: `--arch` picks an encoder/decoder family, `--model` a bottleneck,
`--model.quantizer` the quantiser of a VQ-VAE.

Composing them keeps every combination buildable from small tables instead of one class
per combination. Families, bottlenecks and quantisers register themselves when their
module is imported (`pipeline.models.__init__` imports them all). A name must first be
declared, with the config components the part reads, in the torch-free catalogue
`pipeline.config.model` (`ARCH_PARTS`, `MODEL_PARTS`, `QUANTIZER_PARTS`): config
validation takes the valid names from there without importing torch, and registering an
undeclared name fails at import, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from ..config import ARCH_PARTS, MODEL_PARTS, QUANTIZER_PARTS, ModelConfig
from ..utils import PipelineError


class FamilyBuilder(Protocol):
    def __call__(self, cfg: ModelConfig, encoder_out: int,
                 decoder_in: int) -> tuple[nn.Module, nn.Module]:
        """Return (encoder: image -> encoder_out channels, decoder: decoder_in -> image)."""


BottleneckBuilder = Callable[[ModelConfig], nn.Module]

_FAMILIES: dict[str, FamilyBuilder] = {}
_BOTTLENECKS: dict[str, BottleneckBuilder] = {}
_QUANTIZERS: dict[str, BottleneckBuilder] = {}


def _registrar(table: dict, declared: dict, catalogue: str, option: str, name: str):
    if name not in declared:
        raise ValueError(f"{option} {name!r} is not declared: add it, with the config "
                         f"components it reads, to {catalogue} in pipeline/config/model.py")

    def decorate(builder):
        table[name] = builder
        return builder
    return decorate


def register_arch(name: str) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: make an encoder/decoder family available as `--arch name`."""
    return _registrar(_FAMILIES, ARCH_PARTS, "ARCH_PARTS", "--arch", name)


def register_model(name: str) -> Callable[[BottleneckBuilder], BottleneckBuilder]:
    """Decorator: make a bottleneck (the model kind) available as `--model name`."""
    return _registrar(_BOTTLENECKS, MODEL_PARTS, "MODEL_PARTS", "--model", name)


def register_quantizer(name: str) -> Callable[[BottleneckBuilder], BottleneckBuilder]:
    """Decorator: make a quantiser available as `--model vqvae --model.quantizer name`."""
    return _registrar(_QUANTIZERS, QUANTIZER_PARTS, "QUANTIZER_PARTS", "--model.quantizer",
                      name)


def get_family(name: str) -> FamilyBuilder:
    return _lookup(_FAMILIES, name, "--arch")


def get_bottleneck(name: str) -> BottleneckBuilder:
    return _lookup(_BOTTLENECKS, name, "--model")


def get_quantizer(name: str) -> BottleneckBuilder:
    return _lookup(_QUANTIZERS, name, "--model.quantizer")


def list_models() -> list[str]:
    """Every buildable combination as 'model-arch', e.g. 'vqvae-resnet'."""
    return [f"{m}-{a}" for m in sorted(_BOTTLENECKS) for a in sorted(_FAMILIES)]


def list_archs() -> list[str]:
    """The registered encoder/decoder families (`--arch`)."""
    return sorted(_FAMILIES)


def list_quantizers() -> list[str]:
    """The registered quantisers of `--model vqvae` (`--model.quantizer`)."""
    return sorted(_QUANTIZERS)


def list_kinds() -> list[str]:
    """The registered bottlenecks (`--model`)."""
    return sorted(_BOTTLENECKS)


def _lookup(table: dict, name: str, option: str):
    if name not in table:
        raise PipelineError(f"unknown {option} {name!r}; choose one of {', '.join(sorted(table))}")
    return table[name]
