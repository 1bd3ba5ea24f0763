"""pipeline.models: shapes, the seed architecture, bottleneck maths, quantisers, exports."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from modelgen import case_id, model_cases, takes_quantizer, tiny_model_config
from pipeline.config import (ARCHS, MODELS, QUANTIZERS, Config, LossConfig, ModelConfig,
                             from_dict, weight_fields)
from pipeline.models import (FSQ, VectorQuantizer, build_model, compute_loss, from_pretrained,
                             kl_beta, list_archs, list_kinds, list_models, list_quantizers,
                             read_export_config, register_arch, register_model,
                             register_quantizer, save_pretrained)
from pipeline.models.bottleneck import GaussianBottleneck
from pipeline.models.usage import CodeUsage
from pipeline.utils import PipelineError

PIXELS = 3 * 64 * 64
CASES = model_cases()  # every (model, arch, quantizer) the registry builds
CASE_IDS = [case_id(c) for c in CASES]
# The shipped models, with the latent shapes and loss terms they are specified to have.
SHIPPED_CASES = [("ae", "basic", "vq"), ("ae", "resnet", "vq"), ("vae", "basic", "vq"),
                 ("vae", "resnet", "vq"), ("vqvae", "basic", "vq"), ("vqvae", "resnet", "vq"),
                 ("vqvae", "basic", "fsq"), ("vqvae", "resnet", "fsq")]


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1


def test_registry_lists_every_combination_and_names_valid_choices():
    assert list_models() == ["ae-basic", "ae-resnet", "vae-basic", "vae-resnet",
                             "vqvae-basic", "vqvae-resnet"]
    with pytest.raises(PipelineError, match="unknown --model 'gan'; choose one of ae, vae, vqvae"):
        build_model(tiny_model_config(model="gan"))
    with pytest.raises(PipelineError, match="unknown --arch 'vit'; choose one of basic, resnet"):
        build_model(tiny_model_config(arch="vit"))
    with pytest.raises(PipelineError, match="latent_channels"):
        build_model(tiny_model_config(latent_channels=7))  # basic AE latent must be widths[-1]


def test_registry_names_are_the_declared_ones():
    """Config validation (torch-free) and the registry read names from one catalogue."""
    assert list_archs() == sorted(ARCHS) == ["basic", "resnet"]
    assert list_kinds() == sorted(MODELS) == ["ae", "vae", "vqvae"]
    assert list_quantizers() == sorted(QUANTIZERS) == ["fsq", "rvq", "simvq", "vq"]
    assert list_models() == [f"{m}-{a}" for m in list_kinds() for a in list_archs()]
    with pytest.raises(PipelineError, match="unknown --model.quantizer 'lfq'; choose one of "
                                            "fsq, rvq, simvq, vq"):
        from pipeline.models import get_quantizer
        get_quantizer("lfq")


@pytest.mark.parametrize("register", [register_arch, register_model, register_quantizer])
def test_registering_an_undeclared_name_fails_at_once(register):
    with pytest.raises(ValueError, match=r"'unheard-of' is not declared: add it, with the "
                                         r"config components it reads, to [A-Z_]+ in "
                                         r"pipeline/config/model\.py"):
        register("unheard-of")


# ---------------------------------------------------------------- what a model says of itself

LOGGED_USAGE = {"vq/usage", "vq/perplexity", "vq/usage_window", "vq/perplexity_window"}


@pytest.mark.parametrize("model_name,arch,quantizer", CASES, ids=CASE_IDS)
def test_model_answers_agree_with_its_forward_pass(model_name, arch, quantizer):
    """The contract callers use instead of branching on names, for every registered model:
    code indices iff a code alphabet, a constant rate h*w*log2(K) for codes, KL/ln 2 for a
    posterior, no rate otherwise, and the usage statistics logged under vq/."""
    model = build_model(tiny_model_config(model_name, arch, quantizer)).train()
    out = model(images(3))
    _, height, width = model.latent_shape
    assert model.kind == model_name
    assert model.quantizer_name == (quantizer if takes_quantizer(model_name) else None)
    indices, rate = model.code_indices(out.stats), model.rate_bits(out.stats)
    kl = model.kl_per_image(out.stats)
    if model.num_codes is None:
        assert indices is None and model.bits_per_image is None
    else:
        assert indices.shape == (3, height, width) and indices.dtype == torch.long
        assert 0 <= indices.min() and indices.max() < model.num_codes
        assert model.bits_per_image == pytest.approx(height * width * math.log2(model.num_codes))
        assert rate.tolist() == [model.bits_per_image] * 3
    if kl is not None:
        assert kl.shape == (3,) and torch.equal(kl, out.stats["kl_per_image"])
        assert torch.allclose(rate, kl.double() / math.log(2))
    if model.num_codes is None and kl is None:
        assert rate is None
    logged = model.logged_stats(out.stats)
    assert set(logged) == (LOGGED_USAGE if model.num_codes is not None else set())
    for name, value in logged.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and not value.requires_grad
        assert value.item() == pytest.approx(out.stats[name.removeprefix("vq/")].item())


@pytest.mark.parametrize("model_name,quantizer,kind,quantizer_name,num_codes,has_prior", [
    ("ae", "vq", "ae", None, None, False), ("vae", "fsq", "vae", None, None, True),
    ("vqvae", "vq", "vqvae", "vq", 32, False), ("vqvae", "fsq", "vqvae", "fsq", 1000, False)])
def test_shipped_models_name_their_kind_codes_and_prior(model_name, quantizer, kind,
                                                        quantizer_name, num_codes, has_prior):
    model = build_model(tiny_model_config(model_name, "basic", quantizer))
    assert (model.kind, model.quantizer_name, model.num_codes, model.has_prior) == \
        (kind, quantizer_name, num_codes, has_prior)


def test_vae_rate_is_its_kl_in_bits_and_vq_rate_the_code_size():
    vae = build_model(tiny_model_config("vae", "basic")).eval()
    out = vae(images(2))
    assert torch.allclose(vae.rate_bits(out.stats), out.stats["kl_per_image"].double() / math.log(2))
    fsq = build_model(tiny_model_config("vqvae", "basic", "fsq"))
    rate = fsq.rate_bits(fsq(images(2)).stats)
    assert rate.dtype == torch.float64 and rate.tolist() == [fsq.bits_per_image] * 2
    assert fsq.bits_per_image == pytest.approx(16 * math.log2(1000))


@pytest.mark.parametrize("model_name,arch,quantizer", CASES, ids=CASE_IDS)
def test_sample_works_exactly_when_the_model_has_a_prior(model_name, arch, quantizer):
    model = build_model(tiny_model_config(model_name, arch, quantizer)).eval()
    if model.has_prior:
        with torch.no_grad():
            samples = model.sample(2, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (2, 3, 64, 64) and torch.isfinite(samples).all()
    else:
        with pytest.raises(PipelineError, match="no prior to sample from"):
            model.sample(2)


# ---------------------------------------------------------------- shapes, forward, backward

EXPECTED_LATENT = {"ae": {"basic": (128, 4, 4), "resnet": (8, 16, 16)},
                   "vae": {"basic": (8, 4, 4), "resnet": (8, 16, 16)},
                   "vqvae": {"basic": (8, 4, 4), "resnet": (8, 16, 16)}}


def trains_and_round_trips(model_name: str, arch: str, quantizer: str):
    """A tiny model of the case after one training forward and backward on 4 images, with
    what every model must do checked: shapes through encode/decode, the gradient reaching
    the first conv, a finite loss."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(model_name, arch, quantizer)).train()
    x = images()
    out = model(x)
    loss, parts = compute_loss(out, x, LossConfig(), step=0)
    loss.backward()
    assert out.recon.shape == x.shape
    assert model.encode(x).shape == (4, *model.latent_shape)
    assert model.decode(model.encode(x)).shape == x.shape
    assert model.kind == model_name and model.config.arch == arch
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(loss)
    return model, out


