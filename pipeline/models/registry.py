"""The model registry: `--arch` picks an encoder/decoder family, `--model` a bottleneck.

Composing the two keeps every (model, arch) pair buildable from two small tables instead
of one class per pair. Families and bottlenecks register themselves when their module is
imported (`pipeline.models.__init__` imports them all).
"""
from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from ..config import ModelConfig
from ..utils import PipelineError


class FamilyBuilder(Protocol):
    def __call__(self, cfg: ModelConfig, encoder_out: int,
                 decoder_in: int) -> tuple[nn.Module, nn.Module]:
        """Return (encoder: image -> encoder_out channels, decoder: decoder_in -> image)."""


BottleneckBuilder = Callable[[ModelConfig], nn.Module]

_FAMILIES: dict[str, FamilyBuilder] = {}
_BOTTLENECKS: dict[str, BottleneckBuilder] = {}


def register_arch(name: str) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: make an encoder/decoder family available as `--arch name`."""
    def decorate(builder: FamilyBuilder) -> FamilyBuilder:
        _FAMILIES[name] = builder
        return builder
    return decorate


def register_model(name: str) -> Callable[[BottleneckBuilder], BottleneckBuilder]:
    """Decorator: make a bottleneck (the model kind) available as `--model name`."""
    def decorate(builder: BottleneckBuilder) -> BottleneckBuilder:
        _BOTTLENECKS[name] = builder
        return builder
    return decorate


def get_family(name: str) -> FamilyBuilder:
    return _lookup(_FAMILIES, name, "--arch")


def get_bottleneck(name: str) -> BottleneckBuilder:
    return _lookup(_BOTTLENECKS, name, "--model")


def list_models() -> list[str]:
    """Every buildable combination as 'model-arch', e.g. 'vqvae-resnet'."""
    return [f"{m}-{a}" for m in sorted(_BOTTLENECKS) for a in sorted(_FAMILIES)]


def _lookup(table: dict, name: str, option: str):
    if name not in table:
        raise PipelineError(f"unknown {option} {name!r}; choose one of {', '.join(sorted(table))}")
    return table[name]
