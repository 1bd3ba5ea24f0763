"""torch.compile of what the trainer compiles: every registered model (each quantiser and
its option paths) and the PatchGAN discriminator trace as ONE graph with no graph break
in a training forward + the trainer's loss, and one real compiled training step of the
seed VQ-VAE runs with its dead-code restart inside the compiled region.

What the trainer compiles (`accelerate.prepare` with `--compile`) is the autoencoder and
the discriminator. The `Objective`'s composition of the generator terms (the frozen
discriminator's `requires_grad_` toggling, the adaptive weight's `torch.autograd.grad`)
runs eagerly around those compiled modules by design, so it is not traced here.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from einops import rearrange
from modelgen import case_id, model_cases, tiny_model_config

from pipeline.config import Config, DiscConfig
from pipeline.config.sections import DISC_LOSSES, DISC_NORMS
from pipeline.models import Objective, build_discriminator, build_model, compute_loss
from pipeline.models.losses import generator_loss

IMAGE = 32  # the smallest side every family takes with the tiny widths (basic: 2x2 latent)
LOSS = Config().loss

# Option paths of the quantisers beyond their defaults (model_cases has the defaults).
QUANTIZER_OPTIONS = [
    ("vq", {"rotation_trick": True}),
    ("vq", {"codebook_ema": False}),
    ("simvq", {"rotation_trick": True}),
    ("rvq", {"num_quantizers": 3, "quantizer_dropout": True, "rotation_trick": True}),
    ("rvq", {"num_quantizers": 2, "stage_quantizer": "fsq"}),
    ("rvq", {"num_quantizers": 2, "stage_quantizer": "vq", "codebook_ema": False}),
]
CASES = ([(case, {}) for case in model_cases()]
         + [(("vqvae", "basic", quantizer), options) for quantizer, options in QUANTIZER_OPTIONS])
CASE_IDS = [case_id(case) + "".join(f"-{k}={v}" for k, v in options.items())
            for case, options in CASES]


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_one_graph(fn, *args) -> None:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_the_cases_cover_every_registered_model_and_quantiser():
    from pipeline.models import list_quantizers
    from pipeline.models.registry import list_models

    built = {f"{model}-{arch}" for (model, arch, _), _ in CASES}
    assert built == set(list_models())
    assert {quantizer for (model, _, quantizer), _ in CASES if model == "vqvae"} == \
        set(list_quantizers())


@pytest.mark.parametrize("case,options", CASES, ids=CASE_IDS)
def test_training_forward_and_loss_trace_as_one_graph(case, options):
    """Train mode, as the trainer calls it: the model's forward (codebook initialisation,
    EMA statistics, restarts, usage windows, dropout draws) and `compute_loss`."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*case, **options)).train()

    def training_loss(x):
        return compute_loss(model(x), x, LOSS, step=1)[0]

    assert_one_graph(training_loss, images(2, 0))


@pytest.mark.parametrize("norm", DISC_NORMS)
def test_discriminator_and_its_losses_trace_as_one_graph(norm):
    """The discriminator's own step (real and detached fake images as one batch, the
    loss of each kind) and the generator's loss on its logits."""
    torch.manual_seed(0)
    disc = build_discriminator(DiscConfig(channels=8, norm=norm), 3).train()
    real, fake = images(2, 0), images(2, 1).requires_grad_()
    for kind in DISC_LOSSES:
        objective = Objective(dataclasses.replace(LOSS, adversarial_weight=0.5, disc_loss=kind),
                              discriminator=disc)
        assert_one_graph(lambda x, recon, objective=objective:
                         objective.discriminator_loss(disc, x, recon)[0], real, fake)
        assert_one_graph(lambda recon, kind=kind: generator_loss(kind, disc(recon).float()),
                         fake)


def batch_vectors(model, x: torch.Tensor) -> torch.Tensor:
    """The quantiser's input rows for batch x (a copy of the encoder: its BatchNorm
    statistics stay as they are)."""
    with torch.no_grad():
        return rearrange(copy.deepcopy(model.encoder)(x), "b d h w -> (b h w) d")


def distance_to_nearest(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows.double(), vectors.double()).min(dim=1).values


def test_a_compiled_training_step_restarts_dead_codes_inside_the_graph():
    """The seed VQ-VAE (basic arch, EMA codebook, restarts on), compiled with AOT
    autograd: forward + loss + backward + AdamW. Codes dead when the step starts come
    back as vectors of that step's batch, the live ones do not, all without a graph
    break or a recompilation on the next step."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("vqvae", "basic", "vq")).train()
    neck = model.bottleneck
    model(images(8, 0))  # eager: initialises the codebook from this first batch
    dead = torch.zeros(neck.codebook_size, dtype=torch.bool)
    dead[:8] = True
    with torch.no_grad():
        neck.cluster_size.copy_(torch.where(dead, 0.0, 5.0))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = images(8, 1)
    vectors = batch_vectors(model, x)
    assert (distance_to_nearest(neck.codebook[dead], vectors) > 1e-3).all()
    weights = [p.detach().clone() for p in model.parameters()]

    loss = compute_loss(compiled(x), x, LOSS, step=2)[0]
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())
    assert all(not torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    restarted = neck.codebook[dead]
    assert (distance_to_nearest(restarted, vectors) < 1e-5).all()
    assert len(torch.unique(restarted, dim=0)) == int(dead.sum())  # distinct vectors
    assert (distance_to_nearest(neck.codebook[~dead], vectors) > 1e-4).all()
    assert neck.cluster_size[dead].tolist() == [1.0] * int(dead.sum())  # restarted size

    optimizer.zero_grad()
    with torch.no_grad():
        neck.cluster_size[:4] = 0.0  # more dead codes: the same graph serves
    x = images(8, 2)
    compute_loss(compiled(x), x, LOSS, step=3)[0].backward()
    assert (distance_to_nearest(neck.codebook[:4], batch_vectors(model, x)) < 1e-3).all()
    assert counter.frame_count == 1  # one graph, compiled once, for both steps