@pytest.mark.parametrize("model_name,arch,quantizer", CASES, ids=CASE_IDS)
def test_every_registered_model_trains_and_round_trips_its_latent(model_name, arch, quantizer):
    trains_and_round_trips(model_name, arch, quantizer)


@pytest.mark.parametrize("model_name,arch,quantizer", SHIPPED_CASES,
                         ids=[case_id(c) for c in SHIPPED_CASES])
def test_forward_backward_shapes(model_name, arch, quantizer):
    model, out = trains_and_round_trips(model_name, arch, quantizer)
    expected = EXPECTED_LATENT[model_name][arch]
    if quantizer == "fsq":
        expected = (4, *expected[1:])  # one channel per FSQ level
    assert model.latent_shape == expected
    expected_terms = {"ae": set(), "vae": {"kl"}, "vqvae": {"commitment"} if quantizer == "vq"
                      else set()}[model_name]
    assert set(out.terms) == expected_terms
    if model_name == "vqvae":
        side = expected[1]
        assert out.stats["indices"].shape == (4, side, side)
        assert out.stats["indices"].dtype == torch.long
        assert {"usage", "perplexity", "usage_window", "perplexity_window"} <= set(out.stats)
        bits = math.log2(32) if quantizer == "vq" else math.log2(8 * 5 * 5 * 5)
        assert model.bits_per_image == pytest.approx(side * side * bits)
    else:
        assert model.bits_per_image is None


