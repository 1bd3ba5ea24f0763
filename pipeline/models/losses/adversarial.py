"""The adversarial terms: discriminator and generator losses, the discriminator's logged
statistics, and taming-transformers' adaptive weight.

- hinge: D minimises ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂))), G minimises −mean D(x̂)
  (taming's VQGAN and latent diffusion's autoencoders).
- non-saturating: D minimises ½(mean softplus(−D(x)) + mean softplus(D(x̂))) (taming's
  "vanilla"), G minimises mean softplus(−D(x̂)) = −mean log σ(D(x̂)) (Goodfellow et al.).

Means run over every patch logit of every image.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config.sections import DISC_LOSSES

# taming's VQLPIPSWithDiscriminator.calculate_adaptive_weight: the clamp and the epsilon.
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_EPS = 1e-4


def discriminator_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"--loss.disc_loss {kind!r}: one of {', '.join(DISC_LOSSES)}")


def generator_loss(kind: str, logits_fake: Tensor) -> Tensor:
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"--loss.disc_loss {kind!r}: one of {', '.join(DISC_LOSSES)}")


def discriminator_stats(logits_real: Tensor, logits_fake: Tensor) -> dict[str, Tensor]:
    """What shows a discriminator winning or losing: its mean logits on real and fake
    images and its accuracy (the fraction of patches on the right side of 0, real and
    fake counted equally). Accuracy near 1 with a falling `logits_fake` is the phase in
    which users see reconstructions degrade."""
    real, fake = logits_real.detach().float(), logits_fake.detach().float()
    accuracy = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
    return {"logits_real": real.mean(), "logits_fake": fake.mean(), "d_accuracy": accuracy}


def last_decoder_layer(model: nn.Module) -> Tensor:
    """The weight of the decoder's output layer (the last registered module of
    `model.decoder` holding a weight of 2 or more dimensions: its final conv), where the
    adaptive weight compares gradient norms."""
    for module in reversed(list(model.decoder.modules())):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            return weight
    raise ValueError(f"{type(model.decoder).__name__} has no layer with a weight matrix")


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, *,
                    mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
                    loss_scale: Tensor | float | None = None) -> Tensor:
    """taming's λ = ‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, 1e4], detached;
    L = `last_layer`.

    Under DDP each rank sees its own batch, so per-rank λ would differ. `mean_over_ranks`
    (an all-reduce mean) averages the two gradients first: the norms are then those of the
    global batch's gradients, and λ is the same on every rank. `torch.autograd.grad` with
    `inputs` runs no AccumulateGrad node, so DDP's reducer hooks do not fire: the step's
    one backward still sees each parameter ready once.

    `loss_scale` (the fp16 loss scale) scales both losses before differentiation, so small
    gradients do not underflow, and is divided out of the gradients. A non-finite ratio
    (an fp16 overflow, whose step the scaler skips anyway) gives λ = 0.
    """
    scale = 1.0 if loss_scale is None else loss_scale
    (nll_grad,) = torch.autograd.grad(nll * scale, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)
    grads = torch.stack([nll_grad.float(), g_grad.float()]) / scale
    if mean_over_ranks is not None:
        grads = mean_over_ranks(grads)
    ratio = grads[0].norm() / (grads[1].norm() + ADAPTIVE_EPS)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with its parameters out of autograd: the generator's loss flows through
    the discriminator to the images without leaving gradients on the discriminator (its
    own gradients, accumulated over micro-batches, stay as they are)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)
