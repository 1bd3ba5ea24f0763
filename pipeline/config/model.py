"""The model's config: one small class per component, composed into the flat `ModelConfig`.

Each encoder/decoder family (`--arch`), bottleneck (`--model`) and quantiser
(`--model.quantizer`) reads the fields of a few component classes; the catalogue below
(`ARCH_PARTS`, `MODEL_PARTS`, `QUANTIZER_PARTS`) says which, one line per part, and is
where a part's name is declared. The torch-side registry (`pipeline.models.registry`)
refuses to register a name the catalogue does not declare, so names have one source that
config validation can read without torch (`pipeline prepare` imports no torch).

`ModelConfig` inherits every component, so its fields stay flat: `--model.codebook_size`,
the `model:` section of presets and config.yaml, and the `"model"` dict of export
config.json files keep their keys. `weight_fields(cfg)` lists only the fields that define
the weights of the parts `cfg` uses: what resume must compare.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from ..utils import PipelineError
from .fields import list_presets, opt, require_declared


# ---------------------------------------------------------------- components

@require_declared
@dataclass
class BasicFamily:
    widths: list[int] = opt([64, 128, 256, 512],
                            "basic: channels of the stride-2 convs; latent side = 64/2**len",
                            bounds="[1, inf)", nonempty=True)


@require_declared
@dataclass
class ResNetFamily:
    channels: int = opt(64, "resnet: base width; level i has channels * channel_mult[i]",
                        bounds="[1, inf)")
    channel_mult: list[int] = opt([1, 2, 2], "resnet: width multipliers, one per resolution "
                                             "(len = log2(downsample) + 1)",
                                  bounds="[1, inf)", nonempty=True)
    num_res_blocks: int = opt(2, "resnet: residual blocks per resolution (the decoder has "
                                 "one more, as in latent diffusion)", bounds="[1, inf)")
    attention: bool = opt(True, "resnet: self-attention at the lowest resolution")
    num_groups: int = opt(32, "resnet: GroupNorm groups (clipped to divide the width; the "
                              "diffusers export needs one that divides every width)",
                          bounds="[1, inf)")
    downsample: int = opt(4, "resnet: f, the latent side is image_size / f (4, 8 or 16)",
                          bounds="[2, 32]")


@require_declared
@dataclass
class ContinuousLatent:
    latent_channels: int = opt(512, "C of the AE/VAE latent (basic AE: equals widths[-1])",
                               bounds="[1, inf)")


@require_declared
@dataclass
class GaussianPosterior:
    logvar_clamp: tuple[float, float] = opt((-30.0, 20.0), "VAE: log-variance clamp (min max)",
                                            bounds="(-inf, inf)")


@require_declared
@dataclass
class CodebookSize:
    codebook_size: int = opt(512, "vq/simvq/rvq: K, codes in the codebook (of each rvq "
                                  "stage)", bounds="[2, inf)")
    code_dim: int = opt(64, "vq/simvq/rvq: D, dimension of a code", bounds="[1, inf)")


@require_declared
@dataclass
class Codebook(CodebookSize):
    """A codebook of K learnt codes (vq; rvq's vq stages). SimVQ reads the size only."""
    codebook_ema: bool = opt(True, "vq: learn codes by EMA updates (true) or by the codebook "
                                   "loss (false)")
    l2_normalize_codes: bool = opt(False, "vq: l2-normalise codes and encoder outputs")


@require_declared
@dataclass
class CodebookLearning:
    """How the codebook moves during training; the weights' shape does not depend on it."""
    codebook_decay: float = opt(0.99, "vq: EMA decay of the codebook statistics (not the "
                                      "weight EMA: --optim.ema_decay)", bounds="[0, 1)")
    dead_code_threshold: float = opt(1.0, "vq: EMA cluster size under which a code is "
                                          "restarted from encoder outputs", bounds="[0, inf)")


@require_declared
@dataclass
class CodeUsageWindow:
    usage_window: int = opt(100, "vq/fsq: training steps in the code-usage window",
                            bounds="[1, inf)")


@require_declared
@dataclass
class ScalarLevels:
    fsq_levels: list[int] = opt([8, 8, 8, 6, 5], "fsq: levels per latent channel",
                                bounds="[2, inf)", nonempty=True)


@require_declared
@dataclass
class RotationTrick:
    rotation_trick: bool = opt(False, "vq/simvq (and rvq's vq stages): pass the gradient "
                                      "through the code by the rotation trick (Fifty et al. "
                                      "2024) instead of the straight-through estimator")


STAGE_QUANTIZERS = ("vq", "fsq")  # what one stage of rvq may be


@require_declared
@dataclass
class ResidualStages:
    num_quantizers: int = opt(1, "rvq: S, residual stages, each quantising what the ones "
                                 "before left (bits = S x a stage's bits; 1 = one plain "
                                 "stage)", bounds="[1, 32]")
    stage_quantizer: str = opt("vq", "rvq: quantiser of every stage: vq (a codebook per "
                                     "stage) | fsq (fsq_levels, finer per stage)",
                               choices=STAGE_QUANTIZERS)


@require_declared
@dataclass
class QuantizerDropout:
    """Training-time only: how many rvq stages a step uses (the weights do not depend on it)."""
    quantizer_dropout: bool = opt(False, "rvq: each training step keeps only the first n "
                                         "stages, n uniform in [quantizer_dropout_min_stages, "
                                         "S] and the same on every rank (SoundStream)")
    quantizer_dropout_min_stages: int = opt(1, "rvq: the fewest stages quantizer_dropout keeps",
                                            bounds="[1, 32]")


# ---------------------------------------------------------------- the catalogue of parts

@dataclass(frozen=True)
class Part:
    """The config components one part reads: `shapes` define its weights (resume compares
    them), `steers` only how training moves them (they may change on resume)."""
    shapes: tuple[type, ...] = ()
    steers: tuple[type, ...] = ()


QUANTIZER_PARTS = {
    "vq": Part(shapes=(Codebook,), steers=(CodebookLearning, CodeUsageWindow, RotationTrick)),
    "fsq": Part(shapes=(ScalarLevels,), steers=(CodeUsageWindow,)),
    "simvq": Part(shapes=(CodebookSize,), steers=(CodeUsageWindow, RotationTrick)),
    # + the parts of its stage quantiser (`stage_quantizer`, one of STAGE_QUANTIZERS)
    "rvq": Part(shapes=(ResidualStages,), steers=(QuantizerDropout, CodeUsageWindow)),
}
QUANTIZERS = tuple(QUANTIZER_PARTS)


@require_declared
@dataclass
class QuantizerChoice:
    quantizer: str = opt("vq", "vqvae: vq (codebook) | fsq (finite scalar quantisation) | "
                               "simvq (frozen codes, learnt linear map) | rvq (residual stages)",
                         choices=QUANTIZERS)


MODEL_PARTS = {
    "ae": Part(shapes=(ContinuousLatent,)),
    "vae": Part(shapes=(ContinuousLatent, GaussianPosterior)),
    "vqvae": Part(shapes=(QuantizerChoice,)),  # + the parts of the chosen quantiser
}
ARCH_PARTS = {
    "basic": Part(shapes=(BasicFamily,)),
    "resnet": Part(shapes=(ResNetFamily,)),
}
MODELS = tuple(MODEL_PARTS)
ARCHS = tuple(ARCH_PARTS)


@require_declared
@dataclass
class ImageAndKind:
    model: str = opt("ae", "bottleneck: ae | vae | vqvae", choices=MODELS)
    arch: str = opt("basic", "encoder/decoder family: basic (the seed) | resnet", choices=ARCHS)
    image_size: int = opt(64, "image side in pixels (the shards' image_size)",
                          bounds="[8, 1024]")
    in_channels: int = opt(3, "image channels (the shards hold RGB: 3)", bounds="[1, 4]")


# ---------------------------------------------------------------- the flat model config

# Bases in reverse order of their fields: a dataclass lists the fields of its last base
# first. Keys keep the order they had before the split (but for `codebook_decay`, which
# now follows the codebook fields that shape the weights).
@require_declared
@dataclass
class ModelConfig(QuantizerDropout, ResidualStages, RotationTrick, ScalarLevels,
                  CodeUsageWindow, CodebookLearning, Codebook, QuantizerChoice,
                  GaussianPosterior, ContinuousLatent, ResNetFamily, BasicFamily, ImageAndKind):
    """What the network is. Saved with every export; `from_pretrained` rebuilds from it."""

    # Old key -> its current name; both spellings are read everywhere a config is.
    RENAMED: ClassVar[dict[str, str]] = {"ema_decay": "codebook_decay"}

    @property
    def ema_decay(self) -> float:
        """The old name of `codebook_decay` (not the weight EMA: `OptimConfig.ema_decay`)."""
        return self.codebook_decay

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        self.codebook_decay = value

    @property
    def latent_side(self) -> int:
        if self.arch == "basic":
            return self.image_size // 2 ** len(self.widths)
        return self.image_size // self.downsample

    def check(self) -> None:
        """Rules that relate several fields (each field is already within its range)."""
        if self.arch == "basic":
            self._check_basic()
        else:
            self._check_resnet()
        low, high = self.logvar_clamp
        if low >= high:
            raise PipelineError(f"--model.logvar_clamp {list(self.logvar_clamp)}: the minimum "
                                f"must be below the maximum")
        if ResidualStages in (c for part in parts_of(self) for c in part.shapes):
            self._check_residual()

    def _check_residual(self) -> None:
        if self.quantizer_dropout and self.quantizer_dropout_min_stages > self.num_quantizers:
            raise PipelineError(f"--model.quantizer_dropout_min_stages "
                                f"{self.quantizer_dropout_min_stages} exceeds the "
                                f"{self.num_quantizers} stages of --model.num_quantizers")
        if self.stage_quantizer == "vq" and self.l2_normalize_codes:
            # Residuals shrink stage after stage: unit-norm codes cannot follow them.
            raise PipelineError("--model.l2_normalize_codes does not apply to residual stages "
                                "(--model.quantizer rvq); set it to false")

    def _check_basic(self) -> None:
        side = self.image_size / 2 ** len(self.widths)
        if side < 1 or not side.is_integer():
            raise PipelineError(f"--model.widths {self.widths} halves {self.image_size}px "
                                f"{len(self.widths)} times: the latent side would be {side}; "
                                f"use at most {int(math.log2(self.image_size))} widths")
        if self.model == "ae" and self.latent_channels != self.widths[-1]:
            raise PipelineError(f"the basic AE's latent is its last encoder width "
                                f"({self.widths[-1]}); set --model.latent_channels "
                                f"{self.widths[-1]} or change --model.widths")

    def _check_resnet(self) -> None:
        if self.downsample not in (2, 4, 8, 16, 32) or self.image_size % self.downsample:
            raise PipelineError(f"--model.downsample {self.downsample} does not fit "
                                f"{self.image_size}px images; use 4, 8 or 16")
        expected = int(math.log2(self.downsample)) + 1
        if len(self.channel_mult) != expected:
            raise PipelineError(f"--model.channel_mult {self.channel_mult} has "
                                f"{len(self.channel_mult)} levels but downsample "
                                f"{self.downsample} needs {expected} (one per resolution)")


# ---------------------------------------------------------------- questions about a config

def parts_of(cfg: ModelConfig) -> list[Part]:
    """The catalogue entries `cfg` uses: its family, its bottleneck and, for a VQ-VAE, its
    quantiser (unknown names contribute nothing; validation reports them)."""
    parts = [ARCH_PARTS.get(cfg.arch), MODEL_PARTS.get(cfg.model)]
    if parts[1] is not None and QuantizerChoice in parts[1].shapes:
        parts.append(QUANTIZER_PARTS.get(cfg.quantizer))
        if parts[-1] is not None and ResidualStages in parts[-1].shapes:  # rvq's stages
            parts.append(QUANTIZER_PARTS.get(cfg.stage_quantizer))
    return [part for part in parts if part is not None]


def weight_fields(cfg: ModelConfig) -> list[str]:
    """Names of the `ModelConfig` fields that define the weights of the network `cfg`
    describes, in field order: a checkpoint resumes only into the same values of these.
    Fields of parts `cfg` does not use (a codebook size on an AE) and settings that only
    steer training (codebook decay, usage window) are not among them."""
    components = [ImageAndKind] + [c for part in parts_of(cfg) for c in part.shapes]
    names = {f.name for component in components for f in dataclasses.fields(component)}
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name in names]


def preset_for(model: str, arch: str = "basic", prefix: str | None = None) -> str | None:
    """The preset rule of `pipeline train` and `pipeline demo`: `<prefix>-<model>` when a
    prefix is given and that preset ships, else `<model>` for the basic family and
    `<arch>-<model>` for the others; None when no such preset ships."""
    presets = list_presets()
    if prefix and f"{prefix}-{model}" in presets:
        return f"{prefix}-{model}"
    name = model if arch == "basic" else f"{arch}-{model}"
    return name if name in presets else None