@pytest.mark.parametrize("downsample,mult", [(4, [1, 2, 2]), (8, [1, 1, 2, 2]),
                                             (16, [1, 1, 2, 2, 2])])
def test_resnet_downsample_factors(downsample, mult):
    model = build_model(tiny_model_config("ae", "resnet", downsample=downsample, channel_mult=mult,
                                     channels=8)).eval()
    with torch.no_grad():
        z = model.encode(images(2))
        recon = model.decode(z)
    assert z.shape == (2, 8, 64 // downsample, 64 // downsample)
    assert model.latent_shape == (8, 64 // downsample, 64 // downsample)
    assert recon.shape == (2, 3, 64, 64)


def test_resnet_rejects_channel_mult_that_does_not_fit_downsample():
    with pytest.raises(PipelineError, match="channel_mult .* needs 4"):
        build_model(tiny_model_config("ae", "resnet", downsample=8, channel_mult=[1, 2, 2]))


# ---------------------------------------------------------------- the seed architecture

def describe(layer: nn.Module) -> tuple:
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return (type(layer).__name__, layer.in_channels, layer.out_channels, layer.kernel_size,
                layer.stride, layer.padding)
    if isinstance(layer, nn.BatchNorm2d):
        return ("BatchNorm2d", layer.num_features)
    if isinstance(layer, nn.LeakyReLU):
        return ("LeakyReLU", layer.negative_slope)
    return (type(layer).__name__,)


def seed_layers(kind: str, channels: list[int]) -> list[tuple]:
    k, s, p = (4, 4), (2, 2), (1, 1)
    out = []
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        out.append((kind, c_in, c_out, k, s, p))
        last = i == len(channels) - 2
        out += [("Tanh",)] if kind == "ConvTranspose2d" and last else \
               [("BatchNorm2d", c_out), ("LeakyReLU", 0.2)]
    return out


# The seed notebook, written out layer by layer.
SEED_ENCODER = [
    ("Conv2d", 3, 64, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 64), ("LeakyReLU", 0.2),
    ("Conv2d", 64, 128, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 128), ("LeakyReLU", 0.2),
    ("Conv2d", 128, 256, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 256), ("LeakyReLU", 0.2),
    ("Conv2d", 256, 512, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 512), ("LeakyReLU", 0.2),
]
SEED_DECODER = [
    ("ConvTranspose2d", 512, 256, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 256),
    ("LeakyReLU", 0.2),
    ("ConvTranspose2d", 256, 128, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 128),
    ("LeakyReLU", 0.2),
    ("ConvTranspose2d", 128, 64, (4, 4), (2, 2), (1, 1)), ("BatchNorm2d", 64),
    ("LeakyReLU", 0.2),
    ("ConvTranspose2d", 64, 3, (4, 4), (2, 2), (1, 1)), ("Tanh",),
]


def test_basic_ae_is_exactly_the_seed():
    model = build_model(ModelConfig())  # defaults = the seed
    assert [describe(m) for m in model.encoder] == SEED_ENCODER
    assert [describe(m) for m in model.decoder] == SEED_DECODER
    assert model.latent_shape == (512, 4, 4)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.5e6, rel=0.05)


def test_basic_vae_and_vq_add_only_1x1_heads():
    vae = build_model(tiny_model_config("vae", "basic", latent_channels=6))
    assert [describe(m) for m in vae.encoder] == (
        seed_layers("Conv2d", [3, 16, 32, 64, 128]) + [("Conv2d", 128, 12, (1, 1), (1, 1),
                                                        (0, 0))])
    assert [describe(m) for m in vae.decoder] == (
        [("Conv2d", 6, 128, (1, 1), (1, 1), (0, 0))]
        + seed_layers("ConvTranspose2d", [128, 64, 32, 16, 3]))
    vq = build_model(tiny_model_config("vqvae", "basic", code_dim=5))
    assert describe(vq.encoder[-1]) == ("Conv2d", 128, 5, (1, 1), (1, 1), (0, 0))
    assert describe(vq.decoder[0]) == ("Conv2d", 5, 128, (1, 1), (1, 1), (0, 0))


# ---------------------------------------------------------------- VAE

def test_vae_kl_equals_closed_form_and_logvar_is_clamped():
    neck = GaussianBottleneck(3, logvar_clamp=(-5.0, 2.0))
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 3, 4, 4, generator=generator)
    logvar = torch.randn(2, 3, 4, 4, generator=generator)
    logvar[0, 0, 0, 0], logvar[1, 0, 0, 0] = 9.0, -40.0  # outside the clamp
    out = neck.eval()(torch.cat([mean, logvar], dim=1))

    clamped = logvar.clamp(-5.0, 2.0)
    std = torch.exp(0.5 * clamped)
    by_hand = (0.5 * (mean ** 2 + std ** 2 - 1) - torch.log(std)).sum(dim=(1, 2, 3))
    assert torch.allclose(out.stats["kl_per_image"], by_hand, rtol=1e-5)
    assert out.terms["kl"].item() == pytest.approx(by_hand.mean().item(), rel=1e-5)
    assert torch.equal(out.z, mean)  # eval mode decodes the mean


