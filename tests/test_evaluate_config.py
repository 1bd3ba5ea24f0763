"""`EvaluateConfig`: every option of `pipeline evaluate` as users' scripts spell it, its
default, its declared range and today's messages; no model, no shards."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import from_dict, to_yaml, undeclared_fields
from pipeline.evaluate import EvaluateConfig, build_parser, resolve_config
from pipeline.utils import PipelineError

REQUIRED = ["ckpt", "--shards", "val", "--output", "out"]

# The flags and defaults `pipeline evaluate` had before it had a typed config.
TODAYS_DEFAULTS = {"--batch-size": 64, "--num-workers": 2, "--max-samples": None,
                   "--worst-k": 16, "--vae-sigma": 0.05, "--throughput-batches": 5,
                   "--lpips-backbone": None, "--lpips-linear": None, "--lpips-net": "alex",
                   "--inception-weights": None, "--on-error": "warn", "--tracker": "none",
                   "--project": "ae-pipeline", "--run-name": None}
# A valid value of each, other than its default, and the field it must land in.
TODAYS_VALUES = {"--batch-size": ("8", 8), "--num-workers": ("0", 0),
                 "--max-samples": ("3", 3), "--worst-k": ("4", 4),
                 "--vae-sigma": ("0.1", 0.1), "--throughput-batches": ("2", 2),
                 "--lpips-backbone": ("a.pth", "a.pth"), "--lpips-linear": ("b.pth", "b.pth"),
                 "--lpips-net": ("vgg", "vgg"), "--inception-weights": ("i.pth", "i.pth"),
                 "--on-error": ("raise", "raise"), "--tracker": ("wandb", "wandb"),
                 "--project": ("p", "p"), "--run-name": ("r", "r")}


def config(*extra: str) -> EvaluateConfig:
    return resolve_config(build_parser().parse_args([*REQUIRED, *extra]))


def field_of(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def test_todays_defaults():
    cfg = config()
    assert (cfg.shards, cfg.output) == ("val", "out")
    assert {flag: getattr(cfg, field_of(flag)) for flag in TODAYS_DEFAULTS} == TODAYS_DEFAULTS


@pytest.mark.parametrize("flag", TODAYS_VALUES)
def test_todays_flags_and_the_field_spelling_set_the_same_field(flag):
    text, value = TODAYS_VALUES[flag]
    extra = ["--lpips-backbone", "a.pth"] if flag == "--lpips-linear" else []
    assert getattr(config(flag, text, *extra), field_of(flag)) == value
    assert getattr(config(f"--{field_of(flag)}", text, *extra), field_of(flag)) == value


def test_shards_and_output_stay_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["ckpt", "--shards", "val"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --output" in capsys.readouterr().err


def test_every_numeric_option_declares_its_range():
    assert undeclared_fields(EvaluateConfig) == []


@given(st.integers(min_value=-10 ** 6, max_value=10 ** 6))
def test_batch_size_range_and_message(value):
    if 1 <= value <= 65536:
        assert config(f"--batch-size={value}").batch_size == value
    else:
        with pytest.raises(PipelineError) as error:
            config(f"--batch-size={value}")
        assert str(error.value) == f"--batch-size must be between 1 and 65536, got {value}"


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_vae_sigma_range_and_message(value):
    if 0 < value <= 1:
        assert config(f"--vae-sigma={value!r}").vae_sigma == value
    else:  # `=`: argparse would read "-1e-05" as an option
        with pytest.raises(PipelineError, match=r"^--vae-sigma must be in \(0, 1\], got "):
            config(f"--vae-sigma={value!r}")


def test_a_value_of_the_wrong_type_names_the_option():
    with pytest.raises(PipelineError, match="--batch_size expects int, got 'many'"):
        config("--batch-size", "many")
    with pytest.raises(PipelineError, match="unknown --lpips-net 'resnet'; choose one of alex"):
        config("--lpips-net", "resnet")


def test_lpips_linear_alone_is_refused():
    with pytest.raises(PipelineError, match="--lpips-linear needs --lpips-backbone"):
        config("--lpips-linear", "b.pth")


def test_the_saved_config_reads_back_as_the_same_config():
    import yaml

    cfg = config("--batch-size", "8", "--max-samples", "3", "--lpips-net", "vgg")
    assert from_dict(EvaluateConfig, yaml.safe_load(to_yaml(cfg))) == cfg


def test_the_public_names_of_the_earlier_module_stay_importable():
    from pipeline import evaluate

    names = ("main", "build_parser", "check_args", "load_checkpoints", "Checkpoint",
             "checkpoint_identity", "checkpoint_dir", "check_resolution", "safe_component",
             "Evaluation", "run_pass", "summarize", "per_class_psnr", "expected_samples",
             "settings", "scale_sizes", "metrics_record", "write_checkpoint_dir",
             "fixed_image_files", "load_fixed_images", "png_strip", "error_maps", "to_uint8",
             "measure_throughput", "evaluate_checkpoint", "on_main_process", "lock_output",
             "load_optional_metrics", "log_to_wandb", "print_table", "summarize_run",
             "warn_if_incomplete", "TABLE_COLUMNS", "NUM_FIXED_IMAGES", "PRIOR_SEED",
             "DEFAULT_VAE_SIGMA", "LOCK_NAME", "MAX_STEP", "atomic_write_json")
    assert [n for n in names if not hasattr(evaluate, n)] == []
