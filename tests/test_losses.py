"""The loss terms on their own: LPIPS as a training term (one loader with the evaluation
metric, float32, frozen), the adversarial losses by hand, taming's adaptive weight against
a hand computation, `Objective` composing them, and the config rules of the new fields.

Stand-in LPIPS files are randomly initialised and saved here: nothing is downloaded.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline import metrics, train
from pipeline.config import Config, LossConfig, from_dict, load_preset
from pipeline.config.sections import DISC_LOSSES, LPIPS_NET_NAMES
from pipeline.models import build_model, compute_loss
from pipeline.models.discriminator import PatchDiscriminator
from pipeline.models.losses import (ADAPTIVE_WEIGHT_MAX, Objective, adaptive_weight,
                                    discriminator_loss, discriminator_stats, frozen,
                                    generator_loss, last_decoder_layer, load_perceptual)
from pipeline.models.lpips import LPIPS_NETS
from pipeline.utils import PipelineError


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def perceptual_config(backbone, linear, **extra) -> LossConfig:
    return LossConfig(perceptual_weight=1.0, lpips_net="alex", lpips_backbone=str(backbone),
                      lpips_linear=None if linear is None else str(linear), **extra)


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth-ish images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=64, mode="bilinear") * 2 - 1


# ---------------------------------------------------------------- LPIPS as a training term

@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips' own
def test_training_term_and_evaluation_metric_are_one_network(alex_files):
    """The perceptual term on [-1, 1] equals `pipeline evaluate`'s LPIPS on [0, 1] of the
    same images, from the same files, and the `lpips` package's LPIPS on those weights."""
    import lpips as lpips_package

    backbone, linear = alex_files
    term = load_perceptual(perceptual_config(backbone, linear))
    metric = metrics.load_lpips(backbone, linear, "alex")
    x, y = images(3, 0), images(3, 1)
    ours = term(x, y)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    assert torch.allclose(ours, metric((x + 1) / 2, (y + 1) / 2), rtol=1e-6, atol=1e-7)

    oracle = lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=True,
                                 model_path=str(linear), verbose=False).eval()
    features = {k[len("features."):]: v for k, v in torch.load(backbone).items()}
    for slice_ in (oracle.net.slice1, oracle.net.slice2, oracle.net.slice3,
                   oracle.net.slice4, oracle.net.slice5):
        for index, layer in slice_.named_children():
            layer.load_state_dict({name: features[f"{index}.{name}"]
                                   for name, _ in layer.named_parameters()})
    with torch.no_grad():
        expected = oracle(x, y).flatten()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-7)
    assert term(x, x).abs().max() < 1e-6


