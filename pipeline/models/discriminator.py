"""The PatchGAN discriminator of the adversarial loss (`--loss.adversarial_weight > 0`).

The shape is taming-transformers' `NLayerDiscriminator` (after pix2pix): a 4×4 stride-2
conv + LeakyReLU(0.2), `layers - 1` more 4×4 stride-2 convs doubling the width (capped at
8× `channels`) each with a norm and LeakyReLU, one 4×4 stride-1 conv + norm + LeakyReLU,
and a 4×4 stride-1 conv to one logit per patch. Convs start from N(0, 0.02) (DCGAN).

Receptive field. Each logit sees a square of `receptive_field(layers)` pixels: 16 for one
layer, 34 for two, 70 for three (taming's default, made for 256-px images), 142 for four.
At 64×64 taming's three layers would make every one of its 6×6 logits see the whole image
and its zero padding: one global verdict repeated, not a patch discriminator. The default
here is two layers: 34-px patches, about half the image side, judged by 14×14 logits
(taming's 70 px on 256-px images is about a quarter of the side, but one layer, 16 px,
leaves only two hidden convs to judge texture with). `--disc.layers` changes it;
the output side is `image_size / 2**layers - 2`, so 64-px images take at most four.

Norm: GroupNorm by default, not taming's BatchNorm. Under DDP each rank's BatchNorm
normalises by its own batch (and with real and fake images in separate batches, a
BatchNorm discriminator can tell them apart by their batch statistics alone); its running
statistics are rank 0's, broadcast at every forward; and its result changes with the
per-device batch size. GroupNorm normalises each image alone: the same on every rank, for
any batch size or world size, and with no buffers to synchronise. `--disc.norm batch` is
there for comparison with taming (real and fake pass through it as one batch, and
`--train.sync_bn` converts it to SyncBatchNorm on GPUs); `none` drops the norm.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..config.sections import DISC_NORMS, DiscConfig

KERNEL = 4
MAX_WIDTH_MULT = 8
MAX_GROUPS = 32


def receptive_field(layers: int) -> int:
    """Side in pixels of the input square one output logit depends on."""
    field = 1
    for stride in reversed([2] * layers + [1, 1]):
        field = (field - 1) * stride + KERNEL
    return field


def output_side(image_size: int, layers: int) -> int:
    """Side of the logit map for square inputs of `image_size` (<= 0: too many layers)."""
    side = image_size
    for _ in range(layers):
        side = side // 2  # 4×4, stride 2, padding 1
    return side - 2     # two 4×4 stride-1 convs with padding 1 take one pixel each


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        groups = max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm {norm!r}: one of {', '.join(DISC_NORMS)}")


class PatchDiscriminator(nn.Module):
    """Images in [-1, 1] (B×C×H×W) -> one logit per patch (B×1×h×w)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 2,
                 norm: str = "group"):
        super().__init__()
        self.layers, self.norm = layers, norm
        bias = norm == "none"  # a norm's own shift makes a conv bias redundant
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, KERNEL, 2, 1),
                                   nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            wider = channels * min(2 ** n, MAX_WIDTH_MULT)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, wider, KERNEL, stride, 1, bias=bias),
                       make_norm(norm, wider), nn.LeakyReLU(0.2)]
            width = wider
        blocks.append(nn.Conv2d(width, 1, KERNEL, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(_dcgan_init)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(disc_cfg: DiscConfig, in_channels: int) -> PatchDiscriminator:
    """The discriminator the `disc` config section describes (`DiscConfig`)."""
    return PatchDiscriminator(in_channels, disc_cfg.channels, disc_cfg.layers, disc_cfg.norm)
