"""`pipeline bench quality`: every variant at equal bits, end to end on small shards."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from pipeline.bench import quality
from pipeline.config import build_config
from pipeline.models import build_model
from pipeline.utils import PipelineError


def defaults(**changes) -> argparse.Namespace:
    args = quality.build_parser().parse_args([])
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def test_every_variant_codes_about_ten_bits_per_position_with_its_own_quantiser():
    args = defaults()
    seen = set()
    for name in quality.VARIANTS:
        overrides = quality.variant_overrides(name, args)
        namespace = argparse.Namespace(**{f"model.{k}": v for k, v in overrides.items()},
                                       **{"model.model": "vqvae"})
        model = build_model(build_config(args.preset, namespace).model)
        _, height, width = model.latent_shape
        assert model.bits_per_image / (height * width) == pytest.approx(10, abs=0.05), name
        seen.add((model.quantizer_name, model.config.codebook_ema,
                  model.config.l2_normalize_codes, model.config.rotation_trick,
                  model.config.dead_code_threshold > 0))
    assert len(seen) == len(quality.VARIANTS)  # no two variants train the same model


@pytest.mark.parametrize("argv,message", [
    (["--variants", "vq-ema,gan"], "--variants: unknown gan"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--shards", "/nonexistent"], "expected the split directories train/ and val/"),
])
def test_bad_options_are_refused_naming_them(argv, message):
    with pytest.raises(PipelineError, match=message):
        quality.check_args(quality.build_parser().parse_args(argv))


def test_bench_trains_and_evaluates_each_variant(synthetic_shards, tmp_path, capsys):
    assert quality.main(["--shards", str(synthetic_shards), "--variants", "vq-plain,rvq",
                         "--steps", "2", "--batch-size", "8", "--preset", "debug",
                         "--output", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON object alone
    rows = {row["variant"]: row for row in report["results"]}
    assert list(rows) == ["vq-plain", "rvq"]
    assert {row["quantizer"] for row in rows.values()} == {"vq", "rvq"}
    assert rows["vq-plain"]["bits_per_image"] == rows["rvq"]["bits_per_image"] == 64 * 10
    for row in rows.values():
        assert math.isfinite(row["psnr"]) and 0 < row["ssim"] < 1
        assert row["lpips"] is not None and row["lpips"] >= 0  # the stand-in network ran
        assert 0 < row["codebook_usage"] <= 100 and 0 < row["train_usage_window"] <= 100
        assert row["num_samples"] == 150
    assert len(rows["rvq"]["codebook_usage_per_stage"]) == 2
    assert report["settings"]["steps"] == 2
    assert (tmp_path / "eval" / "rvq-step2" / "metrics.json").is_file()