def test_vae_encode_is_mean_in_eval_and_a_sample_in_train():
    model = build_model(tiny_model_config("vae", "basic"))
    x = images(2)
    model.eval()
    with torch.no_grad():
        mean_1, mean_2 = model.encode(x), model.encode(x)
        posterior_mean, _ = model.bottleneck.posterior(model.encoder(x))
    assert torch.equal(mean_1, mean_2) and torch.equal(mean_1, posterior_mean)
    model.train()
    with torch.no_grad():
        sample_1, sample_2 = model.encode(x), model.encode(x)
    assert not torch.allclose(sample_1, sample_2)


def test_vae_sample_from_prior_and_others_refuse():
    model = build_model(tiny_model_config("vae", "resnet")).eval()
    with torch.no_grad():
        first = model.sample(3, generator=torch.Generator().manual_seed(0))
        again = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert first.shape == (3, 3, 64, 64)
    assert torch.equal(first, again)
    with pytest.raises(PipelineError, match="only --model vae supports sample"):
        build_model(tiny_model_config("ae", "basic")).sample(2)


# ---------------------------------------------------------------- losses

def test_compute_loss_parts_and_kl_convention():
    model = build_model(tiny_model_config("vae", "basic")).train()
    x = images(2)
    out = model(x)
    cfg = LossConfig(recon="mse", kl_weight=0.5, kl_warmup_steps=0)
    loss, parts = compute_loss(out, x, cfg, step=3)
    assert set(parts) == {"loss", "recon", "kl", "kl_weighted", "beta"}
    assert parts["recon"].item() == pytest.approx(((out.recon - x) ** 2).mean().item(), rel=1e-5)
    assert parts["kl_weighted"].item() == pytest.approx(0.5 * parts["kl"].item() / PIXELS,
                                                        rel=1e-5)
    assert loss.item() == pytest.approx(parts["recon"].item() + parts["kl_weighted"].item(),
                                        rel=1e-6)

    _, l1_parts = compute_loss(out, x, LossConfig(recon="l1"), step=0)
    assert l1_parts["recon"].item() == pytest.approx((out.recon - x).abs().mean().item(),
                                                     rel=1e-5)
    with pytest.raises(PipelineError, match="--loss.recon 'huber'"):
        compute_loss(out, x, LossConfig(recon="huber"), step=0)


def test_kl_warmup_ramps_linearly_then_holds():
    cfg = LossConfig(kl_weight=0.5, kl_warmup_steps=100)
    assert [kl_beta(cfg, s) for s in (0, 50, 100, 400)] == [0.0, 0.25, 0.5, 0.5]
    assert kl_beta(LossConfig(kl_weight=0.3), 0) == 0.3