def test_perceptual_term_is_float32_frozen_and_differentiable(alex_files):
    term = load_perceptual(perceptual_config(*alex_files))
    term.train()  # the trainer's .train() calls must not switch its dropout on
    assert not term.training and not term.network.training
    assert all(not p.requires_grad for p in term.parameters())
    x = images(2, 2).requires_grad_(True)
    y = images(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(x.bfloat16(), y)
    assert value.dtype == torch.float32
    assert torch.allclose(value, term(x, y), rtol=1e-2)  # only the bf16 input rounding
    assert torch.equal(term(x, y), term(x, y))            # no dropout
    term(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.parameters())


def test_perceptual_files_errors_name_the_training_options(alex_files, tmp_path):
    backbone, linear = alex_files
    assert load_perceptual(LossConfig()) is None  # weight 0: nothing is read
    with pytest.raises(PipelineError, match=r"--loss.perceptual_weight 1 needs "
                                            r"--loss.lpips_backbone FILE.*vgg16"):
        load_perceptual(LossConfig(perceptual_weight=1.0))
    with pytest.raises(PipelineError, match=r"--loss.lpips_backbone .*nope.pth: no such file"):
        load_perceptual(perceptual_config(tmp_path / "nope.pth", linear))
    with pytest.raises(PipelineError, match=rf"--loss.lpips_linear {backbone}: expected lin0"):
        load_perceptual(perceptual_config(backbone, backbone))
    with pytest.raises(PipelineError, match=rf"--loss.lpips_backbone {linear}: not a torchvision"):
        load_perceptual(perceptual_config(linear, linear))
    # Evaluation's messages keep naming its own options.
    with pytest.raises(PipelineError, match=r"^--lpips-backbone .*nope.pth: no such file"):
        metrics.load_lpips(tmp_path / "nope.pth", linear)


def test_bundled_linear_layers_are_used_when_none_given(alex_files):
    backbone, _ = alex_files
    term = load_perceptual(perceptual_config(backbone, None))
    bundled = torch.load(metrics._lpips.bundled_linear_layers("alex"), map_location="cpu",
                         weights_only=True)
    assert torch.equal(term.network.lin0.model[1].weight, bundled["lin0.model.1.weight"])


def test_config_names_match_the_implementations():
    assert sorted(LPIPS_NET_NAMES) == sorted(LPIPS_NETS)
    logits = torch.zeros(2)
    for kind in DISC_LOSSES:  # every declared loss is implemented
        assert torch.isfinite(discriminator_loss(kind, logits, logits))
        assert torch.isfinite(generator_loss(kind, logits))


# ---------------------------------------------------------------- adversarial losses

def test_discriminator_and_generator_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(
        0.5 * ((0 + 0.5) / 2 + (0 + 1.5) / 2))
    assert generator_loss("hinge", fake).item() == pytest.approx(0.75)

    def softplus(v):
        return math.log1p(math.exp(v))

    assert discriminator_loss("non-saturating", real, fake).item() == pytest.approx(
        0.5 * ((softplus(-2) + softplus(-0.5)) / 2 + (softplus(-2) + softplus(0.5)) / 2))
    assert generator_loss("non-saturating", fake).item() == pytest.approx(
        (softplus(2) + softplus(-0.5)) / 2)
    stats = discriminator_stats(real, fake)
    assert stats["logits_real"].item() == pytest.approx(1.25)
    assert stats["logits_fake"].item() == pytest.approx(-0.75)
    assert stats["d_accuracy"].item() == pytest.approx(0.5 * (1.0 + 0.5))
    with pytest.raises(ValueError, match="--loss.disc_loss 'wasserstein'"):
        generator_loss("wasserstein", fake)


class TinyDecoderModel(nn.Module):
    """A model whose decoder ends in one Linear layer W: recon = h W^T."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Identity(), nn.Linear(4, 3, bias=False), nn.Tanh())


def tiny_losses(model, h, target, u):
    """nll = mean |recon - target|, g = -mean(recon @ u) (a linear 'discriminator')."""
    recon = model.decoder[1](h)
    return (recon - target).abs().mean(), -(recon @ u).mean(), recon


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    model = TinyDecoderModel()
    h, target, u = torch.randn(5, 4), torch.randn(5, 3), torch.randn(3)
    nll, g, recon = tiny_losses(model, h, target, u)
    W = last_decoder_layer(model)
    assert W is model.decoder[1].weight

    # By hand: d nll / dW = sign(recon - target)^T h / (B * 3); d g / dW = -u (sum_b h_b)^T / B
    with torch.no_grad():
        nll_grad = torch.sign(recon - target).T @ h / (5 * 3)
        g_grad = -torch.outer(u, h.sum(0)) / 5
        expected = nll_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_weight(nll, g, W)
    assert math.isfinite(weight.item()) and not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    # The fp16 loss scale is divided out again; the graph survives for the real backward.
    scaled = adaptive_weight(nll, g, W, loss_scale=torch.tensor(1024.0))
    assert scaled.item() == pytest.approx(expected.item(), rel=1e-6)
    (nll + weight * g).backward()
    assert W.grad is not None


def test_adaptive_weight_is_clamped_and_finite():
    model = TinyDecoderModel()
    h, target = torch.randn(5, 4), torch.randn(5, 3)
    nll, g, _ = tiny_losses(model, h, target, torch.zeros(3))  # g has no gradient at all
    # ||grad nll|| / (0 + 1e-4) > 1e4 once ||grad nll|| > 1
    assert adaptive_weight(100 * nll, g, last_decoder_layer(model)).item() == ADAPTIVE_WEIGHT_MAX
    nll, g, _ = tiny_losses(model, h, target, torch.ones(3))
    inf_nll = nll * float("inf")
    assert adaptive_weight(inf_nll, g, last_decoder_layer(model)).item() == 0.0


@settings(max_examples=25, deadline=None)
@given(ranks=st.integers(1, 4), per_rank=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_adaptive_weight_of_ranks_with_averaged_gradients_is_the_global_batch_one(
        ranks, per_rank, seed):
    """Ranks holding equal shares of a batch, averaging the two gradients across ranks
    (as `mean_over_ranks` does), get the weight of the whole batch on one process."""
    torch.manual_seed(seed)
    model = TinyDecoderModel()
    W = last_decoder_layer(model)
    h, target, u = torch.randn(ranks * per_rank, 4), torch.randn(ranks * per_rank, 3), \
        torch.randn(3)
    whole = adaptive_weight(*tiny_losses(model, h, target, u)[:2], W)
    shards = list(zip(h.split(per_rank), target.split(per_rank)))
    assert len(shards) == ranks
    sent = []  # what each rank's all-reduce receives
    for hs, ts in shards:
        adaptive_weight(*tiny_losses(model, hs, ts, u)[:2], W,
                        mean_over_ranks=lambda grads: sent.append(grads) or grads)
    reduced = torch.stack(sent).mean(0)
    per_rank_weights = [adaptive_weight(*tiny_losses(model, hs, ts, u)[:2], W,
                                        mean_over_ranks=lambda grads: reduced).item()
                        for hs, ts in shards]
    assert per_rank_weights == [per_rank_weights[0]] * ranks
    assert per_rank_weights[0] == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)


def test_frozen_passes_gradients_through_but_not_into_the_module():
    disc = PatchDiscriminator(channels=4, layers=1)
    disc.net[0].weight.requires_grad_(False)  # already frozen: stays frozen
    x = images(2, 4).requires_grad_(True)
    with frozen(disc):
        out = disc(x).sum()
    out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert [p.requires_grad for p in disc.parameters()] == [
        name != "net.0.weight" for name, _ in disc.named_parameters()]


def test_last_decoder_layer_is_the_output_layer_of_each_family():
    for arch in ("basic", "resnet"):
        cfg = from_dict(Config, load_preset("debug")).model
        cfg.model, cfg.arch = "ae", arch
        model = build_model(cfg).eval()
        weight = last_decoder_layer(model)
        x = images(2, 5)
        with torch.no_grad():
            weight.zero_()  # the output then no longer depends on the latent
            recon = model(x).recon
        assert torch.allclose(recon, recon[:, :, :1, :1].expand_as(recon)), arch
        assert 3 in weight.shape[:2], arch  # it maps to the 3 image channels


# ---------------------------------------------------------------- Objective

def debug_model(model: str = "vqvae"):
    cfg = from_dict(Config, load_preset("debug"))
    cfg.model.model = model
    return cfg, build_model(cfg.model).train()


def test_objective_adds_the_generator_terms_only_from_disc_start_on(alex_files):
    _cfg, model = debug_model()
    loss_cfg = perceptual_config(*alex_files, adversarial_weight=0.5, disc_start=3)
    disc = PatchDiscriminator(channels=8, layers=2)
    objective = Objective(loss_cfg, load_perceptual(loss_cfg), disc)
    assert [objective.adversarial_at(s) for s in (1, 2, 3, 4, 5)] == [False] * 3 + [True] * 2
    x = images(4, 6)
    for step in (3, 4):
        out = model(x)
        base, base_parts = compute_loss(out, x, loss_cfg, step)
        loss, parts = objective.add_generator_terms(model, out, x, base, base_parts, step)
        assert parts["loss"] is loss
        perceptual = objective.perceptual(out.recon, x).mean()
        assert parts["perceptual"].item() == pytest.approx(perceptual.item(), rel=1e-6)
        expected = base + perceptual
        if step == 3:
            assert "g_loss" not in parts and "d_weight" not in parts
        else:
            g_loss = -disc(out.recon).mean()
            assert parts["g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-5)
            assert 0 < parts["d_weight"].item() <= 0.5 * ADAPTIVE_WEIGHT_MAX
            expected = expected + parts["d_weight"] * g_loss
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        model.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in disc.parameters())  # the generator's pass
        assert model.decoder[-2].weight.grad is not None


def test_fixed_weight_and_the_discriminator_batch():
    _cfg, model = debug_model("ae")
    loss_cfg = LossConfig(adversarial_weight=0.25, adaptive_weight=False,
                          disc_loss="non-saturating")
    disc = PatchDiscriminator(channels=8, layers=2)
    objective = Objective(loss_cfg, None, disc)
    x = images(3, 7)
    out = model(x)
    _, parts = objective.add_generator_terms(model, out, x, *compute_loss(out, x, loss_cfg, 1),
                                             step=1)
    assert parts["d_weight"].item() == 0.25
    d_loss, d_parts = objective.discriminator_loss(disc, x, out.recon)
    # Real and fake go through as one batch; with GroupNorm that is the same as apart.
    real, fake = disc(x), disc(out.recon.detach())
    assert d_loss.item() == pytest.approx(discriminator_loss("non-saturating", real, fake).item(),
                                          rel=1e-5)
    assert d_parts["logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-5)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in model.parameters())  # reconstructions detached


# ---------------------------------------------------------------- config

def parse(*argv: str):
    return train.resolve_config(train.build_parser().parse_args(["--config", "debug", *argv]))


def test_loss_and_disc_options_reach_the_config():
    cfg = parse("--loss.perceptual_weight", "0.5", "--loss.lpips_net", "alex",
                "--loss.lpips_backbone", "b.pth", "--loss.lpips_linear", "l.pth",
                "--loss.adversarial_weight", "0.8", "--loss.disc_start", "100",
                "--loss.disc_loss", "non-saturating", "--loss.adaptive_weight", "false",
                "--disc.lr", "3e-4", "--disc.layers", "3", "--disc.channels", "32",
                "--disc.norm", "batch")
    loss, disc = cfg.loss, cfg.disc
    assert (loss.perceptual_weight, loss.lpips_net, loss.lpips_backbone, loss.lpips_linear) == (
        0.5, "alex", "b.pth", "l.pth")
    assert (loss.adversarial_weight, loss.disc_start, loss.disc_loss, loss.adaptive_weight) == (
        0.8, 100, "non-saturating", False)
    assert (disc.lr, disc.layers, disc.channels, disc.norm) == (3e-4, 3, 32, "batch")
    defaults = parse()
    assert (defaults.loss.perceptual_weight, defaults.loss.adversarial_weight) == (0.0, 0.0)
    assert (defaults.disc.layers, defaults.disc.norm, defaults.loss.lpips_net) == (
        2, "group", "vgg")


@pytest.mark.parametrize("argv, message", [
    (["--disc.layers", "5"], r"--disc.layers 5 leaves no logit for 64px images .*at most 4"),
    (["--loss.disc_loss", "wgan"], r"unknown --loss.disc_loss 'wgan'; choose one of hinge"),
    (["--disc.norm", "layer"], r"unknown --disc.norm 'layer'"),
    (["--loss.lpips_net", "squeeze"], r"unknown --loss.lpips_net 'squeeze'"),
    (["--disc.lr", "0"], r"--disc.lr must be > 0"),
    (["--loss.perceptual_weight", "-1"], r"--loss.perceptual_weight must be >= 0"),
])
def test_bad_loss_options_are_refused_naming_the_option(argv, message):
    with pytest.raises(PipelineError, match=message):
        parse("--loss.adversarial_weight", "0.5", *argv)


def test_discriminator_layers_only_checked_when_it_is_used():
    assert parse("--disc.layers", "6").disc.layers == 6  # adversarial_weight 0: unused


def test_recipes_are_tokenizer_grade_and_say_their_sources():
    from importlib import resources

    vqgan, klf4 = (parse_preset(name) for name in ("vqgan", "kl-f4"))
    assert (vqgan.model.model, vqgan.model.arch, vqgan.model.downsample) == ("vqvae", "resnet", 4)
    assert vqgan.model.quantizer == "vq" and vqgan.model.l2_normalize_codes
    assert vqgan.model.code_dim <= 32  # low-dimensional codes
    assert (klf4.model.model, klf4.model.arch, klf4.model.downsample) == ("vae", "resnet", 4)
    assert klf4.loss.kl_weight == 1e-6
    for cfg in (vqgan, klf4):
        assert cfg.loss.perceptual_weight > 0 and cfg.loss.adversarial_weight > 0
        assert cfg.loss.disc_start > 0 and cfg.model.latent_side == 16
    for name, source in (("vqgan", "taming"), ("kl-f4", "latent diffusion")):
        text = (resources.files("pipeline") / "presets" / f"{name}.yaml").read_text()
        assert source in text


def parse_preset(name: str):
    return train.resolve_config(train.build_parser().parse_args(["--config", name]))
