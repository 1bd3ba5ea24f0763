"""The quantisers of `--model vqvae`: SimVQ, the rotation trick, residual quantisation (RVQ)
and the compile-friendly VQ, through the model contract, the latent contract, the config,
torch.compile's tracer, DDP, export and evaluation. The equality with
vector-quantize-pytorch is in test_quantizers_oracle.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from modelgen import tiny_model_config

from pipeline.config import Config, build_config, validate, weight_fields
from pipeline.models import (
    ResidualQuantizer,
    VectorQuantizer,
    build_model,
    compute_loss,
    from_pretrained,
    get_quantizer,
    list_quantizers,
    save_pretrained,
)
from pipeline.models.rvq import _hash
from pipeline.utils import PipelineError

# (quantizer, config overrides): every registered quantiser and the variants that take
# other code paths.
VARIANTS = [
    ("vq", {}), ("vq", {"rotation_trick": True}),
    ("vq", {"rotation_trick": True, "codebook_ema": False}), ("fsq", {}),
    ("simvq", {}), ("simvq", {"rotation_trick": True}),
    ("rvq", {}), ("rvq", {"num_quantizers": 3}),
    ("rvq", {"num_quantizers": 3, "quantizer_dropout": True, "rotation_trick": True}),
    ("rvq", {"num_quantizers": 2, "stage_quantizer": "fsq"}),
    ("rvq", {"num_quantizers": 2, "stage_quantizer": "vq", "codebook_ema": False}),
]
VARIANT_IDS = [q + "".join(f"-{k}={v}" for k, v in o.items()) for q, o in VARIANTS]
LOGGED_USAGE = {"vq/usage", "vq/perplexity", "vq/usage_window", "vq/perplexity_window"}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1


def model_of(quantizer: str, arch: str = "basic", **overrides):
    torch.manual_seed(0)
    return build_model(tiny_model_config("vqvae", arch, quantizer, **overrides))


def test_every_variant_is_a_registered_quantiser():
    assert sorted(list_quantizers()) == ["fsq", "rvq", "simvq", "vq"]
    assert {q for q, _ in VARIANTS} == set(list_quantizers())


def test_command_line_options_pick_the_quantiser_and_its_options():
    from pipeline import train

    args = train.build_parser().parse_args([
        "--model", "vqvae", "--model.quantizer", "rvq", "--model.num_quantizers", "3",
        "--model.stage_quantizer", "fsq", "--model.rotation_trick", "true",
        "--model.quantizer_dropout", "true", "--model.quantizer_dropout_min_stages", "2"])
    cfg = train.resolve_config(args).model
    assert (cfg.quantizer, cfg.num_quantizers, cfg.stage_quantizer, cfg.rotation_trick,
            cfg.quantizer_dropout, cfg.quantizer_dropout_min_stages) == \
        ("rvq", 3, "fsq", True, True, 2)
    model = build_model(cfg)
    assert model.quantizer_name == "rvq" and model.bottleneck.code_stages == 3


# ---------------------------------------------------------------- the contracts

@pytest.mark.parametrize("quantizer,overrides", VARIANTS, ids=VARIANT_IDS)
def test_model_and_latent_contracts_hold_for_every_variant(quantizer, overrides):
    """bits = positions x stages x bits of a stage; codes B×S×h×w when S > 1; the rate,
    the logged names, and decoding the stored codes gives the reconstruction exactly."""
    model = model_of(quantizer, **overrides).train()
    neck = model.bottleneck
    stages = neck.code_stages
    _, height, width = model.latent_shape
    x = images()
    out = model(x)
    loss, _ = compute_loss(out, x, Config().loss, step=1)
    loss.backward()
    assert torch.isfinite(loss)

    assert model.kind == "vqvae" and model.quantizer_name == quantizer
    assert stages == overrides.get("num_quantizers", 1)
    stage_bits = (sum(map(math.log2, model.config.fsq_levels))
                  if "fsq" in (quantizer, overrides.get("stage_quantizer"))
                  else math.log2(model.config.codebook_size))
    assert model.num_codes == round(2 ** stage_bits)
    assert model.bits_per_image == pytest.approx(height * width * stages * stage_bits)
    indices = model.code_indices(out.stats)
    assert indices.shape == ((3, stages, height, width) if stages > 1 else (3, height, width))
    assert indices.dtype == torch.long and indices.max() < model.num_codes
    kept = (indices >= 0).flatten(1).sum(1).double()
    assert model.rate_bits(out.stats).tolist() == pytest.approx((kept * stage_bits).tolist())

    logged = model.logged_stats(out.stats)
    per_stage = {f"{name}_stage{i}" for name in LOGGED_USAGE for i in range(stages)}
    assert set(logged) == LOGGED_USAGE | (per_stage if stages > 1 else set())
    assert all(v.ndim == 0 and v.dtype == torch.float32 and not v.requires_grad
               for v in logged.values())

    model.eval()
    with torch.no_grad():
        recon = model(x).recon
        codes = model.encode_latents(x)
        assert model.latent_kind == "codes" and torch.equal(codes, model.code_indices(
            model(x).stats))
        assert torch.equal(model.decode_latents(codes), recon)


def test_simvq_exports_its_effective_codebook_and_rvq_none():
    simvq = model_of("simvq").bottleneck
    codebook = simvq.diffusers_codebook()
    assert codebook.shape == (32, 8) and codebook.dtype == torch.float32
    codes = torch.arange(32).view(1, 4, 8)
    assert torch.equal(simvq.latent_from_codes(codes).permute(0, 2, 3, 1).reshape(32, 8),
                       codebook)
    assert model_of("rvq", num_quantizers=2).bottleneck.diffusers_codebook() is None


def test_simvq_terms_are_vq_vae_s_two_and_every_code_moves():
    """The point of SimVQ: a step of the loss moves every code, also those nobody picked
    (a codebook learnt by its loss moves only the picked ones)."""
    model = model_of("simvq").train()
    x = images()
    out = model(x)
    assert set(out.terms) == {"commitment", "codebook"}
    loss, _ = compute_loss(out, x, Config().loss, step=1)
    optimizer = torch.optim.SGD(model.bottleneck.parameters(), lr=0.1)
    before = model.bottleneck.codes().detach().clone()
    unused = torch.ones(32, dtype=torch.bool)
    unused[out.stats["indices"].flatten()] = False
    loss.backward()
    optimizer.step()
    moved = (model.bottleneck.codes().detach() - before).norm(dim=1) > 0
    assert unused.any() and moved[unused].all()


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("quantizer,overrides", VARIANTS, ids=VARIANT_IDS)
def test_training_forward_of_every_quantiser_has_no_graph_break(quantizer, overrides):
    """What torch.compile needs: no data-dependent Python value (the VQ's dead-code count
    was one, bincount's output size another) anywhere in a training forward."""
    import torch._dynamo

    torch._dynamo.reset()
    neck = get_quantizer(quantizer)(tiny_model_config("vqvae", "basic", quantizer, **overrides))
    z = torch.randn(2, neck.in_channels, 4, 4, requires_grad=True)
    explained = torch._dynamo.explain(neck.train())(z)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


# ---------------------------------------------------------------- dead-code restarts

@settings(max_examples=30, deadline=None)
@given(codes=st.integers(2, 40), vectors=st.integers(1, 40), seed=st.integers(0, 1000))
def test_restarted_codes_share_the_batch_vectors_evenly(codes, vectors, seed):
    """Restarting every code (the first batch) from N vectors: each vector is used
    floor(K/N) or ceil(K/N) times, every one of them when K >= N, never a code twice
    while N >= K."""
    torch.manual_seed(seed)
    vq = VectorQuantizer(codes, 3, ema=False).train()  # loss mode: only the restart moves codes
    batch = torch.randn(vectors, 3) * 10
    with torch.no_grad():
        vq.quantize_vectors(batch)
    same = (vq.codebook.detach()[:, None, :] == batch[None]).all(-1)  # code i is vector j
    assert (same.sum(1) == 1).all()  # each code is exactly one of the vectors
    uses = collections.Counter(same.float().argmax(1).tolist())
    low, high = codes // vectors, -(-codes // vectors)
    assert set(uses.values()) <= {low, high} and sum(uses.values()) == codes
    assert len(uses) == min(codes, vectors)


def test_a_training_batch_is_quantised_by_the_codebook_not_by_copies_of_itself():
    """Dead codes restart from the batch after its lookup: with every code dead (fewer
    batch vectors per code than the threshold), restarting first made each vector pick
    its own copy, so that training ran unquantised (commitment ~0)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, decay=0.99, dead_code_threshold=1.0).train()
    vq.initialized.fill_(True)
    with torch.no_grad():
        vq.cluster_size.fill_(0.1)  # every code dead
    codebook = vq.codebook.clone()
    x = torch.randn(32, 4)
    _, indices, terms, _ = vq.quantize_vectors(x.clone())
    nearest = torch.cdist(x, codebook).argmin(1)
    assert torch.equal(indices, nearest)
    expected = torch.nn.functional.mse_loss(x, codebook[nearest])
    assert terms["commitment"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected > 0.1
    # ... and the dead codes now hold batch vectors, for the next batches
    assert (vq.codebook[:, None, :] == x[None]).all(-1).any(1).all()


def test_only_dead_codes_restart_and_the_rest_stay():
    vq = VectorQuantizer(6, 2, decay=1.0, dead_code_threshold=1.0).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(12.0).view(6, 2))
        vq.embed_sum.copy_(vq.codebook * 2)
        vq.cluster_size.copy_(torch.tensor([2.0, 0.5, 2.0, 0.1, 2.0, 2.0]))
    vq.initialized.fill_(True)
    before = vq.codebook.clone()
    batch = torch.tensor([[100.0, 100.0], [-100.0, 50.0], [7.0, 7.0]])
    vq.quantize_vectors(batch)
    dead = torch.tensor([False, True, False, True, False, False])
    assert torch.allclose(vq.codebook[~dead], before[~dead], atol=1e-4)
    restarted = vq.codebook[dead]
    rows = torch.cdist(restarted, batch).argmin(1)
    assert torch.allclose(restarted, batch[rows]) and rows[0] != rows[1]


# ---------------------------------------------------------------- quantiser dropout

@settings(max_examples=25, deadline=None)
@given(stages=st.integers(2, 8), data=st.data())
def test_dropout_draws_stay_in_bounds_and_cover_them(stages, data):
    low = data.draw(st.integers(1, stages), label="min stages")
    span = stages - low + 1
    draws = [int(low + _hash(torch.tensor(i)) % span) for i in range(1, 30 * span + 1)]
    counts = collections.Counter(draws)
    assert set(counts) == set(range(low, stages + 1))
    # roughly uniform: no value more than three times as often as the fair share
    assert max(counts.values()) <= 3 * len(draws) / span


def dropout_rvq(stages: int = 4, low: int = 2) -> ResidualQuantizer:
    torch.manual_seed(0)
    cfg = tiny_model_config("vqvae", "basic", "rvq", num_quantizers=stages,
                            quantizer_dropout=True, quantizer_dropout_min_stages=low)
    return get_quantizer("rvq")(cfg).train()


def kept_stages(out) -> int:
    kept = (out.stats["indices"] >= 0).flatten(2).all(2).sum(1)
    assert (kept == kept[0]).all()  # one draw per forward, for the whole batch
    return int(kept[0])


def test_dropped_stages_give_no_code_no_loss_and_learn_nothing():
    rvq = dropout_rvq()
    z = torch.randn(2, 8, 4, 4)
    rvq(z)  # initialises the stages it keeps
    for _ in range(10):
        before = [stage.codebook.clone() for stage in rvq.stages]
        out = rvq(torch.randn(2, 8, 4, 4))
        kept = kept_stages(out)
        indices = out.stats["indices"]
        assert (indices[:, :kept] >= 0).all() and (indices[:, kept:] == -1).all()
        for stage, old in list(zip(rvq.stages, before))[kept:]:
            assert torch.equal(stage.codebook, old)
        assert rvq.rate_bits(out.stats).tolist() == [16 * kept * math.log2(32)] * 2
        if kept < 4:
            assert out.stats["usage_per_stage"][kept:].eq(0).all()
    rvq.eval()
    assert kept_stages(rvq(z)) == 4  # never in evaluation


def test_dropout_draws_repeat_for_the_same_step_counter_and_resume():
    """Two ranks (two fresh modules) draw the same stage counts; a module restored from
    a state dict continues the sequence where it was saved."""
    first, second = dropout_rvq(6, 1), dropout_rvq(6, 1)
    z = torch.randn(2, 8, 4, 4)
    draws = [kept_stages(first(z)) for _ in range(8)]
    assert draws == [kept_stages(second(torch.randn(2, 8, 4, 4))) for _ in range(8)]
    assert len(set(draws)) > 1
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    later = [kept_stages(first(z)) for _ in range(5)]
    restored = dropout_rvq(6, 1)
    restored.load_state_dict(saved)
    assert [kept_stages(restored(z)) for _ in range(5)] == later


def test_per_stage_usage_windows_are_each_stage_s_and_the_model_s_their_mean():
    rvq = get_quantizer("rvq")(tiny_model_config("vqvae", "basic", "rvq", num_quantizers=3,
                                                  usage_window=2)).train()
    for step in range(3):
        out = rvq(torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(step)))
    for i, stage in enumerate(rvq.stages):
        window = stage.usage.history.sum(0)
        assert out.stats["usage_window_per_stage"][i] == (window > 0).float().mean()
    assert stage.usage.steps_recorded == 3
    assert torch.allclose(out.stats["usage_window"], out.stats["usage_window_per_stage"].mean())
    logged = rvq.logged_stats(out.stats)
    assert logged["vq/usage_window_stage2"] == out.stats["usage_window_per_stage"][2]


# ---------------------------------------------------------------- config

def test_weight_fields_of_the_new_quantisers():
    simvq = weight_fields(tiny_model_config("vqvae", "basic", "simvq"))
    assert simvq[-3:] == ["quantizer", "codebook_size", "code_dim"]
    rvq = weight_fields(tiny_model_config("vqvae", "basic", "rvq"))
    assert {"num_quantizers", "stage_quantizer", "codebook_size", "codebook_ema"} <= set(rvq)
    assert "fsq_levels" not in rvq and "quantizer_dropout" not in rvq
    rvq_fsq = weight_fields(tiny_model_config("vqvae", "basic", "rvq", stage_quantizer="fsq"))
    assert "fsq_levels" in rvq_fsq and "codebook_size" not in rvq_fsq
    assert "rotation_trick" not in weight_fields(tiny_model_config("vqvae", "basic", "vq"))


@pytest.mark.parametrize("overrides,option", [
    (dict(quantizer_dropout=True, num_quantizers=2, quantizer_dropout_min_stages=3),
     "--model.quantizer_dropout_min_stages 3 exceeds the 2 stages"),
    (dict(l2_normalize_codes=True), "--model.l2_normalize_codes does not apply"),
    (dict(num_quantizers=33), "--model.num_quantizers"),
    (dict(stage_quantizer="rvq"), "--model.stage_quantizer"),
])
def test_bad_residual_options_are_refused_naming_the_option(overrides, option):
    cfg = tiny_model_config("vqvae", "basic", "rvq", **overrides)
    with pytest.raises(PipelineError, match=option.replace(".", r"\.")):
        validate(Config(model=cfg))


def test_residual_rules_apply_only_to_rvq():
    """Options of rvq set on another quantiser are not its business."""
    validate(Config(model=tiny_model_config("vqvae", "basic", "vq", quantizer_dropout=True,
                                            quantizer_dropout_min_stages=5)))


@pytest.mark.parametrize("preset", ["simvq", "rvq"])
def test_presets_build_their_quantiser(preset):
    cfg = build_config(preset, argparse.Namespace())
    model = build_model(cfg.model)
    assert model.quantizer_name == preset and model.bits_per_image == {
        "simvq": 16 * 14, "rvq": 16 * 4 * 10}[preset]


# ---------------------------------------------------------------- export and evaluation

@pytest.mark.parametrize("quantizer,overrides", [
    ("simvq", {}), ("rvq", {"num_quantizers": 2, "quantizer_dropout": True}),
    ("rvq", {"num_quantizers": 2, "stage_quantizer": "fsq"})])
def test_export_round_trip_keeps_frozen_codes_and_stages(tmp_path, quantizer, overrides):
    cfg = tiny_model_config("vqvae", "basic", quantizer, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():
        model(images(4, seed=1))
    model.eval()
    save_pretrained(model, tmp_path / "export", Config(model=cfg), step=3)
    torch.manual_seed(123)  # a different random init: everything must come from the files
    loaded = from_pretrained(tmp_path / "export")
    x = images(2, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, model(x).recon)
        assert torch.equal(loaded.encode_latents(x), model.encode_latents(x))


@pytest.fixture
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_evaluate_reports_bits_usage_and_per_stage_figures(synthetic_shards, tmp_path,
                                                           fresh_accelerate_state):
    from pipeline import evaluate
    from pipeline.report.figures import code_stages_of, code_usage_figure
    from pipeline.report.inputs import Checkpoint as ReportCheckpoint

    exports = {}
    for name, quantizer, overrides in [("simvq", "simvq", {}),
                                       ("rvq", "rvq", {"num_quantizers": 3})]:
        cfg = tiny_model_config("vqvae", "basic", quantizer, widths=[8, 16, 32], **overrides)
        torch.manual_seed(0)
        exports[name] = save_pretrained(build_model(cfg), tmp_path / name / "model",
                                        Config(model=cfg), step=1, run_dir=tmp_path / name)
    out = tmp_path / "eval"
    assert evaluate.main([*map(str, exports.values()), "--shards",
                          str(synthetic_shards / "val"), "--output", str(out),
                          "--max-samples", "32", "--batch-size", "16", "--num-workers", "0",
                          "--throughput-batches", "1"]) == 0
    simvq = json.loads((out / "simvq-step1" / "metrics.json").read_text())
    assert simvq["quantizer"] == "simvq" and simvq["bits_per_image"] == 8 * 8 * 5
    assert simvq["codebook_usage_per_stage"] == [simvq["codebook_usage"]]
    rvq = json.loads((out / "rvq-step1" / "metrics.json").read_text())
    assert rvq["quantizer"] == "rvq" and rvq["bits_per_image"] == 8 * 8 * 3 * 5
    assert len(rvq["codebook_usage_per_stage"]) == len(rvq["perplexity_per_stage"]) == 3
    assert rvq["codebook_usage"] == pytest.approx(sum(rvq["codebook_usage_per_stage"]) / 3)
    assert rvq["perplexity"] == pytest.approx(sum(rvq["perplexity_per_stage"]) / 3)
    counts = json.loads((out / "rvq-step1" / "code_usage.json").read_text())["counts"]
    assert len(counts) == 3 * 32
    for i, usage in enumerate(rvq["codebook_usage_per_stage"]):
        block = counts[32 * i:32 * (i + 1)]
        assert sum(block) == 32 * 64  # every image's 8x8 positions, once per stage
        assert usage == pytest.approx(100 * sum(c > 0 for c in block) / 32)
    report_ck = ReportCheckpoint(out / "rvq-step1" / "metrics.json", rvq, 0, "rvq")
    assert code_stages_of(report_ck, counts) == 3
    one_stage = ReportCheckpoint(out / "simvq-step1" / "metrics.json", simvq, 1, "simvq")
    assert code_stages_of(one_stage, counts) == 1
    panels = png_height(code_usage_figure(report_ck, counts).png)
    assert panels > 2.5 * png_height(code_usage_figure(one_stage, counts).png)


def png_height(png: bytes) -> int:
    return int.from_bytes(png[20:24], "big")  # the IHDR chunk's height


# ---------------------------------------------------------------- DDP

def _ddp_rvq_worker(rank: int, init_file: str) -> None:
    """One rank: same initial RVQ with dropout, different data; compare afterwards."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        rvq = dropout_rvq(stages=3, low=1)
        data = torch.Generator().manual_seed(100 + rank)
        kept = []
        for _ in range(6):
            out = rvq(torch.randn(2, 8, 2, 2, generator=data) + 5.0 * rank)
            kept.append(kept_stages(out))
            for stage in rvq.stages:
                for name in ("codebook", "embed_sum", "cluster_size"):
                    mine = getattr(stage, name)
                    both = [torch.empty_like(mine) for _ in range(2)]
                    dist.all_gather(both, mine)
                    assert torch.equal(both[0], both[1]), name
        drawn = [torch.zeros(6, dtype=torch.long) for _ in range(2)]
        dist.all_gather(drawn, torch.tensor(kept))
        assert torch.equal(drawn[0], drawn[1]) and len(set(kept)) > 1
    finally:
        dist.destroy_process_group()


def test_rvq_stages_and_dropout_identical_across_two_ddp_ranks(tmp_path):
    mp.spawn(_ddp_rvq_worker, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)