def test_compute_loss_weights_vq_terms():
    cfg = LossConfig(commitment_weight=0.25, codebook_weight=2.0)
    x = images(2)
    ema = build_model(tiny_model_config("vqvae", "basic")).train()
    _, ema_parts = compute_loss(ema(x), x, cfg, step=0)
    assert set(ema_parts) == {"loss", "recon", "commitment"}
    by_loss = build_model(tiny_model_config("vqvae", "basic", codebook_ema=False)).train()
    loss, parts = compute_loss(by_loss(x), x, cfg, step=0)
    assert set(parts) == {"loss", "recon", "commitment", "codebook"}
    expected = parts["recon"] + 0.25 * parts["commitment"] + 2.0 * parts["codebook"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    fsq = build_model(tiny_model_config("vqvae", "basic", "fsq")).train()
    _, fsq_parts = compute_loss(fsq(x), x, cfg, step=0)
    assert set(fsq_parts) == {"loss", "recon"}


# ---------------------------------------------------------------- vector quantiser

def vq_with_codes(codes: list[list[float]], cluster_size: list[float] | None = None,
                  **kwargs) -> VectorQuantizer:
    """A quantiser whose codebook is `codes`, already initialised, with consistent EMA
    statistics (embed_sum = code * cluster size; cluster sizes default to 1)."""
    codes_t = torch.tensor(codes)
    sizes = torch.tensor(cluster_size or [1.0] * len(codes))
    vq = VectorQuantizer(len(codes), codes_t.shape[1], **kwargs)
    with torch.no_grad():
        vq.codebook.copy_(codes_t)
        vq.cluster_size.copy_(sizes)
        if vq.ema:
            vq.embed_sum.copy_(codes_t * sizes[:, None])
    vq.initialized.fill_(True)
    return vq


def as_latent(vectors: list[list[float]]) -> torch.Tensor:
    """Rows -> a 1×D×1×N latent, so that flattening (b h w) gives the rows back in order."""
    return torch.tensor(vectors).t().reshape(1, -1, 1, len(vectors))


def test_vq_gradient_reaches_encoder_through_straight_through():
    model = build_model(tiny_model_config("vqvae", "basic")).train()
    x = images(2)
    out = model(x)
    # Only the reconstruction: the encoder can get this gradient through the code only
    # via the straight-through estimator.
    (out.recon - x).abs().mean().backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_ema_update_moves_used_code_by_the_expected_amount():
    decay, eps = 0.9, 1e-5
    vq = vq_with_codes([[0.0, 0.0], [10.0, 10.0]], decay=decay, dead_code_threshold=0.0)
    out = vq.train()(as_latent([[1.0, 1.0], [2.0, 0.0]]))  # both nearest to code 0

    assert out.stats["indices"].flatten().tolist() == [0, 0]
    assert torch.equal(out.z, torch.zeros(1, 2, 1, 2))  # quantised with the old code
    cluster_size = torch.tensor([decay * 1 + (1 - decay) * 2, decay * 1])
    embed_sum = torch.tensor([[decay * 0 + (1 - decay) * 3, decay * 0 + (1 - decay) * 1],
                              [decay * 10, decay * 10]])
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + 2 * eps) * total
    assert torch.allclose(vq.cluster_size, cluster_size)
    assert torch.allclose(vq.embed_sum, embed_sum)
    assert torch.allclose(vq.codebook, embed_sum / smoothed[:, None])
    assert vq.codebook[0].tolist() == pytest.approx([0.3 / 1.1, 0.1 / 1.1], rel=1e-4)
    assert vq.codebook[1].tolist() == pytest.approx([10.0, 10.0], rel=1e-4)

    before = vq.codebook.clone()
    vq.eval()(as_latent([[1.0, 1.0]]))
    assert torch.equal(vq.codebook, before)  # no learning in eval mode


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_restart_from_encoder_outputs_and_used_codes_stay(ema):
    torch.manual_seed(0)
    codes = [[0.0, 0.0], [50.0, 50.0], [10.0, 0.0], [-50.0, 50.0]]
    vq = vq_with_codes(codes, cluster_size=[5.0, 0.5, 5.0, 0.2],  # codes 1 and 3 dead
                       ema=ema, decay=1.0, dead_code_threshold=1.0)
    batch = [[0.1, 0.2], [9.0, 1.0], [0.3, -0.1], [11.0, 0.5], [-0.2, 0.1], [10.2, -0.3]]
    vq.train()(as_latent(batch))

    # Each restarted code is one of the batch vectors (EMA: up to Laplace smoothing).
    distances = torch.cdist(vq.codebook[[1, 3]].detach(), torch.tensor(batch))
    closest, rows = distances.min(dim=1)
    assert (closest < 1e-3).all() and rows[0] != rows[1]
    # decay 1 freezes the EMA, so the used codes must be exactly (EMA: up to smoothing) kept
    assert torch.allclose(vq.codebook[[0, 2]], torch.tensor([codes[0], codes[2]]), atol=1e-4)
    assert (vq.cluster_size[[1, 3]] >= 1.0).all()
    if ema:
        assert torch.allclose(vq.embed_sum[[1, 3]], vq.codebook[[1, 3]])


