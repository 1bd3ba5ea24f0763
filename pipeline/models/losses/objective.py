"""`Objective`: the training loss beyond `compute_loss`, i.e. the perceptual term and the
adversarial game, as the trainer composes them at each micro-batch.

Generator (autoencoder) loss, taming-transformers' recipe::

    loss = compute_loss(...)                       recon + bottleneck terms
         + perceptual_weight · LPIPS(x̂, x)          when perceptual_weight > 0
         + λ · g_loss(D(x̂))                         from step disc_start + 1 on

    λ = adversarial_weight · adaptive_weight(nll, g_loss)   (--loss.adaptive_weight true)
      = adversarial_weight                                  (false)
    nll = recon + perceptual_weight · LPIPS                 (taming's "nll_loss")

The first `disc_start` steps train without the discriminator, which is then neither run
nor trained (taming's `global_step >= disc_start`, whose global_step counts from 0).
The generator's pass runs the plain discriminator module with its parameters frozen (no
DDP wrapper: its reducer would wait for gradients that never come). The discriminator's
own pass runs real and reconstructed images as one batch through the (DDP-wrapped)
discriminator: one forward for its one backward, and a BatchNorm discriminator then sees
mixed batch statistics rather than telling real from fake by them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .adversarial import (adaptive_weight, discriminator_loss, discriminator_stats, frozen,
                          generator_loss, last_decoder_layer)
from .perceptual import PerceptualLoss


class Objective:
    """The perceptual and adversarial terms a run's `loss` section asks for."""

    def __init__(self, loss_cfg, perceptual: PerceptualLoss | None = None,
                 discriminator: nn.Module | None = None):
        self.loss_cfg = loss_cfg
        self.perceptual = perceptual
        self.discriminator = discriminator  # the plain module, for the generator's pass

    def adversarial_at(self, step: int) -> bool:
        """Whether step `step` (counted from 1) uses and trains the discriminator."""
        return self.discriminator is not None and step > self.loss_cfg.disc_start

    def add_generator_terms(self, model: nn.Module, out, x: Tensor, loss: Tensor,
                            parts: dict[str, Tensor], step: int, *,
                            mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
                            loss_scale: Tensor | float | None = None
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """`compute_loss`'s (loss, parts) with the perceptual and generator terms added:
        parts gain `perceptual`, `g_loss`, `d_weight` where they apply, and `loss` becomes
        the new total. `model` is the plain autoencoder (its decoder's last layer)."""
        cfg = self.loss_cfg
        parts = dict(parts)
        nll = parts["recon"]
        if self.perceptual is not None:
            perceptual = self.perceptual(out.recon, x).mean()
            parts["perceptual"] = perceptual
            nll = nll + cfg.perceptual_weight * perceptual
            loss = loss + cfg.perceptual_weight * perceptual
        if self.adversarial_at(step):
            with frozen(self.discriminator):
                logits_fake = self.discriminator(out.recon).float()
            g_loss = generator_loss(cfg.disc_loss, logits_fake)
            weight = self.generator_weight(model, nll, g_loss, mean_over_ranks, loss_scale)
            loss = loss + weight * g_loss
            parts.update(g_loss=g_loss, d_weight=weight)
        parts["loss"] = loss
        return loss, parts

    def generator_weight(self, model: nn.Module, nll: Tensor, g_loss: Tensor,
                         mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
                         loss_scale: Tensor | float | None = None) -> Tensor:
        """λ: the adaptive weight times `adversarial_weight`, or that weight alone."""
        cfg = self.loss_cfg
        if not cfg.adaptive_weight:
            return torch.tensor(cfg.adversarial_weight, device=g_loss.device)
        ratio = adaptive_weight(nll, g_loss, last_decoder_layer(model),
                                mean_over_ranks=mean_over_ranks, loss_scale=loss_scale)
        return cfg.adversarial_weight * ratio

    def discriminator_loss(self, discriminator: nn.Module, x: Tensor,
                           recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real `x` and detached `recon`, one batch through
        `discriminator` (the trained, possibly DDP-wrapped module), and its logged
        statistics (`d_loss`, `logits_real`, `logits_fake`, `d_accuracy`)."""
        logits = discriminator(torch.cat([x, recon.detach().to(x.dtype)])).float()
        real, fake = logits[:len(x)], logits[len(x):]
        d_loss = discriminator_loss(self.loss_cfg.disc_loss, real, fake)
        return d_loss, {"d_loss": d_loss, **discriminator_stats(real, fake)}
