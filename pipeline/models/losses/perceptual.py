"""The perceptual (LPIPS) training term, on the network `pipeline evaluate` measures with."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...utils import PipelineError
from ..lpips import TRAIN_OPTIONS, load_lpips_network


class PerceptualLoss(nn.Module):
    """LPIPS per image (B,) between a reconstruction and its target, both in [-1, 1].

    Computed in float32 with autocast off, whatever the run's mixed precision: LPIPS
    normalises each feature vector to unit length, and in half precision the differences
    of nearly equal features vanish. Frozen and always in eval mode (`train()` leaves it
    there: its linear layers hold dropout). Gradients flow to the reconstruction only.

    It is not part of the autoencoder: the trainer holds it beside the model, so it is in
    no optimizer, DDP wrapper, state_dict, checkpoint or export.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=recon.device.type, enabled=False):
            return self.network(recon.float(), target.float(), normalize=False).flatten()


def load_perceptual(loss_cfg) -> PerceptualLoss | None:
    """The LPIPS term `loss_cfg` asks for (None with `perceptual_weight` 0), read from
    `--loss.lpips_backbone` / `--loss.lpips_linear` (errors name these options)."""
    if loss_cfg.perceptual_weight == 0:
        return None
    if not loss_cfg.lpips_backbone:
        backbone = "vgg16-397923af.pth" if loss_cfg.lpips_net == "vgg" else \
            "alexnet-owt-7be5be79.pth"
        raise PipelineError(f"--loss.perceptual_weight {loss_cfg.perceptual_weight:g} needs "
                            f"{TRAIN_OPTIONS.backbone} FILE, the torchvision ImageNet state "
                            f"dict of the {loss_cfg.lpips_net} backbone (e.g. {backbone}; "
                            f"nothing is downloaded), or --loss.perceptual_weight 0")
    return PerceptualLoss(load_lpips_network(loss_cfg.lpips_backbone, loss_cfg.lpips_linear,
                                             loss_cfg.lpips_net, TRAIN_OPTIONS))
