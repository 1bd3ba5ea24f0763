"""This package's models as diffusers models: `AutoencoderKL` (VAE) and `VQModel` (VQ).

The `resnet` family has latent diffusion's layout (see `resnet.py`), so the conversion is
a renaming of parameters, one table (`MODULE_NAMES`, then `LAYER_NAMES` inside a block),
plus what diffusers holds and this package does not: `VQModel`'s 1×1 `quant_conv` /
`post_quant_conv` (written as identities) and its codebook `quantize.embedding.weight`
(the bottleneck's `diffusers_codebook()`: the codes of a plain Euclidean lookup).

What diffusers cannot express is refused by `check_exportable` with what can be exported:
the seed `basic` family, the plain AE (no diffusers class), quantisers without a plain
codebook (FSQ, l2-normalised codes, RVQ), a VAE whose log-variance clamp is not diffusers'
(-30, 20), GroupNorms with different group counts (diffusers has one `norm_num_groups`).

diffusers is an optional dependency (`pip install 'ae-pipeline[diffusers]'`), imported only
when a diffusers model is built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..utils import PipelineError
from .autoencoder import AutoEncoder

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
DIFFUSERS_LOGVAR_CLAMP = (-30.0, 20.0)

# Module paths, this package's -> diffusers'. `{part}` is encoder or decoder, `{i}` a level
# and `{j}` a block index (levels in the order data flows: the decoder's level 0 is its
# lowest resolution, as diffusers' up_blocks[0]). The rest of a parameter name (the layer
# inside a block, then weight/bias) follows, renamed by LAYER_NAMES where they differ.
MODULE_NAMES: tuple[tuple[str, str], ...] = (
    ("{part}.conv_in", "{part}.conv_in"),
    ("encoder.levels.{i}.blocks.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    ("encoder.levels.{i}.resample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.levels.{i}.blocks.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
    ("decoder.levels.{i}.resample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv"),
    ("{part}.mid.block1", "{part}.mid_block.resnets.0"),
    ("{part}.mid.attention", "{part}.mid_block.attentions.0"),
    ("{part}.mid.block2", "{part}.mid_block.resnets.1"),
    ("{part}.norm_out", "{part}.conv_norm_out"),
    ("{part}.conv_out", "{part}.conv_out"),
)
# Layers inside a residual block or the attention whose names differ; the others (norm1,
# conv1, norm2, conv2 of a block; to_q, to_k, to_v of the attention) are the same.
LAYER_NAMES = {"skip": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0"}

_FIELDS = {"part": r"(?P<part>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}


def _compiled(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape(f"{{{name}}}"), group)
    return re.compile(pattern + r"\.(?P<rest>.+)")


_RULES = [(_compiled(ours), theirs) for ours, theirs in MODULE_NAMES]


def diffusers_name(name: str) -> str:
    """The diffusers name of one encoder/decoder parameter of the resnet family:
    `encoder.levels.0.blocks.1.skip.weight` ->
    `encoder.down_blocks.0.resnets.1.conv_shortcut.weight`."""
    for pattern, template in _RULES:
        match = pattern.fullmatch(name)
        if match:
            layer, _, leaf = match["rest"].partition(".")
            rest = f"{LAYER_NAMES.get(layer, layer)}.{leaf}" if leaf else layer
            return template.format(**{k: v for k, v in match.groupdict().items()
                                      if k != "rest"}) + "." + rest
    raise PipelineError(f"parameter {name!r} has no diffusers counterpart in the conversion "
                        f"table (pipeline/models/diffusers.py MODULE_NAMES)")


# ---------------------------------------------------------------- what can be exported

@dataclass(frozen=True)
class Target:
    """How one model kind becomes a diffusers model."""
    class_name: str                                       # diffusers class
    config: Callable[[AutoEncoder], dict[str, Any]]       # kind-specific config keys
    extra_tensors: Callable[[AutoEncoder], dict[str, Tensor]]
    latent: Callable[[AutoEncoder, Tensor], Tensor]       # what diffusers' encode gives
    describes: str                                        # the latent, in words


def _kl_config(model: AutoEncoder) -> dict[str, Any]:
    return {"latent_channels": model.bottleneck.latent_channels,
            "use_quant_conv": False, "use_post_quant_conv": False}


def _vq_config(model: AutoEncoder) -> dict[str, Any]:
    codebook = model.bottleneck.diffusers_codebook()
    return {"latent_channels": codebook.shape[1], "vq_embed_dim": codebook.shape[1],
            "num_vq_embeddings": codebook.shape[0]}


def _identity_conv(channels: int) -> dict[str, Tensor]:
    return {"weight": torch.eye(channels).reshape(channels, channels, 1, 1),
            "bias": torch.zeros(channels)}


def _vq_tensors(model: AutoEncoder) -> dict[str, Tensor]:
    codebook = model.bottleneck.diffusers_codebook().float()
    channels = codebook.shape[1]
    tensors = {"quantize.embedding.weight": codebook}
    for conv in ("quant_conv", "post_quant_conv"):
        tensors.update({f"{conv}.{k}": v for k, v in _identity_conv(channels).items()})
    return tensors


def _posterior_mean(model: AutoEncoder, x: Tensor) -> Tensor:
    return model.bottleneck.posterior(model.encoder(x))[0]


def _encoder_output(model: AutoEncoder, x: Tensor) -> Tensor:
    return model.encoder(x).float()


TARGETS = {
    "vae": Target("AutoencoderKL", _kl_config, lambda model: {}, _posterior_mean,
                  "the posterior mean (AutoencoderKL.encode(x).latent_dist.mean)"),
    "vqvae": Target("VQModel", _vq_config, _vq_tensors, _encoder_output,
                    "the encoder output before quantisation (VQModel.encode(x).latents)"),
}
EXPORTABLE = ("--arch resnet with --model vae (AutoencoderKL), or --model vqvae with a "
              "quantiser of one plain codebook (--model.quantizer vq without "
              "l2_normalize_codes, or simvq) (VQModel)")


def check_exportable(model: AutoEncoder) -> Target:
    """The diffusers target of `model`, or a PipelineError saying why it has none and what
    can be exported."""
    cfg = model.config
    if cfg.arch != "resnet":
        raise PipelineError(f"--arch {cfg.arch} cannot be exported to diffusers: only the "
                            f"resnet family has the layout of diffusers' Encoder/Decoder. "
                            f"Exportable: {EXPORTABLE}")
    target = TARGETS.get(model.kind)
    if target is None:
        raise PipelineError(f"--model {model.kind} has no diffusers class (AutoencoderKL needs "
                            f"a Gaussian posterior, VQModel a codebook). Exportable: "
                            f"{EXPORTABLE}")
    if target is TARGETS["vqvae"]:
        _check_codebook(model)
    if target is TARGETS["vae"] and tuple(cfg.logvar_clamp) != DIFFUSERS_LOGVAR_CLAMP:
        raise PipelineError(f"--model.logvar_clamp {list(cfg.logvar_clamp)}: diffusers clamps "
                            f"the log-variance to {list(DIFFUSERS_LOGVAR_CLAMP)}, so its "
                            f"posterior would differ; train with the default clamp")
    norm_num_groups(model)
    return target


def _check_codebook(model: AutoEncoder) -> None:
    neck = model.bottleneck
    codebook = neck.diffusers_codebook()
    if codebook is None:
        raise PipelineError(f"--model.quantizer {neck.quantizer_name} cannot be expressed by "
                            f"diffusers' VectorQuantizer (a plain Euclidean nearest code in "
                            f"one codebook; FSQ's grid, l2-normalised codes and RVQ's stages "
                            f"are not). Exportable: {EXPORTABLE}")
    if not neck.in_channels == neck.latent_channels == codebook.shape[1]:
        raise PipelineError(f"--model.quantizer {neck.quantizer_name}: the encoder gives "
                            f"{neck.in_channels} channels, the codes have {codebook.shape[1]} "
                            f"and the decoder reads {neck.latent_channels}; diffusers' VQModel "
                            f"needs them equal")


def norm_num_groups(model: AutoEncoder) -> int:
    """diffusers' single `norm_num_groups`: the group count every GroupNorm of the model
    has (the family clips `num_groups` per width, diffusers does not)."""
    counts = sorted({m.num_groups for part in (model.encoder, model.decoder)
                     for m in part.modules() if isinstance(m, nn.GroupNorm)})
    if len(counts) != 1:
        widths = [model.config.channels * m for m in model.config.channel_mult]
        raise PipelineError(f"the model's GroupNorms have {', '.join(map(str, counts))} groups "
                            f"(--model.num_groups {model.config.num_groups} clipped to divide "
                            f"the widths {widths}); diffusers uses one norm_num_groups: train "
                            f"with a --model.num_groups that divides every width")
    return counts[0]


# ---------------------------------------------------------------- the conversion

def diffusers_config(model: AutoEncoder, scaling_factor: float,
                     shift_factor: float | None = None) -> dict[str, Any]:
    """The `config.json` of the diffusers model (keyword arguments of its class)."""
    target = check_exportable(model)
    cfg = model.config
    levels = len(cfg.channel_mult)
    config = {
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "norm_num_groups": norm_num_groups(model), "sample_size": cfg.image_size,
        "mid_block_add_attention": bool(cfg.attention),
        "scaling_factor": float(scaling_factor),
        **target.config(model),
    }
    if target.class_name == "AutoencoderKL":
        config["shift_factor"] = None if shift_factor is None else float(shift_factor)
    return config


def diffusers_state_dict(model: AutoEncoder) -> dict[str, Tensor]:
    """Every diffusers parameter of the export, float32, contiguous, on the CPU."""
    target = check_exportable(model)
    state = {}
    for part in ("encoder", "decoder"):
        for name, tensor in getattr(model, part).state_dict().items():
            state[diffusers_name(f"{part}.{name}")] = tensor
    state.update(target.extra_tensors(model))
    return {name: t.detach().float().cpu().contiguous() for name, t in state.items()}


def to_diffusers(model: AutoEncoder, scaling_factor: float,
                 shift_factor: float | None = None) -> nn.Module:
    """The diffusers model (eval mode, CPU) computing what `model` computes."""
    target = check_exportable(model)
    cls = _diffusers_class(target.class_name)
    exported = cls(**diffusers_config(model, scaling_factor, shift_factor))
    state = diffusers_state_dict(model)
    missing, unexpected = exported.load_state_dict(state, strict=False)
    if missing or unexpected:  # the table and diffusers' layout disagree: a bug here
        raise PipelineError(f"conversion to {target.class_name} left missing keys "
                            f"{sorted(missing)[:5]} and unexpected keys {sorted(unexpected)[:5]}")
    return exported.eval()


def require_diffusers() -> Any:
    """The diffusers module, or a PipelineError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise PipelineError("the diffusers export needs the diffusers package: pip install "
                            "'ae-pipeline[diffusers]'") from None
    return diffusers


