"""Every quantiser against vector-quantize-pytorch (the oracle), with the same weights and
inputs: codes, indices, losses, gradients and codebook learning must equal its
implementation (to float32 rounding where the two sum in another order).

Where our defaults differ from the library's, each test sets both sides explicitly (the
library turns the rotation trick on by default, restarts no dead codes and starts from
random codes; ours starts from the first batch). Shapes: the oracle takes channel-last
rows (B×N×D), ours B×D×h×w with N = h·w in row-major order (`as_image`).
"""
from __future__ import annotations

import random

import pytest
import torch
from vector_quantize_pytorch import FSQ as OracleFSQ
from vector_quantize_pytorch import ResidualFSQ, ResidualVQ, VectorQuantize
from vector_quantize_pytorch import SimVQ as OracleSimVQ

from pipeline.models import FSQ, ResidualQuantizer, SimVQ, VectorQuantizer
from pipeline.models.rvq import ScaledFSQStage

DIM, CODES, HEIGHT, WIDTH = 8, 32, 4, 4
# Two float32 computations of one formula in another order agree to about this.
CLOSE = dict(rtol=1e-5, atol=1e-6)


def rows(batch: int = 3, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """B×N×D channel-last input rows, as the oracle takes them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEIGHT * WIDTH, DIM, generator=generator) * scale


def as_image(x: torch.Tensor) -> torch.Tensor:
    """B×N×D rows -> our B×D×h×w latent, position n at (n // w, n % w)."""
    return x.transpose(1, 2).reshape(len(x), x.shape[2], HEIGHT, WIDTH)


def as_rows(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(2).transpose(1, 2)


def upstream(shape, seed: int = 1) -> torch.Tensor:
    """A random gradient from 'the decoder', the same for both sides."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def oracle_vq(rotation_trick: bool, decay: float = 0.8) -> VectorQuantize:
    torch.manual_seed(0)
    return VectorQuantize(dim=DIM, codebook_size=CODES, decay=decay, commitment_weight=1.0,
                          rotation_trick=rotation_trick, threshold_ema_dead_code=0,
                          kmeans_init=False)


def our_vq_like(oracle_layer: VectorQuantize, rotation_trick: bool,
                decay: float = 0.8) -> VectorQuantizer:
    """Our EMA quantiser holding the oracle's codebook and statistics, restarts off."""
    codebook = oracle_layer._codebook
    vq = VectorQuantizer(CODES, DIM, ema=True, decay=decay, dead_code_threshold=0.0,
                         rotation_trick=rotation_trick)
    with torch.no_grad():
        vq.codebook.copy_(codebook.embed[0])
        vq.embed_sum.copy_(codebook.embed_avg[0])
        vq.cluster_size.copy_(codebook.cluster_size[0])
    vq.initialized.fill_(True)
    return vq


# ---------------------------------------------------------------- today's VQ and FSQ

def test_vq_nearest_codes_commitment_and_five_ema_steps_equal_vector_quantize():
    oracle = oracle_vq(rotation_trick=False).train()
    ours = our_vq_like(oracle, rotation_trick=False).train()
    for step in range(5):
        x = rows(seed=step)
        expected, expected_indices, expected_loss = oracle(x)
        out = ours(as_image(x))
        assert torch.equal(out.stats["indices"].flatten(1), expected_indices), step
        torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
        torch.testing.assert_close(out.terms["commitment"], expected_loss, **CLOSE)
        torch.testing.assert_close(ours.cluster_size, oracle._codebook.cluster_size[0], **CLOSE)
        torch.testing.assert_close(ours.embed_sum, oracle._codebook.embed_avg[0], **CLOSE)
        torch.testing.assert_close(ours.codebook, oracle.codebook, **CLOSE)


def test_fsq_codes_and_indices_identical_to_vector_quantize_pytorch_fsq():
    levels = [8, 5, 5, 5]
    x = torch.randn(2, HEIGHT * WIDTH, len(levels), generator=torch.Generator().manual_seed(2)) * 3
    expected, expected_indices = OracleFSQ(levels)(x)
    out = FSQ(levels)(x.transpose(1, 2).reshape(2, len(levels), HEIGHT, WIDTH))
    assert torch.equal(as_rows(out.z), expected)
    assert torch.equal(out.stats["indices"].flatten(1), expected_indices.long())


# ---------------------------------------------------------------- rotation trick

def test_vq_rotation_trick_outputs_gradients_and_ema_equal_vector_quantize():
    oracle = oracle_vq(rotation_trick=True).train()
    ours = our_vq_like(oracle, rotation_trick=True).train()
    for step in range(3):
        x_oracle = rows(seed=10 + step, scale=2.0).requires_grad_()
        x_ours = as_image(x_oracle.detach()).requires_grad_()
        expected, expected_indices, expected_loss = oracle(x_oracle)
        out = ours(x_ours)
        assert torch.equal(out.stats["indices"].flatten(1), expected_indices)
        torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
        grad = upstream(expected.shape, seed=step)
        (expected * grad).sum().add(expected_loss).backward()
        (as_rows(out.z) * grad).sum().add(out.terms["commitment"]).backward()
        torch.testing.assert_close(as_rows(x_ours.grad), x_oracle.grad, **CLOSE)
        torch.testing.assert_close(ours.codebook, oracle.codebook, **CLOSE)


def test_rotation_trick_gradient_differs_from_straight_through():
    """The test above would pass for an implementation that ignored the option if the
    oracle did too: the two estimators must give different encoder gradients."""
    grads = []
    for rotation in (False, True):
        ours = our_vq_like(oracle_vq(rotation), rotation_trick=rotation).train()
        x = as_image(rows(seed=3, scale=2.0)).requires_grad_()
        (ours(x).z * as_image(upstream((3, HEIGHT * WIDTH, DIM)))).sum().backward()
        grads.append(x.grad)
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)


# ---------------------------------------------------------------- SimVQ

@pytest.mark.parametrize("rotation_trick", [False, True])
def test_simvq_codes_loss_and_gradients_equal_vector_quantize_pytorch(rotation_trick):
    torch.manual_seed(0)
    oracle = OracleSimVQ(dim=DIM, codebook_size=CODES, rotation_trick=rotation_trick,
                         input_to_quantize_commit_loss_weight=0.25, commitment_weight=1.0)
    ours = SimVQ(CODES, DIM, rotation_trick=rotation_trick).train()
    with torch.no_grad():
        ours.frozen_codebook.copy_(oracle.frozen_codebook)
        ours.transform.weight.copy_(oracle.code_transform.weight)
    x_oracle = rows(seed=4, scale=0.5).requires_grad_()
    x_ours = as_image(x_oracle.detach()).requires_grad_()

    expected, expected_indices, expected_loss = oracle(x_oracle)
    out = ours(x_ours)
    assert torch.equal(out.stats["indices"].flatten(1), expected_indices)
    torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
    # Our two terms at the default weights (codebook 1, commitment 0.25) are its loss.
    loss = out.terms["codebook"] + 0.25 * out.terms["commitment"]
    torch.testing.assert_close(loss, expected_loss, **CLOSE)

    grad = upstream(expected.shape)
    (expected * grad).sum().add(expected_loss).backward()
    (as_rows(out.z) * grad).sum().add(loss).backward()
    torch.testing.assert_close(as_rows(x_ours.grad), x_oracle.grad, **CLOSE)
    torch.testing.assert_close(ours.transform.weight.grad, oracle.code_transform.weight.grad,
                               **CLOSE)
    torch.testing.assert_close(ours.diffusers_codebook(), oracle.codebook.detach(), **CLOSE)


# ---------------------------------------------------------------- RVQ

def our_rvq_like(oracle: ResidualVQ, rotation_trick: bool, dropout: bool = False,
                 min_stages: int = 1) -> ResidualQuantizer:
    stages = [our_vq_like(layer, rotation_trick) for layer in oracle.layers]
    return ResidualQuantizer(stages, DIM, dropout=dropout, dropout_min_stages=min_stages)


@pytest.mark.parametrize("rotation_trick", [False, True])
def test_rvq_over_vq_codes_losses_gradients_and_ema_equal_residual_vq(rotation_trick):
    torch.manual_seed(0)
    oracle = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, decay=0.8,
                        commitment_weight=1.0, rotation_trick=rotation_trick,
                        threshold_ema_dead_code=0, kmeans_init=False).train()
    ours = our_rvq_like(oracle, rotation_trick).train()
    for step in range(3):
        x_oracle = rows(seed=20 + step, scale=2.0).requires_grad_()
        x_ours = as_image(x_oracle.detach()).requires_grad_()
        expected, expected_indices, expected_losses = oracle(x_oracle)
        out = ours(x_ours)
        # ours: B×S×h×w; the oracle: B×N×S
        assert torch.equal(out.stats["indices"].flatten(2).transpose(1, 2), expected_indices)
        torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
        torch.testing.assert_close(out.terms["commitment"], expected_losses.sum(), **CLOSE)
        grad = upstream(expected.shape, seed=step)
        (expected * grad).sum().add(expected_losses.sum()).backward()
        (as_rows(out.z) * grad).sum().add(out.terms["commitment"]).backward()
        torch.testing.assert_close(as_rows(x_ours.grad), x_oracle.grad, **CLOSE)
        for stage, layer in zip(ours.stages, oracle.layers):
            torch.testing.assert_close(stage.codebook, layer.codebook, **CLOSE)
            torch.testing.assert_close(stage.cluster_size, layer._codebook.cluster_size[0],
                                       **CLOSE)


def oracle_seed_keeping(kept: int, low: int, stages: int) -> int:
    """A seed for which the oracle's dropout (randrange(low - 1, S) = last stage kept)
    keeps `kept` stages, so that both sides drop the same ones."""
    return next(seed for seed in range(1000)
                if random.Random(seed).randrange(low - 1, stages) == kept - 1)


def test_rvq_quantizer_dropout_matches_residual_vq_for_the_drawn_stage_count():
    torch.manual_seed(0)
    oracle = ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=CODES, decay=0.8,
                        commitment_weight=1.0, rotation_trick=False, threshold_ema_dead_code=0,
                        kmeans_init=False, quantize_dropout=True,
                        quantize_dropout_cutoff_index=1).train()
    ours = our_rvq_like(oracle, rotation_trick=False, dropout=True, min_stages=2).train()
    drawn = []
    for step in range(6):
        x_oracle = rows(seed=30 + step).requires_grad_()
        x_ours = as_image(x_oracle.detach()).requires_grad_()
        out = ours(x_ours)
        kept = int((out.stats["indices"][:, :, 0, 0] >= 0).sum(1)[0])
        drawn.append(kept)
        expected, expected_indices, expected_losses = oracle(
            x_oracle, rand_quantize_dropout_fixed_seed=oracle_seed_keeping(kept, 2, 4))
        assert torch.equal(out.stats["indices"].flatten(2).transpose(1, 2), expected_indices)
        torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
        torch.testing.assert_close(out.terms["commitment"], expected_losses.sum(), **CLOSE)
        grad = upstream(expected.shape, seed=step)
        (expected * grad).sum().add(expected_losses.sum()).backward()
        (as_rows(out.z) * grad).sum().add(out.terms["commitment"]).backward()
        torch.testing.assert_close(as_rows(x_ours.grad), x_oracle.grad, **CLOSE)
        for stage, layer in zip(ours.stages, oracle.layers):  # dropped stages learnt nothing
            torch.testing.assert_close(stage.codebook, layer.codebook, **CLOSE)
            torch.testing.assert_close(stage.cluster_size, layer._codebook.cluster_size[0],
                                       **CLOSE)
    assert min(drawn) >= 2 and len(set(drawn)) > 1  # the draws vary, within the bounds


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 3]])
def test_rvq_over_fsq_codes_indices_and_gradients_equal_residual_fsq(levels):
    oracle = ResidualFSQ(levels=levels, num_quantizers=3).train()
    cfg_levels = torch.tensor(levels, dtype=torch.float32)
    stages = [ScaledFSQStage(levels, s) for s in range(3)]
    ours = ResidualQuantizer(stages, len(levels), soft_clamp=1 + 1 / (cfg_levels - 1)).train()
    generator = torch.Generator().manual_seed(5)
    x_oracle = (torch.randn(2, HEIGHT * WIDTH, len(levels), generator=generator) * 1.5
                ).requires_grad_()
    x_ours = x_oracle.detach().transpose(1, 2).reshape(2, len(levels), HEIGHT, WIDTH)
    x_ours.requires_grad_()

    expected, expected_indices = oracle(x_oracle)
    out = ours(x_ours)
    assert torch.equal(out.stats["indices"].flatten(2).transpose(1, 2),
                       expected_indices.long())
    torch.testing.assert_close(as_rows(out.z), expected, **CLOSE)
    grad = upstream(expected.shape)
    (expected * grad).sum().backward()
    (as_rows(out.z) * grad).sum().backward()
    torch.testing.assert_close(as_rows(x_ours.grad), x_oracle.grad, **CLOSE)
    # and back from the codes: the oracle's codes of the indices, summed over stages
    codes = oracle.get_output_from_indices(expected_indices)
    torch.testing.assert_close(as_rows(ours.latent_from_codes(out.stats["indices"])), codes,
                               **CLOSE)