def test_codebook_initialised_from_first_training_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3, ema=False)  # loss mode: nothing but the init moves the codes
    batch = torch.randn(1, 3, 2, 4)
    vq.train()(batch)
    rows = {tuple(r) for r in batch.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert vq.initialized.item()
    assert all(tuple(code) in rows for code in vq.codebook.tolist())


@pytest.mark.parametrize("ema", [True, False])
def test_l2_normalised_codes_have_unit_norm(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema=ema, l2_normalize=True).train()
    z = torch.randn(2, 4, 3, 3) * 5
    for _ in range(3):
        out = vq(z)
    assert torch.allclose(vq.codes().norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(out.z.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)


def test_vq_distances_in_float32_under_bf16_autocast():
    codes = torch.tensor([[1.0, 0.0], [1.002, 0.0]])
    x = torch.tensor([[1.0016, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # What a naive bf16 distance would pick: the two codes are indistinguishable.
        naive = (x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.t() + codes.pow(2).sum(1))
        vq = vq_with_codes(codes.tolist(), dead_code_threshold=0.0)
        out = vq.train()(as_latent(x.tolist()))
    assert naive.argmin().item() == 0
    assert out.stats["indices"].item() == 1  # float32 picks the right one
    assert out.terms["commitment"].dtype == torch.float32
    assert vq.codebook.dtype == vq.embed_sum.dtype == torch.float32


def test_usage_and_perplexity_per_batch_and_window():
    usage = CodeUsage(num_codes=8, window=2)
    one_code = torch.bincount(torch.zeros(10, dtype=torch.long), minlength=8)
    stats = usage(one_code, record=True)
    assert stats["perplexity"].item() == pytest.approx(1.0)
    assert stats["usage"].item() == pytest.approx(1 / 8)

    four_uniform = torch.bincount(torch.tensor([1, 2, 3, 4] * 3), minlength=8)
    stats = usage(four_uniform, record=True)
    assert stats["perplexity"].item() == pytest.approx(4.0)
    assert stats["usage"].item() == pytest.approx(0.5)
    assert stats["usage_window"].item() == pytest.approx(5 / 8)  # codes 0..4 over 2 steps

    stats = usage(four_uniform, record=False)  # eval: the window does not move
    assert stats["usage_window"].item() == pytest.approx(5 / 8)
    stats = usage(four_uniform, record=True)  # the all-code-0 step leaves the window
    assert stats["usage_window"].item() == pytest.approx(4 / 8)
    assert stats["perplexity_window"].item() == pytest.approx(4.0)


def test_usage_window_too_large_is_refused():
    with pytest.raises(PipelineError, match="usage_window"):
        CodeUsage(num_codes=2 ** 24, window=100)


# ---------------------------------------------------------------- FSQ

def test_fsq_bits_grid_round_trip_and_gradients():
    levels = [8, 5, 5, 5]
    fsq = FSQ(levels)
    model = build_model(tiny_model_config("vqvae", "basic", "fsq", fsq_levels=levels))
    assert model.bits_per_image == pytest.approx(16 * math.log2(1000))

    z = torch.linspace(-6, 6, 500).repeat(4, 1).reshape(1, 4, 20, 25).requires_grad_()
    out = fsq.train()(z)
    grid = out.z.detach() * torch.tensor([4.0, 2, 2, 2]).view(1, 4, 1, 1)
    assert torch.allclose(grid, grid.round(), atol=1e-5)  # integers on the level grid
    for channel, (low, high) in enumerate([(-4, 3), (-2, 2), (-2, 2), (-2, 2)]):
        assert set(grid[0, channel].round().unique().tolist()) == set(range(low, high + 1))
    assert out.terms == {}

    all_indices = torch.arange(1000)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(all_indices)), all_indices)
    codes = out.z.detach().permute(0, 2, 3, 1)
    assert torch.allclose(fsq.indices_to_codes(out.stats["indices"]), codes, atol=1e-6)

    out.z.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_fsq_bound_keeps_zero_at_zero_for_even_levels():
    fsq = FSQ([8, 5])
    assert torch.allclose(fsq.bound(torch.zeros(2)), torch.zeros(2), atol=1e-6)


# ---------------------------------------------------------------- exports

def trained_once(model_cfg: ModelConfig) -> nn.Module:
    """One training forward so BatchNorm statistics and the VQ codebook differ from init."""
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    with torch.no_grad():
        model(images(4, seed=1))
    return model.eval()


@pytest.mark.parametrize("model_name,arch,quantizer", [("vae", "basic", "vq"),
                                                       ("vqvae", "resnet", "vq"),
                                                       ("vqvae", "basic", "fsq")])
def test_save_and_load_round_trip(tmp_path, model_name, arch, quantizer):
    model_cfg = tiny_model_config(model_name, arch, quantizer)
    model = trained_once(model_cfg)
    config = Config(model=model_cfg)
    run_dir = tmp_path / "run-7"
    step_dir = run_dir / "checkpoints" / "step-5"
    save_pretrained(model, step_dir, config, step=5, weights="ema", run_dir=run_dir)

    loaded = from_pretrained(step_dir)
    assert not loaded.training
    x = images(2, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, model(x).recon)
        assert torch.equal(loaded.encode(x), model.encode(x))
    meta = read_export_config(step_dir)
    assert meta["step"] == 5 and meta["weights"] == "ema"
    assert meta["run_dir"] == str(run_dir) and meta["run_name"] == "run-7"
    assert meta["model"]["model"] == model_name and meta["config"]["model"]["arch"] == arch
    assert meta["version"]
    assert sorted(p.name for p in step_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_save_strips_wrapper_prefixes(tmp_path):
    class Wrapper(nn.Module):  # what DDP looks like from outside: the model at `.module`
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    model = trained_once(tiny_model_config("ae", "basic"))
    save_pretrained(Wrapper(model), tmp_path / "export", {"note": "plain dict"}, step=1)
    loaded = from_pretrained(tmp_path / "export")
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, model(x).recon)
    assert read_export_config(tmp_path / "export")["config"] == {"note": "plain dict"}


def test_export_errors_name_the_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")

    export = tmp_path / "export"
    save_pretrained(trained_once(tiny_model_config("ae", "basic")), export, Config(), step=1)
    config_text = (export / "config.json").read_text()

    (export / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(PipelineError, match=r"model\.safetensors is missing"):
        from_pretrained(export)
    (tmp_path / "weights.bak").rename(export / "model.safetensors")

    (export / "config.json").unlink()
    with pytest.raises(PipelineError, match=r"config\.json is missing"):
        from_pretrained(export)

    (export / "config.json").write_text("{not json")
    with pytest.raises(PipelineError, match=r"config\.json is not valid JSON"):
        from_pretrained(export)

    (export / "config.json").write_text(config_text)
    (export / "model.safetensors").write_bytes(b"garbage, not a safetensors file")
    with pytest.raises(PipelineError, match=r"model\.safetensors is not a readable safetensors"):
        from_pretrained(export)


def test_export_config_that_does_not_match_weights(tmp_path):
    export = tmp_path / "export"
    save_pretrained(trained_once(tiny_model_config("ae", "basic")), export, Config(), step=1)
    meta = json.loads((export / "config.json").read_text())
    meta["model"].update(widths=[16, 32, 64, 96], latent_channels=96)
    (export / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as error:
        from_pretrained(export)
    message = str(error.value)
    assert f"the config in {export / 'config.json'} does not match the weights in " \
           f"{export / 'model.safetensors'}" in message
    assert "shape mismatches encoder.9.weight: config (96, 64, 4, 4) vs weights " \
           "(128, 64, 4, 4)" in message


# ---------------------------------------------------------------- which fields shape the weights

def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def another_valid_value(f: dataclasses.Field, value):
    """A different value of field `f` inside its declared range (the generic rule, so
    a new field needs nothing here)."""
    rule = f.metadata["rule"]
    if isinstance(value, bool):
        return not value
    if rule.choices:
        return next(c for c in rule.choices if c != value)
    if isinstance(value, tuple):
        return tuple(v - 1 for v in value)
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value * 2
    candidates = [value + 1, value / 2, value - 1] if isinstance(value, float) else \
        [value + 1, value - 1]
    return next(c for c in candidates if c in rule.bounds)


@pytest.mark.parametrize("model_name,arch,quantizer", CASES, ids=CASE_IDS)
def test_fields_outside_weight_fields_leave_the_weights_as_they_are(model_name, arch,
                                                                    quantizer):
    """Resume compares `weight_fields` only: every other field, changed, must build a
    network with the same state dict (names and shapes)."""
    cfg = tiny_model_config(model_name, arch, quantizer)
    shapes = state_shapes(build_model(cfg))
    others = [f for f in dataclasses.fields(ModelConfig) if f.name not in weight_fields(cfg)]
    assert others  # every model ignores some field (the other family's, at least)
    for f in others:
        value = another_valid_value(f, getattr(cfg, f.name))
        changed = dataclasses.replace(cfg, **{f.name: value})
        assert weight_fields(changed) == weight_fields(cfg), f.name
        assert state_shapes(build_model(changed)) == shapes, f.name


def test_weight_fields_are_those_of_the_parts_in_use():
    assert weight_fields(tiny_model_config("ae", "basic")) == [
        "model", "arch", "image_size", "in_channels", "widths", "latent_channels"]
    vq = weight_fields(tiny_model_config("vqvae", "resnet", "vq"))
    assert vq == ["model", "arch", "image_size", "in_channels", "channels", "channel_mult",
                  "num_res_blocks", "attention", "num_groups", "downsample", "quantizer",
                  "codebook_size", "code_dim", "codebook_ema", "l2_normalize_codes"]
    assert "fsq_levels" in weight_fields(tiny_model_config("vqvae", "basic", "fsq"))
    assert "logvar_clamp" in weight_fields(tiny_model_config("vae", "basic"))


# ---------------------------------------------------------------- exports of earlier versions

# The "model" keys of an export config.json as written before the config was split into
# components (the codebook's EMA decay was then spelt `ema_decay`).
PRE_SPLIT_MODEL_KEYS = [
    "model", "arch", "image_size", "in_channels", "widths", "channels", "channel_mult",
    "num_res_blocks", "attention", "num_groups", "downsample", "latent_channels",
    "logvar_clamp", "quantizer", "codebook_size", "code_dim", "codebook_ema", "ema_decay",
    "l2_normalize_codes", "dead_code_threshold", "usage_window", "fsq_levels"]


def test_export_written_before_the_split_loads(tmp_path):
    cfg = tiny_model_config("vqvae", "basic", codebook_decay=0.9)
    model = trained_once(cfg)
    export = tmp_path / "export"
    save_pretrained(model, export, Config(model=cfg), step=3)
    meta = json.loads((export / "config.json").read_text())
    current = meta["model"]
    old = {key: current["codebook_decay" if key == "ema_decay" else key]
           for key in PRE_SPLIT_MODEL_KEYS}
    meta["model"] = old
    meta["config"]["model"] = old
    (export / "config.json").write_text(json.dumps(meta))

    loaded = from_pretrained(export)
    assert loaded.config == cfg and loaded.config.codebook_decay == 0.9
    assert loaded.config.ema_decay == 0.9  # the old attribute name reads the new field
    x = images(2, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, model(x).recon)
    assert from_dict(Config, read_export_config(export)["config"]).model == cfg


# ---------------------------------------------------------------- DDP codebook sync

def _ddp_codebook_worker(rank: int, init_file: str) -> None:
    """One rank: same initial quantiser, different data; afterwards compare codebooks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        torch.manual_seed(0)  # identical construction on both ranks ...
        vq = VectorQuantizer(16, 4, decay=0.5, dead_code_threshold=1.0).train()
        data = torch.Generator().manual_seed(100 + rank)  # ... but different data
        offset = 10.0 * rank  # rank 1's vectors are far from rank 0's
        dead_before_step = []
        for _ in range(4):  # step 1 initialises every code; later, unused codes go dead
            dead_before_step.append(int((vq.cluster_size < 1.0).sum()))
            vq(torch.randn(2, 4, 2, 2, generator=data) + offset)
            assert_same_on_both_ranks(vq)
        assert min(dead_before_step[1:]) > 0  # restarts happened after the initialisation
        assert vq.usage.steps_recorded == 4
    finally:
        dist.destroy_process_group()


def assert_same_on_both_ranks(vq: VectorQuantizer) -> None:
    for name in ("codebook", "embed_sum", "cluster_size"):
        mine = getattr(vq, name)
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine)
        assert torch.equal(both[0], both[1]), f"{name} differs between ranks"


def test_vq_codebook_identical_across_two_ddp_ranks(tmp_path):
    mp.spawn(_ddp_codebook_worker, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)


def test_models_import_neither_data_nor_trainer_code():
    code = ("import json, sys\n"
            "import pipeline.models\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('pipeline.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    stages = {name.split(".")[1] for name in json.loads(done.stdout)}
    assert stages <= {"config", "models", "utils"}, stages