def _diffusers_class(name: str) -> type:
    return getattr(require_diffusers(), name)


def diffusion_latent(model: AutoEncoder, x: Tensor) -> Tensor:
    """The latent the exported model's `encode` gives for images x (float32): what its
    `scaling_factor` scales (the VAE's posterior mean, the VQ encoder's output)."""
    return check_exportable(model).latent(model, x)


@torch.no_grad()
def export_differences(model: AutoEncoder, exported: nn.Module, x: Tensor) -> dict[str, float]:
    """How far the diffusers export is from this package's model on images x (both in
    eval mode, on x's device): the largest differences of the latent `encode` gives (and
    the VAE's log-variance) and of the images decoded from the same latent, each relative
    to max(1, the largest magnitude of ours) (absolute for images in [-1, 1]); for VQ the
    fraction of positions whose nearest code differs (an exact tie can fall either way:
    the two compute the same distances in another order)."""
    model, exported = model.eval(), exported.eval()
    target = check_exportable(model)
    ours = target.latent(model, x)
    if target.class_name == "AutoencoderKL":
        posterior = exported.encode(x).latent_dist
        _, logvar = model.bottleneck.posterior(model.encoder(x))
        return {"latent": _max_abs(posterior.mean, ours),
                "logvar": _max_abs(posterior.logvar, logvar),
                "decoded": _max_abs(exported.decode(ours).sample, model.decode(ours))}
    latents = exported.encode(x).latents
    _, _, (_, _, theirs) = exported.quantize(latents)
    out = model.bottleneck(ours)
    quantized = exported.decode(out.z, force_not_quantize=True).sample
    indices = model.code_indices(out.stats)
    return {"latent": _max_abs(latents, ours),
            "indices_differing": float((theirs.view(-1) != indices.reshape(-1)).float().mean()),
            "decoded": _max_abs(quantized, model.decode(out.z))}


def _max_abs(theirs: Tensor, ours: Tensor) -> float:
    scale = max(1.0, float(ours.float().abs().max()))
    return float((theirs.float() - ours.float()).abs().max()) / scale
