"""Reconstruction + weighted bottleneck terms: the part of the objective every model has,
and what validation computes (`val/loss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import LossConfig
from ...utils import PipelineError
from ..autoencoder import ModelOutput

RECON_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def kl_beta(loss_cfg: LossConfig, step: int) -> float:
    """β at `step`: ramps linearly from 0 to kl_weight over kl_warmup_steps, then stays."""
    if loss_cfg.kl_warmup_steps <= 0:
        return loss_cfg.kl_weight
    return loss_cfg.kl_weight * min(1.0, step / loss_cfg.kl_warmup_steps)


def compute_loss(out: ModelOutput, x: Tensor, loss_cfg: LossConfig,
                 step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its named parts (`loss`, `recon`, and those that apply of `kl`,
    `kl_weighted`, `beta`, `commitment`, `codebook`).

    recon: L1 or MSE, mean over pixel values of images in [-1, 1].
    KL convention: `kl` is summed over latent elements and averaged over the batch (nats
    per image); it enters the loss as ``kl_weighted = beta(step) * kl / (C*H*W)``, i.e.
    per pixel value, so that β is on the scale of the per-pixel reconstruction loss
    (with MSE and β = 1 the loss is, up to a constant, the negative ELBO per pixel value
    of a Gaussian decoder with variance 1/2).
    VQ: ``commitment_weight * commitment`` and, without EMA, ``codebook_weight * codebook``.
    """
    if loss_cfg.recon not in RECON_LOSSES:
        raise PipelineError(f"--loss.recon {loss_cfg.recon!r}: choose one of "
                            f"{', '.join(RECON_LOSSES)}")
    recon = RECON_LOSSES[loss_cfg.recon](out.recon.float(), x.float())
    parts: dict[str, Tensor] = {"recon": recon}
    loss = recon
    if "kl" in out.terms:
        beta = kl_beta(loss_cfg, step)
        kl_weighted = beta * out.terms["kl"] / x[0].numel()
        parts.update(kl=out.terms["kl"], kl_weighted=kl_weighted,
                     beta=torch.tensor(beta, device=recon.device))
        loss = loss + kl_weighted
    if "commitment" in out.terms:
        parts["commitment"] = out.terms["commitment"]
        loss = loss + loss_cfg.commitment_weight * out.terms["commitment"]
    if "codebook" in out.terms:
        parts["codebook"] = out.terms["codebook"]
        loss = loss + loss_cfg.codebook_weight * out.terms["codebook"]
    return loss, {"loss": loss, **parts}
