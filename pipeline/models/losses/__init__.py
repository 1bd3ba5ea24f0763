"""The training losses.

    recon.py        `compute_loss`: reconstruction + weighted bottleneck terms (KL, VQ),
                    also what validation computes; `kl_beta`
    perceptual.py   `PerceptualLoss`: LPIPS on [-1, 1] images in float32, frozen, read by
                    the loader `pipeline evaluate` uses (`pipeline.models.lpips`)
    adversarial.py  hinge / non-saturating discriminator and generator losses, the
                    discriminator's statistics, taming's adaptive weight
    objective.py    `Objective`: how the trainer adds the perceptual and adversarial terms
                    to `compute_loss` and computes the discriminator's loss

The discriminator itself is `pipeline.models.discriminator.PatchDiscriminator`. Neither it
nor the LPIPS network is part of the autoencoder or its export.
"""
from .adversarial import (ADAPTIVE_EPS, ADAPTIVE_WEIGHT_MAX, DISC_LOSSES, adaptive_weight,
                          discriminator_loss, discriminator_stats, frozen, generator_loss,
                          last_decoder_layer)
from .objective import Objective
from .perceptual import PerceptualLoss, load_perceptual
from .recon import RECON_LOSSES, compute_loss, kl_beta

__all__ = ["ADAPTIVE_EPS", "ADAPTIVE_WEIGHT_MAX", "DISC_LOSSES", "Objective", "PerceptualLoss",
           "RECON_LOSSES", "adaptive_weight", "compute_loss", "discriminator_loss",
           "discriminator_stats", "frozen", "generator_loss", "kl_beta", "last_decoder_layer",
           "load_perceptual"]
